"""The Python module against the real binaries: an artifact compiled by `graft` from the fixture
photos, answers compared with `graft-run --json`, NumPy input with file input, errors, threads,
and the README's "From Python" example.

Needs the release binaries (`cargo build --release`, or the README's test command) and, in the
virtual environment, the wheel, numpy, pillow and pytest. `GRAFT_TARGET_DIR` overrides where the
binaries are looked for (default: the repository's target/release).
"""
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import graft_runtime

REPO = Path(__file__).resolve().parents[3]
TARGET = Path(os.environ.get("GRAFT_TARGET_DIR", REPO / "target" / "release"))
FIXTURES = REPO / "fixtures"
VAL = sorted((FIXTURES / "hymenoptera-mini" / "val").glob("*/*.jpg"))


@pytest.fixture(scope="session")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "bees.graft"
    subprocess.run(
        [TARGET / "graft", "compile", "--backbone", FIXTURES / "efficientnet_lite0.onnx",
         "--data", FIXTURES / "hymenoptera-mini", "--out", out, "--normalize", "tf",
         "--no-cache", "--quiet"],
        check=True,
    )
    return out


@pytest.fixture(scope="session")
def model(artifact):
    return graft_runtime.Model(str(artifact))


def test_labels_input_size_and_repr(model, artifact):
    assert model.labels == ["ants", "bees"]
    assert model.input_size == (224, 224)
    assert repr(model) == f'graft_runtime.Model("{artifact}", 2 labels, input 224x224)'
    assert graft_runtime.Model(artifact).labels == model.labels  # os.PathLike


def test_top_k_equals_graft_run_json(model, artifact):
    images = VAL[:6]
    run = subprocess.run(
        [TARGET / "graft-run", "predict", artifact, *images, "--top-k", "2", "--json"],
        check=True, capture_output=True, text=True,
    )
    expected = {p["path"]: [(s["label"], s["probability"]) for s in p["top_k"]]
                for p in json.loads(run.stdout)["predictions"]}
    got = model.predict([str(p) for p in images], top_k=2)
    assert got == [expected[str(p)] for p in images]
    assert model.predict(images[0], top_k=1) == expected[str(images[0])][:1]


def test_numpy_input_equals_file_input(model, tmp_path):
    # A lossless copy, so the file and the array hold the same pixels.
    rgb = np.asarray(Image.open(VAL[0]).convert("RGB"))
    png = tmp_path / "photo.png"
    Image.fromarray(rgb).save(png)
    from_file = model.predict(png)
    assert model.predict_array(rgb) == from_file
    assert model.predict_array(np.ascontiguousarray(rgb[:, :, ::-1]), bgr=True) == from_file
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    assert model.predict_array(rgba) == from_file
    assert np.array_equal(model.logits(rgb), model.logits(png))
    # A crop view of a larger array (rows in place) and a strided view (copied) answer as their
    # contiguous copies do.
    crop = rgb[10:200, 20:220]
    assert model.predict_array(crop) == model.predict_array(np.ascontiguousarray(crop))
    step = rgb[::2, ::3]
    assert model.predict_array(step) == model.predict_array(np.ascontiguousarray(step))
    gray = np.asarray(Image.open(VAL[0]).convert("L"))
    assert model.predict_array(gray) == model.predict_array(np.dstack([gray] * 3))


def test_logits_are_the_probabilities_before_softmax(model):
    logits = model.logits(VAL[1])
    assert logits.dtype == np.float32 and logits.shape == (2,)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    top = model.predict(VAL[1], top_k=2)
    by_label = dict(top)
    assert np.allclose(probabilities, [by_label["ants"], by_label["bees"]], atol=1e-6)


def test_errors(model, artifact, tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(graft_runtime.GraftError) as e:
        model.predict(missing)
    assert str(e.value) == f"{missing}: No such file or directory (os error 2)"
    with pytest.raises(graft_runtime.GraftError) as e:
        graft_runtime.Model(tmp_path / "missing.graft")
    assert str(e.value) == f"{tmp_path / 'missing.graft'}: No such file or directory (os error 2)"
    truncated = tmp_path / "truncated.graft"
    truncated.write_bytes(Path(artifact).read_bytes()[:5000])
    with pytest.raises(graft_runtime.GraftError) as e:
        graft_runtime.Model(truncated)
    assert re.match(rf"{re.escape(str(truncated))}: artifact is truncated or corrupt", str(e.value))
    with pytest.raises(ValueError, match=r"expected an HxWx3 \(RGB\), HxWx4 \(RGBA\) or HxW"):
        model.predict_array(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ValueError):
        model.predict_array(np.zeros(12, np.uint8))
    with pytest.raises(TypeError):
        model.predict_array(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(graft_runtime.GraftError, match="both sides must be at least 1 pixel"):
        model.predict_array(np.zeros((0, 8, 3), np.uint8))


def test_two_threads_predict_at_once(model):
    expected = model.predict([str(p) for p in VAL])
    results = {}

    def work(name, order):
        results[name] = model.predict([str(VAL[i]) for i in order])

    forward, backward = list(range(len(VAL))), list(reversed(range(len(VAL))))
    threads = [threading.Thread(target=work, args=("a", forward)),
               threading.Thread(target=work, args=("b", backward))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["a"] == expected
    assert results["b"] == list(reversed(expected))


def readme_block(marker):
    text = (REPO / "README.md").read_text()
    block = text.split(f"<!-- {marker} -->")[1].split(f"<!-- /{marker} -->")[0]
    return block.split("```python\n")[1].split("```")[0]


def test_readme_example_runs(artifact, tmp_path):
    (tmp_path / "fixtures").symlink_to(FIXTURES)
    (tmp_path / "bees.graft").symlink_to(artifact)
    run = subprocess.run([sys.executable, "-c", readme_block("python-example")],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "labels ['ants', 'bees'], input (224, 224)"
    assert lines[1].startswith("fixtures/hymenoptera-mini/val/bees/") and "bees" in lines[1]
