#!/usr/bin/env bash
# Training speed under CPU contention: `--threads auto` against 1 thread and all cores, on an idle machine and
# with one core taken by a busy loop (the new user's case in docs/BENCHMARKS.md, Threads). Prints JSON lines.
set -euo pipefail

all=$(python3 -c "import os; print(len(os.sched_getaffinity(0)))")
bench() {
  transfigure bench train --recipe cyclegan --size 64 --steps 16 --json --set cyclegan.batch_size=4 "$@"
}
measure() {
  local load=$1
  for threads in auto 1 "$all"; do
    for repeat in 1 2; do
      echo "{\"load\": \"$load\", \"threads\": \"$threads\", \"repeat\": $repeat, \"result\": $(bench --threads "$threads")}"
    done
  done
}

measure idle
python3 -c "while True: pass" &
busy=$!
trap 'kill $busy' EXIT
sleep 1
measure "one core busy"
