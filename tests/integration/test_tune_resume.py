"""`agpctl tune --resume` of a real sweep: it reads agp's JSON state only, so pickles planted
in the sweep folder (Tune's tuner.pkl, experiment state, error pickles) never run, and it
runs again exactly the trials that did not finish."""

from __future__ import annotations

import json
import pathlib
import pickle

import pytest

import helpers
from helpers import agpctl

pytestmark = pytest.mark.slow

TINY_AGPNET = [*helpers.TINY_AGPNET, "--val-fraction", "0.25"]
SPACE = "model.alpha_max: {type: uniform, low: 0.5, high: 2.0}\n"


class Planted:
    """Loading this pickle creates ``marker`` (code run by the unpickler)."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def sweep(generated_dataset, tmp_path_factory):
    """A finished two-trial, one-epoch sweep."""
    out = tmp_path_factory.mktemp("resume")
    (out / "space.yaml").write_text(SPACE)
    proc = agpctl("tune", "--dataset", "mvtec", "--root", generated_dataset, "--epochs", "1", "--samples", "2",
                  "--scheduler", "fifo", "--max-concurrent", "1", "--space", str(out / "space.yaml"),
                  "--out", str(out), "--name", "sweep", "--json", *TINY_AGPNET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout)
    assert sorted(t["trial"] for t in outcome["trials"]) == ["t0000", "t0001"]
    assert {t["status"] for t in outcome["trials"]} == {"finished"}
    return outcome, out / "sweep", out / "pwned"


def plant_pickles(sweep_dir: pathlib.Path, marker: pathlib.Path) -> list[pathlib.Path]:
    """A malicious pickle in place of every pickle and Tune state file of the sweep, and a
    tuner.pkl where older sweeps kept Tune's state (the sweep folder itself)."""
    payload = pickle.dumps(Planted(marker))
    targets = {sweep_dir / "tuner.pkl", sweep_dir / "experiment_state-2025-01-01_00-00-00.json"}
    for path in sweep_dir.rglob("*"):
        name = path.name
        if path.is_file() and (name.endswith(".pkl") or name.startswith(("experiment_state", "basic-variant-state",
                                                                          "searcher-state"))):
            targets.add(path)
    tune_dirs = [p for p in (sweep_dir / "tune").iterdir() if p.is_dir()]
    assert tune_dirs, "Tune's own files are kept under tune/<attempt>/"
    for attempt in tune_dirs:
        assert (attempt / "tuner.pkl") in targets  # the real one, about to be replaced
    for path in targets:
        path.write_bytes(payload)
    assert not marker.exists()
    return sorted(targets)


def trial_key(trials):
    return [(t["trial"], t["status"], t["epochs"], t["objective"]) for t in trials]


def test_resume_never_loads_a_planted_pickle(sweep):
    outcome, sweep_dir, marker = sweep
    planted = plant_pickles(sweep_dir, marker)
    assert len(planted) >= 3
    proc = agpctl("tune", "--resume", str(sweep_dir), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists(), "resume unpickled a file of the sweep folder"
    again = json.loads(proc.stdout)
    assert trial_key(again["trials"]) == trial_key(outcome["trials"])  # nothing ran again
    assert again["best"]["trial"] == outcome["best"]["trial"]


def test_resume_runs_exactly_the_interrupted_trial(sweep):
    outcome, sweep_dir, marker = sweep
    plant_pickles(sweep_dir, marker)
    # t0001 was cut short after its last checkpoint, before it wrote metrics.json: the
    # driver's record says interrupted.
    (sweep_dir / "runs" / "t0001" / "metrics.json").unlink()
    record_file = sweep_dir / "trials" / "t0001.json"
    record = json.loads(record_file.read_text())
    record.update(status="interrupted", final=False)
    record_file.write_text(json.dumps(record))
    kept = sweep_dir / "runs" / "t0000" / "metrics.json"
    kept_mtime = kept.stat().st_mtime_ns
    attempts_before = len([p for p in (sweep_dir / "tune").iterdir() if p.is_dir()])

    proc = agpctl("tune", "--resume", str(sweep_dir), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists(), "resume unpickled a file of the sweep folder"
    again = json.loads(proc.stdout)
    assert {t["trial"]: t["status"] for t in again["trials"]} == {"t0000": "finished", "t0001": "finished"}
    assert (sweep_dir / "runs" / "t0001" / "metrics.json").exists()
    assert kept.stat().st_mtime_ns == kept_mtime  # the finished trial was left alone
    records = {i: json.loads((sweep_dir / "trials" / f"{i}.json").read_text()) for i in ("t0000", "t0001")}
    assert records["t0000"]["attempts"] == 1 and records["t0001"]["attempts"] == 2
    assert records["t0001"]["status"] == "finished" and records["t0001"]["final"] is True
    # the continued trial resumed from its epoch-1 checkpoint: same planned values, one epoch
    before = {t["trial"]: t for t in outcome["trials"]}
    after = {t["trial"]: t for t in again["trials"]}
    assert after["t0001"]["params"] == before["t0001"]["params"] and after["t0001"]["epochs"] == 1
    assert len([p for p in (sweep_dir / "tune").iterdir() if p.is_dir()]) == attempts_before + 1  # a new Tuner
    results = json.loads((sweep_dir / "results.json").read_text())
    assert results["summary"]["unfinished"] == [] and len(results["trials"]) == 2


class _OverwriteErrorPickle:
    """A Tune callback standing in for someone who swaps a failed trial's error.pkl in the
    sweep folder for a malicious one before the sweep ends."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __getattr__(self, name):  # every other hook of Tune's Callback: nothing to do
        if name.startswith("on_") or name in ("setup", "get_state", "set_state", "can_restore"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_trial_error(self, iteration, trials, trial, **info):
        pathlib.Path(trial.local_path, "error.pkl").write_bytes(pickle.dumps(Planted(self.marker)))


def _failing_trial(config, sweep_uri):
    raise ValueError("planned failure")


def test_a_failed_trial_is_recorded_without_loading_its_error_pickle(tmp_path):
    """Tuner.fit builds a ResultGrid that unpickles each failed trial's error.pkl; the sweep's
    callback drops that file name first, and the record keeps the error line."""
    import ray
    from ray import tune

    from tuning.state import TrialRecorder, new_record, read_trial_records, trial_error_uri
    from tuning.view import sweep_callback

    sweep, marker = str(tmp_path / "sweep"), tmp_path / "pwned"
    (tmp_path / "sweep" / "trials").mkdir(parents=True)
    pathlib.Path(trial_error_uri(sweep, "t0000")).write_text("ValueError: planned failure\n")  # as run_trial does
    recorder = TrialRecorder(sweep, {"t0000": new_record("t0000")})
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        grid = tune.Tuner(
            tune.with_parameters(_failing_trial, sweep_uri=sweep),
            param_space={"agp_trial": tune.grid_search(["t0000"])},
            run_config=tune.RunConfig(name="attempt", storage_path=str(tmp_path / "sweep" / "tune"), verbose=0,
                                      callbacks=[sweep_callback(recorder, None), _OverwriteErrorPickle(marker)]),
        ).fit()
    finally:
        ray.shutdown()
    assert list((tmp_path / "sweep" / "tune").rglob("error.pkl"))  # the planted file was there
    assert not marker.exists(), "Tune unpickled a failed trial's error.pkl"
    assert isinstance(grid[0].error, str)  # Tune fell back to its text error file
    record = read_trial_records(sweep, ["t0000"])["t0000"]
    assert record["status"] == "error" and record["error"] == "ValueError: planned failure"
