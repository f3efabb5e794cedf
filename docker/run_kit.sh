#!/usr/bin/env bash
# Entry point of Dockerfile.jetson: verify the mounted bundle, build its engines, benchmark them.
#   run-kit [fp32|fp16|int8 ...]        (default: int8)
set -euo pipefail

BUNDLE="${BUNDLE:-/bundle}"
[[ -f "$BUNDLE/kit/bench_on_device.py" ]] || {
  echo "run-kit: no bundle at $BUNDLE (mount one: docker run -v /path/to/bundle:$BUNDLE ...)" >&2
  exit 2
}
if (($# == 0)); then
  set -- int8
fi
python3 "$BUNDLE/kit/bench_on_device.py" --bundle "$BUNDLE" --check-only
bash "$BUNDLE/kit/build_engine.sh" "$@"
mkdir -p "$BUNDLE/device_runs"
python3 "$BUNDLE/kit/bench_on_device.py" --bundle "$BUNDLE" --backend tensorrt --precision "$@" \
  --out "$BUNDLE/device_runs/bench_$(hostname)_$(date -u +%Y%m%d-%H%M%S).json"
