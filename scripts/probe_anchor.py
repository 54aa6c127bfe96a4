#!/usr/bin/env python3
"""The linear-probe anchor of docs/RESULTS.md: onnxruntime features of EfficientNet-Lite0 +
scikit-learn logistic regression (C=1, no tuning; on raw and on standardised features), trained
on the train split, measured once on
the held-out split (val, or test for cifar10-mini). No choice is made on the held-out images.

usage: python3 scripts/probe_anchor.py [SHARED_DIR]     (needs: numpy pillow onnx onnxruntime scikit-learn)

Preprocessing as graft's default for Lite0: shorter side to 256 (bilinear), centre crop 224,
(x - 127) / 128, RGB, NCHW; features are the model's `features` output (1280 values).
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

SHARED = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..", "shared")
EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")


def tensor(path):
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - 224) // 2, (h - 224) // 2
    im = im.crop((left, top, left + 224, top + 224))
    x = (np.asarray(im, np.float32) - 127.0) / 128.0
    return x.transpose(2, 0, 1)


def split(root, classes):
    paths, labels = [], []
    for label, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(root, c))):
            if f.lower().endswith(EXTENSIONS):
                paths.append(os.path.join(root, c, f))
                labels.append(label)
    return paths, np.array(labels)


def features(session, paths):
    out = []
    for p in paths:
        try:
            x = tensor(p)[None]
        except Exception:  # undecodable files are skipped, as graft skips them
            out.append(None)
            continue
        out.append(session.run(["features"], {"input": x})[0][0])
    return out


def main():
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    model = onnx.load(os.path.join(SHARED, "backbones", "efficientnet_lite0.onnx"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    for data, held in [("hymenoptera", "val"), ("flowers5", "val"), ("cifar10-mini", "test")]:
        root = os.path.join(SHARED, "datasets", data)
        classes = sorted(d for d in os.listdir(os.path.join(root, "train"))
                         if os.path.isdir(os.path.join(root, "train", d)))
        result = {}
        for name in ("train", held):
            paths, labels = split(os.path.join(root, name), classes)
            feats = features(session, paths)
            keep = [i for i, f in enumerate(feats) if f is not None]
            result[name] = (np.stack([feats[i] for i in keep]), labels[keep])
        scores = []
        for standardise in (False, True):
            (xt, yt), (xh, yh) = result["train"], result[held]
            if standardise:
                scaler = StandardScaler().fit(xt)
                xt, xh = scaler.transform(xt), scaler.transform(xh)
            probe = LogisticRegression(C=1.0, max_iter=5000).fit(xt, yt)
            scores.append(probe.score(xh, yh))
        print(f"{data:13} train {len(result['train'][1])} / {held} {len(result[held][1])}: "
              f"logistic regression (C=1) {held} accuracy {scores[0]:.4f} on raw features, "
              f"{scores[1]:.4f} standardised")


if __name__ == "__main__":
    main()
