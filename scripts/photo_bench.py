"""Pillow + onnxruntime side of scripts/photo_to_label.sh.

  photo_bench.py make SRC_DIR OUT_DIR [COUNT]     upscales the images under SRC_DIR (sorted; the
                                                  first COUNT, default all) to 12 megapixels,
                                                  aspect kept (500x375 -> 4000x3000), JPEG quality
                                                  92, keeping the class folder
  photo_bench.py time MODEL.onnx FILTER PHOTO...  photo to label, one thread: Pillow draft decode
                                                  (libjpeg DCT scaling to >= 256 pixels) + resize
                                                  (FILTER: bilinear or bicubic) of the shorter side
                                                  to 256 + centre crop 224 + (x - 127) / 128 +
                                                  onnxruntime; prints one JSON line
                                                  {"ms": total for all photos, "per_photo_ms": ...}
                                                  (session creation excluded)
"""
import json
import math
import pathlib
import sys
import time

import numpy as np


def make(src, out, count=None):
    from PIL import Image

    paths = sorted(p for p in pathlib.Path(src).rglob("*")
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if count is not None:
        paths = paths[:count]
    for path in paths:
        target = pathlib.Path(out) / path.relative_to(src).with_suffix(".jpg")
        if target.exists():
            continue
        image = Image.open(path).convert("RGB")
        w, h = image.size
        scale = math.sqrt(12e6 / (w * h))
        target.parent.mkdir(parents=True, exist_ok=True)
        image.resize((round(w * scale), round(h * scale)), Image.BICUBIC).save(target, quality=92)
    print(f"{len(paths)} photos of about 12 megapixels in {out}")


def timing(model, filter_name, photos):
    import onnxruntime as ort
    from PIL import Image

    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[filter_name]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    started = time.perf_counter()
    for path in photos:
        image = Image.open(path)
        image.draft("RGB", (256, 256))
        image = image.convert("RGB")
        w, h = image.size
        scale = 256 / min(w, h)
        image = image.resize((max(256, round(w * scale)), max(256, round(h * scale))), resample)
        w, h = image.size
        left, top = (w - 224) // 2, (h - 224) // 2
        image = image.crop((left, top, left + 224, top + 224))
        x = ((np.asarray(image, np.float32) - 127.0) / 128.0).transpose(2, 0, 1)[None]
        sess.run(None, {name: np.ascontiguousarray(x)})
    ms = (time.perf_counter() - started) * 1e3
    print(json.dumps({"ms": ms, "per_photo_ms": ms / len(photos), "photos": len(photos)}))


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else None)
    elif len(sys.argv) >= 5 and sys.argv[1] == "time":
        timing(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(__doc__)
