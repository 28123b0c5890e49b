"""The replay's simulated execution back-end: curve table, nearest-config mapping, event loop.

Only the execution back-end is replaced (as in Syne Tune's simulator back-end): the Optuna
samplers (``search.samplers.make_sampler``), ``StudySearch`` / ``PerCategorySearch`` with their
PRUNED bookkeeping (``search.searcher.make_searcher``), ``ResumableASHA``, ``ResumableMedian``
and ``PerCategoryScheduler`` (``search.scheduler.make_scheduler``) and Ray Tune's async Hyperband
(several brackets) make every decision; ``simulate``
plays Ray Tune's controller: it asks the searcher for trials, "trains" each from the table of
recorded curves (``benchmarks/curves.py``), and passes each validation round to the scheduler
and the searcher in the order and with the arguments Tune's ``TuneController`` uses (a result
the scheduler answers STOP goes to ``searcher.on_trial_complete`` only). Not replayed: the
duplicate end-of-trial result Tune re-sends to a FIFO trial, and PAUSE (no scheduler used
here pauses), nor ``objective.guard`` (the table's curves hold only the objective's metric,
so the replay runs the sweeps without guards). ``tuner_decisions`` runs the same search
through a real ``Tuner`` for the cross-check.

Simulated time: one epoch of one trial takes one time unit; ``max_concurrent`` trials run at
once, so results arrive interleaved as in a real sweep (ties: the earlier-started trial
first). Cost is counted in *model-epochs*: a trial that trains two categories in lockstep
costs two per epoch, a per-category trial one, and so does a trial that trains its categories
one after another (``Strategy.category_order: sequential``, ``train.category_order``): its
global rounds go through the categories in the sweep's order, each round reporting the mean
over the categories started so far (the finished ones at their last value), so a trial
stopped after its first category has cost that category's epochs only.

Mapping to the table: a trial's sampled parameters map to the nearest recorded configuration
that has curves for the trial's categories, by distance in the space's unit cube (numbers
scaled to [0, 1] over their range, on a log scale for ``log: true``; a categorical mismatch
counts 1 per parameter); ties go to the lower configuration index. Each trial replays one of
the configuration's recorded training seeds, drawn from (search seed, the trial's number in
its study), so training noise is replayed and a real Tuner draws the same.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.common import ROOT
from search.contract import OBJECTIVE, ROUNDS_KEY, planned_trials

__all__ = [
    "CurveTable",
    "Incumbent",
    "Nearest",
    "SHIPPED",
    "SearchTrace",
    "Strategy",
    "TrialRecord",
    "draw_seed",
    "simulate",
    "sweep_spec",
    "tuner_decisions",
]

SWEEP = ROOT / "configs" / "demo_sweep.yaml"
SHIPPED = ("fifo", "asha", "median")  # the schedulers a sweep config runs (scheduler.type)


# ----------------------------------------------------------------------------- the table


@dataclass
class CurveTable:
    """Recorded curves: per (configuration, category, seed) the validation values per epoch.

    Built from the rows of ``benchmarks.curves`` (``from_frame``); tests build small
    made-up tables the same way.
    """

    params: dict[int, dict[str, Any]]  # config -> {param name: value} (the space's keys)
    val: dict[tuple[int, str, int], np.ndarray]  # run -> val metric per epoch (1-based: [0])
    test: dict[tuple[int, str, int], float]  # run -> test metric at the end (nan: diverged)
    epochs: int
    metric: str = "image_auroc"
    # run -> (labels, scores) of its test images (the recorder's side file; may be empty):
    # what the confirmation's bootstrap interval needs.
    scores: dict[tuple[int, str, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, *, metric: str = "image_auroc") -> CurveTable:
        """Reads the rows of ``benchmarks.curves.load_curves`` (or a made-up table alike)."""
        from benchmarks.curves import PARAMS

        params: dict[int, dict[str, Any]] = {}
        val: dict[tuple[int, str, int], np.ndarray] = {}
        test: dict[tuple[int, str, int], float] = {}
        epochs = int(frame["epoch"].max())
        for (config, category, seed), run in frame.groupby(["config", "category", "seed"]):
            run = run.sort_values("epoch")
            first = run.iloc[0]
            params[int(config)] = {p: _param_value(p, first[p]) for p in PARAMS}
            key = (int(config), str(category), int(seed))
            values = run[f"val_{metric}"].to_numpy(dtype=float)
            diverged = "status" in run and (run["status"] == "diverged").any()
            if diverged:
                values = values[~np.isnan(values)]
            val[key] = values
            last = run.iloc[-1].get(f"test_{metric}", float("nan"))
            test[key] = float("nan") if diverged else float(last)
        return cls(params=params, val=val, test=test, epochs=epochs, metric=metric)

    @property
    def categories(self) -> list[str]:
        return sorted({c for _, c, _ in self.val})

    def seeds(self, config: int, categories: Sequence[str]) -> list[int]:
        """The training seeds recorded for ``config`` on every one of ``categories``."""
        sets = [{s for c, cat, s in self.val if c == config and cat == k} for k in categories]
        return sorted(set.intersection(*sets)) if sets else []

    def configs(self, categories: Sequence[str]) -> list[int]:
        """Configurations with at least one seed recorded on every one of ``categories``."""
        return sorted(c for c in self.params if self.seeds(c, categories))

    def _seed_mean(self, config: int, categories: Sequence[str], value: Any) -> float:
        """Mean over ``categories`` of the mean over recorded seeds of ``value(run key)``."""
        seeds = self.seeds(config, categories)
        per_category = [np.mean([value((config, k, s)) for s in seeds]) for k in categories]
        return float(np.mean(per_category))

    def final_test(self, config: int, categories: Sequence[str]) -> float:
        """Mean over ``categories`` of the seed-mean test value (nan if any run diverged)."""
        return self._seed_mean(config, categories, self.test.__getitem__)

    def oracle(self) -> CurveTable:
        """The same runs, every validation value replaced by the run's final one.

        Early values then rank runs exactly as the final values do (Spearman 1 at every
        epoch): early stopping at its ideal, the bound no rung metric can beat.
        """
        val = {k: np.full(len(v), v[-1]) if len(v) else v for k, v in self.val.items()}
        return dataclasses.replace(self, val=val)

    def whole(self) -> CurveTable:
        """Only the configurations recorded with every seed on every category of the table.

        A table still being recorded ends in a partly recorded configuration; replayed, it
        would have fewer seeds than the rest (a confirmation without fresh seeds)."""
        cats, seeds = self.categories, sorted({s for _, _, s in self.val})
        keep = {c for c in self.params if all((c, k, s) in self.val for k in cats for s in seeds)}
        return dataclasses.replace(
            self,
            params={c: p for c, p in self.params.items() if c in keep},
            val={k: v for k, v in self.val.items() if k[0] in keep},
            test={k: v for k, v in self.test.items() if k[0] in keep},
            scores={k: v for k, v in self.scores.items() if k[0] in keep},
        )

    def final_val(self, config: int, categories: Sequence[str]) -> float:
        """Mean over ``categories`` of the seed-mean final validation value."""
        return self._seed_mean(config, categories, lambda key: self.val[key][-1])

    def best_by_validation(self, categories: Sequence[str]) -> tuple[int, float]:
        """The configuration with the best final validation value, and its test value: what a
        search that trained every configuration fully and picked by validation would ship
        (diverged configurations left out; ties: the lower index)."""
        cats = list(categories)
        finished = [c for c in self.configs(cats) if not np.isnan(self.final_test(c, cats))]
        best = max(finished, key=lambda c: (self.final_val(c, categories), -c))
        return best, self.final_test(best, categories)

    def best_test(self, categories: Sequence[str], per_category: bool = False) -> float:
        """The best achievable final test value: one config for all, or one per category."""
        if per_category:
            return float(np.mean([self.best_test([k]) for k in categories]))
        values = [self.final_test(c, categories) for c in self.configs(categories)]
        return float(np.nanmax(values))


def _param_value(name: str, raw: Any) -> Any:
    if name == "teacher_layers":
        return tuple(int(x) for x in str(raw).split("-"))
    if name == "patch_size":
        return int(raw)
    return float(raw)


class Nearest:
    """Maps sampled parameters to the nearest recorded configuration (see the module doc)."""

    def __init__(self, table: CurveTable, space: Any, categories: Sequence[str]) -> None:
        self._configs = table.configs(categories)
        if not self._configs:
            raise ValueError(f"the curve table has no configuration recorded on {categories}")
        self._space = space
        self._table = table
        self._cache: dict[tuple, int] = {}

    def __call__(self, sampled: Mapping[str, Any]) -> int:
        key = tuple(sorted((k, _hashable(v)) for k, v in sampled.items()))
        if key not in self._cache:
            self._cache[key] = min(
                self._configs, key=lambda c: (self._distance(sampled, self._table.params[c]), c)
            )
        return self._cache[key]

    def _distance(self, sampled: Mapping[str, Any], recorded: Mapping[str, Any]) -> float:
        total = 0.0
        for p in self._space.params:
            name = p.key.rsplit(".", 1)[-1]
            if p.key not in sampled or name not in recorded:
                continue
            a, b = sampled[p.key], recorded[name]
            if p.type == "categorical":
                total += float(_hashable(a) != _hashable(b))
            elif p.type in ("float", "int"):
                lo, hi, x, y = p.low, p.high, float(a), float(b)
                if p.log:
                    lo, hi, x, y = (math.log(v) for v in (lo, hi, x, y))
                total += ((x - y) / (hi - lo)) ** 2 if hi > lo else 0.0
        return total


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


# ----------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Strategy:
    """One way to search: a sampler, a scheduler and how the rung metric is formed."""

    name: str
    sampler: str = "random"  # tpe | gp | cmaes | random
    scheduler: str = "fifo"  # fifo | asha | hyperband | median
    grace_period: int = 1  # in evaluation rounds
    reduction_factor: float = 3.0
    min_samples: int = 3  # median only: other trials at a round before it stops one
    brackets: int = 1  # hyperband only
    rung_metric: str = "last"  # last | best (best so far) | smoothed (EMA, weight 0.5)
    eval_every: int = 6  # epochs per evaluation round (the tiny config's value; 0: the
    # table's epochs, one round per category's training)
    per_category: bool = False
    cmaes_pruned: bool = False  # CMA-ES learns from stopped trials (search.cmaes_consider_pruned)
    confirm_top_k: int = 0  # search.confirm.top_k (0: no confirmation runs)
    confirm_seeds: int = 0  # search.confirm.seeds (at most the table's other seeds of a config)
    category_order: str = "lockstep"  # train.category_order: lockstep | sequential

    def overrides(self, *, epochs: int | None = None) -> list[str]:
        """Sweep overrides of the project's own sampler/scheduler settings (``epochs``: the
        table's, which ``eval_every: 0`` stands for)."""
        every = self.eval_every or epochs
        if every is None:
            raise ValueError(f"{self.name}: eval_every 0 needs the table's epochs")
        return [
            f"search.sampler={self.sampler}",
            f"search.cmaes_consider_pruned={str(self.cmaes_pruned).lower()}",
            f"scheduler.type={self.scheduler if self.scheduler in SHIPPED else 'fifo'}",
            f"scheduler.grace_period={self.grace_period}",
            f"scheduler.reduction_factor={self.reduction_factor}",
            f"scheduler.min_samples={self.min_samples}",
            f"objective.per_category={str(self.per_category).lower()}",
            f"train.eval_every={every}",
            f"train.category_order={self.category_order}",
            # The replay runs confirmation itself (``confirm``), whatever the sweep config says.
            "search.confirm.top_k=0",
        ]


# ----------------------------------------------------------------------------- the event loop


@dataclass(eq=False)
class SimTrial:
    """What Ray's schedulers read from a ``Trial``: its id, config and status."""

    trial_id: str
    config: dict[str, Any]
    status: str = "RUNNING"
    is_saving: bool = False

    def __str__(self) -> str:
        return self.trial_id


class SimController:
    """The part of Tune's controller the schedulers call back into."""

    def __init__(self) -> None:
        self.live: list[SimTrial] = []

    def get_live_trials(self) -> list[SimTrial]:
        return list(self.live)

    def stop_trial(self, trial: SimTrial) -> None:  # pragma: no cover - sync Hyperband only
        raise NotImplementedError("the replay runs only schedulers that do not pause trials")


@dataclass
class TrialRecord:
    """One replayed trial: what it ran and how far."""

    trial_id: str
    config: int
    seed: int
    category: str | None
    start: float
    rounds: int = 0
    state: str = "running"  # running | done | stopped | failed
    objective: float | None = None  # last reported (possibly smoothed) objective
    baseline: bool = False
    test: float = math.nan  # the replayed run's test value (mean over its categories)


@dataclass
class SearchTrace:
    """A replayed search: its trials, cost and the incumbent's test value over time."""

    trials: list[TrialRecord] = field(default_factory=list)
    epochs: float = 0.0  # model-epochs spent in all
    # (model-epochs spent, test value of the incumbent) at each change of incumbent
    incumbents: list[tuple[float, float]] = field(default_factory=list)
    final_test: float = float("nan")
    study_states: dict[str, int] = field(default_factory=dict)  # Optuna trial states at the end
    cma_generations: int | None = None  # CMA-ES generations its studies completed (max)
    final_config: int | None = None  # the exported configuration (single study)
    final_true_test: float = float("nan")  # its seed-mean test value: its quality, not its luck
    # Confirmation with recorded test scores: the service's gain interval over the baseline
    # ``(mean, lo, hi)`` and the true gain (the table's seed means); None without.
    confirm_gain: tuple[float, float, float] | None = None
    true_gain: float | None = None

    def epochs_to(self, target: float) -> float:
        """Model-epochs spent when the incumbent's test value first reached ``target``."""
        for spent, value in self.incumbents:
            if value >= target - 1e-12:
                return spent
        return math.inf

    def decisions(self) -> list[tuple[int, int, str]]:
        """``(config, rounds, state)`` of each trial in start order (for cross-checks)."""
        return [(t.config, t.rounds, t.state) for t in self.trials]


class Incumbent:
    """The configuration a search would export at each moment, and its held-out test value.

    As ``search.results.best_trials`` picks: per study, among trials that ran every round
    (``done``; a stopped or failed trial never counts), the best reported validation
    objective; a tie keeps the earlier trial. The test value only rides along: it is what the
    replay scores, never what it picks by. With several studies (per-category) the value is
    the mean over studies, defined once every study has an incumbent.
    """

    def __init__(self, studies: Sequence[str | None]) -> None:
        self._studies = set(studies)
        self._best: dict[str | None, tuple[float, float]] = {}

    def offer(
        self, study: str | None, *, state: str, objective: float | None, test: float
    ) -> bool:
        """Offers a finished trial; True when it became its study's incumbent."""
        if state != "done" or objective is None:
            return False
        if study in self._best and objective <= self._best[study][0]:
            return False
        self._best[study] = (objective, test)
        return True

    @property
    def test(self) -> float:
        if set(self._best) != self._studies:
            return float("nan")
        return float(np.mean([test for _, test in self._best.values()]))


def sweep_spec(
    strategy: Strategy,
    *,
    table: CurveTable,
    categories: Sequence[str],
    num_trials: int,
    max_concurrent: int,
    seed: int,
    n_startup_trials: int,
    extra: Sequence[str] = (),
) -> Any:
    """The demo sweep resolved with the strategy's settings and the table's epochs."""
    from search.resolve import resolve_sweep

    overrides = [
        *strategy.overrides(epochs=table.epochs),
        f"search.num_trials={num_trials}",
        f"search.max_concurrent={max_concurrent}",
        f"search.seed={seed}",
        f"search.n_startup_trials={n_startup_trials}",
        f"train.epochs={table.epochs}",
        f"data.categories=[{','.join(categories)}]",
        # The table holds one validation metric per run; guards need others (not replayed).
        "objective.guard={}",
        *extra,
    ]
    return resolve_sweep(SWEEP, overrides, categories=list(categories))


def _scheduler(strategy: Strategy, spec: Any, location: str) -> Any:
    """The project's scheduler for fifo/asha/median; Ray Tune's own for hyperband."""
    from ray.tune.schedulers import AsyncHyperBandScheduler

    from search.scheduler import PerCategoryScheduler, make_scheduler

    if strategy.scheduler in SHIPPED:
        return make_scheduler(spec, location)

    def make(_category: str | None) -> Any:
        return AsyncHyperBandScheduler(
            time_attr="training_iteration",
            metric=OBJECTIVE,
            mode="max",
            max_t=spec.base.num_rounds,
            grace_period=strategy.grace_period,
            reduction_factor=strategy.reduction_factor,
            brackets=strategy.brackets,
        )

    if strategy.per_category:
        return PerCategoryScheduler(make, list(spec.categories))
    return make(None)


def simulate(
    strategy: Strategy,
    table: CurveTable,
    *,
    seed: int,
    num_trials: int = 24,
    max_concurrent: int = 2,
    n_startup_trials: int = 4,
    categories: Sequence[str] | None = None,
    extra: Sequence[str] = (),
    storage: Any = None,
    experiment_dir: Path | None = None,
) -> SearchTrace:
    """Replays one search of ``strategy`` with search seed ``seed`` over ``table``."""
    import optuna
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher

    from search.searcher import make_searcher

    # Ray's async Hyperband draws each trial's bracket from NumPy's global generator.
    np.random.seed(seed)
    categories = list(categories or table.categories)
    spec = sweep_spec(
        strategy,
        table=table,
        categories=categories,
        num_trials=num_trials,
        max_concurrent=max_concurrent,
        seed=seed,
        n_startup_trials=n_startup_trials,
        extra=extra,
    )
    with tempfile.TemporaryDirectory(prefix="replay-") as tmp:
        location = str(experiment_dir or tmp)
        searcher = make_searcher(
            spec,
            Path(location),
            storage=storage if storage is not None else optuna.storages.InMemoryStorage(),
        )
        scheduler = _scheduler(strategy, spec, location)
        trace = _loop(
            strategy,
            spec,
            table,
            searcher,
            scheduler,
            seed,
            categories,
            TrialScheduler,
            Searcher.FINISHED,
        )
    if strategy.confirm_top_k and not strategy.per_category:
        confirm(trace, table, categories, strategy=strategy, search_seed=seed)
    if trace.final_config is not None:
        trace.final_true_test = table.final_test(trace.final_config, categories)
    return trace


def confirm(
    trace: SearchTrace,
    table: CurveTable,
    categories: Sequence[str],
    *,
    strategy: Strategy,
    search_seed: int,
) -> None:
    """Replays ``search.confirm`` after a search: the top-k finished configurations (by the
    search's objective, one trial each) and the baseline train again with fresh seeds (the
    configuration's recorded seeds other than the one its search trial replayed, at most
    ``confirm_seeds``), each for every epoch; the export is the best mean final validation
    over those seeds (the baseline competes; ties keep it). The search's answer exists only
    once confirmation ends, so the trace's incumbent is set once, at the total cost, to the
    exported trial's own test value (as the service exports the search trial's model)."""
    done = [t for t in trace.trials if t.state == "done" and t.objective is not None]
    baseline = [t for t in done if t.baseline][:1]
    picked: list[TrialRecord] = []
    for t in sorted((t for t in done if not t.baseline), key=lambda t: -t.objective):
        if t.config not in {p.config for p in picked}:
            picked.append(t)
        if len(picked) == strategy.confirm_top_k:
            break
    picked += baseline
    if not picked:
        return
    rng = np.random.default_rng([search_seed, 7919])
    cats = list(categories)
    means: dict[int, float] = {}
    seeds: dict[int, list[int]] = {}
    for i, t in enumerate(picked):
        fresh = [s for s in table.seeds(t.config, cats) if s != t.seed] or [t.seed]
        chosen = rng.choice(fresh, size=min(strategy.confirm_seeds, len(fresh)), replace=False)
        seeds[i] = [int(s) for s in chosen]
        finals = []
        for s in chosen:
            curves = [table.val[(t.config, k, int(s))] for k in cats]
            ok = all(len(c) == table.epochs for c in curves)  # a diverged run: -inf
            finals.append(float(np.mean([c[-1] for c in curves])) if ok else -math.inf)
        trace.epochs += len(chosen) * table.epochs * len(cats)
        means[i] = float(np.mean(finals))
    best = max(means, key=lambda i: (means[i], picked[i].baseline))
    pick = picked[best]
    if baseline and not pick.baseline:
        base = picked.index(baseline[0])
        _gain(trace, table, cats, pick, seeds[best], baseline[0], seeds[base], search_seed)
    value = float(np.mean([table.test[(pick.config, k, pick.seed)] for k in cats]))
    trace.incumbents = [(trace.epochs, value)]
    trace.final_test = value
    trace.final_config = pick.config


def _gain(
    trace: SearchTrace,
    table: CurveTable,
    cats: Sequence[str],
    pick: TrialRecord,
    pick_seeds: Sequence[int],
    base: TrialRecord,
    base_seeds: Sequence[int],
    search_seed: int,
) -> None:
    """The service's gain interval (``search.confirm.gain_interval``) of the exported
    configuration over the baseline, from the recorded test scores of their confirmation
    runs (paired in draw order: the table has no common fresh seed), and the true gain it
    estimates: the difference of the two configurations' seed-mean test values."""
    from search.confirm import gain_interval

    n = min(len(pick_seeds), len(base_seeds))
    runs = []
    for config, chosen in ((pick.config, pick_seeds), (base.config, base_seeds)):
        keys = [[(config, k, s) for k in cats] for s in chosen[:n]]
        if not all(key in table.scores for row in keys for key in row):
            return  # no recorded scores (an older table, or a diverged run)
        runs.append([{k[1]: table.scores[k] for k in row} for row in keys])
    trace.confirm_gain = gain_interval(runs[0], runs[1], seed=search_seed)
    trace.true_gain = table.final_test(pick.config, cats) - table.final_test(base.config, cats)


def _loop(
    strategy: Strategy,
    spec: Any,
    table: CurveTable,
    searcher: Any,
    scheduler: Any,
    seed: int,
    categories: list[str],
    ts: Any,
    finished_marker: Any,
) -> SearchTrace:
    per_cat = strategy.per_category
    nearest = (
        {k: Nearest(table, spec.space, [k]) for k in categories}
        if per_cat
        else {None: Nearest(table, spec.space, categories)}
    )
    every, rounds_total = spec.base.train.eval_every, spec.base.num_rounds
    sequential = strategy.category_order == "sequential"
    schedule = round_schedule(
        strategy.category_order, table.epochs, every, 1 if per_cat else len(categories)
    )
    assert len(schedule) == rounds_total, (len(schedule), rounds_total)
    num_samples = planned_trials(spec)
    incumbent = Incumbent(list(categories) if per_cat else [None])
    ctrl = SimController()
    trace = SearchTrace()
    heap: list[tuple[float, int, SimTrial]] = []
    state: dict[str, dict[str, Any]] = {}
    now, started, finished = 0.0, 0, False
    cost_per_epoch = 1 if per_cat or sequential else len(categories)

    def complete(trial: SimTrial, result: dict[str, Any] | None, how: str) -> None:
        st = state[trial.trial_id]
        rec: TrialRecord = st["record"]
        trial.status = "TERMINATED" if how != "failed" else "ERROR"
        ctrl.live.remove(trial)
        if how == "failed":
            scheduler.on_trial_error(ctrl, trial)
            searcher.on_trial_complete(trial.trial_id, error=True)
        else:
            scheduler.on_trial_complete(ctrl, trial, result)
            searcher.on_trial_complete(trial.trial_id, result=result)
        rec.state = how
        if incumbent.offer(rec.category, state=how, objective=rec.objective, test=st["test"]):
            trace.final_config = rec.config if not per_cat else None
            current = incumbent.test
            if not math.isnan(current):
                trace.incumbents.append((trace.epochs, current))

    while True:
        while len(ctrl.live) < spec.sweep.search.max_concurrent and not finished:
            if started >= num_samples:
                finished = True
                break
            trial_id = f"replay_{started:05d}"
            config = searcher.suggest(trial_id)
            if config is None or config == finished_marker:
                finished = config == finished_marker or not ctrl.live
                break
            trial = SimTrial(trial_id, dict(config))
            category = config.get("category")
            cats = [category] if per_cat else categories
            params = {
                k: v for k, v in config.items() if k not in ("baseline", "category", "study_trial")
            }
            cid = nearest[category if per_cat else None](params)
            run_seed = draw_seed(table, cid, cats, seed, config.get("study_trial", started))
            curves = [table.val[(cid, k, run_seed)] for k in cats]
            test = float(np.mean([table.test[(cid, k, run_seed)] for k in cats]))
            record = TrialRecord(
                trial_id,
                cid,
                run_seed,
                category,
                now,
                baseline=bool(config.get("baseline")),
                test=test,
            )
            trace.trials.append(record)
            state[trial_id] = {
                "record": record,
                "curves": curves,
                "test": test,
                "smooth": None,
                "best": -math.inf,
            }
            ctrl.live.append(trial)
            scheduler.on_trial_add(ctrl, trial)
            started += 1
            heapq.heappush(heap, (now + schedule[0][1], started, trial))
        if not heap:
            break
        when, order, trial = heapq.heappop(heap)
        trace.epochs += (when - now) * len(ctrl.live) * cost_per_epoch
        now = when
        st = state[trial.trial_id]
        rec = st["record"]
        rec.rounds += 1
        reached, _ = schedule[rec.rounds - 1]
        raw = round_value(st["curves"], reached)
        if raw is None:  # the recorded run diverged here
            complete(trial, None, "failed")
            continue
        epoch = max(e for e in reached if e)  # the newest category's epoch
        value = _rung_value(strategy.rung_metric, raw, st)
        rec.objective = value
        result = {
            "training_iteration": rec.rounds,
            OBJECTIVE: value,
            ROUNDS_KEY: rounds_total,
            "trial_id": trial.trial_id,
            "epoch": epoch,
        }
        decision = scheduler.on_trial_result(ctrl, trial, result)
        if decision == ts.PAUSE:
            raise NotImplementedError(f"{strategy.name}: the replay cannot pause trials")
        if decision == ts.STOP:
            complete(trial, result, "done" if rec.rounds >= rounds_total else "stopped")
            continue
        searcher.on_trial_result(trial.trial_id, result)
        if rec.rounds >= rounds_total:
            complete(trial, result, "done")
            continue
        heapq.heappush(heap, (now + schedule[rec.rounds][1], order, trial))
    trace.final_test = incumbent.test
    studies = searcher.studies.values() if hasattr(searcher, "studies") else [searcher.study]
    trials = [t for study in studies for t in study.get_trials(deepcopy=False)]
    trace.study_states = dict(Counter(t.state.name for t in trials))
    if strategy.sampler == "cmaes":
        trace.cma_generations = cma_generations(trials)
    return trace


def round_schedule(
    order: str, epochs: int, every: int, num_categories: int
) -> list[tuple[tuple[int, ...], int]]:
    """A trial's evaluation rounds as ``mmr.train.fit`` runs them: per global round, the epoch
    each category has reached (0: not started) and the epochs trained since the previous
    round (simulated time).

    Lockstep: every category at the same epoch; sequential (``train.category_order``): the
    categories one after another, each for every epoch, with its own rounds.
    """
    local = sorted({min(r * every, epochs) for r in range(1, -(-epochs // every) + 1)})
    out: list[tuple[tuple[int, ...], int]] = []
    if order == "lockstep":
        previous = 0
        for epoch in local:
            out.append(((epoch,) * num_categories, epoch - previous))
            previous = epoch
        return out
    if order != "sequential":
        raise ValueError(f"category_order must be lockstep or sequential, got {order!r}")
    for i in range(num_categories):
        previous = 0
        for epoch in local:
            reached = (epochs,) * i + (epoch,) + (0,) * (num_categories - i - 1)
            out.append((reached, epoch - previous))
            previous = epoch
    return out


def round_value(curves: Sequence[np.ndarray], reached: Sequence[int]) -> float | None:
    """Mean over the started categories of their value at the epoch each reached (the
    finished ones at their last); None when a recorded run diverged before it."""
    started = [(c, e) for c, e in zip(curves, reached, strict=True) if e]
    if any(len(c) < e for c, e in started):
        return None
    return float(np.mean([c[e - 1] for c, e in started]))


def cma_generations(trials: Sequence[Any]) -> int:
    """How many generations Optuna's CMA-ES completed in a study: the highest generation it
    sampled a trial from (generation g is sampled once g generations were told)."""
    gens = [v for t in trials for k, v in t.system_attrs.items() if k.endswith("cma:generation")]
    return int(max(gens, default=0))


def draw_seed(
    table: CurveTable, config: int, categories: Sequence[str], search_seed: int, study_trial: int
) -> int:
    """The recorded training seed a trial replays: a function of the search seed and the
    trial's number in its study, so a real Tuner replaying the same search draws the same."""
    seeds = table.seeds(config, categories)
    rng = np.random.default_rng([search_seed, int(study_trial), len(categories)])
    return int(seeds[rng.integers(len(seeds))])


def _rung_value(kind: str, raw: float, st: dict[str, Any]) -> float:
    """The reported objective: the round's value, the best so far, or an EMA (weight 0.5)."""
    if kind == "best":
        st["best"] = max(st["best"], raw)
        return st["best"]
    if kind == "smoothed":
        st["smooth"] = raw if st["smooth"] is None else 0.5 * st["smooth"] + 0.5 * raw
        return st["smooth"]
    return raw


# ----------------------------------------------------------------------------- cross-check


def replay_trial(
    config: dict[str, Any],
    *,
    table: CurveTable,
    strategy: Strategy,
    categories: list[str],
    search_seed: int,
    space_spec: dict[str, Any],
    eval_every: int,
) -> None:
    """A Tune trainable that reports a recorded run instead of training (for cross-checks)."""
    from ray import tune

    from spaces import load_space

    per_cat = strategy.per_category
    cats = [config["category"]] if per_cat else categories
    params = {k: v for k, v in config.items() if k not in ("baseline", "category", "study_trial")}
    cid = Nearest(table, load_space(space_spec), cats)(params)
    run_seed = draw_seed(table, cid, cats, search_seed, config["study_trial"])
    curves = [table.val[(cid, k, run_seed)] for k in cats]
    schedule = round_schedule(strategy.category_order, table.epochs, eval_every, len(cats))
    rounds_total = len(schedule)
    st: dict[str, Any] = {"smooth": None, "best": -math.inf}
    for reached, _ in schedule:
        raw = round_value(curves, reached)
        if raw is None:
            raise RuntimeError("the recorded run diverged")
        value = _rung_value(strategy.rung_metric, raw, st)
        tune.report({OBJECTIVE: value, ROUNDS_KEY: rounds_total, "replay_config": cid})


def tuner_decisions(
    strategy: Strategy,
    table: CurveTable,
    *,
    seed: int,
    num_trials: int,
    storage: str,
    n_startup_trials: int = 4,
    categories: Sequence[str] | None = None,
) -> list[tuple[int, int, str]]:
    """Runs one search through a real ``Tuner`` (one trial at a time) with ``replay_trial``.

    Returns ``(config, rounds, state)`` per trial in the order the studies numbered them,
    comparable with ``simulate(..., max_concurrent=1).decisions()``. Needs ``ray.init()``.
    """
    from ray import tune

    from search.searcher import make_searcher

    categories = list(categories or table.categories)
    spec = sweep_spec(
        strategy,
        table=table,
        categories=categories,
        num_trials=num_trials,
        max_concurrent=1,
        seed=seed,
        n_startup_trials=n_startup_trials,
        extra=[f"name=replay-{strategy.name.replace('/', '-')}-{seed}", f"storage={storage}"],
    )
    location = spec.experiment_location
    trainable = tune.with_parameters(
        replay_trial,
        table=table,
        strategy=strategy,
        categories=categories,
        search_seed=seed,
        space_spec=spec.space_spec,
        eval_every=spec.base.train.eval_every,
    )
    num_samples = planned_trials(spec)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(spec, spec.experiment_dir),
            scheduler=_scheduler(strategy, spec, location),
            num_samples=num_samples,
            max_concurrent_trials=1,
        ),
        run_config=tune.RunConfig(name=spec.sweep.name, storage_path=storage, verbose=0),
    )
    grid = tuner.fit()
    rows = []
    for result in grid:
        config, last = result.config, result.metrics
        rounds = int(last["training_iteration"])
        state = "done" if rounds >= last[ROUNDS_KEY] else "stopped"
        rows.append(
            (
                config.get("category") or "",
                config["study_trial"],
                (int(last["replay_config"]), rounds, state),
            )
        )
    return [decision for _, _, decision in sorted(rows)]
