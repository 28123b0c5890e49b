"""Sweep wall time with one Ray actor per trial (``reuse_actors=False``) against reused actors.

The sweep runs ``reuse_actors=False`` so that the dashboard names every actor after its trial
(Ray reads an actor's ``__repr__`` once, when the actor starts; see docs/design.md
"Monitoring"). This measures what that costs: the same small sweep (the demo sweep with FIFO,
random sampling and fixed seeds, so both variants train the same trials for the same epochs)
run both ways, alternated (A B, B A, A B, ...), each sweep in its own child process on a fresh
local Ray (``ray.init(num_cpus=2, include_dashboard=False)``), as ``benchmarks.bench_search``
does. The child forces ``reuse_actors`` by wrapping ``ray.tune.TuneConfig``; nothing else
differs. Figure: ``run_sweep``'s wall time (Tuner start to summary), median over the repeats,
with its quartiles; ratio = reuse=False median / reuse=True median (> 1: reusing is faster).
On a loaded machine the ratio of interleaved runs is the figure to read, not the seconds.

Run: ``python -m benchmarks.bench_reuse [--quick]`` (default: 6 trials x 2 epochs, 3 repeats
each way, 32 training images; quick: 4 trials, 1 repeat each way).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import child_main, row, run_child

__all__ = ["VARIANTS", "run"]

SECTION = "overhead"
# Variant name -> reuse_actors.
VARIANTS = {"actor_per_trial": False, "reused_actors": True}
SWEEP = [
    "search.sampler=random",
    "scheduler.type=fifo",
    "search.seed=0",
    "train.epochs=2",
    "train.eval_every=1",
    "train.warmup_epochs=1",
    "train.lr_milestones=[1]",
]

# Smoke runs shrink trials to a few seconds (as benchmarks.bench_search's SMOKE).
SMOKE = ["data.resize=40", "data.image_size=32", "model.encoder_depth=2", "train.batch_size=4",
         "eval.blur_sigma=0.5"]  # fmt: skip


def _sizes(quick: bool, smoke: bool) -> dict[str, Any]:
    if smoke:  # 3 trials, 2 at a time: the third can reuse an actor
        return {"trials": 3, "repeats": 1, "n_train": 8, "n_test": 4, "size": 64}
    if quick:
        return {"trials": 4, "repeats": 1, "n_train": 32, "n_test": 30, "size": 256}
    return {"trials": 6, "repeats": 3, "n_train": 32, "n_test": 30, "size": 256}


def _child(spec: dict[str, Any]) -> None:
    """Runs one sweep with ``reuse_actors`` forced to ``spec["reuse"]``; writes its timings."""
    started = time.time()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["MMR_DASHBOARD"] = "0"
    os.environ.pop("RAY_ADDRESS", None)  # always a fresh local Ray, never someone's cluster
    import ray
    from ray import tune

    from benchmarks.common import write_child_result
    from search.resolve import resolve_sweep
    from search.results import load_trials
    from search.sweep import run_sweep

    tune_config = tune.TuneConfig

    def forced(**kwargs: Any) -> Any:
        return tune_config(**{**kwargs, "reuse_actors": spec["reuse"]})

    tune.TuneConfig = forced  # search.sweep reads it as tune.TuneConfig at call time

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)  # the parent's timeout: shut Ray down on the way out
    out: dict[str, Any] = {"started": started, "reuse": spec["reuse"]}
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        sweep_spec = resolve_sweep(
            None, spec["overrides"], name=spec["name"], storage=spec["storage"]
        )
        begin = time.time()
        run = run_sweep(sweep_spec, write=lambda _: None, dashboard=False, export=False)
        out["sweep_s"] = time.time() - begin
        df = load_trials(run.experiment_dir)
        out["states"] = df["state"].tolist()
        out["epochs"] = int(df["epochs"].sum())
        out["compute_s"] = float(df["wall_s"].sum()) if "wall_s" in df else None
        # The worker process of each trial (train_trial writes it): actors started.
        workers = Path(run.location).glob("trial_*/worker.json")
        out["actors"] = len({json.loads(w.read_text())["pid"] for w in workers})
    finally:
        ray.shutdown()
    write_child_result(spec["result"], out)


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def run(quick: bool = False, smoke: bool = False) -> list[dict[str, Any]]:
    """Runs the sweep ``repeats`` times each way, alternated; returns one row."""
    from benchmarks.bench_search import sweep_data

    sizes = _sizes(quick, smoke)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-reuse-") as tmp:
        common = sweep_data(tmp, sizes, [*SWEEP, *(SMOKE if smoke else [])])
        for repeat in range(sizes["repeats"]):
            # Alternate which variant goes first: neither always meets the same machine state.
            order = list(VARIANTS) if repeat % 2 == 0 else list(VARIANTS)[::-1]
            for variant in order:
                child = run_child(
                    "benchmarks.bench_reuse",
                    {
                        "name": f"{variant}-r{repeat}",
                        "reuse": VARIANTS[variant],
                        "overrides": common,
                        "storage": str(Path(tmp) / "runs"),
                    },
                    timeout=1200,
                    workdir=tmp,
                )
                print(
                    f"{variant} repeat {repeat}: sweep {child['sweep_s']:.1f} s, child "
                    f"{child['wall_s']:.1f} s, {child['epochs']} epochs, "
                    f"{child['actors']} actors, "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                runs[variant].append(child)
    per_trial = [c["sweep_s"] for c in runs["actor_per_trial"]]
    reused = [c["sweep_s"] for c in runs["reused_actors"]]
    (a25, a75), (b25, b75) = _quartiles(per_trial), _quartiles(reused)
    note = (
        f"{sizes['trials']} trials x 2 epochs, 2 at a time, {sizes['repeats']} repeat(s) each "
        f"way, alternated; run_sweep wall, median (quartiles): actor per trial "
        f"{statistics.median(per_trial):.1f} s ({a25:.1f}-{a75:.1f}), reused "
        f"{statistics.median(reused):.1f} s ({b25:.1f}-{b75:.1f}); per run: "
        f"{', '.join(f'{v:.1f}' for v in per_trial)} / {', '.join(f'{v:.1f}' for v in reused)}"
    )
    return [
        row(
            "reuse_actors",
            "sweep wall time, reuse_actors=True (project) vs False (reference)",
            statistics.median(reused),
            statistics.median(per_trial),
            note=note,
            section=SECTION,
            runs={v: [c["sweep_s"] for c in cs] for v, cs in runs.items()},
            epochs={v: [c["epochs"] for c in cs] for v, cs in runs.items()},
            actors={v: [c["actors"] for c in cs] for v, cs in runs.items()},
        )
    ]


def main() -> None:
    child_main(__doc__, run, _child, quick_help="4 trials, 1 repeat each way")


if __name__ == "__main__":
    main()
