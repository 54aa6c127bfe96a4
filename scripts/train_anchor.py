#!/usr/bin/env python3
"""The PyTorch (CPU) anchor for graft's training throughput (issue 22).

Fine-tunes an ONNX backbone converted to a torch module by onnx2torch, the way
`graft compile --strategy finetune` does: the part from `--boundary` up to `--features` trains
(everything before it runs under no_grad), a new linear head on top, AdamW (backbone 1e-4,
head 1e-3), batch 16, random resized crop (35-100 % of the area, aspect 3:4-4:3) and
horizontal flip at 224x224, normalised as (x - 127) / 128. Each epoch's images are augmented
before its steps, as graft does, and only the steps are timed (forward, backward, optimizer):
the number comparable to graft's `trained ... images/s forward+backward` line.

Prints one JSON line: images/s, seconds, loss, peak RSS (MiB, of this process).

usage: train_anchor.py --backbone ONNX --data DIR [--boundary TENSOR] [--epochs N]
       [--batch 16] [--threads 2] [--scratch]
"""
import argparse
import json
import os
import random
import resource
import sys
import time

import numpy as np
import onnx
import onnx.utils
import torch
from onnx2torch import convert
from PIL import Image


def images(folder):
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    out = []
    for label, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(folder, name))):
            try:
                img = Image.open(os.path.join(folder, name, f)).convert("RGB")
            except Exception:
                continue  # graft skips undecodable files too (the hymenoptera GIF decodes)
            out.append((img, label))
    return out, classes


def augment(img, rng, size=224):
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(0.35, 1.0)
        aspect = np.exp(rng.uniform(np.log(0.75), np.log(4 / 3)))
        cw, ch = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw, ch = min(w, h), min(w, h)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = img.crop((x, y, x + cw, y + ch)).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    a = (np.asarray(crop, dtype=np.float32) - 127.0) / 128.0
    return a.transpose(2, 0, 1)


def submodel(path, inputs, output, tmp):
    onnx.utils.extract_model(path, tmp, inputs, [output])
    return convert(tmp)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", required=True)
    p.add_argument("--data", required=True, help="image folder with a train/ split")
    p.add_argument("--boundary", default="input", help="first trained tensor (default: all)")
    p.add_argument("--features", default="features")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scratch", action="store_true", help="re-initialise the trained part")
    p.add_argument("--tmp", default="/tmp/train_anchor")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    os.makedirs(a.tmp, exist_ok=True)
    model = onnx.load(a.backbone)
    graph_input = model.graph.input[0].name
    frozen = None
    if a.boundary != graph_input and a.boundary != "input":
        frozen = submodel(a.backbone, [graph_input], a.boundary, f"{a.tmp}/frozen.onnx").eval()
    start = graph_input if frozen is None else a.boundary
    trained = submodel(a.backbone, [start], a.features, f"{a.tmp}/trained.onnx")
    if a.scratch:
        for m in trained.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)
    train, classes = images(os.path.join(a.data, "train"))
    head = torch.nn.Linear(1280, len(classes))
    opt = torch.optim.AdamW(
        [
            {"params": trained.parameters(), "lr": 1e-3 if a.scratch else 1e-4},
            {"params": head.parameters(), "lr": 1e-3},
        ],
        weight_decay=1e-4,
    )
    trained.train()
    rng = random.Random(0)
    seconds, seen, loss_sum = 0.0, 0, 0.0
    for _epoch in range(a.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        batches = []
        for i in range(0, len(order), a.batch):
            idx = order[i : i + a.batch]
            x = torch.from_numpy(np.stack([augment(train[j][0], rng) for j in idx]))
            y = torch.tensor([train[j][1] for j in idx])
            if frozen is not None:
                with torch.no_grad():
                    x = frozen(x)
            batches.append((x, y))
        t0 = time.perf_counter()
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(head(trained(x)), y)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
        seconds += time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": a.threads,
                "boundary": a.boundary,
                "images": seen,
                "seconds": round(seconds, 2),
                "images_per_s": round(seen / seconds, 2),
                "loss": round(loss_sum / seen, 4),
                "peak_rss_mib": round(peak),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
