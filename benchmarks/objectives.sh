#!/usr/bin/env bash
# Every objective and the flow generators on ring8 and grid25, 3 seeds; scatter plots in reports/bench/.
set -euo pipefail
transfigure bench objectives "$@"
