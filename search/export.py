"""Export of a sweep: best config, its checkpoint, test-half tables, trials.csv, plots.

Layout of ``--out DIR`` (single study)::

    best.yaml  model.pt  results.md  trials.csv  summary.json  report.html
    plots/optimization_history.png  param_importances.png  parallel_coordinate.png
    plots/overlays_<task>.png  overlays_<task>.gif

With several objectives also ``pareto.csv`` and ``plots/pareto_front.png``, and results.md
has a row per front trial. With ``objective.per_category`` each category gets
``<category>/best.yaml`` and ``<category>/model.pt``, and plots per study. Files are written
to a temporary directory that replaces ``DIR`` at the end, so a failed export leaves nothing
half-written. ``DIR`` holds a marker (``mmr.outdir.MARKER``) listing what export wrote: an
existing ``DIR`` is replaced only when it is empty or such an export of the same experiment,
and ``DIR`` may not lie inside the experiment (except its own ``export/`` folder, where a sweep
exports itself).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mmr.config import Config, dump_config
from mmr.errors import UserInputError
from mmr.fileio import atomic_path
from mmr.outdir import check_replaceable, read_marker, staged
from mmr.report import flatten_metrics, results_markdown, write_json
from search.config import SweepSpec, load_spec
from search.confirm import NO_FLOOR, read_confirm
from search.confirm import describe as describe_confirm
from search.contract import OBJECTIVE
from search.pareto import write_pareto
from search.report_page import write_report
from search.results import best_trials, load_trials, short_name, unjudged_guards, unjudged_note
from search.storage import is_uri, local_checkpoint

__all__ = ["export_experiment"]

log = logging.getLogger(__name__)


def export_experiment(
    experiment: str | Path,
    out: str | Path,
    *,
    overlays: int = 8,
    device: str = "auto",
    trial: str | None = None,
    onnx: bool = False,
) -> Path:
    """Writes every export artefact of an experiment to ``out``; returns ``out``.

    ``trial`` (a Tune trial id, as in ``launch.py status``) exports that trial as the chosen
    one of its study instead of the best (with several objectives: a point of the front).
    ``onnx`` also writes ``<category>.onnx`` beside each ``model.pt`` (``mmr.onnx_export``).
    """
    spec = load_spec(experiment)
    exp = spec.experiment_location
    out = Path(out).resolve()
    replace = _check_out(exp, out)
    df = load_trials(exp)
    best = best_trials(df)
    confirmed = read_confirm(spec.experiment_dir)
    if trial is None and confirmed is not None and confirmed.get("best_trial"):
        # The configuration with the best mean validation over its confirmation seeds.
        best.update(_chosen(df, confirmed["best_trial"]))
    if trial is not None:
        best.update(_chosen(df, trial))
    if not best and unjudged_guards(df):
        # A failed baseline must not turn the guards off: no guarded best without it.
        raise UserInputError(
            f"experiment {str(exp)!r} has no guarded best to export: {unjudged_note(df, exp)[0]}"
        )
    if not best:
        raise UserInputError(
            f"experiment {str(exp)!r} has no trial with a result yet: "
            "nothing to export (see `launch.py status`)"
        )
    # recheck: still only an earlier export of ours when it is replaced.
    recheck = lambda: _check_out(exp, out)  # noqa: E731
    with staged(out, kind="export", owner=exp, replace=replace, recheck=recheck) as staging:
        _export(spec, df, best, staging, overlays=overlays, device=device, onnx=onnx)
    return out


def _check_out(exp: str, out: Path) -> bool:
    """Refuses an ``--out`` whose replacement would delete what export did not write.

    Returns whether ``out`` exists (and may be replaced).
    """
    fix = "pass an empty or new directory as --out"
    if not is_uri(exp):
        root = Path(exp).resolve()
        if out == root or root in out.parents and out != root / "export":
            raise UserInputError(
                f"--out {out} is inside the experiment {root}: {fix} outside it "
                f"(or {root / 'export'}, where the sweep exports itself)"
            )
        # The sweep's own export/ belongs to the experiment even after the directory was
        # copied or moved (its marker still names the old place).
        if out == root / "export" and read_marker(out) is not None:
            return check_replaceable(out, kind="export", owner=None, what=f"--out {out}", fix=fix)
    return check_replaceable(out, kind="export", owner=exp, what=f"--out {out}", fix=fix)


def _export(
    spec: SweepSpec,
    df: pd.DataFrame,
    best: dict[str | None, pd.Series],
    out: Path,
    *,
    overlays: int,
    device: str,
    onnx: bool = False,
) -> None:
    from mmr.checkpoint import load_checkpoint, model_file
    from mmr.report import thresholds_markdown
    from mmr.thresholds import validation_thresholds
    from mmr.train import evaluate_checkpoint

    (out / "plots").mkdir()
    trials_csv = df.drop(columns=["checkpoint"], errors="ignore")
    trials_csv.to_csv(out / "trials.csv", index=False)
    rows: dict[str, dict[str, dict[str, float]]] = {"baseline (test)": {}, "best (test)": {}}
    summary: dict[str, Any] = {"studies": {}}
    unjudged = unjudged_guards(df)
    if unjudged:
        summary["notes"] = unjudged_note(df, spec.experiment_location)
    tested: dict[str, dict] = {}  # trial id -> test metrics, each trial evaluated once
    thresholds: dict[str, dict[str, Any]] = {}  # task -> decision thresholds (validation half)
    multi = spec.sweep.objective.multi
    for category, row in best.items():
        target = out / category if category else out
        target.mkdir(exist_ok=True)
        if not _has_checkpoint(row):
            raise UserInputError(
                f"best trial {row['trial']} has no checkpoint: the sweep was "
                "stopped before its first round; resume it first"
            )
        with local_checkpoint(row["checkpoint"]) as ckpt:
            state = load_checkpoint(ckpt)
            cfg = Config.from_dict(state["config"])  # exactly the trial's training config
            dump_config(cfg, target / "best.yaml")
            # Decision thresholds for `predict`, from the validation half (never the test).
            chosen = validation_thresholds(state, device=device)
            thresholds.update(chosen)
            with atomic_path(target / "model.pt") as tmp:
                torch.save(model_file(state, thresholds=chosen), tmp)
            if onnx:
                from mmr.onnx_export import export_onnx

                export_onnx(state, target, thresholds=chosen)
            _, test_best, outputs = evaluate_checkpoint(state, device=device)  # loaded once
        rows["best (test)"].update(test_best)
        base = _baseline_row(df, category)
        test_base = test_best
        if base is not None and base["trial"] != row["trial"] and _has_checkpoint(base):
            with local_checkpoint(base["checkpoint"]) as ckpt:
                _, test_base, _ = evaluate_checkpoint(ckpt, device=device)
        if base is not None:
            rows["baseline (test)"].update(test_base)
            tested[base["trial"]] = test_base
        tested[row["trial"]] = test_best
        summary["studies"][category or spec.sweep.name] = {
            "best_trial": row["trial"],
            "best_val_objective": float(row[OBJECTIVE]),
            "baseline_trial": None if base is None else base["trial"],
            "baseline_val_objective": None if base is None else _float(base[OBJECTIVE]),
            "best_test": flatten_metrics(test_best),
            "baseline_test": flatten_metrics(test_base) if base is not None else None,
            # False: chosen with --trial where the guards could not be judged (or no guards).
            "guarded": bool(spec.sweep.objective.guard) and category not in unjudged,
            "thresholds": chosen,
        }
        if multi:
            study = df if category is None else df[df["category"] == category]
            summary["studies"][category or spec.sweep.name]["front"] = study[
                study["on_front"].astype(bool)
            ]["trial"].tolist()
        for task, (data, maps) in outputs.items():
            _overlays(data, maps, cfg.data.image_size, out / "plots", task, overlays)
    if not rows["baseline (test)"]:
        del rows["baseline (test)"]
    if multi:
        write_pareto(spec, df, out)
        rows.update(_front_rows(spec, df, tested, device))
    results = results_markdown(
        rows, title=f"{spec.sweep.name}: held-out test half (never seen by the search)"
    ) + "".join(f"\n**Note:** {note}\n" for note in summary.get("notes", []))
    confirmed = read_confirm(spec.experiment_dir)
    if confirmed is None:
        summary["noise_floor"] = None
        results += f"\n**Seed noise:** {NO_FLOOR}\n"
    else:
        # top_k, seeds, best_trial, gain {mean, ci95}, beyond_noise, noise_floor, and each
        # confirmed configuration's seeds and values.
        summary["confirm"] = confirmed
        results += "\n## Confirmation runs\n\n" + "".join(
            f"- {line}\n" for line in describe_confirm(confirmed)
        )
    results += "\n" + thresholds_markdown(thresholds)
    (out / "results.md").write_text(results)
    write_json(summary, out / "summary.json")
    _study_plots(spec, out / "plots")
    write_report(
        out,
        title=spec.sweep.name,
        rows=rows,
        params=[short_name(k) for k in spec.space.keys],
    )


def _chosen(df: pd.DataFrame, trial: str) -> dict[str | None, pd.Series]:
    """``{study: row}`` of the trial picked with ``--trial``; a clear error if there is none."""
    match = df[df["trial"] == trial] if "trial" in df else df.iloc[0:0]
    if match.empty:
        known = ", ".join(df["trial"].astype(str)) if "trial" in df else ""
        raise UserInputError(
            f"--trial {trial!r} is not a trial of this experiment: pick one of the ids "
            f"`launch.py status` lists ({known or 'none yet'})"
        )
    row = match.iloc[0]
    if not _has_checkpoint(row):
        raise UserInputError(
            f"--trial {trial!r} has no checkpoint (state {row['state']}): it never finished a "
            "round; pick a trial with a result"
        )
    category = row.get("category")
    return {category if isinstance(category, str) else None: row}


def _front_rows(
    spec: SweepSpec, df: pd.DataFrame, done: dict[str, dict], device: str
) -> dict[str, dict[str, dict[str, float]]]:
    """Test-half metrics of every front trial (``front #N (test)`` rows of results.md).

    ``done`` maps trial ids already evaluated (best, baseline) to their test metrics.
    """
    from mmr.train import evaluate_checkpoint

    rows: dict[str, dict[str, dict[str, float]]] = {}
    for _, row in df[df["on_front"].astype(bool)].iterrows():
        test = done.get(row["trial"])
        if test is None and _has_checkpoint(row):
            with local_checkpoint(row["checkpoint"]) as ckpt:
                _, test, _ = evaluate_checkpoint(ckpt, device=device)
        if test is not None:
            label = f"front #{int(row['study_trial'])} {row['trial']} (test)"
            rows.setdefault(label, {}).update(test)
    return rows


def _has_checkpoint(row: pd.Series) -> bool:
    from ray.tune import Checkpoint

    return isinstance(row.get("checkpoint"), Checkpoint)


def _baseline_row(df: pd.DataFrame, category: str | None) -> pd.Series | None:
    pool = df if category is None else df[df["category"] == category]
    base = pool[pool["baseline"]]
    return None if base.empty else base.iloc[0]


def _float(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _overlays(
    data: Any, maps: torch.Tensor, image_size: int, plots: Path, task: str, count: int
) -> None:
    from mmr.visualize import overlay_frames, save_gif, save_grid

    # Most anomalous first, then a few normal images for contrast.
    scores = maps.flatten(1).amax(1).cpu()
    labels = data.labels
    bad = [i for i in scores.argsort(descending=True).tolist() if labels[i] == 1]
    good = [i for i in scores.argsort().tolist() if labels[i] == 0]
    pick = (bad[: max(1, count * 3 // 4)] + good[: max(1, count // 4)])[:count]
    idx = torch.tensor(pick)
    masks = None if data.masks is None else data.masks[idx.to(data.masks.device)]
    frames = overlay_frames(
        data.images[idx.to(data.images.device)],
        maps[idx.to(maps.device)],
        masks,
        image_size=image_size,
    )
    titles = [
        f"{data.samples[i].group}/{data.samples[i].defect} {data.samples[i].image.name} "
        f"score {scores[i]:.3f}"
        for i in pick
    ]
    save_grid(frames, titles, plots / f"overlays_{task}.png")
    save_gif(frames, plots / f"overlays_{task}.gif")


def _study_plots(spec: SweepSpec, plots: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    from search.samplers import study_storage

    # Optuna marks its matplotlib backend experimental; the plots are what we want.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = study_storage(spec.experiment_dir)
    names = (
        [f"{spec.sweep.name}/{c}" for c in spec.categories]
        if spec.sweep.objective.per_category
        else [spec.sweep.name]
    )
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        suffix = "" if name == spec.sweep.name else "_" + name.rsplit("/", 1)[-1]
        targets: dict[str, dict[str, Any]] = {}
        if spec.sweep.objective.multi:
            # Optuna plots one target of a multi-objective study: the first objective. Its
            # importance evaluator looks for what makes a target low: negate a maximised one.
            first, mode = spec.sweep.objective.objectives[0]
            sign = -1.0 if mode == "max" else 1.0
            # It warns about this whenever a target is given; ours already points down.
            warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")
            value = {"target": lambda t: t.values[0], "target_name": first}
            targets = {
                "optimization_history": value,
                "parallel_coordinate": value,
                "param_importances": {
                    "target": lambda t, sign=sign: sign * t.values[0],
                    "target_name": first,
                },
            }
        for plot, fn in (
            ("optimization_history", ovm.plot_optimization_history),
            ("param_importances", ovm.plot_param_importances),
            ("parallel_coordinate", ovm.plot_parallel_coordinate),
        ):
            try:
                ax = fn(study, **targets.get(plot, {}))
            except (ValueError, RuntimeError) as exc:  # e.g. importances need 2+ trials
                log.warning("plot %s of study %s skipped: %s", plot, name, exc)
                continue
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            fig.savefig(plots / f"{plot}{suffix}.png", dpi=100)
            plt.close(fig)
