"""Records full learning curves of the tiny MMR config, for the replay benchmark.

The table is what tabulated HPO benchmarks (NAS-Bench-201, LCBench, YAHPO) hold: every
configuration of a fixed set trained to the full budget, validated after *every* epoch, so
that any search strategy can later be replayed on it in simulated time
(``benchmarks/replay.py``) instead of training again.

What is recorded (``GRID``, ``SEEDS``, ``CATEGORIES``, ``EPOCHS``):

- 48 configurations: the demo space (``spaces/demo.yaml``) on a grid, ``mask_ratio`` in
  {0.1, 0.4, 0.8} x ``patch_size`` in {8, 16} x ``teacher_layers`` in {[1,2,3], [2,3]} x
  ``lr`` in {3e-4, 1e-3, 3e-3, 1e-2} (log-spaced, ~3.3x apart). The tiny config's own values
  (0.4, 8, [1,2,3], 1e-3) are one of the points, so the sweeps' baseline trial is recorded.
- 2 training seeds (``train.seed`` 54, the tiny config's, and 1).
- 2 synthetic categories of different kinds (``mmr.synth``): ``nut`` (an object on a
  textured background) and ``fabric`` (a texture), from the tiny config's synthetic set.
- 36 epochs, 1.5x the demo's 24, with the tiny config's schedule scaled alike (2 warm-up
  epochs, lr / 10 for the last 6 epochs as the demo's for its last 4 or 5); validation after
  every epoch.
  48 epochs would cost 1.3x more for a flat tail. A run took 54 s of one core (median over
  the 192; quartiles 45 and 76 s; runs slowed by other work took up to an hour).

Rows (``curves.csv``, one per run and epoch): the run's key (``config``, its four
parameters, ``category``, ``seed``), ``epoch``, the validation metrics (``val_image_auroc``,
``val_pixel_auroc``, ``val_aupro``, ``val_pixel_f1``), the epoch's training ``loss``, its wall
``seconds`` (training + validation, the first epoch's also loading the data and building the
model; CPU, one thread, niced, so noisy) and ``status``
(``ok``, or ``diverged`` when the loss became NaN). The last epoch's row also holds the
held-out test-half metrics (``test_*``), which no search ever sees.

Resumable in parts: a run is appended (all its rows in one write) only once it finished, and
runs already in the file are skipped, so the recorder can be killed at any time and started
again with the same command; ``load_curves`` drops any incomplete run left by a kill.

Command that made ``benchmarks/data/curves.csv`` (one torch thread, lowest CPU priority so
that it uses only idle CPU; the run order is seed-major over a fixed shuffle of the
configurations, so any prefix is a space-filling subset with both categories; ``--out``
is ``benchmarks/data/curves.csv`` by default). The first 37
runs came from one process; the rest from two, one per core, started as::

    OMP_NUM_THREADS=1 nice -n 19 python -m benchmarks.curves --shard 0/2
    OMP_NUM_THREADS=1 nice -n 19 python -m benchmarks.curves --shard 1/2

(``--out`` elsewhere and copying the file in is equivalent; ``--limit N`` stops after N runs;
``--shard K/N`` records only the runs at positions K, K + N, ... of the plan, so N niced
processes, one per idle core, fill the same file without picking the same run: each run is
appended in one ``write`` to a file opened in append mode, which Linux does not interleave.)
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT

__all__ = [
    "CATEGORIES",
    "FIXED",
    "RANDOM",
    "TESTBEDS",
    "Testbed",
    "COLUMNS",
    "EPOCHS",
    "GRID",
    "PARAMS",
    "SEEDS",
    "Run",
    "load_curves",
    "load_scores",
    "made_up_rows",
    "planned_runs",
    "record",
]

log = logging.getLogger(__name__)

DEFAULT_OUT = ROOT / "benchmarks" / "data" / "curves.csv"
BASE_CONFIG = ROOT / "configs" / "tiny.yaml"
GRID: dict[str, tuple[Any, ...]] = {
    "mask_ratio": (0.1, 0.4, 0.8),
    "patch_size": (8, 16),
    "teacher_layers": ((1, 2, 3), (2, 3)),
    "lr": (3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2),
}
PARAMS = tuple(GRID)
SEEDS = (54, 1)
CATEGORIES = ("nut", "fabric")
EPOCHS = 36
# The tiny config's schedule (24 epochs: warm-up 2, lr / 10 at 20) stretched to EPOCHS: lr / 10
# from 0-based epoch 30 on. The first runs were recorded (at commit 4116fad) when a milestone m
# dropped the lr at 0-based epoch m; mmr.train now drops it at m - 1, hence 31 here.
SCHEDULE = ("train.warmup_epochs=2", "train.lr_milestones=[31]")
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1")
KEY = ("config", "category", "seed")
COLUMNS = (
    "config",
    *PARAMS,
    "category",
    "seed",
    "epoch",
    *(f"val_{m}" for m in METRICS),
    "loss",
    "seconds",
    "status",
    *(f"test_{m}" for m in METRICS),
)
_ORDER_SEED = 11  # fixed shuffle of the configurations: any prefix covers the space


@dataclass(frozen=True)
class Testbed:
    """One curve table: which runs it holds, where, and what trains them.

    ``RANDOM`` is the first table (``curves.csv``): the tiny config's teacher is random-init
    from ``train.seed``, so every seed also has its own teacher. ``FIXED`` loads one chosen
    teacher file for every run (``benchmarks.teacher``), as real MMR loads one pretrained
    teacher; it has 3 training seeds and 4 categories (2 objects, 2 textures), recorded
    configuration-major (all seeds and categories of a configuration before the next), so any
    prefix of the plan holds whole configurations of a space-filling subset.
    """

    name: str
    out: Path
    seeds: tuple[int, ...]
    categories: tuple[str, ...]
    config_major: bool  # plan order: configuration-major (else seed-major)
    fixed_teacher: bool  # every run loads benchmarks.teacher's chosen teacher file
    scores: bool = False  # also keep each run's test-half image scores (scores_path)

    @property
    def meta_path(self) -> Path:
        """Side file naming what recorded the table (the teacher's seed and SHA-256)."""
        return self.out.with_suffix(".meta.json")

    def scores_path(self, out: Path | None = None) -> Path:
        """Side file of per-image test scores, one JSON line per run (``load_scores``): what
        a bootstrap over test images needs (confirmation runs' intervals), which the
        table's AUROCs alone cannot give."""
        return (out or self.out).with_suffix(".scores.jsonl")


RANDOM = Testbed("random", DEFAULT_OUT, SEEDS, CATEGORIES, False, False)
FIXED = Testbed(
    "fixed",
    ROOT / "benchmarks" / "data" / "curves_fixed.csv",
    (1, 2, 3),
    ("nut", "pill", "grid", "fabric"),
    True,
    True,
    scores=True,
)
TESTBEDS = {t.name: t for t in (RANDOM, FIXED)}


@dataclass(frozen=True)
class Run:
    """One training run of the table: a configuration, a category and a training seed."""

    config: int  # index into configurations()
    params: dict[str, Any]
    category: str
    seed: int

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.config, self.category, self.seed)

    def overrides(self, teacher: Path | None = None) -> list[str]:
        """``--set`` style overrides of the tiny config that train this run.

        ``teacher``: a weights file every run loads (the fixed-teacher testbed).
        """
        layers = ",".join(str(x) for x in self.params["teacher_layers"])
        # Both tables were recorded before model.teacher_seed: without a file, the random
        # teacher is drawn from train.seed (the first table), whatever the tiny config says.
        fixed = [f"model.teacher_checkpoint={teacher}"] if teacher is not None else []
        fixed.append("model.teacher_seed=null")
        return [
            *fixed,
            f"data.categories=[{self.category}]",
            f"model.mask_ratio={self.params['mask_ratio']}",
            f"model.patch_size={self.params['patch_size']}",
            f"model.teacher_layers=[{layers}]",
            f"train.lr={self.params['lr']}",
            f"train.seed={self.seed}",
            f"train.epochs={EPOCHS}",
            "train.eval_every=1",
            "train.threads=1",
            *SCHEDULE,
        ]


def configurations() -> list[dict[str, Any]]:
    """The 48 grid points, in a fixed order (their index is the ``config`` column)."""
    return [dict(zip(PARAMS, values, strict=True)) for values in itertools.product(*GRID.values())]


def planned_runs(testbed: Testbed = RANDOM) -> list[Run]:
    """Every run of the table in recording order (see ``Testbed``), configurations shuffled."""
    configs = configurations()
    order = list(range(len(configs)))
    random.Random(_ORDER_SEED).shuffle(order)
    if testbed.config_major:
        return [
            Run(i, configs[i], category, seed)
            for i in order
            for seed in testbed.seeds
            for category in testbed.categories
        ]
    return [
        Run(i, configs[i], category, seed)
        for seed in SEEDS
        for i in order
        for category in CATEGORIES
    ]


def load_curves(path: str | Path = DEFAULT_OUT) -> Any:
    """The complete runs of a curve table as a pandas DataFrame (incomplete runs dropped).

    A run is complete when it has one row per epoch from 1 and test metrics on the last (or,
    diverged, rows up to the epoch it diverged at). ``teacher_layers`` is kept as the
    string ``"1-2-3"``.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=list(COLUMNS))
    frame = pd.read_csv(path, on_bad_lines="skip", dtype={"teacher_layers": str})
    if frame.empty:
        return frame
    keep = []
    for _, run in frame.groupby(list(KEY), sort=False):
        run = run.drop_duplicates("epoch", keep="last").sort_values("epoch")
        epochs = run["epoch"].tolist()
        if epochs != list(range(1, len(epochs) + 1)):
            continue
        # Test metrics are written with the last epoch only: their presence marks the end.
        if (run["status"] == "diverged").any() or not math.isnan(run["test_image_auroc"].iloc[-1]):
            keep.append(run)
    if not keep:
        return frame.iloc[0:0]
    return pd.concat(keep, ignore_index=True)


def _recorded(path: Path) -> set[tuple[int, str, int]]:
    table = load_curves(path)
    return {
        (int(c), str(cat), int(s))
        for c, cat, s in table[list(KEY)].drop_duplicates().itertuples(index=False)
    }


def train_run(
    run: Run, teacher: Path | None = None, scores: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Trains one run with ``mmr.train.fit`` and returns its rows (see the module doc).

    ``scores``: a list that receives the run's test-half image scores (labels and the
    maximum of each anomaly map, as evaluation ranks them).
    """
    import tempfile

    from mmr.config import load_config
    from mmr.train import TrainingDiverged, evaluate_checkpoint, fit

    cfg = load_config(BASE_CONFIG, run.overrides(teacher))
    rows: list[dict[str, Any]] = []
    clock = {"last": time.perf_counter()}

    def report(_round: int, flat: dict[str, float]) -> None:
        now = time.perf_counter()
        rows.append(
            {
                **_key_columns(run),
                "epoch": int(flat["epoch"]),
                **{f"val_{m}": flat[m] for m in METRICS},
                "loss": flat["loss"],
                "seconds": now - clock["last"],
                "status": "ok",
            }
        )
        clock["last"] = now

    try:
        with tempfile.TemporaryDirectory(prefix="curves-") as tmp:
            result = fit(cfg, report=report, final_test=True, checkpoint_dir=tmp)
            if scores is not None:
                _, _, outputs = evaluate_checkpoint(tmp, split="test", device="cpu")
                data, maps = outputs[run.category]
                scores.append(
                    {
                        "config": run.config,
                        "category": run.category,
                        "seed": run.seed,
                        "labels": [int(x) for x in data.labels.tolist()],
                        "scores": [round(x, 6) for x in maps.flatten(1).amax(1).tolist()],
                    }
                )
    except TrainingDiverged as exc:
        log.warning("run %s diverged: %s", run.key, exc)
        for row in rows:
            row["status"] = "diverged"
        if not rows:  # diverged in the first epoch: one row saying so
            rows.append({**_key_columns(run), "epoch": 1, "status": "diverged"})
        return rows
    test = result["test"][run.category]
    rows[-1].update({f"test_{m}": test[m] for m in METRICS})
    return rows


def _key_columns(run: Run) -> dict[str, Any]:
    return {
        "config": run.config,
        **{k: v for k, v in run.params.items() if k != "teacher_layers"},
        "teacher_layers": "-".join(str(x) for x in run.params["teacher_layers"]),
        "category": run.category,
        "seed": run.seed,
    }


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """Appends one JSON line in a single write (as ``_append``)."""
    import json

    data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line cut short by a kill: end it, never extend it
                data = b"\n" + data
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Appends one run's rows in a single write (a kill leaves at most one partial run)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    if not path.exists() or path.stat().st_size == 0:
        writer.writeheader()
    else:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line cut short by a kill: end it, never extend it
                buf.write("\n")
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = buf.getvalue().encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)  # one syscall: concurrent appenders do not interleave
        if written != len(data):
            raise OSError(f"{path}: short write ({written} of {len(data)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


def pending(path: Path, runs: Sequence[Run], scores: Path | None = None) -> Iterator[Run]:
    """The runs not yet in ``path`` (nor, when given, in the ``scores`` side file)."""
    done = _recorded(path)
    if scores is not None:
        done &= set(load_scores(scores))
    return (run for run in runs if run.key not in done)


def load_scores(path: str | Path) -> dict[tuple[int, str, int], tuple[list[int], list[float]]]:
    """``{(config, category, seed): (labels, scores)}`` of a scores side file (the last
    line of a run wins; a line cut short by a kill is skipped)."""
    import json

    out = {}
    path = Path(path)
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[(int(r["config"]), str(r["category"]), int(r["seed"]))] = (r["labels"], r["scores"])
    return out


def _teacher_for(testbed: Testbed, path: Path) -> Path | None:
    """The fixed teacher's file, checked against (or recorded in) the table's side file."""
    if not testbed.fixed_teacher:
        return None
    import json

    import torch

    from benchmarks import teacher as tmod

    file = tmod.teacher_file()
    meta = {"teacher_seed": tmod.CHOSEN_SEED, "teacher_sha256": tmod.sha256(file),
            "torch": torch.__version__, "arch": tmod.ARCH}  # fmt: skip
    side = path.with_suffix(".meta.json")
    if side.is_file():
        old = json.loads(side.read_text())
        if old["teacher_sha256"] != meta["teacher_sha256"]:
            raise RuntimeError(
                f"{path} was recorded with teacher {old['teacher_sha256'][:12]} (seed "
                f"{old['teacher_seed']}, torch {old['torch']}); this machine builds "
                f"{meta['teacher_sha256'][:12]}: record into another --out"
            )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        side.write_text(json.dumps(meta, indent=1) + "\n")
    return file


def record(
    path: str | Path | None = None,
    *,
    limit: int | None = None,
    shard: tuple[int, int] = (0, 1),
    testbed: Testbed = RANDOM,
) -> int:
    """Trains and appends every pending run (at most ``limit``); returns how many it added.

    ``shard=(k, n)`` keeps the runs at plan positions ``k, k + n, ...`` only; ``path``
    defaults to the testbed's table.
    """
    path = Path(path) if path is not None else testbed.out
    k, n = shard
    if not 0 <= k < n:
        raise ValueError(f"shard {k}/{n}: K must be in 0..N-1")
    plan = planned_runs(testbed)
    teacher = _teacher_for(testbed, path)
    scores_file = testbed.scores_path(path) if testbed.scores else None
    todo = list(pending(path, plan[k::n], scores_file))
    log.info("%d of %d runs pending -> %s", len(todo), len(plan), path)
    added = 0
    for run in todo[:limit]:
        started = time.perf_counter()
        scores: list[dict[str, Any]] | None = [] if scores_file else None
        rows = train_run(run, teacher, scores)
        if scores is not None:  # first: a run in the table always has its scores line
            # A diverged run has no test scores: an empty line marks it recorded all the same.
            empty = {**dict(zip(KEY, run.key, strict=True)), "labels": [], "scores": []}
            _append_line(scores_file, scores[0] if scores else empty)
        _append(path, rows)
        added += 1
        last = rows[-1]
        log.info(
            "run %s (%s) done in %.0f s: final val image AUROC %s, test %s; %d left",
            run.key,
            run.params,
            time.perf_counter() - started,
            last.get("val_image_auroc"),
            last.get("test_image_auroc"),
            len(todo) - added,
        )
    return added


# ----------------------------------------------------------------------------- made-up tables

MADE_UP_BEST = {"mask_ratio": 0.1, "patch_size": 16, "teacher_layers": (2, 3), "lr": 3.0e-3}


def made_up_quality(p: dict[str, Any]) -> float:
    """A made-up final AUROC: 0.95 at ``MADE_UP_BEST``, lower with every step away from it."""
    best = MADE_UP_BEST
    q = 0.95
    q -= 0.12 * abs(math.log10(p["lr"] / best["lr"]))
    q -= 0.1 * abs(p["mask_ratio"] - best["mask_ratio"])
    q -= 0.03 * (p["patch_size"] != best["patch_size"])
    q -= 0.03 * (tuple(p["teacher_layers"]) != best["teacher_layers"])
    return float(q)


def made_up_rows(
    *,
    epochs: int = 12,
    seeds: Sequence[int] = SEEDS,
    categories: Sequence[str] = CATEGORIES,
    configs: Sequence[int] | None = None,
    crossing: bool = False,
) -> Any:
    """A curve table with known answers, in this module's format (tests, replay timing).

    Each curve rises from 0.5 towards ``made_up_quality`` (plus noise of sd 0.002), which is
    also its test value. ``crossing``: early values rank configurations in reverse of their
    final values, so early stopping keeps the wrong ones.
    """
    import numpy as np
    import pandas as pd

    rows = []
    grid = configurations()
    for i in configs if configs is not None else range(len(grid)):
        p = grid[i]
        q = made_up_quality(p)
        for category in categories:
            for seed in seeds:
                noise = np.random.default_rng([i, seed, len(category)]).normal(0, 0.002, epochs)
                for e in range(1, epochs + 1):
                    if crossing:  # early: 1.5 - q (reversed), converging to q at the end
                        w = (e - 1) / max(epochs - 1, 1)
                        v = (1 - w) * (1.5 - q) + w * q
                    else:
                        v = 0.5 + (q - 0.5) * (1 - math.exp(-e / 2))
                    row = {
                        **_key_columns(Run(i, p, category, seed)),
                        "epoch": e,
                        **{f"val_{m}": v + noise[e - 1] for m in METRICS},
                        "loss": 1.0 / e,
                        "seconds": 1.0,
                        "status": "ok",
                    }
                    if e == epochs:
                        row.update({f"test_{m}": q for m in METRICS})
                    rows.append(row)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--testbed", choices=sorted(TESTBEDS), default="random", help="which table to record"
    )
    parser.add_argument("--out", type=Path, default=None, help="curve table (CSV)")
    parser.add_argument("--limit", type=int, default=None, help="stop after N new runs")
    parser.add_argument(
        "--shard", default="0/1", metavar="K/N", help="record plan positions K, K+N, ... only"
    )
    args = parser.parse_args(argv)
    try:
        k, n = (int(x) for x in args.shard.split("/"))
    except ValueError:
        parser.error(f"--shard {args.shard!r}: expected K/N, e.g. 0/2")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    record(args.out, limit=args.limit, shard=(k, n), testbed=TESTBEDS[args.testbed])


if __name__ == "__main__":
    main()
