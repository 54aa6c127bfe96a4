#!/usr/bin/env bash
# Training throughput against the PyTorch CPU anchor (issue 22), alternating the two tools:
# for each round and each case, one `graft compile` epoch, then one PyTorch epoch (three each
# for the top 2 blocks)
# (scripts/train_anchor.py) on the same images, batch 16, the same augmentation ranges, both
# on all the machine's cores. Prints graft's "trained ... images/s forward+backward" and the
# anchor's images/s (both time only the training steps: forward, backward, optimizer), and the
# peak RSS of each whole process.
#
# usage: scripts/training_anchor.sh [DATASET] [ROUNDS] [SHARED_DIR] [CASES]
#   DATASET     default hymenoptera (245 training images)
#   ROUNDS      default 2
#   SHARED_DIR  default ../shared
#   CASES       default "all scratch top2"
# needs: python3 with torch, onnx2torch, onnx, pillow (target/torch-venv is made if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-hymenoptera}
rounds=${2:-2}
shared=${3:-../shared}
cases=${4:-all scratch top2}
backbone=$shared/backbones/efficientnet_lite0.onnx
out=target/anchor
mkdir -p "$out"
venv=target/torch-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch onnx2torch onnx pillow numpy
fi
cargo build --release --quiet -p graft-compiler
threads=$(nproc)
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads threads;" \
  "$("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'); $(date -u +%F\ %H:%M)"
graft() {
  local case=$1 epochs=$2
  shift 2
  /usr/bin/time -f "peak %M kB" -o "$out/time.txt" ./target/release/graft compile \
    --backbone "$backbone" --data "$shared/datasets/$data" --out "$out/$case.graft" \
    --no-cache --no-verify --finetune-epochs "$epochs" --threads "$threads" "$@" > "$out/graft.log" 2>&1
  local rate
  rate=$(grep -o '[0-9.]* images/s forward+backward' "$out/graft.log" | cut -d' ' -f1)
  echo "$case graft $rate images/s, $(cat "$out/time.txt")"
}
anchor() {
  local case=$1
  shift
  "$venv/bin/python" scripts/train_anchor.py --backbone "$backbone" \
    --data "$shared/datasets/$data" --threads "$threads" --tmp "$out/torch" "$@" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(sys.argv[1], "pytorch", r["images_per_s"], "images/s, peak", r["peak_rss_mib"] * 1024, "kB")' "$case"
}
for round in $(seq "$rounds"); do
  echo "== round $round"
  for case in $cases; do
    case $case in
      all)
        graft all 1 --strategy finetune --unfreeze all
        anchor all
        ;;
      scratch)
        graft scratch 1 --strategy scratch
        anchor scratch --scratch
        ;;
      top2)
        # The top 2 blocks train an epoch in under a second: three epochs each, for steadier rates.
        graft top2 3 --strategy finetune --unfreeze 2
        anchor top2 --boundary /_blocks.14/Add_output_0 --epochs 3
        ;;
      *) echo "unknown case $case: expected all, scratch or top2" >&2; exit 1 ;;
    esac
  done
done
