"""How much of a curve table's spread is configuration and how much is training seed.

For each category of a table written by ``benchmarks/curves.py`` (complete, non-diverged runs
of configurations recorded with at least two seeds), on the final *test* image AUROC:

- ``icc``: the intra-class correlation ICC(1) of one-way random effects, configurations as
  classes and seeds as repeats: ``(MSB - MSW) / (MSB + (k - 1) MSW)``. 1: seeds of a
  configuration agree exactly and configurations differ; 0 or below: a configuration's
  seeds differ as much as configurations do, so a single run cannot tell configurations
  apart.
- ``sd_config`` / ``sd_seed``: the spread of configuration means and the seed spread within a
  configuration (pooled standard deviation), and ``gap_seed``: the mean absolute difference
  between two seeds of one configuration.
- ``seed_rank``: the mean over seed pairs of the Spearman correlation with which the two seeds
  rank the configurations.
- ``val_test_run``: Spearman over runs of the final validation value with the test value (what
  one run's validation says about its test); ``val_test_mean``: the same over configurations,
  each averaged over its seeds.

Command (both tables side by side, markdown)::

    python -m benchmarks.testbed benchmarks/data/curves.csv benchmarks/data/curves_fixed.csv

``--json OUT`` also writes the figures and each table's number of runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["icc1", "noise_stats", "render"]

FIELDS = (
    "configs",
    "seeds",
    "icc",
    "sd_config",
    "sd_seed",
    "gap_seed",
    "seed_rank",
    "val_test_run",
    "val_test_mean",
)


def icc1(values: np.ndarray) -> float:
    """ICC(1) of a configurations x seeds matrix (one-way random effects, no missing cells)."""
    n, k = values.shape
    grand = values.mean()
    msb = k * ((values.mean(axis=1) - grand) ** 2).sum() / (n - 1)
    msw = ((values - values.mean(axis=1, keepdims=True)) ** 2).sum() / (n * (k - 1))
    return float((msb - msw) / (msb + (k - 1) * msw))


def _final_rows(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    last = frame.sort_values("epoch").groupby(["config", "category", "seed"]).tail(1)
    if "status" in last:
        last = last[last["status"] != "diverged"]
    return last.dropna(subset=[f"test_{metric}", f"val_{metric}"])


def noise_stats(frame: pd.DataFrame, metric: str = "image_auroc") -> dict[str, dict[str, Any]]:
    """Per category: the figures in the module doc (configurations with every seed only)."""
    out: dict[str, dict[str, Any]] = {}
    final = _final_rows(frame, metric)
    for category, rows in final.groupby("category"):
        test = rows.pivot_table(index="config", columns="seed", values=f"test_{metric}")
        val = rows.pivot_table(index="config", columns="seed", values=f"val_{metric}")
        test = test.dropna()
        val = val.loc[test.index, test.columns]
        n, k = test.shape
        if n < 3 or k < 2:
            continue
        t = test.to_numpy()
        pairs = list(itertools.combinations(range(k), 2))
        ranks = [pd.Series(t[:, a]).corr(pd.Series(t[:, b]), method="spearman") for a, b in pairs]
        gaps = [np.abs(t[:, a] - t[:, b]).mean() for a, b in pairs]
        runs_val, runs_test = val.to_numpy().ravel(), t.ravel()
        out[str(category)] = {
            "configs": n,
            "seeds": k,
            "icc": round(icc1(t), 3),
            "sd_config": round(float(t.mean(axis=1).std(ddof=1)), 4),
            "sd_seed": round(float(np.sqrt(t.var(axis=1, ddof=1).mean())), 4),
            "gap_seed": round(float(np.mean(gaps)), 4),
            "seed_rank": round(float(np.mean(ranks)), 3),
            "val_test_run": round(
                float(pd.Series(runs_val).corr(pd.Series(runs_test), method="spearman")), 3
            ),
            "val_test_mean": round(
                float(val.mean(axis=1).corr(test.mean(axis=1), method="spearman")), 3
            ),
        }
    return out


def whole_runs(frame: pd.DataFrame) -> int:
    """Runs of the configurations recorded with every seed on every category: what
    ``python -m benchmarks.replay --whole-configs`` replays of a table still being recorded."""
    runs = frame.groupby(["config", "category", "seed"]).size().reset_index()
    per_config = runs.groupby("config").size()
    whole = runs["category"].nunique() * runs["seed"].nunique()
    return int(per_config[per_config == whole].sum())


def render(tables: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A markdown table: one row per (table, category)."""
    lines = [
        "| table | category | " + " | ".join(FIELDS) + " |",
        "|---|---|" + "---|" * len(FIELDS),
    ]
    for name, stats in tables.items():
        for category, row in stats.items():
            cells = " | ".join(str(row[f]) for f in FIELDS)
            lines.append(f"| {name} | {category} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    from benchmarks.curves import load_curves

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("tables", nargs="+", type=Path, help="curve tables (CSV)")
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the figures (and each table's runs)"
    )
    args = parser.parse_args(argv)
    frames = {p.name: load_curves(p) for p in args.tables}
    stats = {name: noise_stats(frame) for name, frame in frames.items()}
    if args.json is not None:
        runs = {n: whole_runs(f) for n, f in frames.items()}
        args.json.write_text(json.dumps({"stats": stats, "runs": runs}, indent=1) + "\n")
    print(render(stats), end="")


if __name__ == "__main__":
    main()
