"""Export of a sweep with several objectives: ``pareto.csv`` and ``plots/pareto_front*.png``.

The front itself is computed by ``search.results`` (column ``on_front``), per study, over the
fully trained trials that break no guard; this module only writes it out.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from mmr.report import METRICS, SPEED_METRICS
from search.config import SweepSpec
from search.results import short_name

__all__ = ["pareto_table", "write_pareto"]

log = logging.getLogger(__name__)

FINISHED = ("done", "stopped")


def pareto_table(spec: SweepSpec, df: pd.DataFrame) -> pd.DataFrame:
    """Every finished trial: ids, ``baseline``, ``on_front``, guards, objectives, params."""
    objectives = [m for m, _ in spec.sweep.objective.objectives]
    finished = df[df["state"].isin(FINISHED)]
    ids = ["trial", "category", "study_trial", "state", "baseline", "on_front"]
    ids += [c for c in ("feasible", "guard") if c in df]
    params = [short_name(k) for k in spec.space.keys if short_name(k) in df]
    others = [m for m in (*METRICS, *SPEED_METRICS) if m in df and m not in objectives]
    cols = [c for c in ids if c in df] + objectives + params + others
    return finished[[c for c in cols if c in finished]].reset_index(drop=True)


def write_pareto(spec: SweepSpec, df: pd.DataFrame, out: Path) -> pd.DataFrame:
    """Writes ``out/pareto.csv`` and one front plot per study; returns the table."""
    table = pareto_table(spec, df)
    table.to_csv(out / "pareto.csv", index=False)
    studies = (
        [(c, table[table["category"] == c]) for c in spec.categories]
        if spec.sweep.objective.per_category
        else [(None, table)]
    )
    for category, study in studies:
        name = "pareto_front" + (f"_{category}" if category else "")
        title = f"{spec.sweep.name}" + (f" [{category}]" if category else "")
        _plot_front(spec, study, out / "plots" / f"{name}.png", title=title)
    return table


def _plot_front(spec: SweepSpec, table: pd.DataFrame, path: Path, *, title: str) -> None:
    """The first objective against each other one: trials, front, baseline, broken guards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = spec.sweep.objective.objectives
    done = table[table["state"] == "done"]
    x_name, x_mode = objectives[0]
    others = objectives[1:]
    fig, axes = plt.subplots(1, len(others), figsize=(5.5 * len(others), 4.5), squeeze=False)
    feasible = done["feasible"].astype(bool) if "feasible" in done else pd.Series(True, done.index)
    front = done[done["on_front"].astype(bool)]
    for ax, (y_name, y_mode) in zip(axes[0], others, strict=True):
        ok = done[feasible & ~done["on_front"].astype(bool)]
        ax.scatter(ok[x_name], ok[y_name], c="0.6", s=25, label="trial")
        broken = done[~feasible]
        if not broken.empty:
            ax.scatter(broken[x_name], broken[y_name], c="tab:red", marker="x", s=40,
                       label="breaks a guard")  # fmt: skip
        # The front of these two objectives is a staircase only when there are just two.
        line = front.sort_values(x_name)
        ax.plot(line[x_name], line[y_name], "o-" if len(objectives) == 2 else "o",
                c="tab:blue", ms=7, label="Pareto front")  # fmt: skip
        base = done[done["baseline"].astype(bool)]
        if not base.empty:
            ax.scatter(base[x_name], base[y_name], marker="*", s=220, c="gold",
                       edgecolors="k", zorder=3, label="baseline")  # fmt: skip
        for _, row in front.iterrows():
            ax.annotate(f"#{int(row['study_trial'])}", (row[x_name], row[y_name]),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)  # fmt: skip
        ax.set_xlabel(f"{x_name} ({x_mode}, validation)")
        ax.set_ylabel(f"{y_name} ({y_mode})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if done.empty or not np.isfinite(done[x_name].astype(float)).any():
        log.warning("pareto plot %s: no fully trained trial yet", path.name)
    fig.suptitle(f"{title}: Pareto front ({len(front)} of {len(done)} fully trained trials)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
