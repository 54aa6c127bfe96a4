"""onnxruntime side of scripts/bench_vs_onnxruntime.sh.

  ort_bench.py quantize MODEL.onnx TRAIN_DIR OUT.onnx   static int8 (QDQ, per-channel int8 weights,
                                                         uint8 activations), calibrated on 32
                                                         training images (seeded choice)
  ort_bench.py time MODEL.onnx RUNS                      one thread, batch 1: prints one JSON line
                                                         {"p50_ms": ..., "load_ms": ...}
  ort_bench.py profile MODEL.onnx RUNS [NODES=25]        one thread, batch 1, onnxruntime's profiler:
                                                         median time per operator type and the 25
                                                         slowest nodes (profiling adds ~10 %)

Preprocessing for calibration is the artifact's (shorter side 256 bilinear, centre crop 224,
(x - 127) / 128), done with Pillow.
"""
import json
import os
import pathlib
import random
import shutil
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort


def preprocess(path):
    from PIL import Image

    image = Image.open(path).convert("RGB")
    w, h = image.size
    scale = 256 / min(w, h)
    image = image.resize((max(224, round(w * scale)), max(224, round(h * scale))), Image.BILINEAR)
    w, h = image.size
    left, top = (w - 224) // 2, (h - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    x = (np.asarray(image, np.float32) - 127.0) / 128.0
    return x.transpose(2, 0, 1)[None]


def quantize(model, train_dir, out):
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    images = sorted(p for p in pathlib.Path(train_dir).rglob("*")
                    if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    random.Random(42).shuffle(images)
    name = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: preprocess(p)} for p in images[:32]])

        def get_next(self):
            return next(self.batches, None)

    prepared = out + ".prep.onnx"
    quant_pre_process(model, prepared)
    quantize_static(prepared, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    print(f"wrote {out} (calibrated on {min(32, len(images))} images from {train_dir})")


def timing(model, runs):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    started = time.perf_counter()
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - started) * 1e3
    inp = sess.get_inputs()[0].name
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    for _ in range(10):
        sess.run(None, {inp: x})
    lat = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {inp: x})
        lat.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"p50_ms": float(np.median(lat)), "load_ms": load_ms, "runs": runs}))


def profile(model, runs, nodes=25):
    import collections

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.enable_profiling = True
    # onnxruntime writes the profile where the prefix says; keep it out of the working tree.
    scratch = tempfile.mkdtemp()
    opts.profile_file_prefix = os.path.join(scratch, "ort_profile")
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    for _ in range(runs + 20):
        sess.run(None, {inp: x})
    events = json.load(open(sess.end_profiling()))
    shutil.rmtree(scratch)
    times, kinds = collections.defaultdict(list), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            times[node].append(e["dur"])
            kinds[node] = e["args"].get("op_name")
    rows = [(float(np.median(v[20:])) / 1e3, node, kinds[node]) for node, v in times.items()]
    per_kind = collections.Counter()
    for ms, _, kind in rows:
        per_kind[kind] += ms
    print(f"{sum(per_kind.values()):.2f} ms per image, by operator:")
    for kind, ms in per_kind.most_common():
        print(f"  {ms:6.2f} ms  {kind}")
    print("slowest nodes:")
    for ms, node, kind in sorted(rows, reverse=True)[:nodes]:
        print(f"  {ms:6.3f} ms  {node} ({kind})")


if __name__ == "__main__":
    if sys.argv[1] == "quantize":
        quantize(*sys.argv[2:5])
    elif sys.argv[1] == "time":
        timing(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "profile":
        profile(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 25)
    else:
        sys.exit(__doc__)
