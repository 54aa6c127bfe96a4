#!/usr/bin/env bash
# The transfer-strategy table of docs/RESULTS.md: EfficientNet-Lite0 on a shared dataset with a
# new head only, fine-tuning the top 2 / top 4 blocks, fine-tuning every layer, and training
# every layer from random weights. Prints each run's summary lines and wall time.
#
# usage: scripts/strategy_results.sh DATASET [EPOCHS_FULL] [SHARED_DIR]
#   DATASET      hymenoptera, flowers5 or cifar10-mini
#   EPOCHS_FULL  epochs for "all layers" and "scratch" (default 3: ~5 min an epoch on 2 cores
#                for hymenoptera)
#   SHARED_DIR   default ../shared
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?dataset name}
full_epochs=${2:-3}
shared=${3:-../shared}
out=target/strategies/$data
mkdir -p "$out"
cargo build --release --quiet -p graft-compiler
run() {
  local name=$1
  shift
  echo "== $data $name: graft compile $*"
  /usr/bin/time -f "wall %es, peak RSS %MkB" ./target/release/graft compile \
    --backbone "$shared/backbones/efficientnet_lite0.onnx" \
    --data "$shared/datasets/$data" \
    --out "$out/$name.graft" --cache-dir target/strategies/cache "$@" 2>&1 |
    grep -E "^(kept|finetune|scratch|trained|check|verify|validation accuracy|wall)"
}
run head
run top2 --strategy finetune --unfreeze 2
run top4 --strategy finetune --unfreeze 4
run all --strategy finetune --unfreeze all --finetune-epochs "$full_epochs"
run scratch --strategy scratch --finetune-epochs "$full_epochs"
