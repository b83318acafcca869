"""A table of user mistakes run through `agpctl` as a subprocess, as a new user would make them.

For every one: exit code 2, one line on stderr that names the thing and the fix, no
traceback, and no file of an existing run changed (checksums before and after).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.slow

TINY_TRAIN = ["--dataset", "mvtec", "--epochs", "1", "--backbone", "resnet18", "--pretrained", "no",
              "--layers", "1,2", "--image-size", "64", "--loader-workers", "0"]


@pytest.fixture(scope="module")
def world(generated_dataset, tmp_path_factory) -> dict[str, str]:
    """A finished run, the dataset it was trained on, and a few things to trip over."""
    base = tmp_path_factory.mktemp("bad-inputs")
    run = str(base / "runs" / "done")
    helpers.run_in_process(helpers.tiny_config(generated_dataset, epochs=1), run)
    a_file = base / "a-file.txt"
    a_file.write_text("not a folder")
    bad_yaml = base / "bad.yaml"
    bad_yaml.write_text("train: [unclosed\n")
    images = base / "images"
    images.mkdir()
    (images / "part.png").write_bytes((Path(generated_dataset) / "fabric" / "test" / "good" / os.listdir(
        Path(generated_dataset) / "fabric" / "test" / "good")[0]).read_bytes())
    (base / "a-dir").mkdir()
    corrupt = base / "corrupt-data"  # one training image cut short, as an interrupted copy leaves it
    shutil.copytree(generated_dataset, corrupt)
    cut = sorted((corrupt / "metal" / "train" / "good").iterdir())[3]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    maskless = base / "maskless-data"  # one defect image without its mask
    shutil.copytree(generated_dataset, maskless)
    next(iter(sorted((maskless / "fabric" / "ground_truth").rglob("*.png")))).unlink()
    return {"run": run, "runs": str(base / "runs"), "data": generated_dataset, "file": str(a_file),
            "yaml": str(bad_yaml), "images": str(images), "dir": str(base / "a-dir"), "base": str(base),
            "corrupt": str(corrupt), "cut": cut.name, "maskless": str(maskless)}


# (case id, argv with {placeholders} from ``world``, words the one stderr line must contain)
CASES = [
    ("lr-negative", ["train", "--root", "{data}", *TINY_TRAIN, "--lr", "-1", "--out", "{base}/o1"], ["--lr"]),
    ("image-size-zero", ["train", "--root", "{data}", *TINY_TRAIN, "--image-size", "0", "--out", "{base}/o2"],
     ["--image-size"]),
    ("layers-negative", ["train", "--root", "{data}", *TINY_TRAIN, "--layers", "-1", "--out", "{base}/o3"],
     ["--layers"]),
    ("epochs-zero", ["train", "--root", "{data}", *TINY_TRAIN, "--epochs", "0", "--out", "{base}/o4"], ["--epochs"]),
    ("val-fraction", ["train", "--root", "{data}", *TINY_TRAIN, "--val-fraction", "0.7", "--out", "{base}/o5"],
     ["--val-fraction"]),
    ("address-scheme", ["train", "--root", "{data}", *TINY_TRAIN, "--address", "foo://bar"], ["--address", "ray://"]),
    ("name-escapes", ["train", "--root", "{data}", *TINY_TRAIN, "--name", "../x", "--out", "{runs}"], ["--name"]),
    ("workers-infeasible", ["train", "--root", "{data}", *TINY_TRAIN, "--workers", "2", "--cpus-per-worker", "4096",
                            "--out", "{base}/o6"], ["--workers", "--cpus-per-worker"]),
    ("unknown-field", ["train", "--root", "{data}", *TINY_TRAIN, "--set", "model.nonexistent=1"], ["nonexistent"]),
    ("precision-choice", ["train", "--root", "{data}", *TINY_TRAIN, "--set", "train.precision=fp16"], ["fp16"]),
    ("config-missing", ["train", "--config", "{base}/missing.yaml"], ["missing.yaml"]),
    ("config-not-yaml", ["train", "--config", "{yaml}"], ["bad.yaml", "YAML"]),
    ("root-missing", ["train", "--root", "{base}/nowhere", *TINY_TRAIN, "--out", "{base}/o7"], ["nowhere"]),
    ("existing-run", ["train", "--root", "{data}", *TINY_TRAIN, "--out", "{runs}", "--name", "done"],
     ["already exists", "--resume"]),
    ("resume-missing", ["train", "--resume", "{base}/no-such-run"], ["no-such-run"]),
    ("out-is-a-file", ["train", "--root", "{data}", *TINY_TRAIN, "--out", "{file}"], ["a-file.txt"]),
    ("threshold-nan", ["predict", "{images}", "--run", "{run}", "--out", "{base}/p1", "--threshold", "nan"],
     ["--threshold", "finite"]),
    ("threshold-inf", ["predict", "{images}", "--run", "{run}", "--out", "{base}/p2", "--threshold", "-inf"],
     ["--threshold", "finite"]),
    ("threshold-word", ["predict", "{images}", "--run", "{run}", "--out", "{base}/p3", "--threshold", "high"],
     ["--threshold", "auto"]),
    ("predict-no-run", ["predict", "{images}", "--run", "{base}/no-run", "--out", "{base}/p4"], ["no-run"]),
    ("predict-no-input", ["predict", "{base}/no-images", "--run", "{run}", "--out", "{base}/p5"], ["no-images"]),
    ("predict-out-is-a-file", ["predict", "{images}", "--run", "{run}", "--out", "{file}"], ["a-file.txt"]),
    ("eval-no-run", ["eval", "--run", "{base}/no-run"], ["no-run"]),
    ("eval-maps-under-a-file", ["eval", "--run", "{run}", "--save-maps", "{file}/maps.npz"], ["a-file.txt"]),
    ("export-out-is-a-dir", ["export", "--run", "{run}", "--format", "torchscript", "--out", "{dir}"], ["a-dir"]),
    ("download-root-is-a-file", ["data", "download", "visa", "--root", "{file}"], ["a-file.txt"]),
    ("corrupt-training-image", ["train", "--root", "{corrupt}", *TINY_TRAIN, "--out", "{base}/o8"],
     ["cannot decode", "{cut}", "remove or replace"]),
    ("strict-data-missing-mask", ["train", "--root", "{maskless}", *TINY_TRAIN, "--strict-data",
                                  "--out", "{base}/o9"], ["no mask", "--strict-data"]),
    ("tune-samples-zero", ["tune", "--root", "{data}", *TINY_TRAIN, "--samples", "0", "--out", "{base}/s1"],
     ["--samples"]),
]


def checksums(folder: str) -> dict[str, str]:
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(Path(folder).rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def outcomes(world):
    """Every case run once (two at a time: each is mostly start-up), with the run's checksums
    taken before and after all of them."""
    before = checksums(world["runs"])

    def run(case):
        name, argv, _ = case
        return name, helpers.agpctl(*(arg.format(**world) for arg in argv), timeout=120, cwd=world["base"])

    with ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(run, CASES))
    return results, before, checksums(world["runs"])


@pytest.mark.parametrize("name,words", [(name, words) for name, _, words in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(outcomes, world, name, words):
    results, _, _ = outcomes
    words = [word.format(**world) for word in words]
    proc = results[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 1, proc.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])


def test_no_file_of_the_existing_run_changed(outcomes):
    _, before, after = outcomes
    assert before and after == before


def test_a_run_refused_before_training_can_be_rerun(outcomes, world):
    """Mistakes found before training leave no config.yaml that would refuse the same --name."""
    for out in ("o1", "o2", "o8", "o9"):
        assert not list(Path(world["base"], out).rglob("config.yaml")), out
