"""Several objectives and guards: config checks, Pareto fronts, guarded best, study records."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from mmr.config import ConfigError, load_config
from mmr.errors import UserInputError
from search.resolve import resolve_sweep

ROOT = Path(__file__).resolve().parent.parent
THREE = [
    "objective.metrics=[image_auroc, aupro, params_m]",
    "objective.mode=[max, max, min]",
]


# The demo's CMA-ES optimises one objective; these sweeps run TPE and ASHA, as written for.
PINNED = ["search.sampler=tpe", "scheduler.type=asha"]


def _spec(tmp: Path, *overrides: str, name: str = "p"):
    return resolve_sweep(None, [*PINNED, *overrides], name=name, storage=str(tmp / "runs"))


def _dominated(values: np.ndarray, i: int) -> bool:
    """Whether row ``i`` of ``values`` (all to be maximised) is dominated by another row."""
    others = np.delete(values, i, axis=0)
    return bool(((others >= values[i]).all(1) & (others > values[i]).any(1)).any())


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["objective.metrics=[image_auroc, accuracy]"], "objective.metrics"),
        (["objective.metrics=[image_auroc, aupro]", "objective.mode=[max]"], "objective.mode"),
        (["objective.metrics=[image_auroc, aupro]", "objective.mode=[max, up]"], "objective.mode"),
        (["objective.guard={pixel_aurok: 0.01}"], "objective.guard.pixel_aurok"),
        (["objective.guard={aupro: -0.1}"], "objective.guard.aupro"),
        (["objective.metrics=[latency_ms, params_m]"], "objective.metrics"),
        (["objective.metrics=[image_auroc, aupro]", "search.sampler=cmaes"], "search.sampler"),
    ],
)
def test_bad_objective_inputs_name_their_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key} "):
        _spec(tmp_path, *overrides)


def test_bad_objective_fails_in_the_cli_before_ray_starts(tmp_path):
    proc = subprocess.run(
        [sys.executable, "launch.py", "sweep", "--storage", str(tmp_path / "runs"),
         "--set", "objective.metrics=[image_auroc, aupro]", "--set", "objective.mode=[max]"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "objective.mode" in proc.stderr + proc.stdout
    assert "Ray" not in proc.stdout and not (tmp_path / "runs").exists()


def test_objectives_and_the_scalar_for_early_stopping(tmp_path):
    spec = _spec(tmp_path, "objective.metrics=[latency_ms, aupro]", "objective.mode=[min, max]")
    o = spec.sweep.objective
    assert o.multi and o.objectives == (("latency_ms", "min"), ("aupro", "max"))
    # Rungs rank by the first objective reported every round (latency_ms comes at the end).
    assert spec.objective_value({"aupro": 0.3, "image_auroc": 0.9}) == 0.3
    one = _spec(tmp_path, "objective.metrics=[pixel_f1]", "objective.mode=min")
    assert not one.sweep.objective.multi
    assert one.objective_value({"pixel_f1": 0.2}) == -0.2
    # A single value of mode applies to every objective; metrics win over metric.
    both = _spec(tmp_path, "objective.metrics=[aupro, pixel_auroc]", "objective.metric=pixel_f1")
    assert both.sweep.objective.objectives == (("aupro", "max"), ("pixel_auroc", "max"))


# ----------------------------------------------------------------------------- guards


def _table(spec, rows: list[dict]) -> pd.DataFrame:
    from search.results import _judge

    df = pd.DataFrame(rows)
    for column, default in (("state", "done"), ("category", None), ("baseline", False)):
        df[column] = df[column].fillna(default) if column in df else default
    df["baseline"] = df["baseline"].astype(bool)
    df["objective"] = [spec.objective_value(r) for r in rows]
    return _judge(spec, df)


def test_a_trial_that_breaks_a_guard_is_never_the_best(tmp_path):
    from search.results import best_trials

    rows = [
        {"trial": "base", "baseline": True, "image_auroc": 0.60, "aupro": 0.30},
        # Much better image AUROC, but AUPRO 0.05 below the baseline's (guard: 0.01).
        {"trial": "trade", "image_auroc": 0.95, "aupro": 0.25},
        {"trial": "fair", "image_auroc": 0.70, "aupro": 0.295},
    ]
    guarded = _spec(tmp_path, "objective.guard={aupro: 0.01}")
    df = _table(guarded, rows)
    assert df.set_index("trial")["feasible"].to_dict() == {
        "base": True,
        "trade": False,
        "fair": True,
    }
    assert df.set_index("trial").loc["trade", "guard"] == "aupro -0.0500"
    assert best_trials(df)[None]["trial"] == "fair"
    # Without the guard the trade-off trial would win: the guard is what excludes it.
    unguarded = _spec(tmp_path, "objective.guard={}")  # the demo sweep has guards
    assert best_trials(_table(unguarded, rows))[None]["trial"] == "trade"
    # Guards on a lower-is-better metric bound how much slower a trial may get.
    slow = _spec(tmp_path, "objective.guard={latency_ms: 2.0}")
    df = _table(
        slow,
        [
            {"trial": "base", "baseline": True, "image_auroc": 0.6, "latency_ms": 10.0},
            {"trial": "slow", "image_auroc": 0.9, "latency_ms": 12.5},
            {"trial": "ok", "image_auroc": 0.7, "latency_ms": 11.5},
        ],
    )
    assert best_trials(df)[None]["trial"] == "ok"


def test_guards_and_fronts_are_judged_per_category(tmp_path):
    from search.pareto import pareto_table
    from search.results import best_trials

    spec = _spec(tmp_path, "objective.per_category=true", "objective.guard={aupro: 0.0}", *THREE)
    rows = [
        {"trial": "a0", "category": "a", "baseline": True, "image_auroc": 0.5, "aupro": 0.5},
        {"trial": "a1", "category": "a", "image_auroc": 0.9, "aupro": 0.45},  # breaks
        {"trial": "a2", "category": "a", "image_auroc": 0.6, "aupro": 0.55},
        # Stopped: judged on its last round's values against the baseline's final ones.
        {"trial": "a3", "category": "a", "image_auroc": 0.5, "aupro": 0.3, "state": "stopped"},
        {"trial": "b0", "category": "b", "baseline": True, "image_auroc": 0.5, "aupro": 0.2},
        {"trial": "b1", "category": "b", "image_auroc": 0.9, "aupro": 0.45},  # fine here
        # Stopped: non-dominated on its (early-round) values, but never on a front.
        {"trial": "b2", "category": "b", "image_auroc": 0.95, "aupro": 0.25, "state": "stopped"},
        {"trial": "b3", "category": "b", "image_auroc": 0.9, "aupro": 0.45},  # ties b1
    ]
    for i, r in enumerate(rows):
        r.update(params_m=1.0, study_trial=i)
        r.setdefault("state", "done")
    df = _table(spec, rows).set_index("trial")
    assert not df.loc["a1", "feasible"] and df.loc["b1", "feasible"]
    assert not df.loc["a3", "feasible"] and df.loc["a3", "guard"] == "aupro -0.2000"
    # a2 dominates the baseline a0; b1 and b3 (equal: neither dominates the other) dominate
    # b0; stopped trials are never on a front.
    assert sorted(df.index[df["on_front"]]) == ["a2", "b1", "b3"]
    best = best_trials(df.reset_index())
    assert best["a"]["trial"] == "a2" and best["b"]["trial"] == "b1"
    table = pareto_table(spec, df.reset_index())  # pareto.csv: every finished trial
    assert list(table.columns[:8]) == [
        "trial", "category", "study_trial", "state", "baseline", "on_front", "feasible", "guard"
    ]  # fmt: skip
    assert len(table) == 8 and table["baseline"].sum() == 2


def test_a_failed_baseline_does_not_turn_the_guards_off(tmp_path, monkeypatch):
    """Issue 20: against a failed baseline (no metrics) every trial counted as feasible."""
    from search import export, results
    from search.config import SPEC_FILE
    from search.results import best_trials, unjudged_guards

    spec = _spec(tmp_path, "objective.guard={aupro: 0.01}", name="nobase")
    spec.experiment_dir.mkdir(parents=True)
    (spec.experiment_dir / SPEC_FILE).write_text(json.dumps(spec.to_dict()))
    rows = [
        {"trial": "base", "baseline": True, "state": "failed"},  # no metrics at all
        {"trial": "low", "image_auroc": 0.95, "aupro": 0.10},  # 0.2 below on AUPRO
        {"trial": "fair", "image_auroc": 0.70, "aupro": 0.30},
    ]
    for i, r in enumerate(rows):
        r.update(study_trial=i, rounds=4, epochs=4)
    df = _table(spec, rows)
    assert not df["feasible"].any() and not df["guard_judged"].any()
    assert best_trials(df) == {}  # nothing is the guarded best
    assert unjudged_guards(df) == {None: "its baseline trial base has not finished (state failed)"}
    # A finished baseline judges them: the trial 0.2 below on AUPRO breaks the guard.
    rows[0].update(state="done", image_auroc=0.6, aupro=0.30)
    judged = _table(spec, rows)
    assert judged.set_index("trial")["feasible"].to_dict() == {
        "base": True, "low": False, "fair": True
    }  # fmt: skip
    assert best_trials(judged)[None]["trial"] == "fair" and unjudged_guards(judged) == {}
    rows[0] = {"trial": "base", "baseline": True, "state": "failed", "study_trial": 0}
    for r in rows:
        r["error"] = "CUDA out of memory" if r.get("state") == "failed" else None

    monkeypatch.setattr(results, "load_trials", lambda _: _table(spec, rows))
    status = results.status_table(spec.experiment_dir).splitlines()
    row = {line.split()[0]: line for line in status if line.split()[0] in ("low", "fair")}
    assert "unjudged" in row["low"] and "unjudged" in row["fair"]
    assert any(
        line.startswith("guards not judged: its baseline trial base has not finished")
        and "--retry-failed" in line
        for line in status
    )
    assert not any(line.startswith("best") for line in status)
    assert "guards not judged" in results.summary_table(spec.experiment_dir)

    monkeypatch.setattr(export, "load_trials", lambda _: _table(spec, rows))
    out = tmp_path / "export"
    with pytest.raises(UserInputError, match="no guarded best to export: guards not judged"):
        export.export_experiment(spec.experiment_dir, out)
    assert not out.exists()


def test_guards_without_a_finished_baseline_are_noted_per_category(tmp_path):
    from search.results import best_trials, unjudged_guards

    spec = _spec(tmp_path, "objective.per_category=true", "objective.guard={aupro: 0.0}", *THREE)
    rows = [
        {"trial": "a0", "category": "a", "baseline": True, "image_auroc": 0.5, "aupro": 0.5},
        {"trial": "a1", "category": "a", "image_auroc": 0.6, "aupro": 0.55},
        {"trial": "b0", "category": "b", "baseline": True, "aupro": 0.2, "state": "running"},
        {"trial": "b1", "category": "b", "image_auroc": 0.9, "aupro": 0.1},
    ]
    for i, r in enumerate(rows):
        r.update(params_m=1.0, study_trial=i)
        r.setdefault("state", "done")
    df = _table(spec, rows)
    assert list(best_trials(df)) == ["a"]
    assert unjudged_guards(df) == {"b": "its baseline trial b0 has not finished (state running)"}


def test_study_records_objectives_constraints_and_pruned_trials(tmp_path):
    """StudySearch alone (no Ray): told values, PRUNED stops, guard constraints."""
    from search.searcher import make_searcher

    spec = _spec(
        tmp_path, "objective.metrics=[image_auroc, latency_ms]", "objective.mode=[max, min]",
        "objective.guard={aupro: 0.01}", "search.n_startup_trials=2",
    )  # fmt: skip
    searcher = make_searcher(spec, tmp_path / "exp")
    assert searcher.metric == "objective" and searcher.mode == "max"  # what Tune checks
    configs = {t: searcher.suggest(t) for t in ("t0", "t1", "t2", "t3")}
    assert configs["t0"]["baseline"] and not configs["t1"]["baseline"]

    def final(auroc: float, aupro: float, latency: float) -> dict:
        return {"objective": auroc, "image_auroc": auroc, "aupro": aupro,
                "latency_ms": latency, "training_iteration": 4, "rounds_total": 4}  # fmt: skip

    searcher.on_trial_complete("t0", final(0.6, 0.30, 10.0))
    searcher.on_trial_complete("t1", final(0.9, 0.25, 5.0))  # breaks the AUPRO guard
    searcher.on_trial_complete("t2", final(0.7, 0.30, 9.0))
    stopped = {"objective": 0.2, "image_auroc": 0.2, "aupro": 0.1, "training_iteration": 1,
               "rounds_total": 4}  # fmt: skip
    searcher.on_trial_complete("t3", stopped)
    trials = searcher.study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3 + [
        optuna.trial.TrialState.PRUNED
    ]
    assert trials[1].values == [0.9, 5.0]
    assert trials[1].constraints["guard_aupro"] == pytest.approx(0.04)
    assert trials[2].constraints["guard_aupro"] == pytest.approx(-0.01)
    assert trials[3].user_attrs["metrics"]["image_auroc"] == 0.2  # its last rung, kept
    # Optuna's own front leaves the infeasible trial out.
    assert sorted(t.number for t in searcher.study.best_trials) == [2]
    # A driver killed after the study's record but before Tune's snapshot: Tune runs the
    # trial again, and its reports change nothing (Optuna refuses to update a finished trial).
    searcher._completed_trials.discard("t2")
    searcher.on_trial_result("t2", final(0.1, 0.1, 99.0))
    searcher.on_trial_complete("t2", final(0.1, 0.1, 99.0))
    assert searcher.study.trials[2].values == [0.7, 9.0]


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_multi_objective_sweep_resumes_keeps_its_front_and_exports_it(
    ray_session, synthetic_root, tmp_path
):
    from test_search import _driver_at_rounds, _sweep_args, _wait_for, study

    from search.export import export_experiment
    from search.results import load_trials, status_table
    from search.sweep import resume_sweep

    exp = tmp_path / "runs" / "mo"
    extra = [
        *THREE,
        "objective.guard={}",
        "search.num_trials=3",
        "search.max_concurrent=1",
        "scheduler.type=fifo",
        "search.sampler=tpe",
    ]
    args = [
        "sweep",
        "--address",
        ray_session,
        *_sweep_args(tmp_path, synthetic_root, "mo", *extra),
    ]
    # Kill the driver once the first trial (4 rounds) finished and is COMPLETE in the study,
    # before the second reports: a trial killed mid-way can fail its restore when Tune's
    # state snapshot still names a round checkpoint it already replaced (Ray, not this test).
    driver = _driver_at_rounds(args, exp, 4)
    try:
        _wait_for(
            lambda: any(
                t.state == optuna.trial.TrialState.COMPLETE for t in study(exp, "mo").trials
            ),
            300,
            "the first trial's COMPLETE record",
        )
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    before = {
        t.number: t.values
        for t in study(exp, "mo").trials
        if t.state == optuna.trial.TrialState.COMPLETE
    }
    assert len(before) >= 1

    run = resume_sweep(exp, address=ray_session, write=lambda _: None, dashboard=False)
    after = {t.number: t for t in study(exp, "mo").trials}
    for number, values in before.items():  # finished before the kill: kept as they were
        assert after[number].values == values
    df = load_trials(exp)
    done = df[df["state"] == "done"]
    assert len(df) == 3 and len(done) >= 2 and set(df["state"]) <= {"done", "failed"}
    pareto = pd.read_csv(run.export_dir / "pareto.csv")
    assert len(pareto) == len(done) and pareto["baseline"].sum() == 1
    assert {"on_front", "image_auroc", "aupro", "params_m", "latency_ms"} <= set(pareto.columns)
    values = pareto[["image_auroc", "aupro", "params_m"]].to_numpy() * [1, 1, -1]
    front = [i for i in range(len(pareto)) if not _dominated(values, i)]
    assert front and pareto.index[pareto["on_front"]].tolist() == front
    # The study's values are the ones pareto.csv lists, for every trial of both drivers.
    for _, row in pareto.iterrows():
        t = after[int(row["study_trial"])]
        assert t.values == pytest.approx([row["image_auroc"], row["aupro"], row["params_m"]])

    summary = json.loads((run.export_dir / "summary.json").read_text())["studies"]["mo"]
    exported = pareto[pareto["trial"] == summary["best_trial"]].index[0]
    assert not _dominated(values, exported)
    assert pareto.loc[exported, "on_front"]
    assert pareto.loc[exported, "image_auroc"] == pareto[pareto["on_front"]]["image_auroc"].max()
    assert sorted(summary["front"]) == sorted(pareto[pareto["on_front"]]["trial"])
    assert (run.export_dir / "plots" / "pareto_front.png").stat().st_size > 10_000
    results = (run.export_dir / "results.md").read_text()
    for _, row in pareto[pareto["on_front"]].iterrows():
        assert f"front #{row['study_trial']} {row['trial']} (test)" in results
    status = status_table(exp)
    assert "pareto front over image_auroc (max), aupro (max), params_m (min)" in status
    assert all(t in status.splitlines()[-2] for t in pareto[pareto["on_front"]]["trial"])

    # Any trial can be exported: here a trial the default would not pick.
    other = pareto[pareto["trial"] != summary["best_trial"]].iloc[0]
    out = export_experiment(exp, tmp_path / "other", trial=other["trial"], overlays=1)
    chosen = json.loads((out / "summary.json").read_text())["studies"]["mo"]["best_trial"]
    assert chosen == other["trial"]
    cfg = load_config(out / "best.yaml")
    assert cfg.model.mask_ratio == pytest.approx(other["mask_ratio"])
    assert yaml.safe_load((out / "best.yaml").read_text())["model"]["patch_size"] == int(
        other["patch_size"]
    )
    with pytest.raises(UserInputError, match="--trial 'nosuch'"):
        export_experiment(exp, tmp_path / "none", trial="nosuch")
    assert not (tmp_path / "none").exists()


def test_status_marks_front_trials_and_broken_guards(tmp_path, monkeypatch):
    from search import results
    from search.config import SPEC_FILE

    spec = _spec(tmp_path, *THREE, "objective.guard={aupro: 0.01}", name="st")
    spec.experiment_dir.mkdir(parents=True)
    (spec.experiment_dir / SPEC_FILE).write_text(json.dumps(spec.to_dict()))
    rows = [
        {"trial": "t0", "baseline": True, "image_auroc": 0.6, "aupro": 0.30, "params_m": 2.0},
        {"trial": "t1", "image_auroc": 0.9, "aupro": 0.20, "params_m": 1.0},
        {"trial": "t2", "image_auroc": 0.7, "aupro": 0.31, "params_m": 2.0},
    ]
    for i, r in enumerate(rows):
        r.update(study_trial=i, rounds=4, epochs=4)
    monkeypatch.setattr(results, "load_trials", lambda _: _table(spec, rows))
    lines = results.status_table(spec.experiment_dir).splitlines()
    row = {line.split()[0]: line for line in lines if line.split()[0] in ("t0", "t1", "t2")}
    assert "broken: aupro -0.1000" in row["t1"] and " ok " in row["t2"]
    assert "*" in row["t2"] and "*" not in row["t0"] and "*" not in row["t1"]
    assert "pareto front over image_auroc (max), aupro (max), params_m (min): t2" in lines
    assert lines[-1].startswith("front pick: trial t2")


def test_the_demo_sweep_guards_localisation(tmp_path):
    guard = _spec(tmp_path).sweep.objective.guard
    assert guard == {"aupro": 0.01, "pixel_auroc": 0.01}


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random", "gp"])
def test_multi_objective_samplers_suggest_after_their_start_up(tmp_path, sampler):
    from search.searcher import make_searcher

    spec = _spec(tmp_path, *THREE, f"search.sampler={sampler}", "search.n_startup_trials=2")
    searcher = make_searcher(spec, tmp_path / sampler)
    assert searcher.study.directions == [
        optuna.study.StudyDirection.MAXIMIZE,
        optuna.study.StudyDirection.MAXIMIZE,
        optuna.study.StudyDirection.MINIMIZE,
    ]
    for i in range(4):  # two start-up trials, then the sampler's model (NSGA-II: generation 2)
        config = searcher.suggest(f"t{i}")
        assert config is not None and 0.1 <= config["model.mask_ratio"] <= 0.8
        result = {"objective": 0.5 + i / 10, "image_auroc": 0.5 + i / 10, "aupro": 0.3 - i / 20,
                  "params_m": 1.0 + i, "training_iteration": 4, "rounds_total": 4}  # fmt: skip
        searcher.on_trial_complete(f"t{i}", result)
    assert [t.state for t in searcher.study.trials] == [optuna.trial.TrialState.COMPLETE] * 4


@pytest.mark.slow
def test_per_category_sweep_with_several_objectives_has_a_front_per_category(
    ray_session, synthetic_root, tmp_path
):
    from test_search import spec_for

    from search.sweep import run_sweep

    spec = spec_for(
        tmp_path, synthetic_root, *THREE, "objective.per_category=true", "objective.guard={}",
        "data.categories=[disk,grid]", "search.num_trials=2", "scheduler.type=fifo",
        "search.sampler=tpe", name="pcmo",
    )  # fmt: skip
    run = run_sweep(spec, write=lambda _: None, dashboard=False)
    pareto = pd.read_csv(run.export_dir / "pareto.csv")
    assert sorted(pareto["category"]) == ["disk", "disk", "grid", "grid"]
    summary = json.loads((run.export_dir / "summary.json").read_text())["studies"]
    for category in ("disk", "grid"):
        rows = pareto[pareto["category"] == category].reset_index(drop=True)
        assert rows["baseline"].sum() == 1 and rows["on_front"].any()
        values = rows[["image_auroc", "aupro", "params_m"]].to_numpy() * [1, 1, -1]
        assert rows.index[rows["on_front"]].tolist() == [
            i for i in range(len(rows)) if not _dominated(values, i)
        ]
        assert summary[category]["best_trial"] in set(rows[rows["on_front"]]["trial"])
        assert (run.export_dir / "plots" / f"pareto_front_{category}.png").is_file()
        assert load_config(run.export_dir / category / "best.yaml").data.categories == (category,)


def test_readme_objective_example_resolves_and_its_front_picture_exists(tmp_path):
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Several objectives and guards") :]
    block = section[section.index("```yaml") + len("```yaml") : section.index("```\n")]
    example = yaml.safe_load(block)
    overrides = [
        f"{part}.{k}={json.dumps(v)}" for part, keys in example.items() for k, v in keys.items()
    ]
    spec = resolve_sweep(None, overrides, name="p", storage=str(tmp_path / "runs"))
    assert spec.sweep.objective.objectives == (
        ("image_auroc", "max"), ("aupro", "max"), ("latency_ms", "min")
    )  # fmt: skip
    for picture in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section.split("\n## ")[0]):
        assert (ROOT / picture).is_file(), picture
