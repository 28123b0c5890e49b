"""Metric dictionaries and the results tables (the seed README's markdown format)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mmr.fileio import atomic_write

__all__ = [
    "METRICS",
    "SPEED_METRICS",
    "LOWER_IS_BETTER",
    "METRIC_TITLES",
    "flatten_metrics",
    "unflatten_metrics",
    "results_markdown",
    "results_tables",
    "thresholds_markdown",
    "thresholds_table",
    "write_json",
]

# Reported metrics, in table order (pro_official only when eval.official_pro is on).
METRICS = ("image_auroc", "pixel_auroc", "pixel_f1", "aupro", "pro_official")
# Reported once per trial, with its final round (mmr/speed.py): ms per image at batch 1 and
# at eval.batch_size, and the trained (student) parameters in millions.
SPEED_METRICS = ("latency_ms", "latency_batch_ms", "params_m")
LOWER_IS_BETTER = frozenset(SPEED_METRICS)  # every other metric: higher is better
METRIC_TITLES = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "pixel_f1": "Pixel F1",
    "aupro": "AUPRO",
    "pro_official": "PRO (official)",
}


def flatten_metrics(per_unit: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{unit: {metric: v}}`` -> ``{metric: mean over units, "unit/metric": v}``.

    A metric's mean is taken over the units that have it (AeBAD-V has no pixel metrics).
    """
    flat: dict[str, float] = {}
    for metric in METRICS:
        values = [m[metric] for m in per_unit.values() if metric in m]
        if values:
            flat[metric] = float(sum(values) / len(values))
    for unit, metrics in per_unit.items():
        for metric, value in metrics.items():
            flat[f"{unit}/{metric}"] = float(value)
    return flat


def unflatten_metrics(flat: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Inverse of the per-unit part of :func:`flatten_metrics` (other keys are ignored)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        unit, sep, metric = key.rpartition("/")
        if sep and metric in METRICS and value is not None and not _isnan(value):
            out.setdefault(unit, {})[metric] = float(value)
    return out


def results_markdown(rows: Mapping[str, Mapping[str, Mapping[str, float]]], *, title: str) -> str:
    """One markdown table per metric: rows = configs, columns = Avg + units, values in %.

    Args:
        rows: ``{row label: {unit: {metric: value in [0, 1]}}}``.
        title: heading placed above the tables.
    """
    parts = [f"# {title}", ""]
    for df in results_tables(rows):
        parts += [_markdown(df), ""]
    return "\n".join(parts)


def results_tables(rows: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[pd.DataFrame]:
    """The tables of :func:`results_markdown` as DataFrames (index name = metric title).

    Args:
        rows: ``{row label: {unit: {metric: value in [0, 1]}}}``.
    """
    units: list[str] = []
    for per_unit in rows.values():
        units += [u for u in per_unit if u not in units]
    tables = []
    for metric in METRICS:
        table = {
            label: {u: per_unit.get(u, {}).get(metric) for u in units}
            for label, per_unit in rows.items()
        }
        df = pd.DataFrame.from_dict(table, orient="index", columns=units, dtype=float)
        if df.isna().all().all():
            continue  # e.g. pixel metrics of a mask-less dataset
        df.insert(0, "Avg", df.mean(axis=1, skipna=True))
        df = (df * 100).round(1)
        df.index.name = METRIC_TITLES[metric]
        tables.append(df)
    return tables


def thresholds_table(thresholds: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Decision thresholds per category (raw score units), as ``launch.py predict`` applies them.

    Args:
        thresholds: ``{category: mmr.thresholds.choose_thresholds(...)}``.
    """
    rows = {
        cat: {
            "image threshold": t["image"],
            "image rule": t["image_method"],
            "val F1 (image)": t.get("image_f1"),
            "pixel threshold": t["pixel"],
            "pixel rule": t["pixel_method"],
            "scale": t["scale"],
            "val images (anomalous)": f"{t['val_images']} ({t['val_anomalous']})",
        }
        for cat, t in thresholds.items()
    }
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "category"
    return df


def thresholds_markdown(thresholds: Mapping[str, Mapping[str, Any]]) -> str:
    """The ``## Thresholds`` section of results.md (empty string without thresholds)."""
    if not thresholds:
        return ""
    df = thresholds_table(thresholds)
    header = ["category", *df.columns]
    lines = [
        "## Thresholds (chosen on the validation half; raw score units)",
        "",
        "f1_max: the F1-optimal image (pixel) threshold; normal_p99: the 99th percentile of the "
        "normal validation scores, used where validation holds no anomalous image; image: the "
        "image threshold. predict's normalised_score = 1 / (1 + exp(-(score - threshold) / "
        "scale)), 0.5 at the threshold.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for cat, row in df.iterrows():
        cells = [
            "-" if v is None or _isnan(v) else f"{v:.4g}" if isinstance(v, float) else str(v)
            for v in row.tolist()
        ]
        lines.append("| " + " | ".join([str(cat), *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_json(data: Any, path: str | Path) -> None:
    """Writes JSON atomically (temporary file renamed into place)."""
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=True))


def _markdown(df: pd.DataFrame) -> str:
    # pandas' to_markdown needs the optional tabulate package; this is all we need of it.
    header = [df.index.name or ""] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in df.iterrows():
        cells = ["-" if _isnan(v) else f"{v:.1f}" for v in row.tolist()]
        lines.append("| " + " | ".join([str(label)] + cells) + " |")
    return "\n".join(lines)


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
