"""Deployment without PyTorch: ``agpctl export --format onnx`` writes the model and its sidecar;
``agpctl.api.load("model.onnx")`` and ``agpctl predict --model`` answer as the run does
(onnxruntime, numpy and Pillow only), also where torch cannot be imported; bad models and
sidecars are one clear line.

Parity tolerance: |ONNX − PyTorch| ≤ 1e-4 + 1e-4 · max|PyTorch map| on maps and scores, 1e-5
on cosine similarities. Both paths compute in float32 from the same resized pixels; what
differs is the kernels (onnxruntime's convolutions and reductions sum in another order than
PyTorch's, and the map resize is numpy's rather than ``F.interpolate``'s), which moves values
by a few float32 ulps of the backbone's activations — observed ≤ 6e-6 on maps of an untrained
resnet18 AGPNet at 128 px (benchmarks/onnx_speed.py), so the bound is more than an order of
magnitude above that noise and far below any real difference (a wrong resize, a missing
normalisation or smoothing step moves maps by 1e-2 or more). Decisions and masks must agree
except for values within that tolerance of their threshold. The PyTorch side runs at fp32:
the graph computes in float32, while a run's precision "auto" is bf16 on CPUs with native bf16.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import helpers
from agp_data.tiling import Tiling
from agpctl import runs
from agpctl.api import OnnxDetector, UserError, load
from agpctl.cli import cli
from agpctl.inference import onnx_sidecar
from agpctl.inference.detector import Detector
from agpctl.inference.export import export_run
from agpctl.inference import numpy_postprocess
from agpctl.inference.numpy_postprocess import resize_map
from agpctl.inference.onnx_runtime import load_onnx_detector

MAP_ATOL, MAP_RTOL = 1e-4, 1e-4
SIMILARITY_ATOL = 1e-5
BLOCK_TORCH = textwrap.dedent("""
    import sys

    class BlockTorch:  # the deployment machine: torch, torchvision and timm are not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "timm"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, BlockTorch())
""")


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> str:
    """The tiny run exported to ONNX through the CLI (model.onnx + model.onnx.json)."""
    out = str(tmp_path_factory.mktemp("exported") / "model.onnx")
    result = CliRunner().invoke(cli, ["export", "--run", trained_run, "--format", "onnx", "--out", out, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["sidecar"] == out + ".json"
    return out


@pytest.fixture(scope="module")
def torch_detector(trained_run) -> Detector:
    detector = load(trained_run, device="cpu")
    # The graph computes in float32; the run's precision "auto" is bf16 on CPUs with native
    # bf16 (this one included), which parity at float tolerance cannot be asked of.
    detector.precision = "fp32"
    return detector


@pytest.fixture(scope="module")
def onnx_detector(exported) -> OnnxDetector:
    return load(exported)


@pytest.fixture(scope="module")
def images(generated_dataset, image_folder, tmp_path_factory) -> list[str]:
    """Test images of both categories twice — in their dataset folders (category from the
    path) and copied to a flat folder (category inferred) — plus odd sizes and formats."""
    flat = tmp_path_factory.mktemp("flat")
    found = []
    for category in ("fabric", "metal"):
        test_dir = os.path.join(generated_dataset, category, "test")
        for defect in sorted(os.listdir(test_dir)):
            for name in sorted(os.listdir(os.path.join(test_dir, defect)))[:2]:
                source = os.path.join(test_dir, defect, name)
                copy = flat / f"{category[0]}-{defect}-{name}"
                shutil.copy(source, copy)
                found += [source, str(copy)]
    return found + [os.path.join(image_folder, name) for name in helpers.PREDICT_INPUTS]


def tolerance(reference: np.ndarray) -> float:
    return MAP_ATOL + MAP_RTOL * float(np.abs(reference).max())


def assert_same_detections(onnx_results, torch_results) -> None:
    assert len(onnx_results) == len(torch_results)
    for got, want in zip(onnx_results, torch_results):
        tol = tolerance(want.map)
        assert got.path == want.path
        assert got.map.dtype == np.float32 and got.map.shape == want.map.shape
        assert np.abs(got.map - want.map).max() <= tol, got.path
        assert abs(got.score - want.score) <= tol, got.path
        assert (got.category, got.category_source) == (want.category, want.category_source), got.path
        if want.category_similarity is None:
            assert got.category_similarity is None
        else:
            assert got.category_similarity == pytest.approx(want.category_similarity, abs=SIMILARITY_ATOL)
        assert (got.image_threshold, got.pixel_threshold) == (want.image_threshold, want.pixel_threshold)
        if abs(want.score - want.image_threshold) > tol:
            assert got.anomalous == want.anomalous, got.path
        decided = np.abs(want.map - want.pixel_threshold) > tol
        assert np.array_equal(got.mask[decided], want.mask[decided]), got.path


# -- parity -----------------------------------------------------------------------------------
def test_the_onnx_model_gives_the_runs_scores_maps_categories_and_decisions(onnx_detector, torch_detector, images):
    want = torch_detector.predict(images)
    got = onnx_detector.predict(images)
    assert_same_detections(got, want)
    sources = {d.category_source for d in want}
    assert {"path", "inferred"} <= sources  # both ways of naming a category were compared
    assert {d.category for d in want} == {"fabric", "metal"}
    assert np.std([d.score for d in want]) > 0 and max(float(d.map.std()) for d in want) > 0
    assert any(d.map.shape != (64, 64) for d in want)  # maps were resized to other image sizes


def test_a_given_category_and_a_given_threshold_decide_alike(exported, trained_run, torch_detector, images):
    onnx = load_onnx_detector(exported, threshold=0.5, pixel_threshold=0.25)
    torch_given = Detector.from_run(runs.load_run(trained_run, torch.device("cpu")), threshold="0.5",
                                    pixel_threshold=0.25, device=torch.device("cpu"))
    torch_given.precision = "fp32"
    assert_same_detections(onnx.predict(images[:4], category="metal"), torch_given.predict(images[:4], category="metal"))
    assert {d.category_source for d in onnx.predict(images[:2], category="metal")} == {"given"}


def test_map_resize_is_f_interpolate_bilinear():
    rng = np.random.default_rng(0)
    for (h, w), (height, width) in [((16, 16), (60, 80)), ((64, 64), (30, 40)), ((64, 64), (64, 64)),
                                    ((8, 12), (1, 97)), ((5, 7), (333, 2))]:
        values = rng.standard_normal((h, w)).astype(np.float32)
        want = torch.nn.functional.interpolate(torch.from_numpy(values)[None, None], size=(height, width),
                                               mode="bilinear", align_corners=False)[0, 0].numpy()
        # F.interpolate's vectorised kernel rounds its weights differently: a few float32 ulps.
        np.testing.assert_allclose(resize_map(values, height, width), want, atol=1e-5 * np.abs(values).max(), rtol=0)


@pytest.fixture(scope="module")
def fixed_batch_export(trained_run, tmp_path_factory) -> str:
    """The tiny run exported with a fixed batch size of 2: another graph than ``exported``."""
    out = str(tmp_path_factory.mktemp("fixed") / "fixed.onnx")
    result = export_run(trained_run, out, "onnx", batch_size=2)
    assert result.batch_size == 2 and result.sidecar == out + ".json"
    return out


def test_a_fixed_batch_graph_scores_any_number_of_images(fixed_batch_export, torch_detector, images):
    detector = load_onnx_detector(fixed_batch_export, batch_size=3)  # batches of 3 run as 2 + 1 padded
    assert_same_detections(detector.predict(images[:5]), torch_detector.predict(images[:5]))


# -- the sidecar ------------------------------------------------------------------------------
def test_the_sidecar_records_what_inference_needs(exported, trained_run):
    sidecar = json.loads(open(exported + ".json").read())
    run = runs.load_run(trained_run, torch.device("cpu"))
    assert sidecar["format"] == onnx_sidecar.FORMAT and sidecar["format_version"] == onnx_sidecar.FORMAT_VERSION
    assert sidecar["method"] == "agpnet" and sidecar["run"] == run.uri and sidecar["epoch"] == run.checkpoint.epoch
    assert sidecar["model"]["sha256"] == onnx_sidecar.sha256(open(exported, "rb").read())
    assert sidecar["input"]["size"] == 64 and sidecar["input"]["batch_size"] is None
    assert sidecar["input"]["mean"] == pytest.approx(list(run.model.backbone.mean))
    assert sidecar["input"]["std"] == pytest.approx(list(run.model.backbone.std))
    assert sidecar["thresholds"]["image"] == pytest.approx(run.thresholds["image"])
    assert set(sidecar["thresholds"]["per_category"]) == {"fabric", "metal"}
    assert sidecar["categories"] == ["fabric", "metal"] and sidecar["prototypes"]["names"] == ["fabric", "metal"]
    assert len(sidecar["prototypes"]["vectors"][0]) > 0
    assert sidecar["tiling"] is None and sidecar["eval_batch_size"] == run.cfg.train.eval_batch_size
    assert "bilinear" in sidecar["postprocess"]["map_resize"]


# -- tiled runs -------------------------------------------------------------------------------
def test_the_numpy_twins_of_tiled_scoring_match_torch():
    from agp_data.tiled import resize_tiles
    from agp_models.postprocess import gaussian_smooth, image_scores

    rng = np.random.default_rng(1)
    for shape, sigma, pool in [((50, 70), 2.5, 5), ((9, 200), 6.0, 16), ((33, 33), 0.0, 0), ((40, 30), 1.0, 1)]:
        values = rng.random(shape, dtype=np.float32)
        smoothed = gaussian_smooth(torch.from_numpy(values)[None], sigma)
        np.testing.assert_allclose(numpy_postprocess.gaussian_smooth(values, sigma), smoothed[0].numpy(), atol=1e-6)
        assert numpy_postprocess.image_score(values, pool) == pytest.approx(
            float(image_scores(torch.from_numpy(values)[None], pool)[0]), abs=1e-6)
    tiles = rng.random((2, 3, 48, 48), dtype=np.float32)
    for size in (32, 48, 80):  # shrinking (antialiased), unchanged, growing
        want = resize_tiles(torch.from_numpy(tiles), size).numpy()
        np.testing.assert_allclose(numpy_postprocess.resize_tiles(tiles, size), want, atol=1e-5)


@pytest.fixture(scope="module")
def tiled_run(generated_dataset, tmp_path_factory, one_torch_thread) -> str:
    """A tiny AGPNet run with tiling: 48 px tiles (2×2 per 64 px image) shrunk to a 32 px model."""
    run_uri = str(tmp_path_factory.mktemp("tiled-run") / "tiled")
    cfg = helpers.tiny_run_config("agpnet", generated_dataset, **{
        "train.epochs": 1, "model.image_size": 32, "model.score_pool": 4, "model.smoothing_sigma": 1.5,
        "data.tile": 48, "data.tile_overlap": 0.5})
    helpers.run_in_process(cfg, run_uri)
    return run_uri


def test_a_tiled_run_answers_alike_through_onnx(tiled_run, images, tmp_path):
    out = str(tmp_path / "tiled.onnx")
    result = export_run(tiled_run, out, "onnx")
    sidecar = json.loads(open(result.sidecar).read())
    assert Tiling.from_dict(sidecar["tiling"]) == Tiling(tile=48, overlap=0.5)
    assert sidecar["scoring"] == {"image_size": 32, "smoothing_sigma": 1.5, "score_sigma": None, "score_pool": 4}
    want_detector = load(tiled_run, device="cpu")
    assert want_detector.tiling is not None
    want_detector.precision = "fp32"  # see torch_detector
    assert_same_detections(load(out).predict(images), want_detector.predict(images))


# -- without torch ----------------------------------------------------------------------------
def test_the_api_and_the_cli_run_the_model_where_torch_cannot_be_imported(exported, torch_detector, images,
                                                                            tmp_path):
    out = str(tmp_path / "predicted")
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import json, runpy
        import numpy as np
        from agpctl.api import load

        results = load({exported!r}).predict({images!r})
        print(json.dumps([{{"score": r.score, "category": r.category, "source": r.category_source,
                            "anomalous": r.anomalous, "map": r.map.tolist()}} for r in results]))
        sys.argv = ["agpctl", "predict", {os.path.dirname(images[1])!r}, "--model", {exported!r}, "--out", {out!r}]
        try:
            runpy.run_module("agpctl.cli", run_name="__main__")
        except SystemExit as exc:
            assert not exc.code, exc.code
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "timm")]
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=helpers.REPO_ROOT, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[0])
    want = torch_detector.predict(images)
    for one, reference in zip(got, want):
        tol = tolerance(reference.map)
        assert abs(one["score"] - reference.score) <= tol
        assert np.abs(np.asarray(one["map"], dtype=np.float32) - reference.map).max() <= tol
        assert (one["category"], one["source"]) == (reference.category, reference.category_source)
        if abs(reference.score - reference.image_threshold) > tol:
            assert one["anomalous"] == reference.anomalous

    rows = helpers.read_csv(os.path.join(out, "predictions.csv"))
    flat = sorted(path for path in images if os.path.dirname(path) == os.path.dirname(images[1]))
    reference = {d.path: d for d in torch_detector.predict(flat)}
    assert sorted(row["path"] for row in rows) == sorted(reference)
    for row in rows:
        expected = reference[row["path"]]
        assert float(row["score"]) == pytest.approx(expected.score, abs=tolerance(expected.map) + 1e-5 * expected.score)
        assert (row["category"], row["category_source"]) == (expected.category, "inferred")
        for column in ("heatmap", "overlay", "mask"):
            assert os.path.isfile(row[column])
    summary = json.loads(open(os.path.join(out, "predictions.json")).read())
    assert summary["model"]["format"] == "onnx" and summary["model"]["method"] == "agpnet"


def test_the_command_line_lists_every_command_where_torch_cannot_be_imported():
    def agpctl(*args: str) -> subprocess.CompletedProcess:
        script = BLOCK_TORCH + f"sys.argv = ['agpctl', *{list(args)!r}]\nimport runpy\n" \
                               "runpy.run_module('agpctl.cli', run_name='__main__')\n"
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              cwd=helpers.REPO_ROOT, env={**os.environ, "COLUMNS": "200"})

    listed = agpctl("--help")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    commands = {line.split()[0]: " ".join(line.split()[1:]) for line in
                listed.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert {"predict", "export", "data", "train", "serve"} <= set(commands)
    assert "needs" not in commands["predict"] and "needs" not in commands["data"]
    assert commands["train"].startswith("needs PyTorch: pip install agp")
    refused = agpctl("train", "--epochs", "3")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "agpctl train needs PyTorch" in lines[0], refused.stderr


# -- bad models, sidecars and requests: one line, nothing lost ---------------------------------
def copy_model(exported: str, folder) -> str:
    path = str(folder / "model.onnx")
    shutil.copy(exported, path)
    shutil.copy(exported + ".json", path + ".json")
    return path


def assert_one_line_error(args: list[str], *words: str, out=None) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in " ".join(result.output.split()), result.output


def test_a_missing_sidecar_is_one_line_and_loses_nothing(exported, image_folder, tmp_path):
    model = copy_model(exported, tmp_path)
    os.remove(model + ".json")
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    assert_one_line_error(["predict", image_folder, "--model", model, "--out", str(out)], "model.onnx.json", "export")
    assert sorted(os.listdir(out)) == ["earlier.txt"] and (out / "earlier.txt").read_text() == "kept"
    with pytest.raises(UserError, match="no .*model.onnx.json beside it"):
        load(model)


def test_a_sidecar_of_another_model_is_refused(exported, fixed_batch_export, tmp_path):
    model = copy_model(exported, tmp_path)
    shutil.copy(fixed_batch_export + ".json", model + ".json")
    with pytest.raises(UserError, match="belongs to another model file"):
        load(model)


@pytest.mark.parametrize("damage, words", [
    (lambda s: "{not json", "not valid JSON"),
    (lambda s: json.dumps({**json.loads(s), "format": "something"}), "not an agp export sidecar"),
    (lambda s: json.dumps({**json.loads(s), "format_version": 99}), "upgrade agp"),
    (lambda s: json.dumps({**json.loads(s), "input": {**json.loads(s)["input"], "size": "big"}}), "damaged"),
])
def test_a_damaged_sidecar_is_one_line(exported, tmp_path, damage, words):
    model = copy_model(exported, tmp_path)
    with open(model + ".json") as f:
        text = f.read()
    with open(model + ".json", "w") as f:
        f.write(damage(text))
    with pytest.raises(UserError, match=words) as caught:
        load(model)
    assert "\n" not in str(caught.value)


def test_a_corrupt_onnx_file_is_one_line(exported, image_folder, tmp_path):
    model = copy_model(exported, tmp_path)
    with open(model, "r+b") as f:  # a truncated download
        f.truncate(os.path.getsize(model) // 3)
    assert_one_line_error(["predict", image_folder, "--model", model, "--out", str(tmp_path / "out")],
                          "not a model onnxruntime can load")
    assert_one_line_error(["predict", image_folder, "--model", str(tmp_path / "absent.onnx"), "--out",
                           str(tmp_path / "out")], "does not exist")


def test_onnxruntime_missing_is_one_line(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(UserError, match=r"needs the onnxruntime package: pip install onnxruntime"):
        load(exported)


@pytest.mark.parametrize("extra, words", [
    ([], "either --run"),
    (["--run", "runs/x"], "either --run"),
    (["--workers", "2"], "runs in this process"),
    (["--category", "wood"], "no category 'wood'"),
    (["--threshold", "high"], "--threshold must be 'auto' or a number"),
])
def test_bad_predict_requests_are_one_line(exported, image_folder, tmp_path, extra, words):
    model = [] if extra == [] else ["--model", exported]
    assert_one_line_error(["predict", image_folder, *model, *extra, "--out", str(tmp_path / "out")], words)
