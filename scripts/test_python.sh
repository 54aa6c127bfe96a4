#!/usr/bin/env bash
# Builds the Python wheel (bindings/python) with maturin, installs it into a fresh virtual
# environment and runs its pytest suite against the release binaries (run after
# `cargo build --release` or the README's test command; CI runs it).
#   scripts/test_python.sh            # wheel in target/wheels, venvs in target/py-*
set -euo pipefail
cd "$(dirname "$0")/.."

# The module wraps the runtime alone: no candle, no ONNX importer, no clap.
tree=$(cargo tree --locked --manifest-path bindings/python/Cargo.toml -e normal)
if grep -E " (candle-core|tract-onnx|clap) " <<<"$tree"; then
  echo "bindings/python depends on the compiler's crates or clap" >&2
  exit 1
fi

python3 -m venv target/py-build
target/py-build/bin/pip install -q "maturin>=1.7,<2"
rm -f target/wheels/graft_runtime-*.whl
target/py-build/bin/maturin build --release --locked -m bindings/python/Cargo.toml \
  --target-dir target -o target/wheels

rm -rf target/py-test
python3 -m venv target/py-test
target/py-test/bin/pip install -q target/wheels/graft_runtime-*.whl pytest pillow
target/py-test/bin/python -m pytest -q bindings/python/tests
