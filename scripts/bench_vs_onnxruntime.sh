#!/usr/bin/env bash
# One run, one machine: graft's runtime on an artifact of the unmodified EfficientNet-Lite0 (its
# own ImageNet head, softmax appended) against onnxruntime (Python) and tract on the original ONNX.
# Batch 1, one thread everywhere. docs/PERFORMANCE.md quotes the output.
#
# usage: scripts/bench_vs_onnxruntime.sh [RUNS]     (default 200)
# Installs onnxruntime and numpy into target/bench-venv (pip), unless BENCH_PYTHON names a Python
# that already has them.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-200}
venv=target/bench-venv
if [ -n "${BENCH_PYTHON:-}" ]; then
  python=$BENCH_PYTHON
else
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q onnxruntime numpy
  python=$venv/bin/python
fi
cargo build --release --quiet -p graft-compiler --bin graft --example onnx_baseline
model=target/bench-imagenet.graft
./target/release/graft compile --quiet --backbone fixtures/efficientnet_lite0.onnx --keep-imagenet-head \
  --labels fixtures/imagenet-labels.txt --normalize tf --out "$model" >/dev/null

echo "== graft runtime (artifact: Lite0 + ImageNet head + softmax)"
./target/release/graft bench "$model" fixtures/golden/0000_n01440764.png --iterations "$runs" --threads 1
echo "== graft runtime, tract's own operators (--tract-kernels)"
./target/release/graft bench "$model" fixtures/golden/0000_n01440764.png --iterations "$runs" --threads 1 --tract-kernels
echo "== tract on the original ONNX"
./target/release/examples/onnx_baseline fixtures/efficientnet_lite0.onnx "$runs"
echo "== onnxruntime $("$python" -c 'import onnxruntime; print(onnxruntime.__version__)') on the original ONNX"
"$python" - fixtures/efficientnet_lite0.onnx "$runs" <<'PY'
import sys, time
import numpy as np
import onnxruntime as ort
path, runs = sys.argv[1], int(sys.argv[2])
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
loads = []
for _ in range(5):
    t = time.perf_counter()
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    loads.append((time.perf_counter() - t) * 1e3)
x = np.zeros((1, 3, 224, 224), np.float32)
for _ in range(10):
    sess.run(None, {"input": x})
lat = []
for _ in range(runs):
    t = time.perf_counter()
    sess.run(None, {"input": x})
    lat.append((time.perf_counter() - t) * 1e3)
print(f"onnxruntime: session load p50 {np.median(loads):.1f} ms, latency p50 {np.median(lat):.2f} ms (1 thread, batch 1, {runs} runs)")
PY
