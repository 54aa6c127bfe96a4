#!/usr/bin/env bash
# Compiles EfficientNet-Lite0 on each shared dataset with default options (frozen backbone,
# linear head) and prints the lines docs/RESULTS.md quotes. Cold feature cache, so the timings
# include feature extraction.
#
# usage: scripts/transfer_results.sh [SHARED_DIR]     (default: ../shared)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared}
out=target/results
rm -rf "$out" && mkdir -p "$out"
cargo build --release --quiet -p graft-compiler
for data in hymenoptera flowers5 cifar10-mini; do
  echo "== $data"
  /usr/bin/time -f "wall %es, peak RSS %MkB" ./target/release/graft compile \
    --backbone "$shared/backbones/efficientnet_lite0.onnx" \
    --data "$shared/datasets/$data" \
    --out "$out/$data.graft" --cache-dir "$out/cache" 2>&1 |
    grep -E "^(normalize|data|features|kept|verify|validation accuracy|wrote|wall)"
done
