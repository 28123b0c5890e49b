"""``report.html``: one self-contained page of an export (tables, plots, overlays inline).

Built from what the export already wrote (``summary.json``, ``trials.csv``, ``pareto.csv``
when the sweep has several objectives, ``plots/*.png``) and the test-half results rows:
images are embedded as ``data:`` URIs, so the page opens anywhere (mail, CI artefacts, a
bucket) without its folder.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from mmr.report import results_tables, thresholds_table

__all__ = ["REPORT_FILE", "write_report"]

REPORT_FILE = "report.html"
PARETO_FILE = "pareto.csv"  # written by the export of a sweep with several objectives

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; }
.scroll { overflow-x: auto; } figure { margin: 1rem 0; }
img { max-width: 100%; border: 1px solid #eee; } figcaption { color: #666; }
"""

Rows = Mapping[str, Mapping[str, Mapping[str, float]]]


def _table(df: pd.DataFrame, *, table_id: str, index: bool = False) -> str:
    text = df.to_html(
        index=index, na_rep="-", border=0, table_id=table_id, float_format="{:.4g}".format
    )
    return f'<div class="scroll">{text}</div>'


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(caption)
    return (
        f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
        f"<figcaption>{alt}</figcaption></figure>"
    )


def _comparison(summary: dict, trials: pd.DataFrame, params: list[str]) -> pd.DataFrame:
    """Baseline and best trial of each study: id, validation objective, params, test means."""
    out = []
    for study, s in summary.get("studies", {}).items():
        for label, trial, objective, test in (
            ("baseline", s.get("baseline_trial"), s.get("baseline_val_objective"),
             s.get("baseline_test")),
            ("best", s.get("best_trial"), s.get("best_val_objective"), s.get("best_test")),
        ):  # fmt: skip
            if trial is None:
                continue
            row = {"study": study, "row": label, "trial": trial, "val objective": objective}
            match = trials[trials["trial"].astype(str) == str(trial)]
            if not match.empty:
                row.update({p: match.iloc[0][p] for p in params if p in match.columns})
            row.update({f"test {k}": v for k, v in (test or {}).items() if "/" not in k})
            out.append(row)
    return pd.DataFrame(out)


def write_report(out: Path, *, title: str, rows: Rows, params: list[str]) -> Path:
    """Writes ``out/report.html`` from the export in ``out``; returns its path.

    Args:
        out: the export directory (``summary.json``, ``trials.csv`` and ``plots/`` written).
        title: the page's heading (the sweep's name).
        rows: the held-out test results, ``{row label: {unit: {metric: value}}}``, as in
            ``results.md``.
        params: the searched params' column names in ``trials.csv``.
    """
    summary = json.loads((out / "summary.json").read_text())
    trials = pd.read_csv(out / "trials.csv")
    plots = out / "plots"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}: sweep report</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}: sweep report</h1>",
        "<h2 id='results'>Held-out test half (never seen by the search), %</h2>",
    ]
    for i, df in enumerate(results_tables(rows)):
        parts.append(f"<h3>{html.escape(str(df.index.name))}</h3>")
        parts.append(_table(df.rename_axis(None), table_id=f"results-{i}", index=True))
    thresholds = {
        cat: t
        for study in summary.get("studies", {}).values()
        for cat, t in (study.get("thresholds") or {}).items()
    }
    if thresholds:
        parts.append("<h2 id='thresholds'>Decision thresholds (validation half, raw scores)</h2>")
        parts.append(_table(thresholds_table(thresholds), table_id="thresholds", index=True))
    pareto = out / PARETO_FILE
    if pareto.is_file():
        front = pd.read_csv(pareto)
        parts.append("<h2 id='pareto'>Pareto front (several objectives)</h2>")
        parts.append(_table(front, table_id="pareto"))
        if (plots / "pareto_front.png").is_file():
            parts.append(_image(plots / "pareto_front.png", "Pareto front"))
    from search.confirm import NO_FLOOR, describe

    confirm = summary.get("confirm")
    lines = describe(confirm) if confirm is not None else [NO_FLOOR]
    parts.append("<h2 id='confirm'>Confirmation runs and seed noise</h2><ul>")
    parts += [f"<li>{html.escape(line)}</li>" for line in lines]
    parts.append("</ul>")
    parts.append("<h2 id='comparison'>Baseline vs best</h2>")
    parts.append(_table(_comparison(summary, trials, params), table_id="comparison"))
    parts.append(f"<h2 id='trials'>Trials ({len(trials)})</h2>")
    parts.append(_table(trials, table_id="trials"))
    search_plots = [
        p for p in sorted(plots.glob("*.png")) if not p.name.startswith(("overlays_", "pareto"))
    ]
    if search_plots:
        parts.append("<h2 id='search'>Search</h2>")
        parts += [_image(p, p.stem.replace("_", " ")) for p in search_plots]
    overlays = sorted(plots.glob("overlays_*.png"))
    if overlays:
        parts.append("<h2 id='overlays'>Anomaly maps of the best model (test half)</h2>")
        parts += [_image(p, p.stem.removeprefix("overlays_")) for p in overlays]
    parts.append("</body></html>")
    path = out / REPORT_FILE
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
