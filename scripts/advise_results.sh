#!/usr/bin/env bash
# The "Choosing what to transfer" table of docs/RESULTS.md: graft advise on a shared dataset
# (probe accuracy by cut depth, similarity, recommendation, plot), then the default compile and
# the compile that follows the advice (--strategy auto), with their validation accuracies.
#
# usage: scripts/advise_results.sh DATASET [SHARED_DIR]
#   DATASET     hymenoptera, flowers5 or cifar10-mini
#   SHARED_DIR  default ../shared
# Writes target/advise/DATASET/{advice.txt,advice.json,probes.svg,default.graft,auto.graft}.
# GRAFT=path/to/graft runs that binary instead of building target/release/graft (a long run is not
# disturbed by rebuilds in the meantime).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?dataset name}
shared=${2:-../shared}
out=target/advise/$data
mkdir -p "$out"
if [ -z "${GRAFT:-}" ]; then
  cargo build --release --quiet -p graft-compiler
fi
graft=${GRAFT:-./target/release/graft}
common=(--backbone "$shared/backbones/efficientnet_lite0.onnx" --data "$shared/datasets/$data"
  --cache-dir target/strategies/cache)
echo "== $data: graft advise"
/usr/bin/time -f "wall %es, peak RSS %MkB" "$graft" advise "${common[@]}" \
  --plot "$out/probes.svg" --json >"$out/advice.json"
"$graft" advise "${common[@]}" --quiet | tee "$out/advice.txt"
for strategy in head auto; do
  name=$([ "$strategy" = head ] && echo default || echo auto)
  echo "== $data: graft compile --strategy $strategy"
  /usr/bin/time -f "wall %es, peak RSS %MkB" "$graft" compile "${common[@]}" \
    --out "$out/$name.graft" --strategy "$strategy" 2>&1 |
    grep -E "^(advice    compiling|kept|finetune|trained|check|validation accuracy|wall)"
done
