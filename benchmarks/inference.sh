#!/usr/bin/env bash
# translate and the engine against the eager PyTorch loop; `inference.sh gpu` adds CUDA and TensorRT fp16.
set -euo pipefail

if [[ "${1:-cpu}" == gpu ]]; then
  # PEAK_TFLOPS (the GPU's dense fp16 peak, e.g. 989 for an H100 SXM) adds the fraction of it reached.
  transfigure bench inference --arch resnet_9blocks --size 256 --batch-sizes 1,8,32 --providers cuda,tensorrt \
    --tensorrt-fp16 --n-images 96 ${PEAK_TFLOPS:+--peak-tflops "$PEAK_TFLOPS"}
else
  transfigure bench inference --arch resnet_9blocks --size 256 --batch-sizes 1,8 --providers cpu --n-images 24
fi
