#!/usr/bin/env bash
# The CPU's int8 (and bf16) against float32 and the PyTorch loop: the candidates side by side, then translate and
# the engine at 256x256 and 512x512 with `--precisions fp32,int8`.
set -euo pipefail
grep -m1 -o -w -E 'amx_int8|amx_bf16|avx512_vnni|avx_vnni|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ' || true
echo
python benchmarks/cpu_precision_candidates.py --size 256
transfigure bench inference --arch resnet_9blocks --size 256 --batch-sizes 1 --precisions fp32,int8 --n-images 16
transfigure bench inference --arch resnet_9blocks --size 512 --batch-sizes 1 --precisions fp32,int8 --n-images 8
