#!/usr/bin/env python3
"""Cheap levers for a linear head on cifar10-mini, measured on the training images only
(stratified 5-fold cross-validation on the 2,000 train images; the test split is never read),
for issue 16's "+3 points over the probe" (docs/RESULTS.md).

usage: python3 scripts/cifar_levers.py [SHARED_DIR]   (needs numpy pillow onnx onnxruntime scikit-learn)

Features: onnxruntime's Lite0 `features` output (1280 values), `(x - 127) / 128`, under two
framings of the 32x32 images: "crop" (bilinear to 256, centre crop 224: graft's default) and
"whole" (bilinear to 224, nothing cut away); and of the horizontally flipped images.
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

SHARED = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..", "shared")
root = os.path.join(SHARED, "datasets", "cifar10-mini", "train")
classes = sorted(os.listdir(root))
paths, labels = [], []
for label, c in enumerate(classes):
    for f in sorted(os.listdir(os.path.join(root, c))):
        paths.append(os.path.join(root, c, f))
        labels.append(label)
y = np.array(labels)

model = onnx.load(os.path.join(SHARED, "backbones", "efficientnet_lite0.onnx"))
model.graph.output.append(onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, None))
options = ort.SessionOptions()
options.intra_op_num_threads = 2
session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def features(framing, flip):
    rows = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        if framing == "crop":
            im = im.resize((256, 256), Image.BILINEAR).crop((16, 16, 240, 240))
        else:
            im = im.resize((224, 224), Image.BILINEAR)
        x = ((np.asarray(im, np.float32) - 127.0) / 128.0).transpose(2, 0, 1)[None]
        rows.append(session.run(["features"], {"input": x})[0][0])
    return np.stack(rows)


def cv(x, x_flip, c, standardise, seed):
    """Mean held-out accuracy over the folds; x_flip, when given, is added to each training fold."""
    scores = []
    for train, held in StratifiedKFold(5, shuffle=True, random_state=seed).split(x, y):
        xt, yt = x[train], y[train]
        if x_flip is not None:
            xt, yt = np.concatenate([xt, x_flip[train]]), np.concatenate([yt, yt])
        xh = x[held]
        if standardise:
            scaler = StandardScaler().fit(x[train])
            xt, xh = scaler.transform(xt), scaler.transform(xh)
        scores.append(LogisticRegression(C=c, max_iter=3000).fit(xt, yt).score(xh, y[held]))
    return np.mean(scores)


feats = {(f, flip): features(f, flip) for f in ("crop", "whole") for flip in (False, True)}
print("framing  features      C      seed  plain   +flipped copies (training folds only)")
for standardise, grid, seed in ((False, (1.0, 0.1), 0), (True, (0.01, 0.003), 1)):
    for framing in ("crop", "whole"):
        for c in grid:
            x, xf = feats[(framing, False)], feats[(framing, True)]
            print(f"{framing:<8} {'standardised' if standardise else 'raw':<12} {c:<6} {seed:<5} "
                  f"{cv(x, None, c, standardise, seed):.4f}  {cv(x, xf, c, standardise, seed):.4f}",
                  flush=True)
