"""Reading an experiment: one table row per trial, the best trial, status and summary tables."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from mmr.report import METRICS
from search.config import SweepSpec, load_spec
from search.searcher import OBJECTIVE, ROUNDS_KEY
from search.trainable import META_KEYS

__all__ = [
    "load_trials",
    "best_trials",
    "best_of_study",
    "status_table",
    "summary_table",
    "short_name",
]

log = logging.getLogger(__name__)

STATE_ORDER = ["running", "pending", "done", "stopped", "failed"]


def short_name(key: str) -> str:
    """``model.mask_ratio`` -> ``mask_ratio`` for table headers."""
    return key.rsplit(".", 1)[-1]


def load_trials(experiment: str | Path) -> pd.DataFrame:
    """One row per Tune trial: state, params, last validation metrics, epochs, wall time.

    States: ``done`` (all rounds), ``stopped`` (stopped early by the scheduler; PRUNED in the
    study), ``failed``, ``running`` and ``pending`` (or interrupted, for a killed driver).
    """
    from ray.tune import ExperimentAnalysis

    spec = load_spec(experiment)
    exp = spec.experiment_location
    try:
        analysis = ExperimentAnalysis(exp)
        trials = analysis.trials
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        log.debug("no Tune state in %s: %s", exp, exc)
        trials = []
    rows = []
    for trial in trials:
        rows.append(_row(spec, trial))
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["trial", "state", "baseline", OBJECTIVE])
    return df.sort_values(["category", "study_trial"], na_position="first").reset_index(drop=True)


def _row(spec: SweepSpec, trial: Any) -> dict[str, Any]:
    result = dict(trial.last_result or {})
    config = dict(trial.config or {})
    rounds = int(result.get("training_iteration", 0) or 0)
    total = int(result.get(ROUNDS_KEY, spec.base.num_rounds) or spec.base.num_rounds)
    status = trial.status
    if status == "TERMINATED":
        state = "done" if rounds >= total else "stopped"
    elif status == "ERROR":
        state = "failed"
    elif status == "RUNNING":
        state = "running"
    else:
        state = "pending"
    checkpoint = trial.checkpoint
    row: dict[str, Any] = {
        "trial": trial.trial_id,
        "state": state,
        "baseline": bool(config.get("baseline", False)),
        "category": config.get("category"),
        "study_trial": config.get("study_trial"),
    }
    row.update({short_name(k): _cell(v) for k, v in config.items() if k not in META_KEYS})
    row.update(
        {
            OBJECTIVE: result.get(OBJECTIVE),
            "rounds": rounds,
            "epochs": result.get("epoch"),
            "wall_s": result.get("time_total_s"),
            "node_ip": result.get("node_ip"),
        }
    )
    row["error"] = _error_line(trial) if state == "failed" else None
    row.update({m: result.get(m) for m in METRICS if m in result})
    row.update({k: v for k, v in result.items() if "/" in k and k.rsplit("/", 1)[-1] in METRICS})
    row["checkpoint"] = checkpoint  # a Tune Checkpoint (local or remote) or None
    return row


def _error_line(trial: Any) -> str | None:
    """The last line of a failed trial's error (the exception), from its ``error.txt``."""
    try:
        error = trial.get_error()
    except OSError as exc:  # storage unreachable: the table still shows the state
        log.debug("cannot read the error of trial %s: %s", trial.trial_id, exc)
        return None
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    return lines[-1] if lines else None


def _cell(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return "-".join(str(v) for v in value)
    return value


def best_trials(df: pd.DataFrame) -> dict[str | None, pd.Series]:
    """The best trial of each study (key: category, or None for a single study)."""
    out: dict[str | None, pd.Series] = {}
    if df.empty or OBJECTIVE not in df:
        return out
    groups = df.groupby("category", dropna=False) if df["category"].notna().any() else [(None, df)]
    for category, group in groups:
        best = best_of_study(group)
        if best is None:
            continue
        key = (
            None
            if category is None or (isinstance(category, float) and math.isnan(category))
            else category
        )
        out[key] = best
    return out


def best_of_study(trials: pd.DataFrame) -> pd.Series | None:
    """The best of one study's trials (``load_trials`` rows), or None when none has a value.

    Trials that ran every round win over the others, whatever their values: a value from an
    early rung (a trial ASHA stopped, one still running, one that failed) is not comparable
    with a fully trained one. While no trial has run every round, the best of those that got
    furthest is the best so far.
    """
    scored = trials[trials[OBJECTIVE].notna()]
    if scored.empty:
        return None
    done = scored[scored["state"] == "done"]
    pool = done if not done.empty else scored[scored["rounds"] == scored["rounds"].max()]
    return pool.loc[pool[OBJECTIVE].idxmax()]


def status_table(experiment: str | Path) -> str:
    """``launch.py status``: every trial's state, params and metrics, and the best so far."""
    spec = load_spec(experiment)
    exp = spec.experiment_location
    df = load_trials(exp)
    if df.empty:
        return f"{exp}: no trials have started yet"
    params = [short_name(k) for k in spec.space.keys]
    cols = (
        ["trial", "state", "baseline"]
        + (["category"] if df["category"].notna().any() else [])
        + [p for p in params if p in df]
    )
    cols += [c for c in (OBJECTIVE, *METRICS, "rounds", "epochs", "wall_s") if c in df]
    counts = df["state"].value_counts()
    lines = [
        f"experiment {spec.sweep.name} ({exp})",
        "trials: "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATE_ORDER)
        + f" of {_planned(spec)}",
        _format(df[cols]),
    ]
    for _, row in df[df["state"] == "failed"].iterrows():
        lines.append(f"failed: trial {row['trial']}: {row['error'] or 'no error recorded'}")
    if counts.get("failed", 0):
        lines.append(f"run the failed trials again with: launch.py resume {exp} --retry-failed")
    for category, best in best_trials(df).items():
        where = f" [{category}]" if category else ""
        lines.append(
            f"best{where}: trial {best['trial']} {OBJECTIVE} {best[OBJECTIVE]:.4f} "
            + " ".join(f"{p}={_fmt(best[p])}" for p in params if p in best)
        )
    return "\n".join(lines)


def summary_table(experiment: str | Path) -> str:
    """Best vs baseline on validation (per study), printed at the end of a sweep."""
    spec = load_spec(experiment)
    exp = spec.experiment_location
    df = load_trials(exp)
    counts = df["state"].value_counts() if not df.empty else {}
    head = f"sweep {spec.sweep.name}: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATE_ORDER)
    if df.empty:
        return head + "\nno trial reported a result"
    params = [short_name(k) for k in spec.space.keys]
    rows = []
    for category, best in best_trials(df).items():
        pool = df if category is None else df[df["category"] == category]
        base = pool[pool["baseline"]]
        for label, row in (("baseline", base.iloc[0] if not base.empty else None), ("best", best)):
            if row is None:
                continue
            entry = {"study": category or spec.sweep.name, "row": label, "trial": row["trial"]}
            entry.update({p: row.get(p) for p in params})
            entry.update({m: row.get(m) for m in (OBJECTIVE, *METRICS) if m in row})
            entry["epochs"] = row.get("epochs")
            rows.append(entry)
    if not rows:
        return head + "\nno trial reported a result (see each trial's error.txt)"
    table = pd.DataFrame(rows)
    gains = []
    for study, group in table.groupby("study"):
        vals = dict(zip(group["row"], group[OBJECTIVE], strict=False))
        if "baseline" in vals and "best" in vals:
            gains.append(
                f"{study}: best {vals['best']:.4f} vs baseline {vals['baseline']:.4f} "
                f"({vals['best'] - vals['baseline']:+.4f} validation {OBJECTIVE})"
            )
    return "\n".join([head, _format(table), *gains])


def _planned(spec: SweepSpec) -> int:
    n = spec.sweep.search.num_trials
    return n * len(spec.categories) if spec.sweep.objective.per_category else n


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _format(df: pd.DataFrame) -> str:
    return df.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-")
