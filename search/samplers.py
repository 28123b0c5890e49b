"""The Optuna side of a sweep's studies: the configured sampler, the study journal, and the
warm-start trials taken from earlier sweeps (``search.warm_start``).

``search.searcher`` builds the studies behind Ray Tune from these.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from search.config import SweepSpec
from search.contract import JOURNAL_FILE
from spaces import Space, SpaceError

__all__ = [
    "BaselineFirstGridSampler",
    "CMA_SOURCE_MIN",
    "add_warm_trials",
    "cma_source_trials",
    "load_warm_trials",
    "make_sampler",
    "study_storage",
    "warm_trials",
]

log = logging.getLogger(__name__)
# The guards' constraints decide feasibility and the export; CMA-ES does not steer by them (as
# the README says), which Optuna would otherwise warn about after every trial, also in a
# resumed driver whose sampler comes back from the searcher's saved state
# (search.searcher imports this module).
warnings.filterwarnings(
    "ignore", message="Constraints have been set, but CmaEsSampler", category=UserWarning
)


class BaselineFirstGridSampler(optuna.samplers.GridSampler):
    """Grid search whose first trial is the base config's grid point.

    GridSampler shuffles its points and does not count an enqueued trial as a visited point
    (it would run the baseline twice), so instead of enqueueing, the baseline is moved to the
    front: Optuna gives trial ``n`` grid point ``n`` while unvisited points remain.
    """

    def __init__(
        self, search_space: dict[str, list[Any]], *, baseline: Mapping[str, Any], seed: int
    ) -> None:
        super().__init__(search_space, seed=seed)
        point = tuple(baseline[name] for name in self._param_names)
        if point not in self._all_grids:
            raise SpaceError(
                f"the base config {dict(baseline)} is not a point of the grid: "
                "give each parameter a step or choices that include its value"
            )
        i = self._all_grids.index(point)
        self._all_grids[0], self._all_grids[i] = self._all_grids[i], self._all_grids[0]


def make_sampler(
    spec: SweepSpec,
    space: Space,
    seed_offset: int = 0,
    warm: Sequence[optuna.trial.FrozenTrial] = (),
) -> optuna.samplers.BaseSampler:
    """The configured Optuna sampler, its options set explicitly (Optuna 5 changed defaults).

    ``warm``: the warm-start trials the study will hold (``warm_trials``); CMA-ES starts its
    search distribution from them (``cma_source_trials``), the other samplers read them from
    the study."""
    s = spec.sweep.search
    seed = s.seed + seed_offset
    startup = s.n_startup_trials
    if s.sampler == "tpe":
        warnings.filterwarnings(
            "ignore",
            message=".*``group`` is an experimental",
            category=optuna.exceptions.ExperimentalWarning,
        )
        # multivariate+group model conditional spaces jointly; constant_liar keeps parallel
        # workers from sampling the same point while earlier trials still run.
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=startup, multivariate=True, group=True, constant_liar=True
        )
    if s.sampler == "gp":
        # GP models the parameters every trial has; conditional ones (`when:` branches) are
        # sampled at random by design, which Optuna would otherwise warn about every trial.
        # Trials still running are taken into account (Optuna 5's q-batch log EI over them),
        # the part TPE's constant liar plays.
        return optuna.samplers.GPSampler(
            seed=seed, n_startup_trials=startup, warn_independent_sampling=False
        )
    if s.sampler == "cmaes":
        # CMA-ES models the numeric parameters; categorical ones (patch size, stages) are
        # sampled at random by design, which Optuna would otherwise warn about every trial.
        if s.cmaes_consider_pruned:
            warnings.filterwarnings(
                "ignore",
                message=".*``consider_pruned_trials`` is an experimental",
                category=optuna.exceptions.ExperimentalWarning,
            )
        source = cma_source_trials(space, warm)
        if source is not None:
            warnings.filterwarnings(
                "ignore",
                message=".*``source_trials`` is an experimental",
                category=optuna.exceptions.ExperimentalWarning,
            )
        return optuna.samplers.CmaEsSampler(
            seed=seed,
            n_startup_trials=startup,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
            warn_independent_sampling=False,
            source_trials=source,
            consider_pruned_trials=s.cmaes_consider_pruned,
        )
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.sampler == "nsga2":
        # A generation as large as the random start-up phase: the default (50) would leave a
        # sweep of a few dozen trials in its random first generation throughout.
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, startup))
    return BaselineFirstGridSampler(space.grid(), baseline=space.baseline(spec.base), seed=seed)


def study_storage(experiment_dir: Path) -> JournalStorage:
    """Optuna JournalStorage in the experiment dir (a file journal: safe on NFS)."""
    experiment_dir.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(experiment_dir / JOURNAL_FILE)))


WARM_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def load_warm_trials(experiment: str) -> dict[str | None, list[optuna.trial.FrozenTrial]]:
    """The finished (COMPLETE or PRUNED) trials of an earlier sweep, by category.

    Key None holds a single-study sweep's trials; a per-category sweep's studies are keyed
    by their category (study name ``<sweep>/<category>``).
    """
    from search.config import load_spec
    from search.storage import is_uri, pull

    spec = load_spec(experiment).sweep
    local = pull(experiment) if is_uri(experiment) else Path(experiment)
    storage = study_storage(local)
    out: dict[str | None, list[optuna.trial.FrozenTrial]] = {}
    for summary in optuna.get_all_study_summaries(storage):
        name = summary.study_name
        key = name.split("/", 1)[1] if "/" in name else None
        study = optuna.load_study(study_name=name, storage=storage)
        out[key] = [t for t in study.get_trials(deepcopy=False, states=WARM_STATES)]
    if not any(out.values()):
        log.warning("search.warm_start: %s (%s) has no finished trial", experiment, spec.name)
    return out


def add_warm_trials(
    study: optuna.Study, space: Space, trials: list[optuna.trial.FrozenTrial]
) -> int:
    """Adds earlier trials to ``study`` with this space's distributions; returns the count."""
    added = warm_trials(space, trials, len(study.directions))
    study.add_trials(added)
    return len(added)


def warm_trials(
    space: Space, trials: Sequence[optuna.trial.FrozenTrial], n_objectives: int
) -> list[optuna.trial.FrozenTrial]:
    """Earlier trials as new trials of a study of ``space`` with ``n_objectives`` objectives.

    COMPLETE trials keep their value, PRUNED ones their intermediate values (TPE ranks them by
    those, as it ranks its own pruned trials). A trial with a value outside this space (a
    narrower range, a dropped choice) is skipped: TPE would model a point it cannot sample.
    """
    added = []
    for old in trials:
        fixed = optuna.trial.FixedTrial(old.params)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # FixedTrial only warns when out of range
                space.define(fixed)
        except (ValueError, KeyError, UserWarning):
            continue
        if set(fixed.params) != set(old.params):
            continue  # a parameter the new space no longer has (a condition changed)
        done = old.state == TrialState.COMPLETE
        if done and len(old.values) != n_objectives:
            continue  # another number of objectives: its values mean something else here
        added.append(
            optuna.trial.create_trial(
                params=fixed.params,
                distributions=fixed.distributions,
                values=old.values if done else None,
                intermediate_values=dict(old.intermediate_values),
                state=old.state,
                user_attrs={**old.user_attrs, "warm_start": True},
            )
        )
    if len(added) < len(trials):
        log.info("warm start: skipped %d trial(s) outside the space", len(trials) - len(added))
    return added


CMA_SOURCE_MIN = 10  # WS-CMA-ES estimates its start from the best tenth of the source trials


def cma_source_trials(
    space: Space, trials: Sequence[optuna.trial.FrozenTrial]
) -> list[optuna.trial.FrozenTrial] | None:
    """Warm-start trials as Warm Starting CMA-ES (Optuna's ``source_trials``) takes them.

    CMA-ES then starts from a distribution estimated from the best tenth of them instead of
    the centre of the space. It models the numeric parameters only (categorical ones are
    sampled independently), so the trials keep those. None (a cold CMA-ES start) with fewer
    than ``CMA_SOURCE_MIN`` COMPLETE trials, or in a space with conditional parameters:
    CMA-ES models the parameters that all finished trials share, which a conditional one may
    or may not be, and a source that differs from them fails the sampler.
    """
    done = [t for t in trials if t.state == TrialState.COMPLETE and len(t.values) == 1]
    if len(done) < CMA_SOURCE_MIN or any(p.when for p in space.params):
        return None
    numbers = (optuna.distributions.FloatDistribution, optuna.distributions.IntDistribution)
    numeric = {
        name: d
        for name, d in done[0].distributions.items()
        if isinstance(d, numbers) and not d.single()
    }
    if not numeric:
        return None
    return [
        optuna.trial.create_trial(
            params={k: t.params[k] for k in numeric}, distributions=numeric, value=t.value
        )
        for t in done
    ]
