"""The Python API (``agpctl.api``): the same numbers as ``agpctl predict``, every accepted
input type, and bad inputs as one clear UserError."""

from __future__ import annotations

import json
import os
import pathlib
import runpy
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from agpctl import runs
from agpctl.api import Detection, UserError, load
from agpctl.inference.detector import Detector
from agpctl.inference.predict import run_predict
from helpers import PREDICT_INPUTS as READABLE  # (file name, (width, height)) written by `image_folder`


@pytest.fixture(scope="module")
def detector(trained_run):
    return load(trained_run)  # the device agpctl predict picks too: CUDA when there is one


def test_the_api_gives_the_numbers_of_agpctl_predict(trained_run, image_folder, tmp_path, monkeypatch, detector):
    maps_of_predict: dict[str, np.ndarray] = {}
    detect = Detector.detect

    def recording(self, *args, **kwargs):  # the maps predict computes (it writes only pictures of them)
        found = detect(self, *args, **kwargs)
        maps_of_predict.update({d.path: d.map for d in found})
        return found

    monkeypatch.setattr(Detector, "detect", recording)
    out = str(tmp_path / "out")
    run_predict(image_folder, trained_run, out, recursive=True, write_images=False)
    monkeypatch.undo()
    rows = json.loads(open(os.path.join(out, "predictions.json")).read())["predictions"]
    assert len(rows) == len(READABLE)

    results = detector.predict([row["path"] for row in rows])
    assert all(isinstance(r, Detection) for r in results)
    for row, result in zip(rows, results):
        assert result.path == row["path"]
        assert result.score == pytest.approx(row["score"], abs=1e-6)
        assert result.map.dtype == np.float32 and result.map.shape == (row["height"], row["width"])
        np.testing.assert_allclose(result.map, maps_of_predict[row["path"]], atol=1e-6, rtol=0)
        assert result.anomalous == (row["anomalous"] == "yes")
        assert result.mask.dtype == bool and int(result.mask.sum()) == row["defect_area_px"]
        assert (result.image_threshold, result.pixel_threshold) == (row["image_threshold"], row["pixel_threshold"])
        assert (result.category, result.category_source) == (row["category"], row["category_source"])
        assert result.category_similarity == pytest.approx(row["category_similarity"], abs=1e-6)
    stored = runs.stored_thresholds(trained_run)
    assert results[0].image_threshold == stored["image"]  # the tiny run's categories are unstable: pooled


def test_every_accepted_input_type_scores_the_same_image_alike(image_folder, detector):
    path = os.path.join(image_folder, "color.png")
    [reference] = detector.predict(path)
    rgb = np.array(Image.open(path).convert("RGB"))
    chw = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
    inputs = {
        "pathlib.Path": pathlib.Path(path),
        "PIL image": Image.open(path),
        "uint8 array": rgb,
        "float array": rgb.astype(np.float64) / 255.0,
        "3xHxW tensor": chw,
        "uint8 tensor": torch.from_numpy(rgb).permute(2, 0, 1),
    }
    for kind, value in inputs.items():
        [result] = detector.predict(value)
        assert result.score == pytest.approx(reference.score, abs=1e-6), kind
        assert result.map.shape == (60, 80), kind
        np.testing.assert_allclose(result.map, reference.map, atol=1e-6, err_msg=kind)
    assert reference.path == path and detector.predict(rgb)[0].path is None

    batch = torch.stack([chw, chw.flip(-1), chw])  # Bx3xHxW: one result per image, in order
    results = detector.predict(batch)
    assert len(results) == 3 and results[0].score == pytest.approx(reference.score, abs=1e-6)
    assert results[2].score == pytest.approx(reference.score, abs=1e-6)
    mixed = detector.predict([path, rgb, Image.open(path), np.stack([rgb, rgb])])
    assert len(mixed) == 5 and all(r.score == pytest.approx(reference.score, abs=1e-6) for r in mixed)
    assert detector.predict([]) == []

    [given] = detector.predict(rgb, category="metal")
    assert (given.category, given.category_source, given.category_similarity) == ("metal", "given", None)


@pytest.mark.parametrize("bad, words", [
    ("/no/such/part.png", "image /no/such/part.png does not exist"),
    (np.zeros((64, 64), np.uint8), "must be HxWx3"),
    (np.zeros((64, 64, 4), np.uint8), "got shape (64, 64, 4)"),
    (np.full((8, 8, 3), 200.0), "[0, 1], got values from 200 to 200 (divide by 255)"),
    (np.zeros((8, 8, 3), np.int64), "uint8 (0-255) or float"),
    (torch.zeros(64, 64), "3xHxW or Bx3xHxW"),
    (42, "cannot score a int"),
])
def test_bad_inputs_are_one_clear_line(detector, bad, words):
    with pytest.raises(UserError) as raised:
        detector.predict(bad)
    message = str(raised.value)
    assert words in message and "\n" not in message


def test_a_folder_a_corrupt_file_and_an_unknown_category_are_user_errors(image_folder, detector):
    with pytest.raises(UserError, match="is a folder; pass image paths"):
        detector.predict(image_folder)
    with pytest.raises(UserError, match="corrupt.png"):
        detector.predict(os.path.join(image_folder, "corrupt.png"))
    with pytest.raises(UserError, match="no category 'wood'; choose one of fabric, metal"):
        detector.predict(os.path.join(image_folder, "color.png"), category="wood")


def test_per_category_runs_load_the_named_categorys_model(trained_run, tmp_path):
    parent = tmp_path / "per-category"
    parent.mkdir()
    cfg = runs.load_run_config(trained_run).with_overrides({"data.per_category": True})
    runs.write_run_config(str(parent), cfg)
    for category in ("fabric", "metal"):
        shutil.copytree(trained_run, parent / category)
    with pytest.raises(UserError, match="one model per category"):
        load(parent)
    detector = load(parent, category="metal", device="cpu")
    assert next(detector.model.parameters()).device.type == "cpu"
    assert detector.run == str(parent / "metal")
    [result] = detector.predict(np.zeros((32, 32, 3), np.uint8))
    assert (result.category, result.category_source) == ("metal", "given")


def test_the_example_script_prints_one_line_per_image(trained_run, image_folder, capsys, monkeypatch):
    script = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "use_from_python.py")
    monkeypatch.setattr("sys.argv", ["use_from_python.py", trained_run, image_folder])
    with pytest.raises(SystemExit) as finished:
        runpy.run_path(script, run_name="__main__")
    assert finished.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    top_level = sorted(name for name in READABLE if "/" not in name) + ["corrupt.png"]
    assert sorted(os.path.basename(line.split(":")[0]) for line in lines) == sorted(top_level)
    assert sum("skipped" in line for line in lines) == 1 and "corrupt.png: skipped" in "\n".join(lines)
    assert all(" score " in line and "category " in line for line in lines if "skipped" not in line)
