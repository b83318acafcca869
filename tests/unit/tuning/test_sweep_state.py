"""agp's own sweep state, without Ray: the planned trials (reproducible from the seed, inside
the space), sweep.json and the trial records as checked JSON, and which trials --resume
runs again. Resume never loads a pickle: a finished sweep with planted pickles resumes here
without Ray and without running them."""

from __future__ import annotations

import json
import math
import pathlib
import pickle

import pytest

from agpctl.config import RunConfig
from agpctl.errors import UserError
from tuning.space import SpaceError, parse_space
from tuning.results import collect_trials
from tuning.state import (
    SWEEP_FILE,
    SweepSettings,
    TrialRecorder,
    check_trial_record,
    finished_runs,
    load_sweep_state,
    new_record,
    plan_trials,
    read_trial_records,
    sweep_state_json,
    trial_outcome,
    trial_record_uri,
    trials_to_run,
    write_trial_record,
)
from tuning.sweep import run_sweep

RAW_SPACE = {
    "model.alpha_max": {"type": "uniform", "low": 0.5, "high": 2.0},
    "model.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
    "train.batch_size": {"type": "randint", "low": 2, "high": 9},
    "model.attention_source": {"type": "choice", "values": ["prior", "decoder", "both"]},
    "pair": {"type": "group", "values": [{"model.noise_floor": 0.0, "model.image_sigma": 0.5},
                                         {"model.noise_floor": 0.2, "model.image_sigma": 1.0}]},
}
GRID_SPACE = {
    "model.attention_source": {"type": "choice", "values": ["prior", "decoder", "both"]},
    "model.layers": {"type": "choice", "values": [[1, 2], [2]]},
}


def space(raw=None):
    return parse_space(raw or RAW_SPACE, "agpnet", "space.yaml")


# -- the plan ------------------------------------------------------------------------------
def test_random_plan_is_reproducible_from_the_seed_and_plain_json():
    settings = SweepSettings(samples=20, seed=7)
    plan = plan_trials(space(), settings)
    assert plan == plan_trials(space(), SweepSettings(samples=20, seed=7))
    assert plan != plan_trials(space(), SweepSettings(samples=20, seed=8))
    assert json.loads(json.dumps(plan)) == plan  # plain values only, exact round trip
    assert [t["id"] for t in plan] == [f"t{i:04d}" for i in range(20)]


def test_random_plan_stays_inside_the_space():
    sp = space()
    plan = plan_trials(sp, SweepSettings(samples=200, seed=0))
    column = {key: [t["params"][key] for t in plan] for key in RAW_SPACE}
    assert all(0.5 <= v <= 2.0 and isinstance(v, float) for v in column["model.alpha_max"])
    assert all(1e-5 <= v <= 1e-3 for v in column["model.lr"])
    logs = [math.log10(v) for v in column["model.lr"]]
    assert min(logs) < -4.5 and max(logs) > -3.5  # log-uniform: both decades are visited
    assert set(column["train.batch_size"]) == set(range(2, 9))  # randint: high exclusive
    assert all(type(v) is int for v in column["train.batch_size"])
    assert set(column["model.attention_source"]) == {0, 1, 2}  # choice: indices
    assert set(column["pair"]) == {0, 1}
    for trial in plan:
        sp.check_point(trial["params"], "plan")
        overrides = sp.overrides(trial["params"])
        assert overrides["model.attention_source"] in ("prior", "decoder", "both")
        assert overrides["model.noise_floor"] in (0.0, 0.2)


def test_grid_plan_is_the_grid_times_the_samples():
    sp = space(GRID_SPACE)
    plan = plan_trials(sp, SweepSettings(samples=2, search="grid"))
    assert len(plan) == sp.grid_size() * 2 == 12
    points = [tuple(sorted(t["params"].items())) for t in plan]
    assert len(set(points)) == 6 and all(points.count(p) == 2 for p in set(points))
    with pytest.raises(SpaceError, match="grid search needs choice values"):
        plan_trials(space(), SweepSettings(search="grid"))


@pytest.mark.parametrize("point, fragment", [
    ({"model.alpha_max": 3.0}, "not a number in"),
    ({"model.alpha_max": float("nan")}, "not a number in"),
    ({"model.alpha_max": True}, "not a number in"),
    ({"train.batch_size": 9}, "not an integer in [2, 9)"),
    ({"train.batch_size": 3.0}, "not an integer"),
    ({"model.attention_source": 3}, "not an integer in [0, 3)"),
    ({"pair": -1}, "not an integer"),
    ({"extra": 1}, "do not match"),
])
def test_points_outside_the_space_are_rejected(point, fragment):
    sp = space()
    good = plan_trials(sp, SweepSettings(samples=1))[0]["params"]
    with pytest.raises(SpaceError, match="plan") as caught:
        sp.check_point({**good, **point}, "plan")
    assert fragment in str(caught.value)


# -- sweep.json ----------------------------------------------------------------------------
def base_config() -> RunConfig:
    return RunConfig(method="agpnet").with_overrides({"train.epochs": 2, "train.validation": "synthetic"})


def write_sweep(tmp_path, settings=None, raw_space=None, **changes) -> tuple[str, dict]:
    sp, settings = space(raw_space), settings or SweepSettings(samples=3, seed=1)
    state = json.loads(sweep_state_json(base_config(), sp, settings, plan_trials(sp, settings)))
    state.update(changes)
    (tmp_path / SWEEP_FILE).write_text(json.dumps(state))
    return str(tmp_path), state


def test_sweep_state_round_trip(tmp_path):
    sweep, saved = write_sweep(tmp_path)
    state = load_sweep_state(sweep)
    assert state.plan == saved["trials"] and len(state.plan) == 3
    assert state.settings == SweepSettings(samples=3, seed=1)
    assert state.cfg.method == "agpnet" and state.cfg.train.epochs == 2
    assert [d.key for d in state.space.dimensions] == list(RAW_SPACE)


def bad_trial(saved, **fields):
    return [{**saved["trials"][0], **fields}, *saved["trials"][1:]]


@pytest.mark.parametrize("mutate, fragment", [
    (lambda s: {"trials": bad_trial(s, id="../../etc")}, "bad trial id"),
    (lambda s: {"trials": bad_trial(s, id=3)}, "bad trial id"),
    (lambda s: {"trials": bad_trial(s, params={**s["trials"][0]["params"], "model.alpha_max": 9.0})}, "model.alpha_max"),
    (lambda s: {"trials": bad_trial(s, extra=1)}, "expected {\"id\""),
    (lambda s: {"trials": s["trials"][:2]}, "2 planned trial(s), but the settings make 3"),
    (lambda s: {"trials": [s["trials"][0]] * 3}, "trial ids repeat"),
    (lambda s: {"trials": {"t0000": {}}}, "'trials' must be a JSON list"),
    (lambda s: {"settings": {**s["settings"], "samples": "3"}}, "samples = '3' has the wrong type"),
    (lambda s: {"settings": {**s["settings"], "scheduler": "pbt"}}, "--scheduler 'pbt'"),
    (lambda s: {"settings": {**s["settings"], "evil": 1}}, "unknown setting(s) evil"),
    (lambda s: {"space": {"model.alpha_max": {"type": "uniform", "low": 3, "high": 1}}}, "must be below high"),
    (lambda s: {"base": {**s["base"], "method": "nope"}}, "nope"),
    (lambda s: {"base": {**s["base"], "train": {"epochs": "many"}}}, "base"),
    (lambda s: {"base": ["not", "a", "mapping"]}, "'base' must be a JSON object"),
    (lambda s: {"version": 1}, "unknown sweep state version 1"),
])
def test_malformed_sweep_state_is_one_line_naming_the_file(tmp_path, mutate, fragment):
    _, saved = write_sweep(tmp_path)
    (tmp_path / SWEEP_FILE).write_text(json.dumps({**saved, **mutate(saved)}))
    with pytest.raises(UserError) as caught:
        load_sweep_state(str(tmp_path))
    message = str(caught.value)
    assert fragment in message and str(tmp_path / SWEEP_FILE) in message and "\n" not in message


def test_missing_unreadable_and_old_sweep_state(tmp_path):
    with pytest.raises(UserError, match="is not a sweep directory"):
        load_sweep_state(str(tmp_path))
    (tmp_path / SWEEP_FILE).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_sweep_state(str(tmp_path))
    _, saved = write_sweep(tmp_path)
    old = {k: v for k, v in saved.items() if k not in ("trials", "version")}  # before plans were kept
    (tmp_path / SWEEP_FILE).write_text(json.dumps(old))
    with pytest.raises(UserError, match="older agpctl.*start a new sweep"):
        load_sweep_state(str(tmp_path))


# -- trial records -------------------------------------------------------------------------
def test_trial_record_round_trip(tmp_path):
    sweep = str(tmp_path)
    recorder = TrialRecorder(sweep, {"t0000": new_record("t0000")})
    recorder.started("t0000")
    recorder.result("t0000", {"epoch": 1, "val/objective": 0.6, "val/i_auroc": 0.5, "val/p_auroc": 0.7,
                              "val/pro": 0.6, "time_total_s": 3.0})
    recorder.result("t0000", {"epoch": 2, "val/objective": 0.7, "val/i_auroc": 0.6, "val/p_auroc": 0.8,
                              "val/pro": float("nan"), "time_total_s": 5.0})
    recorder.result("t0000", {"epoch": 2, "final": 1, "val/objective": 0.7, "time_total_s": 6.0})
    recorder.completed("t0000", early_stopped=False)
    records = read_trial_records(sweep, ["t0000", "t0001"])
    assert records["t0000"] == recorder.records["t0000"]
    record = records["t0000"]
    assert (record["status"], record["epochs"], record["final"], record["attempts"]) == ("finished", 2, True, 1)
    assert record["history"] == [[1, 0.6], [2, 0.7]] and record["pro"] == 0.6  # NaN does not replace a value
    assert record["seconds"] == 6.0
    assert records["t0001"] == new_record("t0001")  # no file: never started

    # A second attempt (resume) adds its seconds to the first's and starts unproven.
    again = TrialRecorder(sweep, records)
    assert again.started("t0000")["final"] is False
    again.result("t0000", {"epoch": 2, "time_total_s": 1.5})
    assert again.records["t0000"]["seconds"] == 7.5 and again.records["t0000"]["attempts"] == 2
    again.errored("t0000", "RuntimeError: boom")
    assert read_trial_records(sweep, ["t0000"])["t0000"]["error"] == "RuntimeError: boom"


@pytest.mark.parametrize("raw, fragment", [
    ([], "expected a JSON object"),
    ({"id": "t0001"}, "id 't0001' is not 't0000'"),
    ({"status": "pwned"}, "status 'pwned'"),
    ({"epochs": -1}, "counts"),
    ({"final": "yes"}, "final must be true or false"),
    ({"objective": "high"}, "numbers or null"),
    ({"history": [[1, "x"]]}, "history must be"),
    ({"error": {"a": 1}}, "error must be text"),
])
def test_malformed_trial_records_are_rejected(raw, fragment):
    with pytest.raises(UserError) as caught:
        check_trial_record(raw, "t0000", "trials/t0000.json")
    assert fragment in str(caught.value) and "trials/t0000.json" in str(caught.value)
    assert "delete the file" in str(caught.value)


def test_an_unreadable_record_file_names_the_file(tmp_path):
    path = pathlib.Path(trial_record_uri(str(tmp_path), "t0000"))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x80\x04\x95 a pickle, not JSON")
    with pytest.raises(UserError, match="t0000.json: not valid JSON"):
        read_trial_records(str(tmp_path), ["t0000"])


# -- what --resume runs ----------------------------------------------------------------------
def record(trial_id, status, epochs=0, final=False, objective=None):
    return {**new_record(trial_id), "status": status, "epochs": epochs, "final": final, "objective": objective}


def test_resume_runs_what_did_not_finish_or_stop():
    plan = [{"id": f"t{i:04d}", "params": {}} for i in range(7)]
    records = {
        "t0000": record("t0000", "finished", 2, True, 0.8),        # finished: kept
        "t0001": record("t0001", "stopped", 1, False, 0.5),        # stopped by ASHA: kept
        "t0002": record("t0002", "running", 1, False, 0.6),        # the driver died mid-trial: interrupted
        "t0003": record("t0003", "interrupted", 1, False, 0.6),    # Ctrl-C
        "t0004": record("t0004", "error"),                         # failed: run again
        "t0005": record("t0005", "finished", 2, True, 0.7),        # final report, but metrics.json is gone
        # t0006: no record at all: not started
    }
    finished, early = {"t0000"}, {"t0001"}
    assert trials_to_run(plan, records, early, finished) == ["t0002", "t0003", "t0004", "t0005", "t0006"]
    assert trial_outcome(records["t0002"], False, False) == "interrupted"
    assert trial_outcome(records["t0005"], False, False) == "interrupted"
    assert trial_outcome(new_record("t0006"), False, False) == "not started"
    assert trial_outcome(record("t0001", "running", 1), False, True) == "stopped"  # early_stopped.json alone
    assert trial_outcome(record("t0000", "error", 2, True), True, False) == "finished"  # its run completed
    assert trials_to_run(plan[:2], records, early, finished) == []


def test_results_table_comes_from_records_and_run_directories(tmp_path):
    sp = space()
    plan = plan_trials(sp, SweepSettings(samples=3, seed=0))
    runs_uri = str(tmp_path / "runs")
    (tmp_path / "runs" / "t0000").mkdir(parents=True)
    (tmp_path / "runs" / "t0000" / "metrics.json").write_text(json.dumps({"metrics": {}}))
    records = {"t0000": record("t0000", "finished", 2, True, 0.8), "t0001": record("t0001", "running", 1, False, 0.9),
               "t0002": {**record("t0002", "error"), "error": "ValueError: bad"}}
    assert finished_runs(runs_uri, records) == {"t0000"}
    rows = collect_trials(plan, records, sp, runs_uri, set(), finished_runs(runs_uri, records))
    assert [(r["trial"], r["status"]) for r in rows] == [("t0001", "interrupted"), ("t0000", "finished"),
                                                         ("t0002", "error")]
    assert rows[1]["run"] == str(tmp_path / "runs" / "t0000") and rows[2]["error"] == "ValueError: bad"
    assert rows[1]["params"] == sp.overrides(plan[0]["params"])


# -- ASHA starts from the recorded rungs -------------------------------------------------------
def test_asha_on_resume_compares_with_the_recorded_trials(tmp_path):
    from types import SimpleNamespace

    from tuning.schedulers import RecordingASHA, read_early_stopped

    history = {"t0000": [(1, 0.9), (2, 0.95)], "t0001": [(1, 0.8)], "t0002": [(1, 0.85)]}
    scheduler = RecordingASHA(sweep_uri=str(tmp_path), history=history, time_attr="epoch", max_t=3, grace_period=1,
                              reduction_factor=2)
    scheduler.set_search_properties("val/objective", "max")
    weak = SimpleNamespace(trial_id="tune_00000", config={"agp_trial": "t0003"})
    continued = SimpleNamespace(trial_id="tune_00001", config={"agp_trial": "t0001"})
    for trial in (weak, continued):
        scheduler.on_trial_add(None, trial)
    # alone, a first trial always goes on; against the recorded rung it is cut
    assert scheduler.on_trial_result(None, weak, {"epoch": 1, "val/objective": 0.1}) == scheduler.STOP
    assert read_early_stopped(str(tmp_path)) == {"t0003"}  # agp's id, not Tune's
    # t0001 passed rung 1 before the interruption: it is judged at rung 2 only
    rungs = {milestone: recorded for milestone, recorded in scheduler._brackets[0]._rungs}
    assert rungs[1]["tune_00001"] == 0.8 and "t0001" not in rungs[1]
    assert scheduler.on_trial_result(None, continued, {"epoch": 2, "val/objective": 0.99}) == scheduler.CONTINUE


def test_early_stopped_file_is_checked_on_resume(tmp_path):
    from tuning.schedulers import STOPPED_FILE, read_early_stopped

    (tmp_path / STOPPED_FILE).write_text(json.dumps({"t0000": "yes"}))
    assert read_early_stopped(str(tmp_path)) == set()
    with pytest.raises(UserError, match="early_stopped.json: expected a JSON list"):
        read_early_stopped(str(tmp_path), strict=True)


# -- resume of a finished sweep: nothing runs, nothing is unpickled -------------------------------
class Planted:
    """A pickle that creates ``marker`` when loaded."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_resume_of_a_finished_sweep_reads_only_json(where, tmp_path, monkeypatch, request):
    import tuning.sweep as sweep_module
    from agp_data import storage

    sweep = str(tmp_path / "sweep") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/sweeps/x"
    sp, settings = space(), SweepSettings(samples=2, scheduler="fifo", seed=4)
    plan = plan_trials(sp, settings)
    storage.write_text(storage.join(sweep, SWEEP_FILE), sweep_state_json(base_config(), sp, settings, plan))
    for i, trial in enumerate(plan):
        run = storage.join(sweep, "runs", trial["id"])
        storage.write_text(storage.join(run, "config.yaml"), base_config().to_yaml())
        storage.write_text(storage.join(run, "metrics.json"), json.dumps({"metrics": {"mean": {"i_auroc": 0.5}}}))
        write_trial_record(sweep, record(trial["id"], "finished", 2, True, 0.5 + i / 10))
    marker = tmp_path / "pwned"
    for name in ("tuner.pkl", "tune/20250101-000000/tuner.pkl", "tune/20250101-000000/experiment_state-x.json",
                 "runs/t0000/error.pkl"):
        storage.write_bytes(storage.join(sweep, name), pickle.dumps(Planted(marker)))

    def no_tune(*args, **kwargs):
        raise AssertionError("a finished sweep runs no Tuner")

    monkeypatch.setattr(sweep_module, "_run_trials", no_tune)
    outcome = run_sweep(None, None, None, resume=sweep + "/", quiet=True)
    assert not marker.exists()
    assert outcome.sweep_uri == sweep
    assert [(t["trial"], t["status"], t["objective"]) for t in outcome.trials] == [("t0001", "finished", 0.6),
                                                                                   ("t0000", "finished", 0.5)]
    assert outcome.best["trial"] == "t0001" and storage.exists(storage.join(sweep, "results.json"))
