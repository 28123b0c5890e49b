"""Confirmation runs (search.confirm): the pick, the gain interval, the noise floor, a sweep."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pytest
from fast import FAST

from mmr.config import ConfigError
from mmr.metrics import image_auroc
from search import confirm as C
from search.contract import CONFIRM_KEY, OBJECTIVE, TEST_SCORES_FILE
from search.resolve import resolve_sweep


def _scores(rng: np.random.Generator, shift: float, n: int = 40) -> dict[str, tuple]:
    labels = np.array([0] * n + [1] * n)
    scores = rng.normal(0, 1, 2 * n) + shift * labels
    return {"disk": (labels, scores)}


def test_gain_interval_is_paired_and_covers_zero_for_equal_runs():
    rng = np.random.default_rng(0)
    runs = [_scores(rng, 1.0) for _ in range(3)]
    mean, lo, hi = C.gain_interval(runs, runs, n_boot=200)
    assert mean == 0 and lo == 0 and hi == 0  # paired: a run against itself gains nothing

    base = [_scores(rng, 0.2) for _ in range(3)]
    better = [_scores(rng, 2.5) for _ in range(3)]
    mean, lo, hi = C.gain_interval(better, base, n_boot=300)
    expected = np.mean(
        [image_auroc(b["disk"][1], b["disk"][0]) - image_auroc(a["disk"][1], a["disk"][0])
         for a, b in zip(base, better, strict=True)]
    )  # fmt: skip
    assert mean == pytest.approx(expected) and 0 < lo < mean < hi

    noisy = [_scores(rng, 0.2) for _ in range(3)]
    mean, lo, hi = C.gain_interval(noisy, base, n_boot=300)
    assert lo < 0 < hi  # two draws of the same quality: not beyond noise


def test_gain_interval_refuses_runs_tested_on_other_images():
    rng = np.random.default_rng(1)
    a, b = _scores(rng, 1.0), _scores(rng, 1.0, n=30)
    with pytest.raises(ValueError, match="different images"):
        C.gain_interval([a], [b], n_boot=10)


@dataclass
class FakeStorage:
    storage_filesystem: Any
    trial_fs_path: str


@dataclass
class FakeTrial:
    config: dict
    last_result: dict
    storage: FakeStorage
    status: str = "TERMINATED"


def _trial(tmp: Path, name: str, source: str, seed: int, val: float, scores, baseline=False):
    d = tmp / name
    d.mkdir()
    labels, s = scores["disk"]
    payload = {"disk": {"labels": labels.tolist(), "scores": s.tolist()}}
    (d / TEST_SCORES_FILE).write_text(json.dumps(payload))
    config = {CONFIRM_KEY: source, "train.seed": seed, "baseline": baseline}
    result = {"training_iteration": 4, OBJECTIVE: val}
    return FakeTrial(config, result, FakeStorage(pafs.LocalFileSystem(), str(d)))


def _spec(tmp: Path, *extra: str):
    return resolve_sweep(
        None,
        [*FAST, "search.confirm.top_k=2", "search.confirm.seeds=2", *extra],
        name="c",
        storage=str(tmp / "runs"),
    )


def test_the_confirmed_best_is_the_best_mean_validation_not_the_best_test(tmp_path):
    spec = _spec(tmp_path)
    rng = np.random.default_rng(2)
    seeds = C.fresh_seeds(spec)
    assert len(seeds) == 2 and spec.base.train.seed not in seeds
    trials = []
    # A: validation 0.80 / 0.78, test scores weak; B: validation 0.70 / 0.72, test strong.
    for i, s in enumerate(seeds):
        trials.append(_trial(tmp_path, f"a{i}", "A", s, [0.80, 0.78][i], _scores(rng, 0.5)))
        trials.append(_trial(tmp_path, f"b{i}", "B", s, [0.70, 0.72][i], _scores(rng, 3.0)))
        trials.append(_trial(tmp_path, f"z{i}", "Z", s, 0.60, _scores(rng, 0.3), baseline=True))
    out = C.summarize_confirm(spec, trials, n_boot=200)
    assert out["best_trial"] == "A" and out["baseline_trial"] == "Z"
    assert out["configurations"]["A"]["val_mean"] == pytest.approx(0.79)
    assert (
        out["configurations"]["B"]["test_image_auroc_mean"]
        > (out["configurations"]["A"]["test_image_auroc_mean"])
    )
    assert set(out) >= {"top_k", "seeds", "best_trial", "gain", "beyond_noise", "noise_floor"}
    lo, hi = out["gain"]["ci95"]
    assert lo <= out["gain"]["mean"] <= hi and out["beyond_noise"] == (lo > 0)
    sds = [np.std(v, ddof=1) for v in ([0.80, 0.78], [0.70, 0.72], [0.60, 0.60])]
    floor = 1.96 * np.sqrt(2) * np.sqrt(np.mean(np.square(sds)))
    assert out["noise_floor"] == pytest.approx(floor, abs=1e-4)
    lines = C.describe(out)
    assert any("confirmed best: trial A" in x for x in lines)
    assert any(f"below {out['noise_floor']:.4f}" in x for x in lines)


def test_the_baseline_wins_when_no_configuration_beats_it_over_seeds(tmp_path):
    spec = _spec(tmp_path)
    rng = np.random.default_rng(3)
    trials = []
    for i, s in enumerate(C.fresh_seeds(spec)):
        trials.append(_trial(tmp_path, f"a{i}", "A", s, 0.70, _scores(rng, 1.0)))
        trials.append(_trial(tmp_path, f"z{i}", "Z", s, 0.75, _scores(rng, 1.0), baseline=True))
    failed = _trial(tmp_path, "f", "A", 99, 0.99, _scores(rng, 5.0))
    failed.last_result["training_iteration"] = 2  # did not finish: confirms nothing
    out = C.summarize_confirm(spec, [*trials, failed], n_boot=50)
    assert out["best_trial"] == "Z" and out["gain"] is None and not out["beyond_noise"]
    assert out["configurations"]["A"]["seeds"] == C.fresh_seeds(spec)
    assert any("the baseline is the confirmed best" in x for x in C.describe(out))


def test_confirm_configs_take_the_top_k_finished_feasible_trials_and_the_baseline(tmp_path):
    import pandas as pd

    spec = _spec(tmp_path)

    @dataclass
    class T:
        trial_id: str
        config: dict

    rows = [
        ("z", "done", True, 0.5, True),
        ("a", "done", False, 0.9, False),  # infeasible: breaks a guard
        ("b", "done", False, 0.8, True),
        ("c", "stopped", False, 0.95, True),  # stopped early: not a candidate
        ("d", "done", False, 0.7, True),
        ("e", "done", False, 0.6, True),
    ]
    table = pd.DataFrame(rows, columns=["trial", "state", "baseline", OBJECTIVE, "feasible"])
    trials = [T(r[0], {"model.mask_ratio": 0.1, "baseline": r[2], "study_trial": 1}) for r in rows]
    configs = C.confirm_configs(spec, trials, table)
    assert [c[CONFIRM_KEY] for c in configs] == ["b", "b", "d", "d", "z", "z"]
    assert [c["train.seed"] for c in configs[:2]] == C.fresh_seeds(spec)
    assert all("study_trial" not in c and c["model.mask_ratio"] == 0.1 for c in configs)


def test_confirm_settings_are_checked(tmp_path, caplog):
    with pytest.raises(ConfigError, match=r"search.confirm.seeds must be >= 2"):
        _spec(tmp_path, "search.confirm.seeds=1")
    with pytest.raises(ConfigError, match=r"search.confirm.top_k must be >= 0"):
        _spec(tmp_path, "search.confirm.top_k=-1")
    # Per-category or several objectives: the sweep runs without confirmation, and says so.
    for extra in (
        ["objective.per_category=true", "data.categories=[disk,grid]"],
        ["objective.metrics=[image_auroc, aupro]", "search.sampler=tpe"],
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="search.config"):
            spec = _spec(tmp_path, *extra)
        assert spec.sweep.search.confirm.top_k == 0, extra
        assert spec.to_dict()["sweep"]["search"]["confirm"]["top_k"] == 0
        assert "confirmation runs confirm one single-objective study" in caplog.text
    # The demo config confirms (its sizes from the replay).
    assert resolve_sweep(None, categories=["nut"]).sweep.search.confirm.top_k == 1


@pytest.mark.slow
def test_a_sweep_confirms_its_best_and_exports_the_confirmed_one(
    ray_session, synthetic_root, tmp_path
):
    from search.results import load_trials, status_table
    from search.sweep import run_sweep

    spec = resolve_sweep(
        None,
        [
            f"data.root={synthetic_root}",
            *FAST,
            "train.epochs=2",
            "train.lr_milestones=[2]",
            "search.num_trials=3",
            "search.max_concurrent=1",
            "scheduler.type=fifo",
            "search.confirm.top_k=1",
            "search.confirm.seeds=2",
        ],
        name="conf",
        storage=str(tmp_path / "runs"),
    )
    lines: list[str] = []
    run = run_sweep(spec, write=lines.append, dashboard=False)
    exp = run.experiment_dir
    # The budget says what the confirmation adds: (top 1 + the baseline) x 2 seeds.
    assert any("3 trials + 4 confirmation trials after them" in line for line in lines), lines
    summary = json.loads((exp / "confirm.json").read_text())
    confirmed = summary["configurations"]
    assert len(confirmed) == 2 and all(len(v["seeds"]) == 2 for v in confirmed.values())
    assert summary["best_trial"] in confirmed
    best = max(confirmed, key=lambda k: (confirmed[k]["val_mean"], confirmed[k]["baseline"]))
    assert summary["best_trial"] == best
    # The search's own table is unchanged: 3 trials, the confirmation runs live apart.
    assert len(load_trials(exp)) == 3 and (exp / "confirm").is_dir()
    exported = json.loads((run.export_dir / "summary.json").read_text())
    assert exported["confirm"]["best_trial"] == best
    assert exported["studies"]["conf"]["best_trial"] == best
    assert "## Confirmation runs" in (run.export_dir / "results.md").read_text()
    assert "Confirmation runs" in (run.export_dir / "report.html").read_text()
    status = status_table(exp)
    assert f"confirmed best: trial {best}" in status
    assert any("confirming the top 1" in x for x in lines)

    # A driver that died after the confirmation trials but before confirm.json: resume
    # restores the confirmation experiment (not the finished search) and writes the verdict.
    from search.sweep import resume_sweep

    (exp / "confirm.json").unlink()
    assert "confirmation runs: 4 of 4 finished" in status_table(exp)
    lines.clear()
    resume_sweep(exp, write=lines.append, dashboard=False, export=False)
    assert any("resuming the confirmation runs" in x for x in lines), lines
    assert not any("resuming sweep" in x for x in lines)
    again = json.loads((exp / "confirm.json").read_text())
    assert again["best_trial"] == best and again["configurations"] == confirmed
    lines.clear()
    resume_sweep(exp, write=lines.append, dashboard=False, export=False)
    assert lines == ["conf: already complete (3 trials); nothing to resume"]

    # The step after the search: predict with the export on the held-out test half gives
    # the export's own test image AUROC (issue 22's "done when", on a sweep's export).
    import csv

    from mmr.data import list_tasks, split_task
    from mmr.predict import predict

    (task,) = list_tasks(spec.base.data)
    _, test = split_task(task, spec.base.data)
    out = tmp_path / "pred"
    predict(run.export_dir, [str(x.image) for x in test], out, device="cpu", overlays=False)
    with (out / "predictions.csv").open() as f:
        rows = {r["path"]: float(r["score"]) for r in csv.DictReader(f)}
    scores = np.array([rows[str(x.image)] for x in test])
    labels = np.array([x.label for x in test])
    want = exported["studies"]["conf"]["best_test"]["image_auroc"]
    assert image_auroc(scores, labels) == pytest.approx(want, abs=1e-6)


def test_bootstrap_aurocs_are_image_auroc_of_each_resample():
    # The vectorised replicates rank with ties as image_auroc does (scores rounded: many ties).
    rng = np.random.default_rng(5)
    labels = np.array([1] * 7 + [0] * 11)
    scores = rng.normal(0, 1, (50, 18)).round(1) + labels
    rows = C._auroc_rows(scores, positives=7)
    assert rows == pytest.approx([image_auroc(s, labels) for s in scores])


def test_bootstrap_replicates_resample_seeds_and_images_around_the_point_gain():
    rng = np.random.default_rng(6)
    base = [_scores(rng, 0.5) for _ in range(4)]
    better = [_scores(rng, 1.5) for _ in range(4)]
    point, reps = C.replicate_gains(better, base, n_boot=2000, seed=3)
    assert reps.shape == (2000,) and len(np.unique(reps)) > 1000
    assert abs(np.mean(reps) - point) < 0.01  # the bootstrap centres on the estimate
    _, reps1 = C.replicate_gains(better[:1], base[:1], n_boot=2000, seed=3)
    assert np.std(reps1) > 0.01  # one seed: the images alone are resampled
