"""Reading an experiment: one table row per trial, the best trial, status and summary tables."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmr.report import METRICS, SPEED_METRICS
from search.config import SweepSpec, load_spec
from search.contract import META_KEYS, OBJECTIVE, ROUNDS_KEY, planned_trials
from search.storage import count_repeated

__all__ = [
    "load_trials",
    "best_trials",
    "best_of_study",
    "pareto_front",
    "status_table",
    "summary_table",
    "short_name",
    "trial_state",
    "unjudged_guards",
    "unjudged_note",
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
    df = df.sort_values(["category", "study_trial"], na_position="first").reset_index(drop=True)
    return _judge(spec, df)


def _studies(df: pd.DataFrame) -> list[pd.Index]:
    """Row labels of each study: one per category in per-category sweeps, else all rows."""
    if "category" not in df or not df["category"].notna().any():
        return [df.index]
    return [group.index for _, group in df.groupby("category", dropna=False)]


def _judge(spec: SweepSpec, df: pd.DataFrame) -> pd.DataFrame:
    """Adds guard and Pareto columns, each study judged against its own baseline trial.

    ``feasible`` (bool) and ``guard`` (the broken guards, e.g. ``aupro -0.021``) when the sweep
    has guards; ``first_objective`` (the first objective, sign-adjusted to be maximised) and
    ``on_front`` (bool) when it has several objectives.
    """
    o = spec.sweep.objective
    if o.guard:
        df["feasible"], df["guard"], df["guard_judged"] = True, "", True
        for idx in _studies(df):
            study = df.loc[idx]
            # Only a baseline that ran every round is a reference: a failed one has no
            # metrics (every comparison would be NaN, every trial "feasible"), a running one
            # not its final ones. Without it no trial counts as feasible (see unjudged_guards).
            base = study[study["baseline"].astype(bool) & (study["state"] == "done")]
            if base.empty:
                df.loc[idx, "feasible"], df.loc[idx, "guard_judged"] = False, False
                continue
            base_metrics = _metrics_of(base.iloc[0])
            for i in idx:
                excess = spec.guard_violations(_metrics_of(df.loc[i]), base_metrics)
                broken = {m: v for m, v in excess.items() if v > 0}
                df.loc[i, "feasible"] = not broken
                # The change against the baseline of each broken guard's metric.
                df.loc[i, "guard"] = " ".join(
                    f"{m} {df.loc[i, m] - base_metrics[m]:+.4f}" for m in broken
                )
    if o.multi:
        first, mode = o.objectives[0]
        df["first_objective"] = -df[first] if mode == "min" else df[first]
        df["on_front"] = False
        for idx in _studies(df):
            df.loc[pareto_front(df.loc[idx], o.objectives), "on_front"] = True
    return df


def unjudged_guards(df: pd.DataFrame) -> dict[str | None, str]:
    """``{study: why}`` for each study whose guards cannot be judged (``load_trials`` rows):
    its baseline trial has not run every round, so none of its trials is a guarded best."""
    out: dict[str | None, str] = {}
    if "guard_judged" not in df:
        return out
    for idx in _studies(df):
        study = df.loc[idx]
        if study["guard_judged"].astype(bool).all():
            continue
        category = study["category"].iloc[0] if "category" in study else None
        key = category if isinstance(category, str) else None
        base = study[study["baseline"].astype(bool)]
        if base.empty:
            out[key] = "it has no baseline trial"
        else:
            trial, state = base.iloc[0]["trial"], base.iloc[0]["state"]
            out[key] = f"its baseline trial {trial} has not finished (state {state})"
    return out


def unjudged_note(df: pd.DataFrame, exp: str) -> list[str]:
    """One line per study whose guards are not judged, saying what to do."""
    return [
        f"guards{f' [{c}]' if c else ''} not judged: {why}, so no trial counts as within the "
        f"guards and none is the best; once the sweep has ended, run the baseline again with "
        f"`launch.py resume {exp} --retry-failed` (or export a trial of your choice, "
        f"unguarded, with `launch.py export {exp} --trial ID`)"
        for c, why in unjudged_guards(df).items()
    ]


def _metrics_of(row: pd.Series) -> dict[str, Any]:
    return {m: row[m] for m in (*METRICS, *SPEED_METRICS) if m in row and not _missing(row[m])}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def pareto_front(df: pd.DataFrame, objectives: tuple[tuple[str, str], ...]) -> list[Any]:
    """Row labels of the non-dominated trials among the fully trained, feasible ones.

    Stopped trials are left out: their values come from an earlier round than the others'.
    """
    names = [m for m, _ in objectives]
    pool = df[df["state"] == "done"]
    if "feasible" in pool:
        pool = pool[pool["feasible"].astype(bool)]
    if any(m not in pool for m in names):
        return []
    pool = pool.dropna(subset=names)
    # Every objective turned into "higher is better".
    values = np.stack(
        [
            (-1.0 if mode == "min" else 1.0) * pool[m].astype(float).to_numpy()
            for m, mode in objectives
        ],
        axis=1,
    )
    front = []
    for i, label in enumerate(pool.index):
        others = np.delete(values, i, axis=0)
        dominated = ((others >= values[i]).all(axis=1) & (others > values[i]).any(axis=1)).any()
        if not dominated:
            front.append(label)
    return front


def _row(spec: SweepSpec, trial: Any) -> dict[str, Any]:
    result = dict(trial.last_result or {})
    config = dict(trial.config or {})
    rounds = int(result.get("training_iteration", 0) or 0)
    state = trial_state(trial.status, result, spec.base.num_rounds)
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
            # The trained model's: a round trained again after a restart counts once here
            # (Tune's time_total_s continues from the checkpoint's), and in rounds_repeated.
            "epochs": result.get("epoch"),
            "wall_s": result.get("time_total_s"),
            "rounds_repeated": _repeated(trial),
            "node_ip": result.get("node_ip"),
        }
    )
    row["error"] = _error_line(trial) if state == "failed" else None
    row.update({m: result.get(m) for m in (*METRICS, *SPEED_METRICS) if m in result})
    row.update({k: v for k, v in result.items() if "/" in k and k.rsplit("/", 1)[-1] in METRICS})
    row["checkpoint"] = checkpoint  # a Tune Checkpoint (local or remote) or None
    return row


def _repeated(trial: Any) -> int | None:
    """Rounds of the trial that restarts trained again; None when its storage is unreachable."""
    try:
        return count_repeated(trial)
    except OSError as exc:
        log.debug("cannot read the repeated rounds of trial %s: %s", trial.trial_id, exc)
        return None


def _error_line(trial: Any) -> str | None:
    """The last line of a failed trial's error (the exception), from its ``error.txt``."""
    try:
        error = trial.get_error()
    except OSError as exc:  # storage unreachable: the table still shows the state
        log.debug("cannot read the error of trial %s: %s", trial.trial_id, exc)
        return None
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    return lines[-1] if lines else None


def trial_state(status: str, result: dict[str, Any], num_rounds: int) -> str:
    """A Tune trial status and its last result as one of :data:`STATE_ORDER`.

    A terminated trial is ``done`` when it ran every round, else ``stopped`` (early, by the
    scheduler); ``num_rounds`` counts when the result does not say how many rounds it had.
    """
    if status == "TERMINATED":
        rounds = int(result.get("training_iteration", 0) or 0)
        total = int(result.get(ROUNDS_KEY, num_rounds) or num_rounds)
        return "done" if rounds >= total else "stopped"
    return {"ERROR": "failed", "RUNNING": "running"}.get(status, "pending")


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
    if "feasible" in scored:  # a trial that breaks a guard is never the best
        scored = scored[scored["feasible"].astype(bool)]
    if scored.empty:
        return None
    if "on_front" in scored and scored["on_front"].any():
        # Several objectives: the front trial (all fully trained) with the best first one.
        front = scored[scored["on_front"].astype(bool)]
        return front.loc[front["first_objective"].idxmax()]
    done = scored[scored["state"] == "done"]
    pool = done if not done.empty else scored[scored["rounds"] == scored["rounds"].max()]
    return pool.loc[pool[OBJECTIVE].idxmax()]


def _confirm_lines(spec: SweepSpec) -> list[str]:
    """The confirmation's verdict, or how far its trials got (``search.confirm``)."""
    from search.confirm import NO_FLOOR, confirm_progress, describe, read_confirm

    if spec.sweep.search.confirm.top_k == 0:
        return [NO_FLOOR]

    summary = read_confirm(spec.experiment_dir)
    if summary is not None:
        return describe(summary)
    return [confirm_progress(spec)]


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
    cols += [
        c for c in (OBJECTIVE, *METRICS, *SPEED_METRICS, "rounds", "epochs", "wall_s") if c in df
    ]
    if "rounds_repeated" in df and df["rounds_repeated"].fillna(0).gt(0).any():
        cols.append("rounds_repeated")  # restarts trained these rounds again
    shown = df.copy()
    if "on_front" in df:
        shown["front"] = np.where(df["on_front"].astype(bool), "*", "")
        cols.insert(3, "front")
    if "guard" in df:
        # Why a trial is infeasible: the guarded metrics it lost, as changes to the baseline.
        shown["guard"] = np.where(df["feasible"].astype(bool), "ok", "broken: " + df["guard"])
        shown.loc[~df["guard_judged"].astype(bool), "guard"] = "unjudged"
        cols.insert(3, "guard")
    counts = df["state"].value_counts()
    lines = [
        f"experiment {spec.sweep.name} ({exp})",
        "trials: "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATE_ORDER)
        + f" of {planned_trials(spec)}",
        _format(shown[cols]),
    ]
    for _, row in df[df["state"] == "failed"].iterrows():
        lines.append(f"failed: trial {row['trial']}: {row['error'] or 'no error recorded'}")
    if counts.get("failed", 0):
        lines.append(f"run the failed trials again with: launch.py resume {exp} --retry-failed")
    lines += unjudged_note(df, exp)
    lines += _confirm_lines(spec)
    if "on_front" in df:
        names = ", ".join(f"{m} ({mode})" for m, mode in spec.sweep.objective.objectives)
        for idx in _studies(df):
            study = df.loc[idx]
            front = study[study["on_front"].astype(bool)]["trial"].tolist()
            category = study["category"].iloc[0] if study["category"].notna().any() else None
            where = f" [{category}]" if category else ""
            lines.append(f"pareto front{where} over {names}: {', '.join(front) or 'none yet'}")
    for category, best in best_trials(df).items():
        where = f" [{category}]" if category else ""
        label = "front pick" if "on_front" in df else "best"
        lines.append(
            f"{label}{where}: trial {best['trial']} {OBJECTIVE} {best[OBJECTIVE]:.4f} "
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
    multi = "on_front" in df
    rows, notes = [], []
    for category, best in best_trials(df).items():
        pool = df if category is None else df[df["category"] == category]
        base = pool[pool["baseline"]]
        picks = [("baseline", base.iloc[0] if not base.empty else None), ("best", best)]
        if multi:
            # Every front trial (the export takes the one with the best first objective).
            front = pool[pool["on_front"].astype(bool)]
            picks = picks[:1] + [
                ("front*" if r["trial"] == best["trial"] else "front", r)
                for _, r in front.iterrows()
            ]
            notes.append(
                f"{category or spec.sweep.name}: {len(front)} trial(s) on the Pareto front "
                f"(*: exported); export another with `launch.py export {exp} --trial ID`"
            )
        for label, row in picks:
            if row is None:
                continue
            entry = {"study": category or spec.sweep.name, "row": label, "trial": row["trial"]}
            entry.update({p: row.get(p) for p in params})
            metrics = (OBJECTIVE, *METRICS, *(SPEED_METRICS if multi else ()))
            entry.update({m: row.get(m) for m in metrics if m in row})
            entry["epochs"] = row.get("epochs")
            rows.append(entry)
    if not rows:
        # error.txt exists for failed trials only (not for those a Ctrl-C stopped).
        failed = counts.get("failed", 0)
        return "\n".join(
            [
                head
                + "\nno trial reported a result"
                + (" (`launch.py status` shows why trials failed)" if failed else " yet")
            ]
            + unjudged_note(df, exp)
        )
    table = pd.DataFrame(rows)
    gains = []
    for study, group in table.groupby("study"):
        vals = dict(zip(group["row"], group[OBJECTIVE], strict=False))
        if "baseline" in vals and "best" in vals:
            gains.append(
                f"{study}: best {vals['best']:.4f} vs baseline {vals['baseline']:.4f} "
                f"({vals['best'] - vals['baseline']:+.4f} validation {OBJECTIVE})"
            )
    unjudged = unjudged_note(df, exp)
    return "\n".join([head, _format(table), *(notes if multi else gains), *unjudged])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _format(df: pd.DataFrame) -> str:
    return df.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-")
