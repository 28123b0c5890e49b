"""Confirmation runs: the search's top configurations and the baseline, trained again.

A search ranks trials by one training run each, and on small validation halves two seeds of one
configuration can differ as much as the configurations do (BENCHMARKS section 9): the best
trial is then partly the luckiest seed. With ``search.confirm: {top_k: K, seeds: S}``, once the
search has ended, the K best finished (and guard-feasible) configurations and the baseline each
train again with S fresh seeds, as Ray trials of a second Tune experiment inside the
experiment (``<experiment>/confirm``: resumable, in the dashboard and in ``status``). Then:

- the exported configuration is the one with the best *mean validation* objective over its
  seeds (the test half still decides nothing);
- its gain over the baseline on the held-out test half is reported as a mean over seeds with a
  95% interval from a bootstrap that resamples the seeds (pairs: the same fresh seed for both)
  and, within each category, the test images (positives and negatives separately, the same
  images for both): ``beyond_noise`` is whether the interval lies above 0;
- the noise floor: two single runs of one configuration differ by less than
  ``1.96 * sqrt(2) * sd`` in 95% of cases, ``sd`` being the pooled seed standard deviation of
  the validation objective; differences between search trials below it are seed noise.

Everything lands in ``confirm.json`` in the experiment directory (``summary.json``'s
``confirm`` block after export).
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.search import ConcurrencyLimiter, Searcher

from mmr.fileio import atomic_write
from search.config import SweepSpec
from search.contract import CONFIRM_DIR, CONFIRM_FILE, CONFIRM_KEY, OBJECTIVE, TEST_SCORES_FILE
from search.searcher import RelocatingGenerator
from search.storage import resuming

__all__ = [
    "confirm_configs",
    "confirm_progress",
    "describe",
    "fresh_seeds",
    "NO_FLOOR",
    "gain_interval",
    "read_confirm",
    "replicate_gains",
    "run_confirm",
    "summarize_confirm",
]

log = logging.getLogger(__name__)

# What status and the report say when no confirmation ran: no measured floor.
NO_FLOOR = (
    "seed noise not measured (search.confirm is off): a difference between two single trials "
    "may be seed noise; search.confirm: {top_k: 1, seeds: 2} measures it"
)
SEED_STRIDE = 7919  # fresh seeds: the search's seed plus multiples of a prime (never equal)


def fresh_seeds(spec: SweepSpec) -> list[int]:
    """The confirmation's training seeds, none of them the search's ``train.seed``."""
    base = spec.base.train.seed
    return [base + SEED_STRIDE * (i + 1) for i in range(spec.sweep.search.confirm.seeds)]


def confirm_configs(spec: SweepSpec, trials: Sequence[Any], table: Any) -> list[dict[str, Any]]:
    """Tune configs of the confirmation trials: (top-k + baseline) x fresh seeds.

    ``trials``: the search's Tune trials (their configs); ``table``: ``load_trials`` rows of
    the same experiment (states, objective, feasibility). Only finished trials count.
    """
    c = spec.sweep.search.confirm
    configs = {t.trial_id: dict(t.config or {}) for t in trials}
    done = table[table["state"] == "done"]
    if "feasible" in done:
        done = done[done["feasible"].astype(bool) | done["baseline"].astype(bool)]
    base = done[done["baseline"].astype(bool)]
    ranked = done[~done["baseline"].astype(bool)].sort_values(OBJECTIVE, ascending=False)
    chosen = list(ranked["trial"][: c.top_k]) + list(base["trial"][:1])
    out = []
    for trial in chosen:
        for seed in fresh_seeds(spec):
            config = {k: v for k, v in configs[trial].items() if k != "study_trial"}
            config["train.seed"] = seed
            config[CONFIRM_KEY] = trial
            out.append(config)
    return out


def run_confirm(
    spec: SweepSpec, *, write: Callable[[str], None], trainable: Any, callbacks: list
) -> bool:
    """Runs (or resumes) the confirmation trials and writes ``confirm.json``.

    Returns False when they were interrupted (Ctrl-C: ``resume`` continues them). With no
    finished trial besides the baseline there is nothing to confirm: ``confirm.json`` says so.
    """
    from ray import tune
    from ray.tune import ExperimentAnalysis

    from search.results import load_trials

    location = f"{spec.experiment_location}/{CONFIRM_DIR}"
    c = spec.sweep.search.confirm
    resumed = tune.Tuner.can_restore(location)
    if resumed:
        write(f"resuming the confirmation runs in {location}")
        tuner = tune.Tuner.restore(
            location, trainable=trainable, resume_unfinished=True, restart_errored=False
        )
    else:
        search = ExperimentAnalysis(spec.experiment_location).trials
        configs = confirm_configs(spec, search, load_trials(spec.experiment_location))
        if len({cfg[CONFIRM_KEY] for cfg in configs}) < 2:
            write("confirmation skipped: no finished trial besides the baseline")
            empty = {"top_k": c.top_k, "seeds": c.seeds, "configurations": {}}
            summary = {**empty, "best_trial": None, "baseline_trial": None, "gain": None}
            summary.update(beyond_noise=False, noise_floor=None)
            atomic_write(spec.experiment_dir / CONFIRM_FILE, json.dumps(summary) + "\n")
            return True
        write(
            f"confirming the top {c.top_k} configuration(s) and the baseline with "
            f"{c.seeds} fresh seed(s) each: {len(configs)} trials"
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                # Its new trials follow the experiment when a copy of it is resumed.
                search_alg=RelocatingGenerator(
                    ConcurrencyLimiter(
                        ListedConfigs(configs), max_concurrent=spec.sweep.search.max_concurrent
                    )
                ),
                num_samples=len(configs),
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=CONFIRM_DIR,
                storage_path=spec.experiment_location,
                failure_config=tune.FailureConfig(max_failures=spec.sweep.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=callbacks,
                verbose=0,
            ),
        )
    with resuming(location, spec.experiment_dir / CONFIRM_DIR) if resumed else nullcontext():
        tuner.fit()
    trials = ExperimentAnalysis(location).trials
    if any(t.status not in ("TERMINATED", "ERROR") for t in trials):
        return False
    summary = summarize_confirm(spec, trials)
    atomic_write(spec.experiment_dir / CONFIRM_FILE, json.dumps(summary, indent=1) + "\n")
    for line in describe(summary):
        write(line)
    return True


class ListedConfigs(Searcher):
    """Suggests the given trial configs in order, then ends (pickled with the experiment, so
    a resumed confirmation continues the list)."""

    def __init__(self, configs: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        self._configs = [dict(c) for c in configs]
        self._next = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self._next >= len(self._configs):
            return Searcher.FINISHED
        self._next += 1
        return dict(self._configs[self._next - 1])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump((self._configs, self._next), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self._configs, self._next = pickle.load(f)


def _scores_of(trial: Any) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    from search.storage import join, read_file

    storage = trial.storage
    text = read_file(storage.storage_filesystem, join(storage.trial_fs_path, TEST_SCORES_FILE))
    if text is None:
        return None
    return {
        cat: (np.asarray(v["labels"], dtype=int), np.asarray(v["scores"], dtype=float))
        for cat, v in json.loads(text).items()
    }


def summarize_confirm(
    spec: SweepSpec, trials: Sequence[Any], *, n_boot: int = 1000
) -> dict[str, Any]:
    """``confirm.json``: per configuration its seeds' values, the pick, the gain, the floor."""
    from mmr.metrics import image_auroc

    runs: dict[str, dict[int, dict[str, Any]]] = {}
    baseline = None
    for t in trials:
        config = dict(t.config or {})
        result = dict(t.last_result or {})
        if result.get("training_iteration", 0) < spec.base.num_rounds:
            continue  # failed or unfinished: not a confirmation of anything
        source = config[CONFIRM_KEY]
        if config.get("baseline"):
            baseline = source
        runs.setdefault(source, {})[int(config["train.seed"])] = {
            "val": result.get(OBJECTIVE),
            "scores": _scores_of(t),
        }
    c = spec.sweep.search.confirm
    out: dict[str, Any] = {"top_k": c.top_k, "seeds": c.seeds, "configurations": {}}
    sds = []  # each configuration's seed standard deviation of the validation objective
    for source, by_seed in runs.items():
        vals = [r["val"] for r in by_seed.values() if r["val"] is not None]
        if len(vals) > 1:
            sds.append(float(np.std(vals, ddof=1)))
        tests = [
            float(np.mean([image_auroc(s, y) for y, s in r["scores"].values()]))
            for r in by_seed.values()
            if r["scores"]
        ]
        out["configurations"][source] = {
            "baseline": source == baseline,
            "seeds": sorted(by_seed),
            "val_mean": _round(np.mean(vals)) if vals else None,
            "val_sd": _round(np.std(vals, ddof=1)) if len(vals) > 1 else None,
            "test_image_auroc_mean": _round(np.mean(tests)) if tests else None,
        }
    confs = out["configurations"]
    # The baseline competes too: when no configuration beats it on mean validation, the
    # baseline is what the export ships (ties: the baseline).
    contenders = [s for s, v in confs.items() if v["val_mean"] is not None]
    best = (
        max(contenders, key=lambda s: (confs[s]["val_mean"], confs[s]["baseline"]))
        if contenders
        else None
    )
    out["best_trial"] = best
    out["baseline_trial"] = baseline
    out["gain"] = None
    out["beyond_noise"] = False
    if best is not None and baseline is not None and best != baseline:
        pairs = sorted(set(runs[best]) & set(runs[baseline]))
        a = [runs[best][s]["scores"] for s in pairs]
        b = [runs[baseline][s]["scores"] for s in pairs]
        if pairs and all(a) and all(b):
            mean, lo, hi = gain_interval(a, b, n_boot=n_boot, seed=spec.sweep.search.seed)
            out["gain"] = {
                "metric": "test_image_auroc",
                "mean": _round(mean),
                "ci95": [_round(lo), _round(hi)],
            }
            out["beyond_noise"] = bool(lo > 0)
    pooled = math.sqrt(np.mean(np.square(sds))) if sds else None
    out["noise_floor"] = None if pooled is None else _round(1.96 * math.sqrt(2) * pooled)
    return out


def gain_interval(
    best: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]],
    base: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean test image AUROC gain of ``best`` over ``base`` and its 95% bootstrap interval.

    ``best[i]`` and ``base[i]`` are runs with the same seed: ``{category: (labels, scores)}``
    on the same test images. The gain of a seed is the mean over categories of the AUROC
    difference; the estimate is the mean over seeds. Each bootstrap replicate resamples the
    seeds (with their pairs) and, per category, the images (positives and negatives apart, so
    both classes stay), the same images for both runs. All replicates are computed at once
    (``replicate_gains``).
    """
    point, reps = replicate_gains(best, base, n_boot=n_boot, seed=seed)
    lo, hi = np.quantile(reps, [0.025, 0.975])
    return point, float(lo), float(hi)


def replicate_gains(
    best: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]],
    base: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]],
    *,
    n_boot: int,
    seed: int = 0,
) -> tuple[float, np.ndarray]:
    """The point gain and ``n_boot`` bootstrap replicates of it (see ``gain_interval``)."""
    from mmr.metrics import image_auroc

    n = len(best)
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n, size=(n_boot, n))  # replicate b uses seeds[b]
    point = np.zeros(n)
    diff = np.zeros((n, n_boot))  # per seed, per replicate: mean over categories of the gain
    for cat, (y, _) in best[0].items():
        y = np.asarray(y)
        pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        idx = np.concatenate(
            [rng.choice(pos, size=(n_boot, len(pos))), rng.choice(neg, size=(n_boot, len(neg)))],
            axis=1,
        )
        for i in range(n):
            (ya, sa), (yb, sb) = best[i][cat], base[i][cat]
            if not (np.array_equal(ya, y) and np.array_equal(yb, y)):
                raise ValueError(f"{cat}: the paired runs were tested on different images")
            point[i] += image_auroc(sa, ya) - image_auroc(sb, yb)
            diff[i] += _auroc_rows(np.asarray(sa)[idx], len(pos)) - _auroc_rows(
                np.asarray(sb)[idx], len(pos)
            )
    cats = len(best[0])
    reps = (diff / cats)[seeds, np.arange(n_boot)[:, None]].mean(axis=1)
    return float(np.mean(point / cats)), reps


def _auroc_rows(scores: np.ndarray, positives: int) -> np.ndarray:
    """ROC AUC of each row of ``scores`` whose first ``positives`` columns are the anomalous
    images (Mann-Whitney with average ranks: ties count one half, as ``image_auroc``)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1)
    negatives = scores.shape[1] - positives
    u = ranks[:, :positives].sum(axis=1) - positives * (positives + 1) / 2
    return u / (positives * negatives)


def confirm_progress(spec: SweepSpec) -> str:
    """One line on confirmation trials that have not all finished (or not started)."""
    from ray.tune import ExperimentAnalysis

    location = f"{spec.experiment_location}/{CONFIRM_DIR}"
    try:
        trials = ExperimentAnalysis(location).trials
    except (ValueError, FileNotFoundError, RuntimeError):
        return "confirmation runs: not started (they follow the search)"
    done = sum(t.status == "TERMINATED" for t in trials)
    failed = sum(t.status == "ERROR" for t in trials)
    return f"confirmation runs: {done} of {len(trials)} finished, {failed} failed"


def read_confirm(experiment_dir: str | Path) -> dict[str, Any] | None:
    """The experiment's ``confirm.json``, or None before (or without) confirmation."""
    path = Path(experiment_dir) / CONFIRM_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def describe(summary: Mapping[str, Any]) -> list[str]:
    """What ``status`` and the sweep's last lines say about the confirmation."""
    lines = []
    best = summary.get("best_trial")
    gain = summary.get("gain")
    if best is None:
        return ["confirmation: no configuration besides the baseline finished"]
    conf = summary["configurations"][best]
    lines.append(
        f"confirmed best: trial {best} (mean validation {conf['val_mean']} over seeds "
        f"{conf['seeds']})"
    )
    if best == summary.get("baseline_trial"):
        lines.append(
            "no configuration beat the baseline on mean validation over fresh seeds: "
            "the baseline is the confirmed best"
        )
    if gain is not None:
        lo, hi = gain["ci95"]
        verdict = (
            "beyond seed noise"
            if summary["beyond_noise"]
            else "NOT beyond seed noise: no configuration beat the baseline reliably"
        )
        lines.append(
            f"gain over the baseline on the test half: {gain['mean']:+.4f} image AUROC "
            f"(95% interval {lo:+.4f} .. {hi:+.4f}), {verdict}"
        )
    if summary.get("noise_floor") is not None:
        lines.append(
            f"differences below {summary['noise_floor']:.4f} between single trials are seed noise"
        )
    return lines


def _round(x: Any) -> float:
    return round(float(x), 4)
