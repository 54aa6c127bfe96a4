#!/usr/bin/env bash
# The transfer-strategy table of docs/RESULTS.md: EfficientNet-Lite0 on a shared dataset with a
# new head only, fine-tuning the top 2 / top 4 blocks, fine-tuning every layer, and training
# every layer from random weights. Prints each run's summary lines and wall time.
#
# usage: scripts/strategy_results.sh DATASET [EPOCHS_FULL] [SHARED_DIR] [ROWS]
#   DATASET      hymenoptera, flowers5 or cifar10-mini
#   EPOCHS_FULL  epochs for "all layers" and "scratch" (default 3)
#   SHARED_DIR   default ../shared
#   ROWS         which rows, default "head top2 top4 all scratch"
# GRAFT=path/to/graft runs that binary instead of building target/release/graft.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?dataset name}
full_epochs=${2:-3}
shared=${3:-../shared}
rows=${4:-head top2 top4 all scratch}
out=target/strategies/$data
mkdir -p "$out"
if [ -z "${GRAFT:-}" ]; then
  cargo build --release --quiet -p graft-compiler
fi
graft=${GRAFT:-./target/release/graft}
run() {
  local name=$1
  shift
  echo "== $data $name: graft compile $*"
  /usr/bin/time -f "wall %es, peak RSS %MkB" "$graft" compile \
    --backbone "$shared/backbones/efficientnet_lite0.onnx" \
    --data "$shared/datasets/$data" \
    --out "$out/$name.graft" --cache-dir target/strategies/cache "$@" 2>&1 |
    grep -E "^(kept|finetune|scratch|trained|check|verify|validation accuracy|wall)"
}
for row in $rows; do
  case $row in
    head) run head ;;
    top2) run top2 --strategy finetune --unfreeze 2 ;;
    top4) run top4 --strategy finetune --unfreeze 4 ;;
    all) run all --strategy finetune --unfreeze all --finetune-epochs "$full_epochs" ;;
    scratch) run scratch --strategy scratch --finetune-epochs "$full_epochs" ;;
    *) echo "unknown row $row: expected head, top2, top4, all or scratch" >&2; exit 1 ;;
  esac
done
