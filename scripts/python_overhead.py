#!/usr/bin/env python3
"""The Python module's import time and per-image overhead over the Rust call (docs/PERFORMANCE.md).

usage: target/py-test/bin/python scripts/python_overhead.py MODEL.graft IMAGE [ROUNDS]
(after scripts/test_python.sh; needs the wheel, numpy and pillow in that Python, and
`cargo build --release -p graft-runtime --example classify_loop`).

Import: median wall time of `python -c "import graft_runtime"` minus `python -c "pass"` over 20
runs each, alternated. Per image: `model.predict_array(frame)` on a decoded RGB array, and the
same decoded image through `Model::classify` in Rust (runtime/examples/classify_loop.rs), 200
calls each, in alternating rounds; the medians' difference is the overhead (array checks and the
copy into the runtime's image buffer, the GIL release, the result list).
"""
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

import graft_runtime

REPO = Path(__file__).resolve().parents[1]
model_path, image_path = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
loop = REPO / "target" / "release" / "examples" / "classify_loop"


def wall(code):
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return (time.perf_counter() - started) * 1e3


bare, imported = [], []
for _ in range(20):
    bare.append(wall("pass"))
    imported.append(wall("import graft_runtime"))
print(f"import graft_runtime: {statistics.median(imported) - statistics.median(bare):.1f} ms "
      f"(python -c pass {statistics.median(bare):.1f} ms, with the import "
      f"{statistics.median(imported):.1f} ms)")

model = graft_runtime.Model(model_path)
frame = np.asarray(Image.open(image_path).convert("RGB"))
for _ in range(5):
    model.predict_array(frame)
python_ms, rust_ms = [], []
for r in range(rounds):
    times = []
    for _ in range(200):
        started = time.perf_counter()
        model.predict_array(frame)
        times.append((time.perf_counter() - started) * 1e3)
    python_ms.append(statistics.median(times))
    out = subprocess.run([loop, model_path, image_path, "200"], check=True,
                         capture_output=True, text=True)
    rust_ms.append(float(out.stdout))
    print(f"round {r + 1}: python predict_array {python_ms[-1]:.3f} ms, rust classify {rust_ms[-1]:.3f} ms")
p, r = statistics.median(python_ms), statistics.median(rust_ms)
print(f"per image: python {p:.3f} ms, rust {r:.3f} ms, overhead {p - r:+.3f} ms ({(p / r - 1) * 100:+.1f} %)"
      f"; frame {frame.shape[1]}x{frame.shape[0]}")
