#!/usr/bin/env bash
# graft's runtime against onnxruntime on EfficientNet-Lite0, batch 1, one thread, f32 and int8.
# docs/PERFORMANCE.md quotes the output.
#
#   graft f32    the default `graft compile` of hymenoptera (Lite0 + a 2-class head), timed by
#                `graft-run bench` (the deployed runtime)
#   graft int8   the same compile with `--precision int8`
#   ort f32      onnxruntime on the original Lite0 ONNX
#   ort int8     onnxruntime's static int8 quantization of it, made here: QDQ, per-channel int8
#                weights, uint8 activations, 32 calibration images from hymenoptera/train
#
# The four are timed one after the other, ROUNDS times (the VM's speed drifts, so they alternate),
# RUNS timed runs each; the script prints every round, the medians and the ratios.
#
# usage: scripts/bench_vs_onnxruntime.sh [RUNS=200] [ROUNDS=3] [SHARED=../shared]
# Installs onnxruntime, onnx, numpy, Pillow and sympy into target/bench-venv (pip), unless BENCH_PYTHON
# names a Python that has them.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-200}
rounds=${2:-3}
shared=${3:-../shared}
source scripts/bench_python.sh
cargo build --release --quiet -p graft-compiler --bin graft -p graft-runtime --bin graft-run
graft=./target/release/graft
graft_run=./target/release/graft-run
out=target/bench-ort
mkdir -p "$out"
backbone=$shared/backbones/efficientnet_lite0.onnx
data=$shared/datasets/hymenoptera

echo "== machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
  "$(grep -m1 '^flags' /proc/cpuinfo | grep -ow 'avx2\|avx512f\|avx512_vnni\|avx_vnni' | xargs)"
for precision in f32 int8; do
  [ -f "$out/graft_$precision.graft" ] || "$graft" compile --quiet --backbone "$backbone" --data "$data" \
    --precision "$precision" --cache-dir "$out/cache" --out "$out/graft_$precision.graft" >/dev/null
done
[ -f "$out/ort_int8.onnx" ] || "$python" scripts/ort_bench.py quantize "$backbone" "$data/train" "$out/ort_int8.onnx"
"$python" - "$out" <<'PY'
import sys, onnx
out = sys.argv[1]
model = onnx.load(f"{out}/ort_int8.onnx")
ops = {}
for node in model.graph.node:
    ops[node.op_type] = ops.get(node.op_type, 0) + 1
print("ort int8 model:", ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
PY

graft_p50() {
  "$graft_run" bench "$1" --iterations "$runs" --threads 1 --batch 1 --json |
    "$python" -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["latency"]["p50_ms"])'
}
ort_p50() {
  "$python" scripts/ort_bench.py time "$1" "$runs" |
    "$python" -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["p50_ms"])'
}
results=$out/rounds.txt
: > "$results"
for round in $(seq "$rounds"); do
  a=$(graft_p50 "$out/graft_f32.graft")
  b=$(graft_p50 "$out/graft_int8.graft")
  c=$(ort_p50 "$backbone")
  d=$(ort_p50 "$out/ort_int8.onnx")
  echo "round $round: graft f32 $a ms, graft int8 $b ms, ort f32 $c ms, ort int8 $d ms (p50 of $runs)"
  echo "$a $b $c $d" >> "$results"
done
"$python" - "$results" <<'PY'
import sys, statistics
rows = [list(map(float, line.split())) for line in open(sys.argv[1])]
gf, gi, of, oi = (statistics.median(col) for col in zip(*rows))
print(f"medians: graft f32 {gf:.2f} ms, graft int8 {gi:.2f} ms, ort f32 {of:.2f} ms, ort int8 {oi:.2f} ms")
print(f"graft f32 / ort f32 = {gf / of:.2f}x; graft int8 / ort int8 = {gi / oi:.2f}x; "
      f"graft int8 / graft f32 = {gi / gf:.2f}x")
PY
