#!/usr/bin/env bash
# The HTTP service: requests/s and p50/p99 at 1, 8 and 32 clients, --max-batch 1 against 8, 128x128 photos.
set -euo pipefail
transfigure bench serve --arch resnet_9blocks --size 128 --clients 1,8,32 --max-batches 1,8 \
  --requests-per-client 6 --repeats 2 "$@"
