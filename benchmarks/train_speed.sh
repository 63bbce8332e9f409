#!/usr/bin/env bash
# Training speed of cyclegan; `train_speed.sh gpu` adds the fp32 / bf16 channels-last / compiled comparison.
set -euo pipefail

reference=(--set cyclegan.generator.arch=resnet_9blocks --set cyclegan.generator.ngf=64
  --set cyclegan.discriminator.kind=basic --set cyclegan.discriminator.ndf=64 --set cyclegan.batch_size=1)

if [[ "${1:-cpu}" == gpu ]]; then
  for precision in fp32 bf16; do
    transfigure bench train --recipe cyclegan --size 32 --steps 200 --json --precision "$precision"
    transfigure bench train --recipe cyclegan --size 256 --steps 50 --json "${reference[@]}" \
      --precision "$precision"
  done
  transfigure bench train --recipe cyclegan --size 256 --steps 50 --json "${reference[@]}" \
    --precision bf16 --set cyclegan.compile=true
else
  transfigure bench train --recipe cyclegan --size 32 --steps 100 --json --set cyclegan.device=cpu
  transfigure bench train --recipe cyclegan --size 256 --steps 5 --json "${reference[@]}" --set cyclegan.device=cpu
fi
