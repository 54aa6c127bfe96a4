# Sourced by the benchmark scripts: sets `python` to a Python with onnxruntime, onnx, numpy,
# Pillow and sympy: $BENCH_PYTHON when set, else target/bench-venv (created and filled by pip).
venv=target/bench-venv
if [ -n "${BENCH_PYTHON:-}" ]; then
  python=$BENCH_PYTHON
else
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q onnxruntime onnx numpy pillow sympy
  python=$venv/bin/python
fi
