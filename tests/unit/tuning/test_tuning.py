"""Sweeps without Ray: search-space files, the synthetic validation set, per-epoch
validation in the training loop, and the sweep's result bookkeeping."""

from __future__ import annotations

import csv
import io
import math

import pytest
import torch
from click.testing import CliRunner

from agp_data.dataset import AnomalyDataset
from agp_data.errors import DataError
from agp_data.layouts import load_samples
from agp_data.validation import SyntheticValidationSet
from agpctl.cli import cli
from agpctl.config import RunConfig
from agpctl.distributed import WorkerContext
from agpctl.training.progress import ProgressSender
from agpctl.training.worker import RunSpec, train_on_worker
from tuning.space import SpaceError, load_space, parse_space
from tuning.results import pick_best, sort_trials, trials_csv
from tuning.sweep import trial_config


def write(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


# -- search-space files ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["agpnet", "onenip", "rlr"])
def test_default_spaces_parse_and_every_value_builds_a_config(method):
    space = load_space(method)
    assert space.dimensions
    keys = {p for d in space.dimensions for p in d.paths()}
    assert "model.lr" in keys
    base = RunConfig(method=method)
    for dim in space.dimensions:
        for index in range(len(dim.values)):
            sampled = {d.key: (index if d is dim else _any_value(d)) for d in space.dimensions}
            base.with_overrides(space.overrides(sampled))  # raises if a value is invalid


def _any_value(dim):
    return 0 if dim.kind in ("choice", "group") else dim.low


def test_default_spaces_cover_the_issue_parameters():
    agpnet = {p for d in load_space("agpnet").dimensions for p in d.paths()}
    assert {"model.alpha_max", "model.noise_floor", "model.image_sigma", "model.mask_ratio_end",
            "model.attention_source", "model.layers", "model.lr"} <= agpnet
    layers = next(d for d in load_space("agpnet").dimensions if d.key == "model.layers")
    assert layers.values == [[3, 6, 9, 12], [6, 9, 12], [9, 12], [12]]
    onenip = {p for d in load_space("onenip").dimensions for p in d.paths()}
    assert {"model.fusion_alpha", "model.lam", "model.neighbourhood_size", "model.restoration", "model.lr"} <= onenip
    rlr = {p for d in load_space("rlr").dimensions for p in d.paths()}
    assert {"model.alpha", "model.jitter_scale", "model.layers", "model.widths", "model.window_sizes", "model.lr"} <= rlr


@pytest.mark.parametrize("text, fragment", [
    ("model.alpha_maxx: {type: uniform, low: 0.5, high: 2.0}\n", "unknown config field 'alpha_maxx'"),
    ("train.nope: {type: choice, values: [1, 2]}\n", "unknown config field 'nope'"),
    ("model.alpha_max: {type: uniform, low: 2.0, high: 0.5}\n", "low (2.0) must be below high (0.5)"),
    ("model.alpha_max: {type: uniform, low: 1.0, high: 1.0}\n", "must be below high"),
    ("model.lr: {type: loguniform, low: 0.0, high: 0.1}\n", "loguniform needs low > 0"),
    ("model.layers: {type: choice, values: []}\n", "non-empty list"),
    ("model.layers: {type: uniform, low: 1, high: 2}\n", "needs a float field"),
    ("model.decoder_depth: {type: uniform, low: 1, high: 4}\n", "(use randint)"),
    ("model.alpha_max: {type: randint, low: 1, high: 4}\n", "randint needs an integer field"),
    ("model.alpha_max: {type: choice, values: [0.5, fast]}\n", "'fast' is not a float"),
    ("model.layers: {type: choice, values: [[3, 6], three]}\n", "expected an integer, got 'three'"),
    ("model.attention_source: {type: choice, values: [prior, nowhere]}\n", "attention_source must be one of"),
    ("model.alpha_max: {type: normal, low: 0, high: 1}\n", "unknown type 'normal'"),
    ("model.alpha_max: {type: uniform, low: 0.5}\n", "needs both low and high"),
    ("storage.out: {type: choice, values: [a, b]}\n", "cannot be searched"),
    ("model.backbone: {type: choice, values: [a]}\n", "is a whole section"),
    ("g: {type: group, values: [{model.nope: 1}]}\n", "unknown config field 'nope'"),
    ("model.lr: {type: uniform, low: 0.1, high: 0.2}\ng: {type: group, values: [{model.lr: 0.1}]}\n",
     "already varied"),
    ("- just a list\n", "expected a mapping"),
])
def test_bad_space_files_are_rejected_with_file_and_key(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as caught:
        load_space("agpnet", path)
    message = str(caught.value)
    assert fragment in message
    assert message.startswith(path)
    assert "\n" not in message
    key = text.split(":", 1)[0].strip()
    if not key.startswith("-"):
        assert key in message


def test_a_field_of_another_method_is_unknown(tmp_path):
    path = write(tmp_path, "model.fusion_alpha: {type: uniform, low: 0.0, high: 1.0}\n")
    assert load_space("onenip", path).dimensions[0].key == "model.fusion_alpha"
    with pytest.raises(SpaceError, match="unknown config field 'fusion_alpha'.*agpnet"):
        load_space("agpnet", path)


def test_choice_and_group_indices_map_to_overrides():
    space = parse_space({
        "model.alpha_max": {"type": "uniform", "low": 0.5, "high": 2},
        "model.layers": {"type": "choice", "values": [[3, 6], [12]]},
        "pair": {"type": "group", "values": [{"model.lr": 1e-4, "train.batch_size": 2},
                                             {"model.lr": 1e-3, "train.batch_size": 4}]},
    }, "agpnet")
    overrides = space.overrides({"model.alpha_max": 0.7, "model.layers": 1, "pair": 1})
    assert overrides == {"model.alpha_max": 0.7, "model.layers": [12], "model.lr": 1e-3, "train.batch_size": 4}
    cfg = trial_config(RunConfig(method="agpnet").to_dict(), space,
                       {"model.alpha_max": 0.7, "model.layers": 1, "pair": 1}, "/sweeps/x/runs", "t_00001")
    assert (cfg.model.alpha_max, cfg.model.layers, cfg.model.lr, cfg.train.batch_size) == (0.7, [12], 1e-3, 4)
    assert (cfg.storage.out, cfg.storage.name) == ("/sweeps/x/runs", "t_00001")
    assert cfg.model.alpha_min == RunConfig(method="agpnet").model.alpha_min  # untouched fields stay


def test_grid_search_needs_choice_dimensions():
    space = parse_space({"model.layers": {"type": "choice", "values": [[3], [6], [9]]},
                         "model.alpha_max": {"type": "choice", "values": [0.5, 1.0]}}, "agpnet")
    grid = space.grid()
    assert sorted({point["model.layers"] for point in grid}) == [0, 1, 2] and len(grid) == space.grid_size() == 6
    mixed = parse_space({"model.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3}}, "agpnet")
    with pytest.raises(SpaceError, match="grid search needs choice values"):
        mixed.grid()


def test_cli_rejects_a_bad_space_in_one_line_before_ray(tmp_path):
    path = write(tmp_path, "model.alpha_max: {type: uniform, low: 3, high: 1}\n")
    result = CliRunner().invoke(cli, ["tune", "--method", "agpnet", "--space", path, "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert path in result.output and "model.alpha_max" in result.output and "must be below high" in result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("tune-*"))


# -- the synthetic validation set --------------------------------------------------------
@pytest.fixture(scope="module")
def normals(generated_dataset):
    samples = [s for s in load_samples("mvtec", generated_dataset) if s.split == "train"][:5]
    return AnomalyDataset(samples, image_size=64, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


def test_validation_set_pairs_each_normal_with_an_exactly_masked_anomaly(normals):
    val = SyntheticValidationSet(normals, seed=3)
    assert len(val) == 2 * len(normals)
    for i in range(len(normals)):
        normal, anomalous = val[i], val[i + len(normals)]
        assert normal["label"] == 0 and normal["mask"].sum() == 0
        assert torch.equal(normal["image"], normals[i]["image"])
        assert anomalous["label"] == 1 and anomalous["index"] == i + len(normals)
        mask = anomalous["mask"][0].bool()
        assert mask.any()
        changed = (anomalous["image"] != normal["image"]).any(dim=0)
        assert torch.equal(changed, mask)  # the mask is exact: changed pixels, nothing else


def test_validation_set_is_deterministic_per_seed(normals):
    a, b, c = (SyntheticValidationSet(normals, seed=s) for s in (3, 3, 4))
    last = len(a) - 1
    assert torch.equal(a[last]["image"], b[last]["image"]) and torch.equal(a[last]["mask"], b[last]["mask"])
    assert any(not torch.equal(a[i]["mask"], c[i]["mask"]) for i in range(len(normals), len(a)))


def test_validation_set_needs_normal_images(generated_dataset):
    defects = [s for s in load_samples("mvtec", generated_dataset) if s.label == 1][:2]
    with pytest.raises(DataError, match="normal images only"):
        SyntheticValidationSet(AnomalyDataset(defects, image_size=32, mean=[0.5] * 3, std=[0.5] * 3))
    with pytest.raises(DataError, match="--val-fraction"):
        SyntheticValidationSet(None)


# -- per-epoch validation inside the training loop ----------------------------------------
def test_training_reports_the_objective_every_epoch(generated_dataset, tmp_path):
    cfg = RunConfig(method="agpnet").with_overrides({
        "data.dataset": "mvtec", "data.root": generated_dataset, "data.loader_workers": 0, "data.val_fraction": 0.25,
        "train.epochs": 2, "train.batch_size": 4, "train.eval_batch_size": 8, "train.validation": "synthetic",
        "model.backbone.name": "resnet18", "model.backbone.pretrained": "no", "model.layers": [1, 2],
        "model.image_size": 64, "model.decoder_width": 32, "model.decoder_depth": 1, "model.decoder_heads": 2,
        "model.score_pool": 4,
    })
    reports: list[dict] = []
    train_on_worker(RunSpec(cfg, str(tmp_path / "run")), WorkerContext(), lambda m: m,
                    lambda metrics, payload, epoch: reports.append(metrics), ProgressSender(None, False), None)
    assert [r["epoch"] for r in reports] == [1, 2, 2] and reports[-1]["final"] == 1
    for r in reports:
        parts = [r["val/i_auroc"], r["val/p_auroc"], r["val/pro"]]
        assert all(0.0 <= v <= 1.0 for v in parts)
        assert r["val/objective"] == pytest.approx(sum(parts) / 3)
    assert reports[-1]["val/objective"] == reports[-2]["val/objective"]  # the final report repeats the last epoch's
    assert "test/i_auroc" in reports[-1] and "test/i_auroc" not in reports[0]


# -- sweep bookkeeping --------------------------------------------------------------------
def rows():
    return [
        {"trial": "a", "status": "stopped", "epochs": 1, "objective": 0.9, "params": {"model.lr": 1e-3}},
        {"trial": "b", "status": "finished", "epochs": 3, "objective": 0.7, "params": {"model.lr": 1e-4}},
        {"trial": "c", "status": "error", "epochs": 0, "objective": None, "params": {"model.lr": 1e-5}, "error": "boom"},
        {"trial": "d", "status": "finished", "epochs": 3, "objective": 0.8, "params": {"model.lr": 2e-4}},
    ]


def test_trials_sort_by_objective_and_best_is_a_finished_trial():
    assert [r["trial"] for r in sort_trials(rows())] == ["a", "d", "b", "c"]
    assert pick_best(rows())["trial"] == "d"  # a stopped trial's objective is of a shorter training
    only_stopped = [r for r in rows() if r["status"] != "finished"]
    assert pick_best(only_stopped)["trial"] == "a"
    assert pick_best([rows()[2]]) is None


def test_trials_csv_has_one_column_per_parameter():
    table = list(csv.DictReader(io.StringIO(trials_csv(sort_trials(rows())))))
    assert [r["trial"] for r in table] == ["a", "d", "b", "c"]
    assert float(table[1]["model.lr"]) == 2e-4 and table[3]["objective"] == "" and table[3]["error"] == "boom"
    assert not math.isnan(float(table[0]["objective"]))


def test_cli_needs_held_out_normals_for_the_synthetic_objective(generated_dataset, tmp_path):
    # 8 training images per category and val_fraction 0.1: no image is held out.
    result = CliRunner().invoke(cli, ["tune", "--method", "agpnet", "--dataset", "mvtec", "--root", generated_dataset,
                                      "--val-fraction", "0.1", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "raise --val-fraction" in result.output and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


def test_trial_status_tells_asha_stops_from_interruptions():
    from tuning.state import trial_status

    assert trial_status(error=True, final=False, early_stopped=False, epochs_done=1) == "error"
    assert trial_status(error=False, final=True, early_stopped=False, epochs_done=3) == "finished"
    assert trial_status(error=False, final=False, early_stopped=True, epochs_done=1) == "stopped"
    assert trial_status(error=False, final=False, early_stopped=False, epochs_done=2) == "interrupted"
    assert trial_status(error=False, final=False, early_stopped=False, epochs_done=0) == "not started"


def test_asha_records_the_trials_it_stops(tmp_path):
    from types import SimpleNamespace

    from tuning.schedulers import RecordingASHA, read_early_stopped

    scheduler = RecordingASHA(sweep_uri=str(tmp_path), time_attr="epoch", metric="objective", mode="max", max_t=4,
                              grace_period=1, reduction_factor=2)
    trials = [SimpleNamespace(trial_id=f"t{i}", config={}) for i in range(4)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    decisions = {t.trial_id: scheduler.on_trial_result(None, t, {"epoch": 1, "objective": 0.9 - 0.2 * i})
                 for i, t in enumerate(trials)}
    stopped = {trial_id for trial_id, decision in decisions.items() if decision == scheduler.STOP}
    assert stopped  # the weaker trials reaching the rung after the best are cut
    assert read_early_stopped(str(tmp_path)) == stopped
    assert read_early_stopped(str(tmp_path / "elsewhere")) == set()


def test_layer_sets_the_backbone_lacks_fail_before_ray(generated_dataset, tmp_path):
    """The default AGPNet space varies ViT blocks; with a CNN backbone that is one clear line."""
    from click.testing import CliRunner

    from agpctl.cli import cli

    result = CliRunner().invoke(cli, ["tune", "--method", "agpnet", "--dataset", "mvtec", "--root", generated_dataset,
                                      "--backbone", "resnet18", "--pretrained", "no", "--layers", "1,2",
                                      "--val-fraction", "0.25", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "agpnet.yaml" in result.output and "backbone resnet18 has stages 0..4" in result.output
    assert not any(tmp_path.iterdir())  # nothing started, nothing written
