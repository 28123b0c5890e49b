"""The search service end to end on a local Ray: sweeps, pruning, resume, failures, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import timm
import torch
import yaml
from fast import FAST_SWEEP, cli

from mmr.config import ConfigError, load_config
from mmr.errors import UserInputError
from search.config import ResourcesConfig
from search.resolve import resolve_sweep
from spaces import SpaceError

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

FAST = [*FAST_SWEEP, "search.n_startup_trials=2"]  # tests/fast.py


def spec_for(tmp: Path, root: Path, *extra: str, name: str = "t", space: dict | None = None):
    overrides = [f"data.root={root}", *FAST, *extra]
    if space is not None:
        path = tmp / f"space-{name}.yaml"
        path.write_text(yaml.safe_dump(space))
        overrides.append(f"space={path}")
    return resolve_sweep(None, overrides, name=name, storage=str(tmp / "runs"))


def study(exp: Path, name: str) -> optuna.Study:
    from search.samplers import study_storage

    return optuna.load_study(study_name=name, storage=study_storage(exp))


def test_sweep_end_to_end_with_export_that_reproduces_the_best_trial(
    ray_session, synthetic_root, tmp_path
):
    from mmr.train import fit
    from search.results import load_trials
    from search.sweep import run_sweep

    spec = spec_for(tmp_path, synthetic_root, "search.num_trials=4", "scheduler.type=fifo")
    lines: list[str] = []
    run = run_sweep(spec, write=lines.append, dashboard=False)
    text = "\n".join(lines)
    assert "best" in text and "baseline" in text and "trials:" in text

    df = load_trials(run.experiment_dir)
    assert len(df) == 4 and set(df["state"]) == {"done"}
    assert df["baseline"].sum() == 1
    base = df[df["baseline"]].iloc[0]
    assert base["mask_ratio"] == 0.4 and base["lr"] == pytest.approx(1e-3)
    assert base["study_trial"] == 0

    out = run.export_dir
    for name in (
        "best.yaml",
        "model.pt",
        "results.md",
        "trials.csv",
        "summary.json",
        "plots/optimization_history.png",
        "plots/param_importances.png",
        "plots/parallel_coordinate.png",
        "plots/overlays_disk.png",
        "plots/overlays_disk.gif",
    ):
        assert (out / name).is_file(), name
    trials = pd.read_csv(out / "trials.csv")
    assert trials["baseline"].tolist().count(True) == 1 and len(trials) == 4
    assert {"disk/image_auroc", "wall_s", "rounds_repeated"} <= set(trials.columns)
    assert trials["rounds_repeated"].eq(0).all()  # no trial was restarted
    results = (out / "results.md").read_text()
    assert "| baseline (test) |" in results and "| best (test) |" in results
    state = torch.load(out / "model.pt", weights_only=True)
    assert set(state["students"]) == {"disk"}

    # best.yaml retrains to exactly the metrics the best trial reported.
    summary = json.loads((out / "summary.json").read_text())["studies"]["t"]
    best = df[df["trial"] == summary["best_trial"]].iloc[0]
    again = fit(load_config(out / "best.yaml"), final_test=False)
    assert again["history"][-1]["image_auroc"] == pytest.approx(best["image_auroc"], abs=1e-9)
    # The exported best is the highest validation objective of the (all fully trained) trials
    # that keep the demo's guards (AUPRO, pixel AUROC), and the baseline is the base-config
    # trial, whatever their values.
    assert summary["guarded"] and df["feasible"].astype(bool)[df["baseline"]].all()
    kept = df[df["feasible"].astype(bool)]
    assert summary["best_trial"] == kept.loc[kept["objective"].idxmax(), "trial"]
    assert summary["best_val_objective"] == pytest.approx(kept["objective"].max())
    assert summary["baseline_trial"] == base["trial"]
    assert summary["baseline_val_objective"] == pytest.approx(base["objective"])


@pytest.mark.parametrize(
    "scheduler",
    [
        ["scheduler.type=asha", "scheduler.reduction_factor=2"],
        ["scheduler.type=median", "scheduler.min_samples=1"],
    ],
    ids=["asha", "median"],
)
def test_the_scheduler_stops_trials_and_the_study_records_them_pruned(
    ray_session, synthetic_root, tmp_path, scheduler
):
    from search.results import load_trials
    from search.sweep import run_sweep

    spec = spec_for(
        tmp_path,
        synthetic_root,
        "search.num_trials=6",
        "search.max_concurrent=1",
        "scheduler.grace_period=1",
        "search.sampler=cmaes",  # the sampler these stopping decisions were written against
        *scheduler,
        name="asha",
    )
    run = run_sweep(spec, write=lambda _: None, dashboard=False, export=False)
    df = load_trials(run.experiment_dir)
    stopped = df[df["state"] == "stopped"]
    assert len(stopped) >= 1, df[["trial", "state", "rounds"]]
    assert not df[df["baseline"]]["state"].eq("stopped").any()  # the baseline always finishes
    trials = {t.number: t for t in study(run.experiment_dir, "asha").trials}
    for _, row in stopped.iterrows():
        t = trials[int(row["study_trial"])]
        assert t.state == optuna.trial.TrialState.PRUNED
        # Its intermediate values are there, up to the round it was stopped at.
        assert max(t.intermediate_values) == row["rounds"]
        assert t.value == pytest.approx(row["objective"])
    done = df[df["state"] == "done"]
    assert all(
        trials[int(n)].state == optuna.trial.TrialState.COMPLETE for n in done["study_trial"]
    )


@pytest.mark.parametrize(
    "scheduler",
    [
        ["scheduler.type=asha", "scheduler.reduction_factor=2"],
        ["scheduler.type=median", "scheduler.min_samples=1"],
    ],
    ids=["asha", "median"],
)
def test_sequential_categories_stop_a_trial_after_its_first_category(
    ray_session, synthetic_root, tmp_path, scheduler
):
    """train.category_order=sequential with one round per category: the scheduler stops by
    category (successive halving over categories); a stopped trial trained disk only."""
    from mmr.checkpoint import load_checkpoint
    from search.results import load_trials
    from search.sweep import run_sweep

    spec = spec_for(
        tmp_path,
        synthetic_root,
        "data.categories=[disk, grid]",
        "train.category_order=sequential",
        "train.eval_every=4",  # = train.epochs: one round per category
        "search.num_trials=6",
        "search.max_concurrent=1",
        "scheduler.grace_period=1",
        *scheduler,
        name="seq",
    )
    assert spec.base.num_rounds == 2
    run = run_sweep(spec, write=lambda _: None, dashboard=False, export=False)
    df = load_trials(run.experiment_dir)
    stopped, done = df[df["state"] == "stopped"], df[df["state"] == "done"]
    assert len(stopped) >= 1 and len(done) >= 1, df[["trial", "state", "rounds"]]
    assert not df[df["baseline"]]["state"].eq("stopped").any()
    assert set(stopped["rounds"]) == {1} and set(done["rounds"]) == {2}
    assert stopped["grid/image_auroc"].isna().all() and done["grid/image_auroc"].notna().all()
    for _, row in df.iterrows():
        with row["checkpoint"].as_directory() as d:
            state = load_checkpoint(d)
        # Epoch steps trained: one category's 4 epochs for a stopped trial, both for a done one.
        assert state["epoch"] == 4 * row["rounds"], row["trial"]
        assert [h["tasks_started"] for h in state["history"]] == [1.0, 2.0][: row["rounds"]]
    trials = {t.number: t for t in study(run.experiment_dir, "seq").trials}
    for _, row in stopped.iterrows():
        assert trials[int(row["study_trial"])].state == optuna.trial.TrialState.PRUNED


def test_failing_trial_does_not_stop_the_sweep_and_runs_again_with_retry_failed(
    ray_session, synthetic_root, tmp_path
):
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from search.results import load_trials, status_table
    from search.sweep import resume_sweep, run_sweep

    # One grid point names a teacher weight file that is not there (yet): that trial fails
    # when it builds its model. (Data choices are checked on the driver before any trial.)
    root = synthetic_root
    missing = tmp_path / "nosuch-teacher.pt"
    space = {"model.teacher_checkpoint": {"type": "categorical", "choices": [None, str(missing)]}}
    spec = spec_for(
        tmp_path,
        root,
        "search.sampler=grid",
        "search.num_trials=2",
        "max_failures=2",
        name="fail",
        space=space,
    )
    lines: list[str] = []
    run = run_sweep(spec, write=lines.append, dashboard=False, export=False)
    exp = run.experiment_dir
    df = load_trials(exp)
    assert sorted(df["state"]) == ["done", "failed"]
    failed = df[df["state"] == "failed"].iloc[0]
    trial_dir = exp / f"trial_{failed['trial']}"
    error = (trial_dir / "error.txt").read_text()
    assert "nosuch" in error
    # It ran once: Ray's retry (meant for lost workers) ended before any work and was the
    # last one (2 failures recorded, not 1 + max_failures).
    assert json.loads((trial_dir / "worker.json").read_text())["attempt"] == 1
    assert error.count("Failure #") == 2
    (failed_line,) = [x for x in lines if "FAILED" in x]
    assert "nosuch-teacher.pt' does not exist" in failed_line
    # status names the failure by the error's last line, and says how to run it again.
    last = [x for x in error.splitlines() if x.strip()][-1].strip()
    assert "nosuch" in last and failed["error"] == last
    status = status_table(exp)
    assert f"failed: trial {failed['trial']}: {last}" in status
    assert f"launch.py resume {exp} --retry-failed" in status
    assert f"launch.py resume {exp} --retry-failed" in "\n".join(lines)
    states = {t.state for t in study(exp, "fail").trials}
    assert states == {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL}

    # A plain resume keeps it failed, and says so.
    lines.clear()
    resume_sweep(exp, write=lines.append, dashboard=False, export=False)
    assert sorted(load_trials(exp)["state"]) == ["done", "failed"]
    assert "1 trial(s) failed" in "\n".join(lines) and "--retry-failed" in "\n".join(lines)

    # The cause fixed, --retry-failed runs the same trial again (its deterministic-failure
    # marker cleared), and the study records the retry as a new trial marked as such.
    torch.manual_seed(0)
    net = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3))
    torch.save(net.state_dict(), missing)
    lines.clear()
    resume_sweep(exp, write=lines.append, dashboard=False, export=False, retry_failed=True)
    df = load_trials(exp)
    assert sorted(df["state"]) == ["done", "done"] and failed["trial"] in set(df["trial"])
    assert "failed: trial" not in status_table(exp) and "--retry-failed" not in "\n".join(lines)
    trials = study(exp, "fail").trials
    original = trials[int(failed["study_trial"])]
    retries = [t for t in trials if "failed_trial" in t.system_attrs]
    assert [RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in retries] == [
        original.number
    ]
    assert original.state == optuna.trial.TrialState.FAIL
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].params == original.params
    assert retries[0].value == pytest.approx(
        df[df["trial"] == failed["trial"]].iloc[0]["objective"]
    )
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "FAIL"]


def test_per_category_mode_gives_one_best_config_per_category(
    ray_session, synthetic_root, tmp_path
):
    from search.export import export_experiment
    from search.results import load_trials
    from search.sweep import run_sweep

    spec = spec_for(
        tmp_path,
        synthetic_root,
        "data.categories=[disk,grid]",
        "objective.per_category=true",
        "search.num_trials=2",
        name="percat",
    )
    assert spec.categories == ("disk", "grid")
    run = run_sweep(spec, write=lambda _: None, dashboard=False, export=False)
    df = load_trials(run.experiment_dir)
    assert sorted(df["category"]) == ["disk", "disk", "grid", "grid"]
    assert df.groupby("category")["baseline"].sum().tolist() == [1, 1]
    out = export_experiment(run.experiment_dir, tmp_path / "export")
    for category in ("disk", "grid"):
        cfg = load_config(out / category / "best.yaml")
        assert cfg.data.categories == (category,)
        assert (out / category / "model.pt").is_file()
        assert study(run.experiment_dir, f"percat/{category}").trials
    assert "| Image AUROC | Avg | disk | grid |" in (out / "results.md").read_text()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _sweep_args(tmp: Path, root: Path, name: str, *extra: str) -> list[str]:
    args = ["--set", f"data.root={root}", "--name", name, "--storage", str(tmp / "runs")]
    for item in (*FAST, *extra):
        args += ["--set", item]
    return args


def _driver_env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "MMR_DASHBOARD": "0"}


def _recorded_rounds(exp: Path) -> int:
    """Rounds the driver has written to the trials' ``result.json`` files."""
    return sum(len(p.read_text().splitlines()) for p in exp.glob("trial_*/result.json"))


def _driver_at_rounds(
    args: list[str], exp: Path, count: int, env: dict | None = None
) -> subprocess.Popen:
    """Starts ``launch.py *args`` and returns once the driver has recorded ``count`` rounds.

    Recorded by the driver, not just written by the worker: a checkpoint dir exists as soon as
    the worker persists it, but Tune restores from it only once the driver has received that
    round (the save of round n is processed before round n + 1 is recorded).
    """
    driver = subprocess.Popen(
        [sys.executable, "launch.py", *args],
        cwd=ROOT,
        env=env or _driver_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(
            lambda: _recorded_rounds(exp) >= count,
            300,
            f"{count} recorded round(s)",
        )
    except BaseException:
        driver.kill()
        raise
    return driver


def _kill(driver: subprocess.Popen) -> None:
    """SIGKILLs a driver (no chance to save anything) and reaps it."""
    try:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()


def test_driver_killed_mid_sweep_then_resume_completes_exactly_num_trials(
    ray_session, synthetic_root, tmp_path
):
    from search.results import load_trials

    exp = tmp_path / "runs" / "killed"
    args = [
        "sweep",
        "--address",
        ray_session,
        *_sweep_args(
            tmp_path,
            synthetic_root,
            "killed",
            "search.num_trials=5",
            "search.max_concurrent=1",
            "train.epochs=6",
            "scheduler.type=fifo",
        ),
    ]
    # Kill the driver mid-sweep: the first trial has recorded two of its six rounds.
    _kill(_driver_at_rounds(args, exp, 2))
    assert len(load_trials(exp)) < 5
    proc = cli("resume", str(exp), "--address", ray_session, env=_driver_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = load_trials(exp)
    assert len(df) == 5 and set(df["state"]) == {"done"}
    assert df["study_trial"].is_unique and df["trial"].is_unique
    assert df["baseline"].sum() == 1
    finished = [
        t for t in study(exp, "killed").trials if t.state == optuna.trial.TrialState.COMPLETE
    ]
    assert len(finished) == 5
    assert (exp / "export" / "best.yaml").is_file()


def _embedded_env(marker: str) -> dict:
    """A driver that starts its own Ray, as on a laptop; its processes carry ``marker``."""
    from raycluster import MARKER_VAR

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        RAY_AUTH_MODE="disabled",
        MMR_DASHBOARD="0",
        RAY_USAGE_STATS_ENABLED="0",
        **{MARKER_VAR: marker},
    )
    return env


@pytest.mark.parametrize(
    "scheduler, per_category",
    [("asha", False), ("asha", True), ("median", False)],
    ids=["asha-one-study", "asha-per-category", "median-one-study"],
)
def test_sweep_resumes_after_its_embedded_rays_driver_is_killed(
    synthetic_root, tmp_path, scheduler, per_category
):
    """The laptop default (no --address): kill the driver mid-trial, then resume.

    Each study runs its baseline only; the killed trial is a baseline (the scheduler never
    stops it), so it is surely still running: in the per-category sweep the second study's
    (grid), after disk's has finished.
    """
    import re
    import secrets

    from raycluster import end_marked

    from search.results import load_trials
    from search.storage import read_histories

    name = "percat" if per_category else "one"
    exp = tmp_path / "runs" / name
    categories = ["disk", "grid"] if per_category else ["disk"]
    extra = [
        "search.num_trials=1",  # the baseline: ASHA never stops it, so the kill hits it
        "search.max_concurrent=1",
        "train.epochs=8",  # 8 rounds: rungs at 1, 2, 4
        "train.lr_milestones=[6]",
        f"scheduler.type={scheduler}",
        "scheduler.grace_period=1",
        "scheduler.reduction_factor=2",
        "scheduler.min_samples=1",
        f"data.categories=[{','.join(categories)}]",
        f"objective.per_category={str(per_category).lower()}",
    ]
    marker = f"{scheduler}-resume-{secrets.token_hex(6)}"
    env = _embedded_env(marker)
    # Kill once the killed trial has recorded 2 of its 8 rounds (after disk's 8, per category).
    kill_at = 8 * (len(categories) - 1) + 2
    args = ["sweep", *_sweep_args(tmp_path, synthetic_root, name, *extra)]
    try:
        _kill(_driver_at_rounds(args, exp, kill_at, env))
    finally:
        end_marked(marker, timeout=60)  # its Ray dies with it; leftovers are killed by PID
    at_kill = {trial_id: results for trial_id, _, results in read_histories(exp)}
    killed = [t for t, results in at_kill.items() if len(results) < 8]
    assert len(killed) == 1 and len(at_kill) == len(categories), at_kill
    (killed,) = killed
    category_of = {t: config.get("category") for t, config, _ in read_histories(exp)}
    study_name = f"{name}/{category_of[killed]}" if per_category else name
    # The window a kill can hit: the study has started a trial the saved searcher state does
    # not know yet. Made certain here, as the killed driver would have left it.
    orphan = study(exp, study_name).ask().number

    proc = cli("-v", "resume", str(exp), env=env)
    end_marked(marker, timeout=60)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    # The scheduler's state (ASHA's rungs, median stopping's histories), rebuilt from the
    # results on disk, holds each study's own trials only.
    label, holds = (
        ("ASHA", r"rung at round \d+ holds")
        if scheduler == "asha"
        else ("median stopping", "holds")
    )
    rungs: dict[str | None, set[str]] = {}
    for where, ids in re.findall(
        label + r"(?: \[(\w+)\])?: " + holds + r" trials \[(.*)\]", proc.stderr
    ):
        rungs.setdefault(where or None, set()).update(re.findall(r"'(\w+)'", ids))
    for category in categories:
        key = category if per_category else None
        expected = {t for t in at_kill if category_of[t] == (category if per_category else None)}
        assert rungs.get(key) == expected, (category, rungs)

    df = load_trials(exp)
    assert len(df) == len(categories) and set(df["state"]) == {"done"}
    # The killed trial continued from its round checkpoint, not from round 1: Tune's round
    # count goes on either way, the model's own epoch count only if fit resumed.
    results = dict((t, r) for t, _, r in read_histories(exp))[killed]
    restarts = [r for r in results if r["iterations_since_restore"] == 1]
    assert len(restarts) == 2 and restarts[1]["training_iteration"] > 1, restarts
    assert [r["epoch"] for r in restarts] == [r["training_iteration"] for r in restarts]
    assert results[-1]["training_iteration"] == 8 and results[-1]["epoch"] == 8
    # The orphaned study trial is FAIL; every other record ended with its Tune trial.
    trials = study(exp, study_name).trials
    assert trials[orphan].state == optuna.trial.TrialState.FAIL
    killed_row = df[df["trial"] == killed].iloc[0]
    assert trials[int(killed_row["study_trial"])].state == optuna.trial.TrialState.COMPLETE
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


def test_worker_killed_mid_trial_resumes_from_its_checkpoint(
    ray_session, synthetic_root, tmp_path
):
    from search.results import load_trials
    from search.storage import read_histories

    exp = tmp_path / "runs" / "worker"
    args = [
        "sweep",
        "--address",
        ray_session,
        *_sweep_args(
            tmp_path,
            synthetic_root,
            "worker",
            "search.num_trials=1",
            # Enough rounds that the kill below lands mid-trial even on a loaded machine.
            "train.epochs=30",
            "train.lr_milestones=[20]",
            "scheduler.type=fifo",
            "max_failures=2",
        ),
    ]
    # Two recorded rounds: the first one's checkpoint is Tune's to restore from.
    driver = _driver_at_rounds(args, exp, 2)
    try:
        worker = json.loads(next(exp.glob("trial_*/worker.json")).read_text())
        os.kill(worker["pid"], signal.SIGSTOP)  # frozen: its round count is final
        last = max(int(p.name.split("_")[-1]) for p in exp.glob("trial_*/checkpoint_*"))
        assert last < 29, "the trial ended before the kill: the test needs more rounds"
        os.kill(worker["pid"], signal.SIGKILL)
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-3000:]
    df = load_trials(exp)
    assert list(df["state"]) == ["done"]
    ((_, _, results),) = read_histories(exp)
    rounds = [r["training_iteration"] for r in results]
    assert sorted(set(rounds)) == list(range(1, 31))
    restarts = [r["training_iteration"] for r in results if r["iterations_since_restore"] == 1]
    # The retry started after the last checkpoint, not from round 1 again.
    assert len(restarts) == 2 and restarts[1] > 1
    assert json.loads(next(exp.glob("trial_*/worker.json")).read_text())["pid"] != worker["pid"]


def test_rounds_a_retried_trial_trains_again_appear_once_with_the_retrys_values(
    ray_session, synthetic_root, tmp_path, monkeypatch
):
    """``train.checkpoint_every: 2`` and a worker lost after round 3 (a non-deterministic
    error: Ray retries the trial). The retry continues from round 2's checkpoint and trains
    round 3 again; every record holds each round once, round 3 with the retry's value (the
    first attempt reported a recognisably lower one), and the repeated round is counted."""
    import warnings

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from search import trainable
    from search.results import load_trials, status_table
    from search.storage import read_histories
    from search.sweep import run_sweep

    failed = tmp_path / "failed-once"

    def flaky(config, *, spec):  # runs in the trial's worker (a closure: pickled by value)
        import ray.tune

        from search.trainable import train_trial

        report = ray.tune.report

        def report_then_fail(metrics, *, checkpoint=None):
            first = not failed.exists()
            if first and metrics["epoch"] == 3:
                metrics = {**metrics, "objective": metrics["objective"] - 0.5}
            report(metrics, checkpoint=checkpoint)
            if first and metrics["epoch"] == 3:
                failed.touch()
                raise RuntimeError("injected: the worker is lost after round 3")

        ray.tune.report = report_then_fail
        try:
            train_trial(config, spec=spec)
        finally:
            ray.tune.report = report

    monkeypatch.setattr(trainable, "train_trial", flaky)
    spec = spec_for(
        tmp_path,
        synthetic_root,
        "search.num_trials=1",
        "train.checkpoint_every=2",
        "max_failures=2",
        name="again",
    )
    lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = run_sweep(spec, write=lines.append, dashboard=False, export=False)
    exp = run.experiment_dir
    assert failed.exists()
    (trial_dir,) = exp.glob("trial_*")

    # Tune's files: each round once; round 3 is the retry's (its first round).
    rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    assert [r["training_iteration"] for r in rows] == [1, 2, 3, 4]
    assert [r["iterations_since_restore"] for r in rows] == [1, 2, 1, 2]
    value = {r["training_iteration"]: r["objective"] for r in rows}
    (stale,) = [
        json.loads(x) for x in (trial_dir / "result_repeated.json").read_text().splitlines()
    ]
    assert stale["training_iteration"] == 3 and stale["objective"] < value[3] - 0.4
    progress = pd.read_csv(trial_dir / "progress.csv")
    assert progress["training_iteration"].tolist() == [1, 2, 3, 4]
    assert progress["objective"].tolist() == pytest.approx([value[r] for r in range(1, 5)])
    ((_, _, results),) = read_histories(exp)
    assert [(r["training_iteration"], r["objective"]) for r in results] == list(value.items())
    events = EventAccumulator(str(trial_dir))
    events.Reload()
    scalars = events.Scalars("ray/tune/objective")
    assert [s.step for s in scalars] == [1, 2, 3, 4]
    assert [s.value for s in scalars] == pytest.approx(list(value.values()), abs=1e-6)

    # The trials table: the model's 4 rounds, and the one round trained again.
    (row,) = load_trials(exp).to_dict("records")
    assert (row["state"], row["rounds"], row["epochs"], row["rounds_repeated"]) == (
        "done", 4, 4, 1,
    )  # fmt: skip
    assert "rounds_repeated" in status_table(exp)

    # The study: one intermediate value per round, round 3's the retry's; no Optuna warning.
    (ot_trial,) = study(exp, "again").trials
    assert ot_trial.state == optuna.trial.TrialState.COMPLETE
    assert ot_trial.intermediate_values == pytest.approx(value)
    assert not [w for w in caught if "already reported" in str(w.message)]

    # The terminal says what the retry repeats.
    (retry,) = [x for x in lines if " restart " in x]
    assert "round-2 checkpoint" in retry and "round 3 runs again" in retry, retry


# ----------------------------------------------------------------------------- bad input


def test_bad_sweep_inputs_fail_before_ray_starts(synthetic_root, tmp_path):
    with pytest.raises(ConfigError, match="search.num_trials must be >= 1"):
        spec_for(tmp_path, synthetic_root, "search.num_trials=0")
    with pytest.raises(ConfigError, match="unknown config key 'search.num_trails'"):
        spec_for(tmp_path, synthetic_root, "search.num_trails=3")
    with pytest.raises(SpaceError, match="unknown config key"):
        spec_for(
            tmp_path,
            synthetic_root,
            space={"mask_rato": {"type": "float", "low": 0.1, "high": 0.5}},
        )
    with pytest.raises(SpaceError, match="patch_size=24"):
        spec_for(
            tmp_path,
            synthetic_root,
            space={"patch_size": {"type": "categorical", "choices": [8, 24]}},
        )
    with pytest.raises(ConfigError, match="objective.metric"):
        spec_for(tmp_path, synthetic_root, "objective.metric=accuracy")


def test_sequential_category_order_is_refused_per_category_and_lists_all(synthetic_root, tmp_path):
    seq = "train.category_order=sequential"
    with pytest.raises(ConfigError, match="objective.per_category=false"):
        spec_for(tmp_path, synthetic_root, seq, "objective.per_category=true")
    one = spec_for(tmp_path, synthetic_root, seq)  # one category: the same as lockstep
    assert one.base.num_rounds == one.base.rounds_per_task == 4
    every = spec_for(tmp_path, synthetic_root, seq, "data.categories=all")
    assert every.base.data.categories == ("disk", "grid") and every.base.num_rounds == 8
    with pytest.raises(ConfigError, match="categories in sequence"):
        spec_for(
            tmp_path,
            synthetic_root,
            seq,
            "data.categories=all",
            "scheduler.type=median",  # the demo's FIFO has no grace period to check
            "scheduler.grace_period=8",
        )


def test_gpu_request_on_a_cluster_without_gpus_fails_at_once(ray_session):
    from search.sweep import check_resources

    with pytest.raises(UserInputError, match="no GPU.*resources.gpu=0"):
        check_resources(ResourcesConfig(cpu=1, gpu=1))
    with pytest.raises(UserInputError, match="fit on no node"):
        check_resources(ResourcesConfig(cpu=64))
    check_resources(ResourcesConfig(cpu=1))


def test_unwritable_storage_and_existing_experiment_are_refused(
    ray_session, synthetic_root, tmp_path
):
    from search.config import SPEC_FILE
    from search.sweep import run_sweep

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    spec = spec_for(tmp_path, synthetic_root)
    bad = resolve_sweep(
        None, [f"data.root={synthetic_root}", *FAST], name="t", storage=str(blocker)
    )
    with pytest.raises(UserInputError, match="not writable.*--storage"):
        run_sweep(bad, write=lambda _: None, dashboard=False)
    spec.experiment_dir.mkdir(parents=True)
    (spec.experiment_dir / SPEC_FILE).write_text(json.dumps(spec.to_dict()))
    with pytest.raises(UserInputError, match="already exists.*resume"):
        run_sweep(spec, write=lambda _: None, dashboard=False)


@pytest.mark.parametrize("command", [["resume"], ["status"], ["export", "--out", "x"]])
def test_commands_on_a_directory_that_is_not_an_experiment(tmp_path, command):
    proc = cli(command[0], str(tmp_path), *command[1:], timeout=120)
    assert proc.returncode == 2
    assert "not an mmr-sweep experiment directory" in proc.stderr


def test_resumed_asha_rebuilds_its_rungs_from_disk_and_still_stops_trials(tmp_path):
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from search.scheduler import ResumableASHA

    # Three finished trials of an interrupted sweep, as Tune wrote them (one line per round).
    for i, values in enumerate(([0.9, 0.92, 0.95, 0.96], [0.6, 0.61], [0.8, 0.85, 0.86, 0.9])):
        trial_dir = tmp_path / f"trial_{i}"
        trial_dir.mkdir()
        lines = [
            json.dumps(
                {"trial_id": f"old{i}", "training_iteration": r + 1, "objective": v, "config": {}}
            )
            for r, v in enumerate(values)
        ]
        (trial_dir / "result.json").write_text("\n".join(lines) + "\n")

    asha = ResumableASHA(
        experiment=str(tmp_path), metric="objective", max_t=4, grace_period=1, reduction_factor=2
    )
    new = SimpleNamespace(trial_id="new", config={})
    asha.on_trial_add(None, new)  # the first trial after restore triggers the rebuild
    recorded = {milestone: dict(r) for milestone, r in asha.rungs}
    assert recorded[1] == {"old0": 0.9, "old1": 0.6, "old2": 0.8}
    assert recorded[2] == {"old0": 0.92, "old1": 0.61, "old2": 0.85}
    # A new trial well below the rebuilt cutoff is stopped at once: early stopping survives.
    result = {"training_iteration": 1, "objective": 0.5}
    assert asha.on_trial_result(None, new, result) == TrialScheduler.STOP
    # The baseline is recorded like any trial but never stopped.
    base = SimpleNamespace(trial_id="base", config={"baseline": True})
    asha.on_trial_add(None, base)
    assert asha.on_trial_result(None, base, result) == TrialScheduler.CONTINUE
    assert "base" in dict(asha.rungs)[1]


def test_asha_decides_a_rung_once_when_a_retried_trial_reports_it_again(tmp_path):
    """Ray's ASHA records a trial at a rung once: a round that a retry trains again (here far
    below the cutoff) neither stops the trial nor changes its record. A resumed sweep
    rebuilds the rung from ``result.json`` with the latest attempt's value."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from search.scheduler import ResumableASHA

    def asha() -> ResumableASHA:  # rungs at rounds 1 and 3
        return ResumableASHA(
            experiment=str(tmp_path), metric="objective", max_t=4, grace_period=1,
            reduction_factor=3,
        )  # fmt: skip

    live = asha()
    good, weak = (
        SimpleNamespace(trial_id="good", config={}),
        SimpleNamespace(trial_id="weak", config={}),
    )
    for trial, value in ((weak, 0.5), (good, 0.9)):
        live.on_trial_add(None, trial)
        for round_ in (1, 2, 3):
            result = {"training_iteration": round_, "objective": value}
            assert live.on_trial_result(None, trial, result) == TrialScheduler.CONTINUE
    # The worker of "good" is lost after round 3; Tune requeues it and the retry, restored
    # from round 2's checkpoint, reports round 3 again, with a value that the rung would stop.
    live.on_trial_error(None, good)
    live.on_trial_add(None, good)
    result = {"training_iteration": 3, "objective": 0.1}
    assert live.on_trial_result(None, good, result) == TrialScheduler.CONTINUE
    assert dict(live.rungs)[3] == {"weak": 0.5, "good": 0.9}
    assert live._num_stopped == 0

    # result.json of a trial whose round 3 was trained again (rows as an older sweep left them).
    rows = [(1, 0.9), (2, 0.9), (3, 0.2), (3, 0.8)]
    (tmp_path / "trial_a").mkdir()
    (tmp_path / "trial_a" / "result.json").write_text(
        "".join(
            json.dumps({"trial_id": "a", "training_iteration": r, "objective": v}) + "\n"
            for r, v in rows
        )
    )
    resumed = asha()
    resumed.on_trial_add(None, SimpleNamespace(trial_id="new", config={}))
    assert {m: dict(r) for m, r in resumed.rungs} == {3: {"a": 0.8}, 1: {"a": 0.9}}


class _Trial:
    """What the schedulers use of a Tune trial (hashed by identity, as Tune's)."""

    def __init__(self, trial_id: str, **config) -> None:
        self.trial_id, self.config = trial_id, config


def _write_results(root: Path, histories: dict[str, list[float]]) -> None:
    """``result.json`` per trial as Tune writes it (one line per round)."""
    for trial_id, values in histories.items():
        (root / f"trial_{trial_id}").mkdir()
        (root / f"trial_{trial_id}" / "result.json").write_text(
            "".join(
                json.dumps({"trial_id": trial_id, "training_iteration": r + 1, "objective": v})
                + "\n"
                for r, v in enumerate(values)
            )
        )


def test_median_stopping_stops_below_the_median_never_the_baseline_and_never_pauses(tmp_path):
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from search.scheduler import ResumableMedian

    rule = ResumableMedian(
        experiment=str(tmp_path), metric="objective", grace_period=2, min_samples=2
    )
    # Trials are waiting: Ray's rule would pause a trial that lacks samples, this one goes on.
    waiting = SimpleNamespace(get_live_trials=lambda: [SimpleNamespace(status="PENDING")])

    def report(trial, round_, value):
        result = {"training_iteration": round_, "objective": value}
        return rule.on_trial_result(waiting, trial, result)

    a, b, c, base = (_Trial(i, baseline=i == "base") for i in ("a", "b", "c", "base"))
    for trial in (a, b, c, base):
        rule.on_trial_add(waiting, trial)
    for r, value in ((1, 0.7), (2, 0.8), (3, 0.9)):
        assert report(a, r, value) == TrialScheduler.CONTINUE  # no other trial yet
    for r, value in ((1, 0.6), (2, 0.7), (3, 0.8)):
        assert report(b, r, value) == TrialScheduler.CONTINUE  # one other: below min_samples
    rule.on_trial_complete(waiting, b, {"training_iteration": 3, "objective": 0.8})
    assert rule.histories()["b"] == [0.6, 0.7, 0.8]  # the final result is not counted twice
    # Round 1 is inside the grace period; at round 2 the median of a's and b's means over
    # rounds 2..2 is 0.75: c's best so far (0.74) is below it.
    assert report(c, 1, 0.74) == TrialScheduler.CONTINUE
    assert report(c, 2, 0.5) == TrialScheduler.STOP
    # At round 3 the median of a's mean (0.85) and b's (0.75) is 0.8: 0.8 is not below it.
    d = _Trial("d")
    rule.on_trial_add(waiting, d)
    assert report(d, 3, 0.8) == TrialScheduler.CONTINUE
    # The baseline, weaker than c, is never stopped, and its values count.
    assert report(base, 1, 0.45) == TrialScheduler.CONTINUE
    assert report(base, 2, 0.5) == TrialScheduler.CONTINUE
    assert rule.histories()["base"] == [0.45, 0.5]


def test_resumed_median_stopping_rebuilds_histories_and_keeps_a_round_once(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    from search.scheduler import PerCategoryScheduler, ResumableMedian

    # An interrupted sweep: three finished trials and "run", killed after its round 2.
    _write_results(tmp_path, {"o0": [0.9, 0.92, 0.95], "o1": [0.6, 0.7], "o2": [0.8, 0.85, 0.9],
                              "run": [0.4, 0.42]})  # fmt: skip

    def rule(category=None) -> ResumableMedian:
        return ResumableMedian(
            experiment=str(tmp_path), metric="objective", grace_period=1, min_samples=2,
            category=category,
        )  # fmt: skip

    resumed = rule()
    # Tune restores "run" as a new Trial object: it takes over its own history (it is not
    # another trial beside itself).
    run = _Trial("run")
    resumed.on_trial_add(None, run)
    assert resumed.histories() == {
        "o0": [0.9, 0.92, 0.95], "o1": [0.6, 0.7], "o2": [0.8, 0.85, 0.9], "run": [0.4, 0.42]
    }  # fmt: skip
    # Restored from its round-1 checkpoint, "run" trains round 2 again: the retry's value
    # replaces the lost attempt's, and against the rebuilt medians 0.5 at round 2 stops it.
    assert resumed.on_trial_result(
        None, run, {"training_iteration": 2, "objective": 0.5}
    ) == TrialScheduler.STOP  # fmt: skip
    assert resumed.histories()["run"] == [0.4, 0.5]
    # A new trial is judged against the rebuilt histories at once: early stopping survives.
    new = _Trial("new")
    resumed.on_trial_add(None, new)
    assert resumed.on_trial_result(
        None, new, {"training_iteration": 1, "objective": 0.55}
    ) == TrialScheduler.STOP  # fmt: skip
    # Per category: each rule rebuilds the trials of its own category only.
    for i, category in enumerate(("nut", "nut", "fabric")):
        path = tmp_path / f"trial_o{i}" / "result.json"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text(
            "".join(json.dumps({**r, "config": {"category": category}}) + "\n" for r in rows)
        )
    split = PerCategoryScheduler(rule, ["nut", "fabric"])
    split.on_trial_add(None, _Trial("n", category="nut"))
    split.on_trial_add(None, _Trial("f", category="fabric"))
    assert set(split._subs["nut"].histories()) == {"o0", "o1"}
    assert set(split._subs["fabric"].histories()) == {"o2"}


def test_file_loggers_keep_each_round_once_and_record_the_repeated_rows(tmp_path):
    """Tune's file loggers as a sweep drives them, through a retry in the same driver and a
    resumed driver. Tune writes a trial's files in the driver's staging dir and uploads them
    to the storage now and then; a resumed driver starts with an empty staging dir."""
    import shutil
    from types import SimpleNamespace

    import pyarrow.fs as pafs

    from search.callbacks.result_files import RoundCSVLogger, RoundJsonLogger
    from search.storage import count_repeated

    remote = tmp_path / "storage" / "trial"
    remote.mkdir(parents=True)

    class Trial:  # what the loggers use of a Tune trial
        config: dict = {}
        checkpoint: str | None = None
        local_path = ""
        storage = SimpleNamespace(
            storage_filesystem=pafs.LocalFileSystem(), trial_fs_path=str(remote)
        )

        def init_local_path(self) -> None:
            Path(self.local_path).mkdir(parents=True, exist_ok=True)

    trial = Trial()

    def driver(staging: str) -> list:  # fresh loggers, an empty staging dir
        trial.local_path = str(tmp_path / staging / "trial")
        trial.init_local_path()
        return [RoundJsonLogger(), RoundCSVLogger()]

    def start(loggers: list) -> None:  # Tune's on_trial_start: a new, retried or resumed trial
        for logger in loggers:
            logger.log_trial_start(trial)

    def report(loggers: list, attempt: int, round_: int) -> None:
        result = {"training_iteration": round_, "objective": attempt + round_ / 10}
        if round_ == 3:  # the final round adds the speed metrics
            result["latency_ms"] = 1.0
        for logger in loggers:
            logger.log_trial_result(round_, trial, result)

    def upload() -> None:  # Tune's sync of the staging dir to the storage
        shutil.copytree(trial.local_path, remote, dirs_exist_ok=True)

    first = driver("a")
    start(first)
    report(first, 1, 1)
    upload()
    trial.checkpoint = "round 1"
    report(first, 1, 2)  # not uploaded when the worker is lost
    start(first)  # the retry, from round 1's checkpoint, trains round 2 again
    report(first, 2, 2)
    upload()  # the driver is killed
    resumed = driver("b")
    trial.checkpoint = "round 2"
    start(resumed)
    report(resumed, 3, 3)  # the final round, with more keys than the file's header
    start(resumed)  # its worker lost while saving: round 3 runs again
    report(resumed, 4, 3)
    upload()

    rows = [json.loads(line) for line in (remote / "result.json").read_text().splitlines()]
    expected = {1: 1.1, 2: 2.2, 3: 4.3}
    assert [(r["training_iteration"], r["objective"]) for r in rows] == list(expected.items())
    progress = pd.read_csv(remote / "progress.csv")
    assert list(progress.columns) == ["training_iteration", "objective"]
    assert progress.set_index("training_iteration")["objective"].to_dict() == expected
    assert count_repeated(trial) == 2  # attempt 1's round 2, attempt 3's round 3


@pytest.mark.parametrize(
    "name, fixture",
    [
        ("sweep_mvtec", "fake_mvtec"),
        ("sweep_aebad_s", "fake_aebad_s"),
        ("demo_sweep", "synthetic_root"),
    ],
)
def test_shipped_sweep_configs_resolve(name, fixture, request, tmp_path):
    root = request.getfixturevalue(fixture)
    spec = resolve_sweep(
        ROOT / "configs" / f"{name}.yaml", [f"data.root={root}"], storage=str(tmp_path)
    )
    assert spec.space.keys and spec.categories
    assert spec.experiment_dir == tmp_path / spec.sweep.name


def test_uri_storage_keeps_everything_remote_and_works_from_the_uri_alone(
    ray_session, synthetic_root, tmp_path, monkeypatch
):
    """file:// goes through pyarrow exactly like s3:// or gs:// would."""
    import shutil

    from search.export import export_experiment
    from search.results import load_trials, status_table
    from search.storage import mirror_dir
    from search.sweep import resume_sweep, run_sweep

    monkeypatch.setenv("MMR_STATE_DIR", str(tmp_path / "state"))
    remote = tmp_path / "bucket"
    spec = resolve_sweep(
        None,
        [f"data.root={synthetic_root}", *FAST, "search.num_trials=2", "scheduler.type=fifo"],
        name="uri",
        storage=f"file://{remote}",
    )
    assert spec.experiment_location == f"file://{remote}/uri"
    run = run_sweep(spec, write=lambda _: None, dashboard=False, export=False)
    assert run.location == spec.experiment_location
    assert (remote / "uri" / "sweep.json").is_file()
    assert (remote / "uri" / "study.journal").is_file()
    assert len(list(remote.glob("uri/trial_*/result.json"))) == 2

    # Another machine: nothing local but the URI.
    shutil.rmtree(mirror_dir(spec.experiment_location))
    df = load_trials(spec.experiment_location)
    assert len(df) == 2 and set(df["state"]) == {"done"}
    assert "2 done" in status_table(spec.experiment_location)
    out = export_experiment(spec.experiment_location, tmp_path / "export")
    assert (out / "best.yaml").is_file() and (out / "plots" / "optimization_history.png").is_file()
    finished = resume_sweep(
        spec.experiment_location, write=lambda _: None, dashboard=False, export=False
    )
    assert len(load_trials(finished.location)) == 2


def interrupted_sweep(address: str, tmp: Path, root: Path, name: str) -> tuple[Path, int, str]:
    """A 2-trial sweep stopped by Ctrl-C while a trial is under way, with rounds recorded.

    Returns the experiment dir, the driver's exit code and its output.
    """
    exp = tmp / "runs" / name
    args = [
        "sweep",
        "--address",
        address,
        *_sweep_args(
            tmp,
            root,
            name,
            "search.num_trials=2",
            "search.max_concurrent=1",
            "train.epochs=12",  # still running when Ctrl-C arrives, even on a loaded machine
            "scheduler.type=fifo",
        ),
    ]
    driver = _driver_at_rounds(args, exp, 2)
    try:
        driver.send_signal(signal.SIGINT)
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    return exp, driver.returncode, out


def test_ctrl_c_stops_without_exporting_and_says_how_to_resume(
    ray_session, synthetic_root, tmp_path
):
    from search.results import load_trials

    exp, returncode, out = interrupted_sweep(ray_session, tmp_path, synthetic_root, "ctrlc")
    assert returncode == 130, out[-3000:]
    assert f"launch.py resume {exp}" in out
    assert not (exp / "export").exists()
    proc = cli("resume", str(exp), "--address", ray_session, env=_driver_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(load_trials(exp)["state"]) == {"done"} and (exp / "export").is_dir()


def test_a_restored_generator_creates_its_trials_where_the_resumed_experiment_is(tmp_path):
    """Tune restores a search generator with the storage it was saved with; resumed (within
    ``resuming``), the generator of a copied or moved experiment points it at the new place."""
    from types import SimpleNamespace

    from ray.train._internal.storage import StorageContext
    from ray.tune.search import ConcurrencyLimiter

    from search.confirm import ListedConfigs
    from search.searcher import RelocatingGenerator, relocated
    from search.storage import resuming

    saved = StorageContext(storage_path=str(tmp_path / "runs"), experiment_dir_name="orig")
    state = {"counter": 1, "total_samples": 2, "finished": False}

    def restored(**kw) -> StorageContext:
        gen = RelocatingGenerator(ConcurrencyLimiter(ListedConfigs([{}]), max_concurrent=1))
        gen.set_state({**state, "experiment": SimpleNamespace(spec={"storage": saved})})
        return gen._experiment.spec["storage"]

    assert restored() is saved  # a sweep resumed where it was: as saved
    copy = tmp_path / "elsewhere" / "copy"
    with resuming(str(copy), copy):
        moved = restored()
    assert moved.experiment_fs_path == str(copy) and moved.experiment_dir_name == "copy"
    assert saved.experiment_fs_path == str(tmp_path / "runs" / "orig")  # the saved one intact
    with resuming(str(tmp_path / "runs" / "orig"), tmp_path / "runs" / "orig"):
        assert restored() is saved
    uri = relocated(saved, f"file://{tmp_path}/sweeps/copy/")  # a storage URI alike
    assert (uri.storage_fs_path, uri.experiment_dir_name) == (f"{tmp_path}/sweeps", "copy")
