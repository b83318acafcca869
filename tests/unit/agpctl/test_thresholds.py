"""Per-category thresholds: calibrated on each category's held-out normal images, applied by
``agpctl predict`` to each image's category (given, named by its path, or inferred from the
category prototypes); older runs fall back to the pooled thresholds with one warning."""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import helpers
from agp_data.generate import generate_dataset
from agpctl import checkpoint as ckpt
from agpctl import runs
from agpctl.cli import cli
from agpctl.inference.detection import category_in_path
from agpctl.errors import UserError
from agpctl.inference.predict import run_predict
from agpctl.inference.predict_ray import run_predict_on_ray
from agpctl.inference.scoring import MIN_STABLE_IMAGES, Predictions, calibrate_thresholds
from agpctl.inference.thresholds import ThresholdPolicy


def held_out(scores_by_category: dict[str, list[float]]) -> Predictions:
    """Held-out normal predictions: maps whose maximum is the image score plus 0.5."""
    categories = [c for c, scores in scores_by_category.items() for _ in scores]
    scores = np.array([s for values in scores_by_category.values() for s in values], np.float32)
    maps = np.zeros((len(scores), 4, 4), np.float32)
    maps[:, 1, 2] = scores + 0.5
    count = len(scores)
    return Predictions(indices=np.arange(count), scores=scores, maps=maps, masks=np.zeros_like(maps, bool),
                       labels=np.zeros(count, np.int64), categories=categories, paths=[f"{i}.png" for i in range(count)])


def test_each_category_gets_its_own_quantile_and_the_pooled_one_stays_the_fallback():
    rng = np.random.default_rng(0)
    low = rng.normal(1.0, 0.1, 12).tolist()   # "fabric": naturally low scores
    high = rng.normal(3.0, 0.1, 12).tolist()  # "metal": naturally high scores
    few = [2.0, 2.2, 2.1]                     # "tile": too few images for a stable quantile
    stored = calibrate_thresholds(held_out({"fabric": low, "metal": high, "tile": few}), 0.9)

    everything = np.array(low + high + few, np.float32)
    assert stored["image"] == pytest.approx(float(np.quantile(everything, 0.9)))  # pooled, as before
    assert stored["pixel"] == pytest.approx(float(np.quantile(everything + 0.5, 0.9)))
    assert stored["quantile"] == 0.9 and stored["normal_image_scores"]["max"] == pytest.approx(everything.max())
    per = stored["per_category"]
    assert set(per) == {"fabric", "metal", "tile"}
    assert per["fabric"]["image"] == pytest.approx(float(np.quantile(np.float32(low), 0.9)))
    assert per["metal"]["pixel"] == pytest.approx(float(np.quantile(np.float32(high) + 0.5, 0.9)))
    assert per["fabric"]["image"] < 1.5 < stored["image"] and per["metal"]["image"] > stored["image"] - 1e-6
    assert [per[c]["images"] for c in ("fabric", "metal", "tile")] == [12, 12, 3]
    assert [per[c]["stable"] for c in ("fabric", "metal", "tile")] == [True, True, False]
    assert len(stored["warnings"]) == 1 and "tile" in stored["warnings"][0]
    assert f"fewer than {MIN_STABLE_IMAGES}" in stored["warnings"][0]
    assert json.loads(runs.to_json(stored)) == stored  # thresholds.json round trip

    # Fewer false alarms on metal's normal images than with the pooled threshold.
    new_metal = rng.normal(3.0, 0.1, 200)
    policy = ThresholdPolicy(stored)
    assert (new_metal > policy.for_category("metal").image).sum() < (new_metal > stored["image"]).sum()
    # Unstable and unknown categories are decided by the pooled thresholds.
    assert policy.for_category("tile") == policy.for_category(None) == policy.default
    assert policy.default.image == stored["image"]
    # A given threshold overrides every category's.
    given = ThresholdPolicy(stored, "2.5")
    assert given.for_category("metal").image == given.for_category("fabric").image == 2.5


def test_no_held_out_images_means_no_thresholds():
    stored = calibrate_thresholds(None, 0.99)
    assert stored["image"] is None and stored["per_category"] == {} and stored["warnings"] == []


def test_category_from_path_takes_the_deepest_known_folder():
    names = ["fabric", "metal"]
    assert category_in_path("/data/mvtec/metal/test/crack/000.png", names) == "metal"
    assert category_in_path("/home/fabric/mvtec/metal/test/good/1.png", names) == "metal"
    assert category_in_path("s3://fabric/lines/metal/x.png", names) == "metal"  # never the bucket
    assert category_in_path("s3://fabric/x.png", names) is None
    assert category_in_path("/data/today/metal.png", names) is None  # never the file name
    assert category_in_path(None, names) is None


# -- end to end: a run where one category's normal images score higher ---------------------------------
@pytest.fixture(scope="module")
def uneven_run(tmp_path_factory) -> tuple[str, str]:
    """A tiny run on two categories whose metal images are darkened to 40 %: its normal
    scores then lie well above fabric's (measured: 13.93-13.96 against 13.57-13.61). Half
    the training images are held out (10 per category: stable), the threshold is the median
    (so that the pooled one falls between the categories)."""
    root = generate_dataset(str(tmp_path_factory.mktemp("uneven") / "data"), categories=2, train=20, test=12,
                            size=64, seed=0)
    for path in glob.glob(os.path.join(root, "metal", "train", "*", "*.png")) + glob.glob(
            os.path.join(root, "metal", "test", "*", "*.png")):
        dark = np.asarray(Image.open(path).convert("RGB"), np.float32) * 0.4
        Image.fromarray(dark.astype(np.uint8)).save(path)
    run_uri = str(tmp_path_factory.mktemp("uneven-run") / "run")
    cfg = helpers.tiny_run_config("agpnet", root, **{"train.epochs": 1, "train.threshold_quantile": 0.5,
                                                     "data.val_fraction": 0.45})
    helpers.run_in_process(cfg, run_uri)
    return root, run_uri


def test_the_high_category_gets_a_higher_threshold_and_fewer_false_alarms(uneven_run, tmp_path):
    root, run_uri = uneven_run
    stored = runs.stored_thresholds(run_uri)
    per = stored["per_category"]
    assert per["metal"]["stable"] and per["fabric"]["stable"] and stored["warnings"] == []
    assert per["metal"]["images"] == per["fabric"]["images"] == 10
    assert per["fabric"]["image"] < stored["image"] < per["metal"]["image"]

    report = run_predict(os.path.join(root, "metal", "test", "good"), run_uri, str(tmp_path / "metal"),
                         write_images=False)
    assert {(r["category"], r["category_source"]) for r in report.rows} == {("metal", "path")}
    assert all(r["image_threshold"] == pytest.approx(per["metal"]["image"]) for r in report.rows)
    per_category_alarms = sum(r["anomalous"] == "yes" for r in report.rows)
    pooled_alarms = sum(r["score"] > stored["image"] for r in report.rows)
    assert per_category_alarms < pooled_alarms, (per_category_alarms, pooled_alarms)
    assert "metal" in report.as_dict()["category_thresholds"]


def test_a_given_category_decides_and_an_unknown_one_names_the_known_ones(uneven_run, tmp_path):
    root, run_uri = uneven_run
    folder = os.path.join(root, "metal", "test", "good")
    given = run_predict(folder, run_uri, str(tmp_path / "given"), category="fabric", write_images=False)
    fabric = runs.stored_thresholds(run_uri)["per_category"]["fabric"]
    assert {(r["category"], r["category_source"]) for r in given.rows} == {("fabric", "given")}
    assert all(r["image_threshold"] == pytest.approx(fabric["image"]) for r in given.rows)

    result = CliRunner().invoke(cli, ["predict", folder, "--run", run_uri, "--out", str(tmp_path / "x"),
                                      "--category", "wood"])
    assert result.exit_code == 2, result.output
    assert "no category 'wood'; choose one of fabric, metal" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    # Sharded predict refuses it on the driver, before Ray starts.
    with pytest.raises(UserError, match="no category 'wood'; choose one of fabric, metal"):
        run_predict_on_ray(folder, run_uri, str(tmp_path / "y"), address=None, workers=2, category="wood")


def test_categories_are_inferred_for_images_outside_a_dataset_layout(trained_run, generated_dataset, tmp_path):
    flat = tmp_path / "today"
    flat.mkdir()
    truth = {}
    for category in ("fabric", "metal"):
        for i, path in enumerate(sorted(glob.glob(os.path.join(generated_dataset, category, "test", "*", "*.png")))):
            name = f"part_{len(truth):03d}.png"  # nothing in the path names the category
            shutil.copy(path, flat / name)
            truth[name] = category
    report = run_predict(str(flat), trained_run, str(tmp_path / "out"), write_images=False)
    assert len(report.rows) == len(truth) == 12
    for row in report.rows:
        assert row["category_source"] == "inferred"
        assert row["category"] == truth[os.path.basename(row["path"])], row
        assert 0.5 < row["category_similarity"] <= 1.0 + 1e-6
    csv_rows = helpers.read_csv(os.path.join(tmp_path / "out", "predictions.csv"))
    assert {r["category_source"] for r in csv_rows} == {"inferred"} and all(r["category_similarity"] for r in csv_rows)
    # The tiny run holds out 2 images per category: too few, so the pooled thresholds decide.
    stored = runs.stored_thresholds(trained_run)
    assert not any(entry["stable"] for entry in stored["per_category"].values())
    assert all(row["image_threshold"] == stored["image"] for row in report.rows)
    assert json.loads(open(os.path.join(trained_run, runs.CATEGORIES_FILE)).read())["categories"] == ["fabric", "metal"]


def as_old_run(run_uri: str, copy: str) -> str:
    """A copy of ``run_uri`` as runs trained before per-category thresholds and prototypes were."""
    shutil.copytree(run_uri, copy)
    os.remove(os.path.join(copy, runs.CATEGORIES_FILE))
    thresholds = runs.stored_thresholds(copy)
    for key in ("per_category", "warnings"):
        thresholds.pop(key)
    runs.write_json(os.path.join(copy, runs.THRESHOLDS_FILE), thresholds)
    for _, directory in runs.list_checkpoints(copy):
        path = os.path.join(directory, ckpt.CHECKPOINT_FILE)
        payload = ckpt.deserialise(open(path, "rb").read(), path)
        payload.pop("categories")
        payload["thresholds"] = thresholds
        open(path, "wb").write(ckpt.serialise(payload))
    return copy


def test_an_old_run_falls_back_to_the_pooled_thresholds_with_one_warning(uneven_run, tmp_path):
    root, run_uri = uneven_run
    old = as_old_run(run_uri, str(tmp_path / "old"))
    warnings: list[str] = []
    report = run_predict(os.path.join(root, "metal", "test", "good"), old, str(tmp_path / "out"),
                         write_images=False, on_warning=warnings.append)
    assert len(warnings) == 1 and "no per-category thresholds" in warnings[0] and "pooled" in warnings[0]
    pooled = runs.stored_thresholds(run_uri)["image"]
    assert all(r["image_threshold"] == pooled for r in report.rows)
    assert {r["category"] for r in report.rows} == {None}  # nothing recorded to find it with
    # An explicit threshold still overrides, without the warning.
    warnings.clear()
    given = run_predict(os.path.join(root, "metal", "test", "good"), old, str(tmp_path / "given"), threshold="99",
                        write_images=False, on_warning=warnings.append)
    assert warnings == [] and all(r["image_threshold"] == 99.0 and r["anomalous"] == "no" for r in given.rows)


def test_the_prototypes_travel_in_every_checkpoint(uneven_run):
    _, run_uri = uneven_run
    payload = runs.load_latest_checkpoint(run_uri).payload
    assert payload["categories"]["names"] == ["fabric", "metal"]
    assert payload["categories"]["images"] == [10, 10]
    assert isinstance(payload["categories"]["prototypes"], torch.Tensor)
    assert payload["categories"]["prototypes"].shape[0] == 2
