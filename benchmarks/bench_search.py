"""Search efficiency (ASHA+TPE against FIFO+random) and the sweep's overhead, on a local Ray.

Efficiency: the demo sweep (``configs/demo_sweep.yaml``: the tiny config, 2 trials at a time)
with TPE + ASHA (grace period 1, reduction factor 3: the demo's default until the replay,
``benchmarks/replay.py``, chose CMA-ES + median stopping) against the same sweep with a random
sampler and no early stopping, same number of trials, same seeds (``search.seed`` = repeat
index; training seed fixed), on the synthetic set of the tiny config's category. Counted per
sweep: epochs trained over all trials (``search.results.load_trials``, column ``epochs``) and
the best validation objective (image AUROC) among trials that ran every epoch (``done``).

Overhead: the share of a sweep's wall time not spent inside trials. Wall time = the child
process from interpreter start to exit (imports, ``ray.init``, the Tuner, Optuna, actor start,
``ray.shutdown``); trial compute = the sum of the trials' ``time_total_s`` (Tune's in-trainable
time, which holds ``mmr.train.fit``'s data loading, training, evaluation and checkpoints)
divided by the trials running at once. ``1 - compute / wall`` is the overhead share.

Each sweep runs in its own child process (``python -m benchmarks.bench_search --child``) on a
fresh local Ray (``ray.init(num_cpus=2, include_dashboard=False)``, ``RAY_AUTH_MODE=disabled``)
that the child shuts down itself. The image cache is built before the first sweep.

Run: ``python -m benchmarks.bench_search [--quick]``. Full mode (12 trials x 2 methods x 3
repeats, the demo's data) took 15 min on 2 cores at load ~2; quick mode (6 trials, 1 repeat,
32 training images) 2-4 min.
"""

from __future__ import annotations

import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import child_main, row, run_child, synthetic_data

__all__ = ["METHODS", "asha_bound", "run"]

SECTION_SEARCH = "search"
SECTION_OVERHEAD = "overhead"
METHODS = {
    "asha_tpe": ["search.sampler=tpe", "scheduler.type=asha"],
    "fifo_random": ["search.sampler=random", "scheduler.type=fifo"],
}
# Smoke runs shrink trials to a few seconds (tests/test_search.py's FAST overrides).
SMOKE = [
    "data.resize=40",
    "data.image_size=32",
    "model.encoder_depth=2",
    "train.epochs=2",
    "train.eval_every=1",
    "train.warmup_epochs=1",
    "train.lr_milestones=[1]",
    "train.batch_size=4",
    "eval.blur_sigma=0.5",
    "search.n_startup_trials=1",
]


def _sizes(quick: bool, smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"trials": 2, "repeats": 1, "n_train": 8, "n_test": 4, "size": 64}
    if quick:
        return {"trials": 6, "repeats": 1, "n_train": 32, "n_test": 30, "size": 256}
    # The demo's own data: mmr.synth's defaults for one category.
    return {"trials": 12, "repeats": 3, "n_train": 100, "n_test": 100, "size": 256}


# ----------------------------------------------------------------------------- child


def _child(spec: dict[str, Any]) -> None:
    """Runs the sweeps of ``spec`` on one local Ray; writes timings and per-trial results."""
    started = time.time()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["MMR_DASHBOARD"] = "0"
    os.environ.pop("RAY_ADDRESS", None)  # always a fresh local Ray, never someone's cluster
    import ray

    from benchmarks.common import write_child_result
    from search.resolve import resolve_sweep
    from search.results import load_trials
    from search.sweep import run_sweep

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)  # the parent's timeout: shut Ray down on the way out
    out: dict[str, Any] = {"started": started, "imported": time.time(), "sweeps": []}
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        out["ray_ready"] = time.time()
        for sweep in spec["sweeps"]:
            sweep_spec = resolve_sweep(
                None, sweep["overrides"], name=sweep["name"], storage=spec["storage"]
            )
            begin = time.time()
            run = run_sweep(sweep_spec, write=lambda _: None, dashboard=False, export=False)
            end = time.time()
            df = load_trials(run.experiment_dir)
            cols = ["state", "baseline", "epochs", "wall_s", "objective", "image_auroc"]
            trials = df[[c for c in cols if c in df]].astype(object).where(df.notna(), None)
            out["sweeps"].append(
                {
                    "name": sweep["name"],
                    "method": sweep["method"],
                    "begin": begin,
                    "end": end,
                    "max_concurrent": sweep_spec.sweep.search.max_concurrent,
                    "epochs": sweep_spec.base.train.epochs,
                    "eval_every": sweep_spec.base.train.eval_every,
                    "grace_period": sweep_spec.sweep.scheduler.grace_period,
                    "reduction_factor": sweep_spec.sweep.scheduler.reduction_factor,
                    "trials": trials.to_dict(orient="records"),
                }
            )
    finally:
        shutdown = time.time()
        ray.shutdown()
        out["shutdown_s"] = time.time() - shutdown
    write_child_result(spec["result"], out)


# ----------------------------------------------------------------------------- parent


def _prewarm(overrides: list[str]) -> None:
    """Builds the decoded-image cache once, as the first trial on a node would."""
    from mmr.config import load_config
    from mmr.data import list_tasks, load_images, load_masks
    from search.config import ROOT

    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    d = cfg.data
    for task in list_tasks(d):
        load_images([s.image for s in task.train], size=d.train_size, cache_dir=d.cache_dir)
        load_images([s.image for s in task.test], size=d.resize, cache_dir=d.cache_dir)
        load_masks(list(task.test), size=d.resize, cache_dir=d.cache_dir)


def sweep_data(tmp: str, sizes: dict[str, Any], extra: list[str]) -> list[str]:
    """Generates the benchmark's synthetic category in ``tmp``, fills its image cache and
    returns the sweep overrides that use them (plus ``extra``); ``sizes``: the ``_sizes``."""
    from mmr.config import load_config
    from search.config import ROOT

    category = load_config(ROOT / "configs" / "tiny.yaml").data.categories[0]
    root = synthetic_data(
        Path(tmp) / "data",
        categories=[category],
        size=sizes["size"],
        n_train=sizes["n_train"],
        n_test=sizes["n_test"],
    )
    common = [
        f"data.root={root}",
        f"data.cache_dir={Path(tmp) / 'cache'}",
        f"data.categories=[{category}]",
        f"search.num_trials={sizes['trials']}",
        "search.confirm.top_k=0",  # the search itself is measured (the demo also confirms)
        *extra,
    ]
    _prewarm([o for o in common if o.startswith(("data.", "model.", "train."))])
    return common


def run(quick: bool = False, smoke: bool = False) -> list[dict[str, Any]]:
    """Runs both methods (``repeats`` times each) and returns search and overhead rows.

    Args:
        quick: 6 trials, 1 repeat, 32 training images (the full run: 12, 3 and 100).
        smoke: 2 trials of a few seconds each, both sweeps in one child: the code path only.
    """
    sizes = _sizes(quick, smoke)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        common = sweep_data(tmp, sizes, SMOKE if smoke else [])
        results: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
        children = []
        for repeat in range(sizes["repeats"]):
            # Alternate which method goes first: neither always meets a cold machine.
            order = list(METHODS) if repeat % 2 == 0 else list(METHODS)[::-1]
            sweeps = [
                {
                    "name": f"{m}-r{repeat}",
                    "method": m,
                    "overrides": [*common, f"search.seed={repeat}", *METHODS[m]],
                }
                for m in order
            ]
            groups = [sweeps] if smoke else [[s] for s in sweeps]
            for group in groups:
                child = run_child(
                    "benchmarks.bench_search",
                    {"sweeps": group, "storage": str(Path(tmp) / "runs")},
                    timeout=600 if smoke or quick else 2400,
                    workdir=tmp,
                )
                children.append(child)
                for sweep in child["sweeps"]:
                    results[sweep["method"]].append(sweep)
    return _search_rows(results, sizes) + _overhead_rows(children)


def _summary(sweep: dict[str, Any]) -> dict[str, Any]:
    trials = sweep["trials"]
    done = [t for t in trials if t["state"] == "done" and t.get("objective") is not None]
    return {
        "epochs": sum(int(t["epochs"] or 0) for t in trials),
        "best": max(t["objective"] for t in done) if done else float("nan"),
        "wall": sweep["end"] - sweep["begin"],
        "states": {s: sum(t["state"] == s for t in trials) for s in {t["state"] for t in trials}},
    }


def _search_rows(
    results: dict[str, list[dict[str, Any]]], sizes: dict[str, Any]
) -> list[dict[str, Any]]:
    s = {m: [_summary(x) for x in sweeps] for m, sweeps in results.items()}
    mean = {
        m: {k: statistics.fmean(x[k] for x in v) for k in ("epochs", "best", "wall")}
        for m, v in s.items()
    }
    a, f = mean["asha_tpe"], mean["fifo_random"]
    epochs_ratio = f["epochs"] / a["epochs"]
    within = [
        x["best"] >= y["best"] - 0.01 for x, y in zip(s["asha_tpe"], s["fifo_random"], strict=True)
    ]
    auroc_ok = all(within)
    per_repeat = "; ".join(
        f"r{i}: {x['epochs']} vs {y['epochs']} epochs, best {x['best']:.4f} vs {y['best']:.4f}"
        for i, (x, y) in enumerate(zip(s["asha_tpe"], s["fifo_random"], strict=True))
    )
    states = ", ".join(f"{k} {v}" for k, v in sorted(s["asha_tpe"][0]["states"].items()))
    first = results["asha_tpe"][0]
    ideal = asha_bound(
        epochs=first["epochs"],
        eval_every=first["eval_every"],
        grace=first["grace_period"],
        rf=first["reduction_factor"],
    )
    bound = (
        f"an ideal ASHA on this rung structure ({first['epochs']} epochs, validation every "
        f"{first['eval_every']}, grace {first['grace_period']}, rf {first['reduction_factor']:g}) "
        f"trains {ideal:.1f} epochs per trial, i.e. at most {first['epochs'] / ideal:.2f}x fewer"
    )
    n, reps = sizes["trials"], sizes["repeats"]
    figure = f"{n} trials per sweep, mean of {reps} repeat(s), tiny config, synthetic set"
    return [
        row(
            "search_epochs",
            f"epochs trained, all trials; {figure}",
            a["epochs"],
            f["epochs"],
            note=f"project = ASHA (grace 1, rf 3) + TPE, reference = FIFO + random; "
            f"{per_repeat}; ASHA r0 trial states: {states}; {bound}",
            section=SECTION_SEARCH,
            unit="epochs",
            target=">= 3x fewer epochs, best AUROC within 0.01",
            met=epochs_ratio >= 3 and auroc_ok,
            summary=f"{a['epochs']:.0f} vs {f['epochs']:.0f} epochs (ideal ASHA bound "
            f"{first['epochs'] / ideal:.2f}x)",
        ),
        row(
            "search_best_auroc",
            f"best validation image AUROC of a fully trained trial; {figure}",
            a["best"],
            f["best"],
            note=f"within 0.01 of FIFO+random (or better) in {sum(within)} of {reps} repeats",
            section=SECTION_SEARCH,
            unit="AUROC",
            higher_is_better=True,
            target=">= FIFO+random - 0.01",
            met=auroc_ok,
            summary=f"{a['best']:.4f} vs {f['best']:.4f}",
        ),
        row(
            "search_wall",
            f"sweep wall time (Tuner only, Ray already up); {figure}",
            a["wall"],
            f["wall"],
            note="2 trials at a time on a local Ray with 2 CPUs",
            section=SECTION_SEARCH,
        ),
    ]


def _overhead_rows(children: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: the mean over its sweeps that were first in their child process
    (those include interpreter start, imports and ``ray.init``)."""
    by_method: dict[str, list[dict[str, float]]] = {}
    for child in children:
        sweep = child["sweeps"][0]
        last = len(child["sweeps"]) == 1
        wall = sweep["end"] - child["started_at"] + (child["shutdown_s"] if last else 0.0)
        compute = sum(t["wall_s"] or 0.0 for t in sweep["trials"]) / sweep["max_concurrent"]
        tuner = sweep["end"] - sweep["begin"]
        by_method.setdefault(sweep["method"], []).append(
            {
                "wall": wall,
                "compute": compute,
                "startup": child["imported"] - child["started_at"],
                "ray_init": child["ray_ready"] - child["imported"],
                "tuner_idle": tuner - compute,
                "shutdown": child["shutdown_s"],
                "trials": len(sweep["trials"]),
                "concurrent": sweep["max_concurrent"],
            }
        )
    rows = []
    for method, runs in by_method.items():
        mean = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
        share = 1 - mean["compute"] / mean["wall"]
        shares = ", ".join(f"{1 - r['compute'] / r['wall']:.1%}" for r in runs)
        rows.append(
            row(
                f"overhead_{method}",
                f"sweep process wall time vs in-trial compute ({mean['trials']:.0f} trials, "
                f"{mean['concurrent']:.0f} at a time), mean of {len(runs)} sweep(s)",
                mean["wall"],
                mean["compute"],
                note=f"outside trial compute {share:.1%} (per sweep: {shares}): interpreter + "
                f"imports {mean['startup']:.1f} s, ray.init {mean['ray_init']:.1f} s, idle trial "
                f"slots inside the Tuner (actor start, scheduling, the last trial's tail) "
                f"{mean['tuner_idle']:.1f} s, ray.shutdown {mean['shutdown']:.1f} s; "
                f"ratio = compute / wall",
                section=SECTION_OVERHEAD,
                target="<= 15% outside trial compute",
                met=share <= 0.15,
                share=share,
                summary=f"{share:.1%} outside trial compute",
            )
        )
    return rows


def asha_bound(*, epochs: int, eval_every: int, grace: int, rf: float) -> float:
    """Mean epochs per trial of an ideal ASHA (infinitely many trials, exact top-1/rf cuts).

    Rungs sit at ``grace * rf**k`` rounds below the last round; a trial stops at rung ``k``
    with probability ``(1 - 1/rf) / rf**k`` and runs all epochs with ``1 / rf**K``.
    """
    rounds = -(-epochs // eval_every)
    rungs = []
    milestone = grace
    while milestone < rounds:
        rungs.append(milestone)
        milestone *= rf
    mean, alive = 0.0, 1.0
    for m in rungs:
        mean += alive * (1 - 1 / rf) * min(m * eval_every, epochs)
        alive /= rf
    return mean + alive * epochs


def main() -> None:
    child_main(__doc__, run, _child, quick_help="6 trials, 1 repeat")


if __name__ == "__main__":
    main()
