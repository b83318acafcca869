"""``agpctl predict`` end to end on a tiny run trained in-process: real-world image quirks,
thresholds, corrupt files, and S3 input/output on a real moto server. (Sharded predict on an
embedded Ray: tests/integration/test_predict_ray.py.)"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from agp_data import storage
from agpctl import runs
from agpctl.cli import cli
from agpctl.inference.predict import COLORMAP, colorize, discover_inputs, run_predict
from agpctl.inference.thresholds import resolve_thresholds
from helpers import PREDICT_INPUTS as READABLE  # (file name, (width, height)) written by `image_folder`
from helpers import read_csv


def stored_thresholds(run_uri: str) -> dict:
    return json.loads(storage.read_text(storage.join(run_uri, runs.THRESHOLDS_FILE)))


def test_cli_predicts_a_folder_with_odd_images_and_skips_the_corrupt_one(trained_run, image_folder, tmp_path):
    out = str(tmp_path / "out")
    result = CliRunner().invoke(cli, ["predict", image_folder, "--run", trained_run, "--out", out, "--recursive"])
    assert result.exit_code == 0, result.output
    assert "corrupt.png" in result.output and "1 skipped" in result.output

    rows = read_csv(os.path.join(out, "predictions.csv"))
    by_name = {os.path.relpath(r["path"], image_folder).replace(os.sep, "/"): r for r in rows}
    assert set(by_name) == set(READABLE)
    thresholds = stored_thresholds(trained_run)
    for name, (width, height) in READABLE.items():
        row = by_name[name]
        assert (int(row["width"]), int(row["height"])) == (width, height)
        for kind in ("heatmap", "overlay", "mask"):
            with Image.open(row[kind]) as picture:
                assert picture.size == (width, height), (name, kind)
        with Image.open(row["mask"]) as mask:
            assert int((np.asarray(mask) > 0).sum()) == int(row["defect_area_px"])
        # Auto thresholds are the run's calibrated ones, applied as score > threshold.
        assert float(row["image_threshold"]) == pytest.approx(thresholds["image"])
        assert float(row["pixel_threshold"]) == pytest.approx(thresholds["pixel"])
        assert row["anomalous"] == ("yes" if float(row["score"]) > thresholds["image"] else "no")

    report = json.loads(open(os.path.join(out, "predictions.json")).read())
    assert [s["path"] for s in report["skipped"]] == [os.path.join(image_folder, "corrupt.png")]
    assert report["summary"]["images"] == len(READABLE) and report["summary"]["skipped"] == 1
    assert report["threshold"]["image"] == pytest.approx(thresholds["image"])


def test_given_threshold_overrides_the_calibrated_one(trained_run, image_folder, tmp_path):
    auto = run_predict(image_folder, trained_run, str(tmp_path / "auto"), write_images=False)
    scores = sorted(r["score"] for r in auto.rows)
    middle = (scores[1] + scores[2]) / 2  # two images below it, the rest above
    given = run_predict(image_folder, trained_run, str(tmp_path / "given"), threshold=str(middle),
                        write_images=False)
    assert given.thresholds.image == given.thresholds.pixel == middle
    assert sum(r["anomalous"] == "yes" for r in given.rows) == len(scores) - 2
    for row in given.rows:
        assert row["image_threshold"] == middle
        assert row["anomalous"] == ("yes" if row["score"] > middle else "no")
    assert all(r["heatmap"] == "" for r in given.rows)  # --no-images

    split = resolve_thresholds({"image": 1.0, "pixel": 2.0}, "0.5", pixel_threshold=0.25)
    assert (split.image, split.pixel) == (0.5, 0.25)


def test_predict_reads_and_writes_s3(trained_run, image_folder, s3_bucket, tmp_path):
    for name in ("color.png", "gray.jpg", "corrupt.png"):
        storage.write_bytes(f"s3://{s3_bucket}/parts/{name}", open(os.path.join(image_folder, name), "rb").read())
    out = f"s3://{s3_bucket}/predictions"
    report = run_predict(f"s3://{s3_bucket}/parts", trained_run, out)
    assert sorted(r["path"] for r in report.rows) == [f"s3://{s3_bucket}/parts/color.png",
                                                     f"s3://{s3_bucket}/parts/gray.jpg"]
    assert [s["path"] for s in report.skipped] == [f"s3://{s3_bucket}/parts/corrupt.png"]
    rows = read_csv(f"{out}/predictions.csv")
    assert len(rows) == 2
    written = set(storage.list_files(out))
    assert {f"{out}/heatmaps/color.png", f"{out}/overlays/gray.png", f"{out}/masks/color.png",
            f"{out}/predictions.json"} <= written
    with Image.open(io.BytesIO(storage.read_bytes(f"{out}/heatmaps/gray.png"))) as heat:
        assert heat.size == READABLE["gray.jpg"]


def test_inputs_from_a_glob_file_and_name_clashes(image_folder, tmp_path):
    assert [i.name for i in discover_inputs(os.path.join(image_folder, "*.png"))] == ["color", "corrupt", "rgba"]
    assert [i.name for i in discover_inputs(os.path.join(image_folder, "gray.jpg"))] == ["gray"]
    assert "sub/nested" not in [i.name for i in discover_inputs(image_folder)]
    assert "sub/nested" in [i.name for i in discover_inputs(image_folder, recursive=True)]
    for ext in ("png", "jpg"):
        Image.new("RGB", (4, 4)).save(tmp_path / f"a.{ext}")
    assert sorted(i.name for i in discover_inputs(str(tmp_path))) == ["a_jpg", "a_png"]


def test_colormap_runs_from_dark_blue_through_green_to_dark_red():
    assert COLORMAP[0].tolist() == [0, 0, 128] and COLORMAP[-1].tolist() == [128, 0, 0]
    picture = colorize(np.array([[0.0, 1.0, 2.0, 5.0]]), vmax=2.0)
    assert picture[0, 0].tolist() == [0, 0, 128]
    assert picture[0, 1, 1] > 200 and picture[0, 1, 0] < 140 and picture[0, 1, 2] < 140  # threshold: green
    assert picture[0, 2].tolist() == picture[0, 3].tolist() == [128, 0, 0]  # clipped above vmax


def test_workers_below_one_is_a_clear_error(trained_run, image_folder, tmp_path):
    result = CliRunner().invoke(cli, ["predict", image_folder, "--run", trained_run, "--out", str(tmp_path),
                                      "--workers", "0"])
    assert result.exit_code == 2 and "--workers must be at least 1" in result.output


def test_shards_are_contiguous_and_cover_the_inputs():
    from agpctl.inference.predict_ray import shards

    items = list(range(7))
    assert shards(items, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert shards(items, 10) == [[i] for i in items]
    assert shards([], 4) == [[]]
