"""Replays recorded learning curves through the project's real search stack, in simulated time.

``python -m benchmarks.replay --seeds 30 --json OUT.json`` replays every strategy in
``STRATEGIES`` (samplers random / TPE / GP / CMA-ES x FIFO / ASHA with grace period, reduction
factor and validation interval swept / async Hyperband with 3 brackets / median stopping; the
rung metric as the last value, best so far or smoothed; per-category routing; a grace period
of 3 rounds (``_g3``); categories as a fidelity (``_seq``, ``_cats``); confirmation runs after
every shippable search strategy (``_confirmKxS``)) for 30 search seeds each over the curve
table of ``benchmarks/curves.py``; how a search is simulated (and
how sampled points map to recorded configurations) is in ``benchmarks/replay_sim.py``.

Outcome of a search: its incumbent is what ``search.results.best_trials`` would pick at that
moment (the best reported objective among trials that ran every round); its *test* value is
the recorded held-out test AUROC of that run (the mean over categories). Target: the best
configuration's test AUROC in the table (mean over its seeds) minus 0.01 (and 0.02);
``epochs_to_target`` is the cost spent when the incumbent first reaches it (model-epochs; an
unreached search seed counts as infinitely many; quantiles are empirical, no interpolation,
and an infinite one prints as null). Per-category strategies have their own target: the mean
over categories of each category's best. ``trained`` (and ``trained_0.02``): the fraction of
searches that trained a run at the target to the end at all, the most any pick among their
trials could reach (``reached`` below it: validation picked another run).

Also written: ``oracle`` (the early-stopping strategies replayed on ``CurveTable.oracle``,
whose early values rank runs as the final ones do: the ideal bound of early stopping with
that rung structure), ``rank_correlation`` (Spearman, over runs, of the validation value at epoch E
with the final validation and test values: what bounds early stopping), ``warm_start``
(epochs to target with and without ``search.warm_start``) and ``meta``.

Run: ``python -m benchmarks.replay --seeds 30 --json OUT.json`` (``--table`` picks the curve
table, default ``benchmarks/data/curves.csv``; ``--only NAME,...`` a subset of strategies;
``--workers`` processes, default 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.common import ROOT
from benchmarks.replay_sim import (
    SHIPPED,
    CurveTable,
    SearchTrace,
    Strategy,
    simulate,
    sweep_spec,
)

__all__ = [
    "STRATEGIES",
    "DEFAULT_STRATEGY",
    "FIRST_TABLE_DEFAULT",
    "RULES",
    "rank_correlations",
    "run_replay",
    "summarize",
    "warm_start_replay",
]

log = logging.getLogger(__name__)

DEFAULT_TABLE = ROOT / "benchmarks" / "data" / "curves.csv"
TARGET_GAPS = (0.01, 0.02)


def shippable(strategy: Strategy) -> bool:
    """Whether a sweep config can run ``strategy`` (``scheduler.type`` fifo, asha or median,
    the last value as rung metric, one study for all categories, as the demo sweep)."""
    return (
        strategy.scheduler in SHIPPED
        and strategy.rung_metric == "last"
        and not strategy.per_category
    )


CONFIRM_TOP_K = (1, 2, 3)  # the confirmation sizes replayed: search.confirm.top_k
CONFIRM_SEEDS = (1, 2)  # and search.confirm.seeds (the fixed table has 2 fresh seeds a config)
MIN_CONFIRM_SEEDS = 2  # search.confirm.seeds below 2 is refused (no seed spread): not shipped
COVERAGE = 0.9  # the bar: the gain interval covers the true gain in >= 90% of seeds


def _strategies() -> list[Strategy]:
    out = []
    for sampler in ("random", "tpe", "gp", "cmaes"):
        out.append(Strategy(f"fifo_{sampler}", sampler, "fifo"))
        out.append(Strategy(f"asha_{sampler}", sampler, "asha"))
        out.append(Strategy(f"hyperband_{sampler}", sampler, "hyperband", brackets=3))
        out.append(Strategy(f"median_{sampler}", sampler, "median"))
    # CMA-ES that learns from the trials early stopping ended (search.cmaes_consider_pruned).
    for scheduler in ("asha", "median"):
        out.append(Strategy(f"{scheduler}_cmaes_pruned", "cmaes", scheduler, cmaes_pruned=True))
    # A longer grace period (3 rounds: half the fixed-teacher table's 36 epochs), for curves
    # that cross early.
    for sampler in ("random", "tpe", "gp", "cmaes"):
        for scheduler in ("median", "asha"):
            out.append(Strategy(f"{scheduler}_{sampler}_g3", sampler, scheduler, grace_period=3))
    # Categories as a fidelity (train.category_order=sequential): a trial trains its categories
    # one after another and reports the mean over those started; stopping by global round is
    # then epoch and category stopping combined (_seq: a round every 6 epochs) or pure
    # successive halving over categories (_cats: one round per category, the table's epochs).
    seq = "sequential"
    for sampler in ("random", "tpe", "gp", "cmaes"):
        for scheduler in ("median", "asha"):
            out.append(
                Strategy(f"{scheduler}_{sampler}_seq", sampler, scheduler, category_order=seq)
            )
            out.append(
                Strategy(
                    f"{scheduler}_{sampler}_cats",
                    sampler,
                    scheduler,
                    reduction_factor=2,
                    eval_every=0,
                    category_order=seq,
                )
            )
    # Confirmation runs (search.confirm: top_k x seeds) after every shippable base strategy;
    # their cost counts in every epoch figure (``confirm_sizes`` picks a base's sizes).
    bases = [s for s in out if shippable(s) and not s.cmaes_pruned]
    for base in bases:
        for k in CONFIRM_TOP_K:
            for n in CONFIRM_SEEDS:
                name = f"{base.name}_confirm{k}x{n}"
                out.append(dataclasses.replace(base, name=name, confirm_top_k=k, confirm_seeds=n))
    for sampler in ("random", "tpe"):
        for every, grace, rf in ((6, 1, 2), (6, 2, 3), (3, 1, 3), (3, 2, 3), (1, 1, 3), (1, 3, 3)):
            out.append(
                Strategy(
                    f"asha_{sampler}_e{every}_g{grace}_rf{rf:g}",
                    sampler,
                    "asha",
                    grace,
                    rf,
                    eval_every=every,
                )
            )
        for rung in ("best", "smoothed"):
            out.append(Strategy(f"asha_{sampler}_{rung}", sampler, "asha", rung_metric=rung))
        out.append(Strategy(f"fifo_{sampler}/per_category", sampler, "fifo", per_category=True))
        out.append(Strategy(f"asha_{sampler}/per_category", sampler, "asha", per_category=True))
    return out


STRATEGIES: dict[str, Strategy] = {s.name: s for s in _strategies()}
# What the production sweep configs run: GP without early stopping, then the best configuration
# and the baseline again with 2 fresh seeds: `python -m benchmarks.evidence --rule reach` on all
# 48 configurations of the fixed-teacher curves, seeds 0-29, reported on seeds 130-229. The
# first rule (--rule epochs) had picked "median_tpe_cats_confirm1x2" on them (on the first 26
# configurations "fifo_tpe_confirm1x2", on the first 14 "fifo_gp_confirm1x2"): BENCHMARKS.md
# section 11.
DEFAULT_STRATEGY = "fifo_gp_confirm1x2"
# The rule's pick on the first table (benchmarks/data/curves.csv), the default until the
# fixed-teacher curves; the evidence files of that table name it as their default.
FIRST_TABLE_DEFAULT = "median_cmaes"
# Warm start is measured with the first table's default and with TPE (the sampler that models
# every trial in the study; CMA-ES starts from the source only when it holds 10 finished trials).
WARM_START_STRATEGIES = (FIRST_TABLE_DEFAULT, "median_tpe")
# Replayed on the oracle table too: early stopping at its ideal, against the same reference.
ORACLE_STRATEGIES = (
    "fifo_random",
    "asha_random",
    "asha_tpe",
    "hyperband_random",
    "median_random",
    "median_cmaes",
)


# ----------------------------------------------------------------------------- analysis

FINAL_TOLERANCE = 0.005  # the bar: median final test AUROC within this of the reference


def decisive_target(doc: Mapping[str, Any], reference: str = "fifo_random") -> str:
    """The ``epochs_to_target`` key the comparison uses: the first target (best - 0.01, then
    best - 0.02) that ``reference`` reaches in at least half of the search seeds."""
    keys = [f"epochs_to_target{'' if g == TARGET_GAPS[0] else f'_{g:g}'}" for g in TARGET_GAPS]
    for key in keys:
        if doc[reference].get(key, {}).get("median") is not None:
            return key
    return keys[-1]


RULES = ("reach", "epochs")  # evidence_best's rules: the current one first
# Rule "reach": strategies whose reach of best - 0.01 is within this of the highest count as
# tied on reach (0.05: one or two searches of 30), and the cheaper of them wins.
REACH_SLACK = 0.05


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose from {', '.join(RULES)}")


def evidence_best(
    doc: Mapping[str, Any], reference: str = "fifo_random", rule: str | None = None
) -> str:
    """The shippable strategy a replay document shows best, by a fixed rule.

    Both rules compare at a decisive target: best - 0.01, or best - 0.02 when ``reference``
    reaches best - 0.01 in fewer than half of the search seeds (its median epochs to target is
    then undefined and no ratio against it exists). Eligible: strategies that reach that target
    in at least as many search seeds as ``reference`` and whose median final test AUROC is at
    most ``FINAL_TOLERANCE`` below the reference's. The reference itself is eligible, so a rule
    always names one.

    ``rule="reach"`` (the issue's targets in their order: reach best - 0.01 first, then cost):
    among the eligible strategies that also reach best - 0.01 at least as often as
    ``reference``, those within ``REACH_SLACK`` of the highest reach of best - 0.01; of them the
    fewest median epochs to best - 0.01, then to the decisive target (an unreached median
    counts as infinite), then the higher reach, the lower q75 at the decisive target, the name.

    ``rule="epochs"`` (the first rule, up to the default of 2026-12-06): among the eligible
    strategies the fewest median epochs to the decisive target, then the higher reached
    fraction, the lower q75, the name. Its pick moved with every table size and generalised
    worse than the runner-up each time (BENCHMARKS.md section 11).

    ``rule=None``: the rule the document was written under (``doc["rule"]``; documents from
    before rules were named were written under "epochs").
    """
    rule = rule or doc.get("rule", "epochs")
    _check_rule(rule)
    key = decisive_target(doc, reference)
    suffix = key.removeprefix("epochs_to_target")
    ref = doc[reference]
    reached = f"reached{suffix}"

    def value(q: Any) -> float:
        return math.inf if q is None else float(q)

    def eligible(name: str) -> bool:
        e = doc[name]
        final, ref_final = e["final_test_auroc"]["median"], ref["final_test_auroc"]["median"]
        return (
            e[reached] >= ref[reached]
            and final is not None
            and ref_final is not None
            and final >= ref_final - FINAL_TOLERANCE
            and (rule == "epochs" or e["reached"] >= ref["reached"])
        )

    names = [
        n
        for n in doc
        if n in STRATEGIES
        and shippable(STRATEGIES[n])
        and not STRATEGIES[n].confirm_top_k  # the search; confirm_sizes sizes what follows it
        and eligible(n)
    ]
    by_reach = rule == "reach"
    if by_reach:
        top = max(doc[n]["reached"] for n in names)
        names = [n for n in names if doc[n]["reached"] >= top - REACH_SLACK]
    tally = "reached" if by_reach else reached  # the reach that breaks ties on epochs

    def order(n: str) -> tuple:
        first = (value(doc[n]["epochs_to_target"]["median"]),) if by_reach else ()
        e = doc[n][key]
        return (*first, value(e["median"]), -doc[n][tally], value(e["q75"]), n)

    return min(names, key=order)


def confirm_sizes(doc: Mapping[str, Any], base: str) -> str | None:
    """The confirmation a replay document justifies after the search strategy ``base``.

    Eligible: ``base``'s confirmation variants a sweep can run (``MIN_CONFIRM_SEEDS``) whose
    gain interval covers the true gain in at least ``COVERAGE`` of the searches that have one,
    and whose exported configuration's median final test AUROC is at least ``base``'s (the
    unconfirmed incumbent's). Among them the fewest median epochs in all wins (then the
    name). None: no size is justified.
    """
    ref = doc[base]["final_test_auroc"]["median"]

    def eligible(name: str) -> bool:
        e, interval = doc[name], doc[name].get("confirm_interval")
        final = e["final_test_auroc"]["median"]
        return (
            interval is not None
            and interval["coverage"] >= COVERAGE
            and final is not None
            and ref is not None
            and final >= ref
        )

    names = [
        n
        for n in doc
        if n in STRATEGIES
        and STRATEGIES[n].confirm_top_k
        and STRATEGIES[n].confirm_seeds >= MIN_CONFIRM_SEEDS
        and n == f"{base}_confirm{STRATEGIES[n].confirm_top_k}x{STRATEGIES[n].confirm_seeds}"
        and eligible(n)
    ]
    if not names:
        return None
    return min(names, key=lambda n: (doc[n]["epochs_total"]["median"] or math.inf, n))


def _quantiles(values: Sequence[float]) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=float)
    out: dict[str, float | None] = {}
    for name, q in (("median", 0.5), ("q25", 0.25), ("q75", 0.75)):
        # Empirical quantiles (no interpolation): defined with unreached (infinite) seeds.
        v = float(np.quantile(arr, q, method="inverted_cdf"))
        out[name] = None if math.isinf(v) or math.isnan(v) else round(v, 4)
    return out


def summarize(traces: Sequence[SearchTrace], best: float) -> dict[str, Any]:
    """The per-strategy entry of the JSON output (see ``INTERFACE.md``)."""
    out: dict[str, Any] = {}
    # One run per trial is the objective (per-category searches have no single run).
    single = bool(traces) and all(r.category is None for t in traces for r in t.trials)
    for gap in TARGET_GAPS:
        spent = [t.epochs_to(best - gap) for t in traces]
        suffix = "" if gap == TARGET_GAPS[0] else f"_{gap:g}"
        out[f"epochs_to_target{suffix}"] = _quantiles(spent)
        out[f"reached{suffix}"] = round(float(np.mean([not math.isinf(s) for s in spent])), 4)
        if single:
            # Searches that trained a run at the target to the end at all: the most any pick
            # among their trials could reach.
            hit = [
                any(r.state == "done" and r.test >= best - gap - 1e-12 for r in t.trials)
                for t in traces
            ]
            out[f"trained{suffix}"] = round(float(np.mean(hit)), 4)
    if single:
        # Which configurations the searches trained to the end, and exported: per
        # configuration the number of searches (what a sampler explores, and what validation
        # then picks among those).
        done = [{r.config for r in t.trials if r.state == "done"} for t in traces]
        trained = Counter(c for configs in done for c in configs)
        exported = Counter(t.final_config for t in traces if t.final_config is not None)
        out["configs"] = {
            "trained": {str(c): n for c, n in sorted(trained.items())},
            "exported": {str(c): n for c, n in sorted(exported.items())},
        }
    out["final_test_auroc"] = _quantiles([t.final_test for t in traces])
    # The exported configuration's seed-mean test value: its quality without its seed's luck.
    out["final_true_test_auroc"] = _quantiles([t.final_true_test for t in traces])
    out["epochs_total"] = _quantiles([t.epochs for t in traces])
    gained = [t for t in traces if t.confirm_gain is not None]
    if gained:
        # The confirmation's 95% gain interval against the true gain (seed means of the table).
        lows, highs = (np.array([t.confirm_gain[i] for t in gained]) for i in (1, 2))
        truth = np.array([t.true_gain for t in gained])
        covered = (lows - 1e-12 <= truth) & (truth <= highs + 1e-12)
        out["confirm_interval"] = {
            "intervals": len(gained),
            "searches": len(traces),
            "coverage": round(float(np.mean(covered)), 4),
            "beyond_noise": round(float(np.mean(lows > 0)), 4),
            "true_gain_positive": round(float(np.mean(truth > 0)), 4),
            "width": _quantiles(highs - lows),
        }
    gens = [t.cma_generations for t in traces if t.cma_generations is not None]
    if gens:
        out["cma_generations"] = _quantiles(gens)
    return out


def rank_correlations(table: CurveTable, epochs: Iterable[int]) -> dict[str, dict[str, float]]:
    """Spearman correlation over runs of the value at each epoch with the final values.

    Per category: ``{"val@E": rho(val at E, final val), "test@E": rho(val at E, final
    test)}``; diverged runs are left out. This bounds what early stopping can save.
    """
    out: dict[str, dict[str, float]] = {}
    for category in table.categories:
        keys = [k for k in table.val if k[1] == category and len(table.val[k]) == table.epochs]
        if len(keys) < 3:
            continue
        final_val = pd.Series([table.val[k][-1] for k in keys])
        final_test = pd.Series([table.test[k] for k in keys])
        row = {}
        for e in epochs:
            if 1 <= e <= table.epochs:
                at = pd.Series([table.val[k][e - 1] for k in keys])
                row[f"val@{e}"] = round(float(at.corr(final_val, method="spearman")), 3)
                row[f"test@{e}"] = round(float(at.corr(final_test, method="spearman")), 3)
        out[category] = row
    return out


def run_replay(
    table: CurveTable,
    strategies: Sequence[Strategy],
    *,
    seeds: int,
    num_trials: int = 24,
    max_concurrent: int = 2,
    n_startup_trials: int = 4,
    categories: Sequence[str] | None = None,
    workers: int = 1,
    progress: Callable[[str], None] = log.info,
    seed_offset: int = 0,
    rule: str = RULES[0],
) -> dict[str, Any]:
    """Replays every strategy for ``seeds`` search seeds; returns the JSON document.

    The search seeds are ``seed_offset .. seed_offset + seeds - 1``, the same for every
    strategy (and a trial's training seed is drawn from the search seed and its number, so
    strategies that sample alike replay the same runs). ``workers`` > 1 replays strategies
    in that many processes (each search is sequential). ``rule``: ``evidence_best``'s rule
    for the document's ``best``.
    """
    _check_rule(rule)
    search_seeds = range(seed_offset, seed_offset + seeds)
    categories = list(categories or table.categories)
    out: dict[str, Any] = {}
    best = {
        False: table.best_test(categories),
        True: table.best_test(categories, per_category=True),
    }
    jobs = [
        (strategy, table, search_seeds, num_trials, max_concurrent, n_startup_trials, categories)
        for strategy in strategies
    ]
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")  # no forked copy of a half-imported Ray
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_quiet) as pool:
            results = pool.map(_replay_strategy, jobs)
            done = dict(zip((s.name for s in strategies), results, strict=True))
    else:
        _quiet()
        done = {s.name: _replay_strategy(job) for s, job in zip(strategies, jobs, strict=True)}
    for strategy in strategies:
        traces, seconds = done[strategy.name]
        out[strategy.name] = summarize(traces, best[strategy.per_category])
        out[strategy.name]["cpu_seconds"] = round(seconds, 2)
        progress(f"{strategy.name}: {json.dumps(out[strategy.name])}")
    out["default"] = DEFAULT_STRATEGY
    out["rule"] = rule
    if "fifo_random" in out:
        out["best"] = evidence_best(out)
        out["confirm_best"] = confirm_sizes(out, out["best"])
    out["meta"] = {
        "table": {
            "configs": len(table.configs(categories)),
            "categories": categories,
            "epochs": table.epochs,
            "runs": len(table.val),
        },
        "targets": {f"best-{g:g}": round(best[False] - g, 4) for g in TARGET_GAPS},
        # The ceiling of any search that picks by validation (see render_markdown).
        "best_by_validation": dict(
            zip(("config", "test"), _rounded(table.best_by_validation(categories)), strict=True)
        ),
        "best_test": round(best[False], 4),
        "targets_per_category": {f"best-{g:g}": round(best[True] - g, 4) for g in TARGET_GAPS},
        "seeds": seeds,
        "search_seeds": [search_seeds[0], search_seeds[-1]] if seeds else [],
        # The table replayed (main adds its path): its categories and training seeds.
        "curves": {
            "categories": table.categories,
            "seeds": sorted({s for _, _, s in table.val}),
            "configs": len(table.params),
            "runs": len(table.val),
        },
        "num_trials": num_trials,
        "max_concurrent": max_concurrent,
        "n_startup_trials": n_startup_trials,
        "cost_unit": "model-epochs",
    }
    # The last epoch's test@E: how well the final validation value itself ranks runs by test.
    epochs = sorted({1, 2, 3, 4, 6, 9, 12, 18, 24, 30, table.epochs})
    out["rank_correlation"] = rank_correlations(table, epochs)
    return out


def _seed_range(meta: Mapping[str, Any]) -> str:
    first, last = (meta.get("search_seeds") or [0, meta["seeds"] - 1])[:2]
    return f"seeds {first}-{last}"


def _rounded(pair: tuple[int, float]) -> tuple[int, float]:
    return pair[0], round(pair[1], 4)


def _quiet() -> None:
    """One torch thread (GPSampler) and no per-trial Optuna warnings in replay processes."""
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.disable_default_handler()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _replay_strategy(job: tuple) -> tuple[list[SearchTrace], float]:
    strategy, table, seeds, num_trials, max_concurrent, n_startup_trials, categories = job
    started = time.process_time()
    traces = [
        simulate(
            strategy,
            table,
            seed=s,
            num_trials=num_trials,
            max_concurrent=max_concurrent,
            n_startup_trials=n_startup_trials,
            categories=categories,
        )
        for s in seeds
    ]
    return traces, time.process_time() - started


def warm_start_replay(
    table: CurveTable,
    *,
    seeds: int,
    strategy: str = FIRST_TABLE_DEFAULT,
    num_trials: int = 24,
    max_concurrent: int = 2,
    n_startup_trials: int = 4,
    seed_offset: int = 0,
) -> dict[str, Any]:
    """Epochs to target with and without ``search.warm_start``, through ``make_searcher``.

    Two cases: the source is the same sweep run with another search seed (same categories),
    and, per category, a sweep of another category (each category alone; the source is the
    other category's sweep). Each source is a real experiment directory (``sweep.json`` and
    its study journal) written by a replayed search; its cost is not counted.
    """
    from search.config import SPEC_FILE
    from search.samplers import study_storage

    base = STRATEGIES[strategy]
    cats = table.categories
    kw = {
        "num_trials": num_trials,
        "max_concurrent": max_concurrent,
        "n_startup_trials": n_startup_trials,
    }
    cases: dict[str, tuple[list[str], list[str] | None]] = {"all": (cats, cats)}
    for k in cats:
        others = [c for c in cats if c != k]
        if others and table.configs([k]) and table.configs(others[:1]):
            cases[k] = ([k], others[:1])
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="replay-warm-") as tmp:
        for case, (target, source_cats) in cases.items():
            cold, warm = [], []
            for s in range(seed_offset, seed_offset + seeds):
                src_seed = s + 1000
                src = Path(tmp) / f"{case.replace('/', '-')}-{s}"
                spec = sweep_spec(
                    base,
                    table=table,
                    categories=source_cats,
                    seed=src_seed,
                    extra=[f"name={src.name}", f"storage={tmp}"],
                    **kw,
                )
                src.mkdir()
                (src / SPEC_FILE).write_text(json.dumps(spec.to_dict()))
                simulate(
                    base,
                    table,
                    seed=src_seed,
                    categories=source_cats,
                    storage=study_storage(src),
                    experiment_dir=src,
                    extra=[f"name={src.name}"],
                    **kw,
                )
                cold.append(simulate(base, table, seed=s, categories=target, **kw))
                warm.append(
                    simulate(
                        base,
                        table,
                        seed=s,
                        categories=target,
                        extra=[f"search.warm_start=[{src}]"],
                        **kw,
                    )
                )
            best = table.best_test(target)
            label = "other_seed" if case == "all" else f"{case}_from_{source_cats[0]}"
            out[f"{strategy}/cold/{case}"] = summarize(cold, best)
            out[f"{strategy}/warm/{label}"] = summarize(warm, best)
    return out


def load_table(path: str | Path = DEFAULT_TABLE, metric: str = "image_auroc") -> CurveTable:
    """The complete runs of a recorded curve table."""
    from benchmarks.curves import load_curves, load_scores

    frame = load_curves(path)
    if frame.empty:
        raise SystemExit(f"{path}: no complete run recorded yet (run python -m benchmarks.curves)")
    table = CurveTable.from_frame(frame, metric=metric)
    scores = Path(path).with_suffix(".scores.jsonl")  # the recorder's side file, when kept
    if scores.is_file():
        for key, (labels, values) in load_scores(scores).items():
            if key in table.val and len(labels):
                table.scores[key] = (np.asarray(labels), np.asarray(values, dtype=float))
    return table


def render_markdown(doc: Mapping[str, Any], command: str) -> str:
    """A markdown summary of a replay document (the ``7. Replay`` section of BENCHMARKS.md)."""
    meta = doc["meta"]
    t = meta["table"]
    key = decisive_target(doc)
    suffix = key.removeprefix("epochs_to_target")
    ref = doc["fifo_random"][key]["median"]
    made_up = str(meta.get("source", "")).startswith("made up")
    gap = suffix.lstrip("_") or f"{TARGET_GAPS[0]:g}"
    ceiling = meta.get("best_by_validation")
    lines = [
        *(
            [
                "**Made-up curves** (`--made-up`): a timing and code-path check, no evidence "
                "about MMR or about which strategy to ship.",
                "",
            ]
            if made_up
            else []
        ),
        f"Written by `{command}` on {meta.get('date', '?')}, {meta.get('seconds', '?')} s wall "
        f"({meta.get('workers', 1)} processes; load average {meta.get('load', '?')} at the "
        "start).",
        f"Table: {t['runs']} recorded runs, {t['configs']} configurations with curves on "
        f"{', '.join(t['categories'])}, {t['epochs']} epochs ({meta.get('source', '')}). "
        f"{meta['seeds']} search seeds ({_seed_range(meta)}), {meta['num_trials']} trials per "
        f"study (the first {meta.get('n_startup_trials', 4)} random for a model sampler), "
        f"{meta['max_concurrent']} at a time. Targets: the best configuration's test image "
        f"AUROC {meta.get('best_test', '?')} minus 0.01 ({meta['targets']['best-0.01']}) and "
        f"minus 0.02 ({meta['targets']['best-0.02']}); per-category strategies "
        f"{meta['targets_per_category']['best-0.01']} and "
        f"{meta['targets_per_category']['best-0.02']}. "
        + (
            f"The configuration with the best final validation value (what training every "
            f"configuration fully and picking by validation would ship: config "
            f"{ceiling['config']}) scores {ceiling['test']} on the test half. "
            if ceiling
            else ""
        )
        + "Cost in model-epochs. Ratio = fifo_random's median epochs to the decisive target / "
        f"the strategy's (> 1: fewer epochs); decisive target: best - {gap} (best - 0.02 "
        "replaces best - 0.01 when fifo_random reaches the latter in under half of the seeds).",
        "",
        "| strategy | epochs to best - 0.01: median [q25, q75] | reached | epochs to best - "
        "0.02: median [q25, q75] | reached | ratio | final test AUROC: median [q25, q75] | "
        "epochs in all: median | CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(q: Mapping[str, Any] | None) -> str:
        return f"{q['median']} [{q['q25']}, {q['q75']}]" if q else "-"

    def cells(e: Mapping[str, Any], ref_median: float | None) -> str:
        """Both targets' epochs and reach, the ratio and the final test AUROC of one row."""
        med = e[key]["median"]
        ratio = f"{ref_median / med:.2f}x" if ref_median and med else "-"
        return (
            f"{fmt(e['epochs_to_target'])} | {e['reached']} | "
            f"{fmt(e.get('epochs_to_target_0.02'))} | {e.get('reached_0.02', '-')} | {ratio} | "
            f"{fmt(e['final_test_auroc'])}"
        )

    names = [k for k, v in doc.items() if isinstance(v, dict) and "epochs_to_target" in v]
    names.sort(
        key=lambda n: (doc[n][key]["median"] or math.inf, -doc[n].get(f"reached{suffix}", 0))
    )
    for name in names:
        e = doc[name]
        mark = " (default)" if name == doc.get("default") else ""
        total = (e.get("epochs_total") or {}).get("median", "-")
        lines.append(
            f"| `{name}`{mark} | {cells(e, ref)} | {total} | {e.get('cpu_seconds', '-')} |"
        )
    trained = {n: doc[n][f"trained{suffix}"] for n in names if f"trained{suffix}" in doc[n]}
    if trained:
        lines += [
            "",
            f"Searches that trained a run at best - {gap} to the end at all (the most any pick "
            "among their trials could reach; reached / trained: how often validation picked "
            "it): " + "; ".join(f"`{n}` {v}" for n, v in trained.items()) + ".",
        ]
    gens = {n: doc[n]["cma_generations"] for n in names if doc[n].get("cma_generations")}
    if gens:
        lines += [
            "",
            "CMA-ES generations completed per search (median [q25, q75]): "
            + "; ".join(f"`{n}` {fmt(q)}" for n, q in gens.items())
            + ".",
        ]
    intervals = {n: doc[n]["confirm_interval"] for n in names if doc[n].get("confirm_interval")}
    if intervals:
        lines += [
            "",
            "Confirmation's gain interval (the service's 95% bootstrap over seeds and test "
            "images, from the recorded test scores) against the true gain (the difference of "
            "the two configurations' seed-mean test AUROCs in the table), in the searches "
            "whose export is not the baseline:",
            "",
            "| strategy | intervals / searches | coverage | above 0 (beyond noise) | true gain "
            "> 0 | width: median [q25, q75] |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| `{n}` | {c['intervals']} / {c['searches']} | {c['coverage']} | "
            f"{c['beyond_noise']} | {c['true_gain_positive']} | {fmt(c['width'])} |"
            for n, c in intervals.items()
        ]
    if doc.get("best"):
        eligible = (
            "among the strategies a sweep config can run, those that reach the decisive "
            "target in at least as many seeds as `fifo_random` with a median final test AUROC "
            f"at most {FINAL_TOLERANCE} below its"
        )
        if doc.get("rule", "epochs") == "epochs":
            how = f"rule `epochs`: {eligible}, the fewest median epochs to that target"
        else:
            how = (
                f"rule `reach`: {eligible} and best - 0.01 in at least as many, those within "
                f"{REACH_SLACK} of the highest reach of best - 0.01, the fewest median epochs "
                "to best - 0.01, then to the decisive target"
            )
        lines += [
            "",
            f"Evidence picks `{doc['best']}` (`benchmarks.replay.evidence_best`, {how}); the "
            f"shipped default is `{doc.get('default')}`.",
        ]
        if "confirm_best" in doc:
            sizes = doc["confirm_best"]
            lines.append(
                f"Confirmation after `{doc['best']}` (`benchmarks.replay.confirm_sizes`: the "
                f"variants whose gain interval covers the true gain in >= {COVERAGE:.0%} of "
                "the searches and whose median final test AUROC is at least the unconfirmed "
                "search's, the fewest epochs in all): "
                + (f"`{sizes}`." if sizes else "none justified (among those replayed).")
            )
    corr = doc.get("rank_correlation") or {}
    if corr:
        epochs = list(next(iter(corr.values())))
        lines += [
            "",
            "Spearman rank correlation over runs of the validation image AUROC at epoch E with "
            "the final validation (val@E) and final test (test@E) values:",
            "",
            "| category | " + " | ".join(epochs) + " |",
            "|---|" + "---|" * len(epochs),
        ]
        for category, row in corr.items():
            lines.append(f"| {category} | " + " | ".join(str(row[k]) for k in epochs) + " |")
    oracle = doc.get("oracle") or {}
    if oracle:
        ref_ideal = oracle["fifo_random"][key]["median"]
        lines += [
            "",
            "Ideal early stopping: the same strategies replayed on the oracle table (every "
            "validation value replaced by the run's final one, so rung values rank runs exactly "
            "as the final values do). Ratio against `fifo_random` on the same oracle table "
            "(which neither stops early nor models values: the same as on the real table):",
            "",
            "| strategy (oracle curves) | epochs to best - 0.01: median [q25, q75] | reached | "
            "epochs to best - 0.02: median [q25, q75] | reached | ratio | final test AUROC: "
            "median [q25, q75] |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [f"| `{name}` | {cells(e, ref_ideal)} |" for name, e in oracle.items()]
    warm = doc.get("warm_start") or {}
    if warm:
        lines += [
            "",
            "Warm start (`search.warm_start`; the source sweep's own epochs not counted):",
            "",
            "| search | epochs to target: median [q25, q75] | reached | final test AUROC |",
            "|---|---|---|---|",
        ]
        for name, e in warm.items():
            lines.append(
                f"| `{name}` | {fmt(e['epochs_to_target'])} | {e['reached']} | "
                f"{fmt(e['final_test_auroc'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    parser.add_argument(
        "--made-up",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="replay a made-up table of the full grid instead (curves.made_up_rows; timing)",
    )
    parser.add_argument("--markdown", type=Path, default=None, help="write a summary here")
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--strategies",
        "--only",
        dest="strategies",
        default="",
        help="comma-separated strategy names ('default': the shipped one; empty: all)",
    )
    parser.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        metavar="K",
        help="search seeds K .. K + seeds - 1 (defaults are chosen on 0-29: report on others)",
    )
    parser.add_argument("--trials", type=int, default=24, help="trials per search (per study)")
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument(
        "--n-startup-trials",
        type=int,
        default=4,
        help="search.n_startup_trials (random trials before a model samples; sweeps use 10)",
    )
    parser.add_argument("--categories", default="", help="comma-separated (default: all)")
    parser.add_argument(
        "--whole-configs",
        action="store_true",
        help="replay only configurations recorded with every seed on every category",
    )
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--rule",
        choices=RULES,
        default=RULES[0],
        help="evidence_best's rule for the document's pick (epochs: the first rule)",
    )
    parser.add_argument(
        "--warm-seeds",
        type=int,
        default=None,
        help="seeds of the warm-start comparison (default: --seeds; 0 skips it)",
    )
    parser.add_argument(
        "--oracle-seeds",
        type=int,
        default=None,
        help="seeds of the ideal early-stopping bound (default: --seeds; 0 skips it)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("ray", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    names = [DEFAULT_STRATEGY if n == "default" else n for n in args.strategies.split(",") if n]
    names = list(dict.fromkeys(names)) or list(STRATEGIES)
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    if "fifo_random" not in names:
        names.insert(0, "fifo_random")  # the reference is always part of the output
    if args.made_up:
        from benchmarks.curves import made_up_rows

        table = CurveTable.from_frame(made_up_rows(epochs=args.made_up))
        source = f"made up: benchmarks.curves.made_up_rows(epochs={args.made_up})"
    else:
        table = load_table(args.table)
        source = str(args.table)
        if args.whole_configs:
            table = table.whole()
    started = time.perf_counter()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    replay_kw = {
        "num_trials": args.trials,
        "max_concurrent": args.concurrent,
        "n_startup_trials": args.n_startup_trials,
        "workers": args.workers,
        "categories": [c for c in args.categories.split(",") if c] or None,
        "seed_offset": args.seed_offset,
    }
    doc = run_replay(
        table, [STRATEGIES[n] for n in names], seeds=args.seeds, rule=args.rule, **replay_kw
    )
    oracle_seeds = args.seeds if args.oracle_seeds is None else args.oracle_seeds
    if oracle_seeds:
        oracle = [STRATEGIES[n] for n in ORACLE_STRATEGIES]
        ideal = run_replay(table.oracle(), oracle, seeds=oracle_seeds, **replay_kw)
        doc["oracle"] = {n: ideal[n] for n in ORACLE_STRATEGIES}
    warm_seeds = args.seeds if args.warm_seeds is None else args.warm_seeds
    if warm_seeds:
        doc["warm_start"] = {}
        for name in WARM_START_STRATEGIES:
            doc["warm_start"].update(
                warm_start_replay(
                    table,
                    seeds=warm_seeds,
                    strategy=name,
                    num_trials=args.trials,
                    max_concurrent=args.concurrent,
                    seed_offset=args.seed_offset,
                )
            )
    doc["meta"].update(
        seconds=round(time.perf_counter() - started, 1),
        source=source,
        curves={**doc["meta"]["curves"], "path": source, "whole_configs": args.whole_configs},
        workers=args.workers,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        load=" / ".join(f"{x:.1f}" for x in load) if load else None,
    )
    text = json.dumps(doc, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    if args.markdown:
        command = "python -m benchmarks.replay " + " ".join(argv or sys.argv[1:])
        args.markdown.write_text(render_markdown(doc, command))
    print(text)


if __name__ == "__main__":
    main()
