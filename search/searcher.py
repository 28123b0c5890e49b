"""Optuna studies behind Ray Tune: PRUNED bookkeeping, one study per category.

Ray's ``OptunaSearch`` tells Optuna that a trial stopped early by ASHA is COMPLETE with its
low-rung value, so TPE learns from partial results as if they were final. ``StudySearch``
records such trials as PRUNED (Optuna then ranks them by their intermediate values, as its own
pruners do). ``PerCategorySearch`` runs one such study per category inside a single Tuner.
The samplers, the study journal and the warm-start trials are in ``search.samplers``.
"""

from __future__ import annotations

import copy
import logging
import math
import posixpath
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import pyarrow.fs as pafs
from optuna.storages import JournalStorage
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from search.config import OBJECTIVE_METRICS, SweepSpec, load_spec
from search.contract import OBJECTIVE, ROUNDS_KEY, planned_trials
from search.samplers import (  # BaselineFirstGridSampler: older pickles' path
    BaselineFirstGridSampler,  # noqa: F401
    load_warm_trials,
    make_sampler,
    study_storage,
    warm_trials,
)
from search.storage import resumed_experiment
from spaces import Space

__all__ = [
    "StudySearch",
    "PerCategorySearch",
    "RelocatingGenerator",
    "RetryingLimiter",
    "make_searcher",
]

log = logging.getLogger(__name__)

SHARE_TOP_K = 3  # share_across_categories: a study's top-k trials are tried by the others


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that records early-stopped trials as PRUNED and marks the baseline.

    The first trial of a study is the base config (enqueued); its config carries
    ``baseline: True``. Trial configs hold dotted training-config keys only (plus metadata
    keys ``baseline``, ``category`` and ``study_trial``), never Optuna branch names.

    With several ``objectives`` the study is multi-objective (one direction per metric) and
    is told each metric's final value. Optuna 5 rejects ``Trial.report`` in multi-objective
    studies, so a stopped trial is recorded PRUNED without intermediate values; its last
    reported metrics are kept in the user attribute ``metrics``, as for every finished trial.
    With ``guards`` (``SweepSpec.guard_violations``) every finished trial gets one Optuna
    constraint per guarded metric (``Trial.set_constraint``; > 0: infeasible), measured
    against the baseline trial; while the baseline has not finished, a trial counts as
    feasible for the sampler (status and export judge it again against the finished baseline).
    """

    def __init__(
        self,
        space: Space,
        *,
        baseline: Mapping[str, Any],
        study_name: str,
        storage: JournalStorage,
        sampler: optuna.samplers.BaseSampler,
        category: str | None = None,
        objectives: Sequence[tuple[str, str]] | None = None,
        guards: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, float]] | None = None,
    ) -> None:
        # A grid sampler puts the baseline first itself (see BaselineFirstGridSampler).
        enqueue = not isinstance(sampler, optuna.samplers.GridSampler)
        multi = objectives is not None and len(objectives) > 1
        super().__init__(
            space=space.define,
            metric=[m for m, _ in objectives] if multi else OBJECTIVE,
            mode=[d for _, d in objectives] if multi else "max",
            points_to_evaluate=[dict(baseline)] if enqueue else None,
            sampler=sampler,
            study_name=study_name,
            storage=storage,
        )
        self._category = category
        self._baseline_params = dict(baseline)
        self._baseline_taken = False
        self._enqueue = enqueue
        self._multi = multi
        self._guards = guards

    def _suggest_from_define_by_run_func(self, func: Any, ot_trial: Any) -> dict:
        # Keep the define-by-run return (config keys), not Optuna's parameter names.
        return func(ot_trial)

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if config is None:
            return None
        ot_trial = self._ot_trials[trial_id]
        config = dict(config)
        # The enqueued base config comes back as the first trial with exactly its params.
        is_baseline = not self._baseline_taken and ot_trial.params == self._baseline_params
        self._baseline_taken |= is_baseline
        if is_baseline:
            ot_trial.set_user_attr("baseline", True)  # in the journal: survives a resume
        config["baseline"] = is_baseline
        config["study_trial"] = ot_trial.number
        if self._category is not None:
            config["category"] = self._category
        return config

    @property
    def metric(self) -> str:
        # What Tune checks every result for: the scalar reported every round. With several
        # objectives the study's own metrics (self._metric) include ones reported only at the
        # end (latency_ms), which Tune's strict metric check would reject in earlier rounds.
        return OBJECTIVE

    @property
    def mode(self) -> str:
        return "max"  # of OBJECTIVE (the study keeps one direction per objective)

    def _finished_in_study(self, trial_id: str) -> bool:
        """Whether the study already recorded this trial's end.

        After a driver was killed between the study's record and Tune's state snapshot, Tune
        runs the trial again; Optuna refuses any update of a finished trial.
        """
        number = self._ot_trials[trial_id].number
        return self._ot_study.get_trials(deepcopy=False)[number].state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._reopen_if_retried(trial_id)
        if trial_id in self._ot_trials and self._finished_in_study(trial_id):
            return
        if self._multi:  # Optuna keeps no intermediate values for several objectives
            return
        if trial_id in self._completed_trials:
            super().on_trial_result(trial_id, result)  # Ray's warning: a result after the end
            return
        self._report(trial_id, result[OBJECTIVE], int(result["training_iteration"]))

    def _report(self, trial_id: str, value: float, step: int) -> None:
        """``Trial.report``, where a step reported again replaces the earlier value.

        A trial restarted from a checkpoint older than its last round trains the rounds
        since then again and reports their steps again; Optuna's ``report`` would keep the
        first attempt's value (and warn), which a PRUNED trial's ranking would then use.
        """
        ot_trial = self._ot_trials[trial_id]
        if step in ot_trial.storage.get_trial(ot_trial._trial_id).intermediate_values:
            ot_trial.storage.set_trial_intermediate_value(ot_trial._trial_id, step, float(value))
        else:
            ot_trial.report(value, step)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if not error and result and OBJECTIVE in result:
            self._reopen_if_retried(trial_id)
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if self._finished_in_study(trial_id):
            self._completed_trials.add(trial_id)
            return
        if error:
            # FAIL whatever it reported before: OptunaSearch would record an errored trial
            # that passes a result as COMPLETE with that value.
            super().on_trial_complete(trial_id, result=None, error=True)
            return
        done = result and result.get("training_iteration", 0) >= result.get(ROUNDS_KEY, 0)
        if result:
            self._record_metrics(self._ot_trials[trial_id], result)
        if result and OBJECTIVE in result and not done:
            # Stopped early by the scheduler: PRUNED, valued by its last intermediate value.
            # Tune passes the result that triggered the stop here, not to on_trial_result.
            ot_trial = self._ot_trials[trial_id]
            if not self._multi:
                self._report(trial_id, result[OBJECTIVE], int(result["training_iteration"]))
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        if self._multi:
            values = [result.get(m) for m in self._metric] if result else None
            if values is None or any(v is None for v in values):
                self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.FAIL)
            else:
                self._ot_study.tell(self._ot_trials[trial_id], values)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)

    def _reopen_if_retried(self, trial_id: str) -> None:
        """Gives a failed trial that reports again (``resume --retry-failed``) a new record.

        Optuna never changes a finished trial, so the FAIL record stays and the retry runs as
        a new RUNNING trial with the same params, marked the way Optuna's own
        ``RetryHeartbeatStaleTrialCallback`` marks retries (system attrs ``failed_trial``: the
        original number, ``retry_history``), so
        ``RetryHeartbeatStaleTrialCallback.retried_trial_number`` finds the original.
        """
        if trial_id not in self._completed_trials or trial_id not in self._ot_trials:
            return
        trials = self._ot_study.get_trials(deepcopy=False)
        failed = trials[self._ot_trials[trial_id].number]
        if failed.state != TrialState.FAIL:
            return  # a finished trial reporting again: ignored, as OptunaSearch does
        history = [*failed.system_attrs.get("retry_history", []), failed.number]
        self._ot_study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.RUNNING,
                params=failed.params,
                distributions=failed.distributions,
                user_attrs=failed.user_attrs,
                system_attrs={"failed_trial": history[0], "retry_history": history},
            )
        )
        # Only this driver writes the study: the record just added is its last trial.
        retry = self._ot_study.get_trials(deepcopy=False)[-1]
        self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, retry._trial_id)
        self._completed_trials.discard(trial_id)
        log.info(
            "study %s: trial %d runs again as trial %d",
            self._study_name,
            failed.number,
            retry.number,
        )

    def _record_metrics(self, ot_trial: optuna.Trial, result: Mapping[str, Any]) -> None:
        """Stores the trial's reported metrics and, with guards, its constraints."""
        metrics = {m: float(result[m]) for m in OBJECTIVE_METRICS if result.get(m) is not None}
        ot_trial.set_user_attr("metrics", metrics)
        if self._guards is None:
            return
        base = self._baseline_metrics()
        if base is None and ot_trial.user_attrs.get("baseline"):
            base = metrics
        for metric, excess in self._guards(metrics, base or {}).items():
            # Unknown (baseline unfinished, metric not reported yet): feasible for now.
            ot_trial.set_constraint(f"guard_{metric}", 0.0 if math.isnan(excess) else excess)

    def _baseline_metrics(self) -> dict[str, float] | None:
        for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("baseline"):
                return dict(t.user_attrs.get("metrics", {}))
        return None

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.relocate()
        self.fail_orphans()

    def relocate(self) -> None:
        """Points a restored searcher at the journal of the experiment being resumed.

        The saved state holds the journal's path at save time: resuming a copied experiment
        would otherwise write its trials into the original's journal.
        """
        current = resumed_experiment()
        if current is None:
            return
        self._storage = study_storage(current[1])
        self._ot_study = optuna.load_study(
            study_name=self._study_name, storage=self._storage, sampler=self._sampler
        )
        self._ot_trials = {
            tid: optuna.trial.Trial(self._ot_study, t._trial_id)
            for tid, t in self._ot_trials.items()
        }

    def fail_orphans(self) -> int:
        """Marks RUNNING study trials that no Tune trial owns (driver killed) as FAIL."""
        owned = {t.number for t in self._ot_trials.values()}
        orphans = [
            t.number
            for t in self._ot_study.get_trials(deepcopy=False)
            if t.state == TrialState.RUNNING and t.number not in owned
        ]
        for number in orphans:
            self._ot_study.tell(number, state=TrialState.FAIL)
        owned_baseline = any(t.params == self._baseline_params for t in self._ot_trials.values())
        if self._enqueue and self._baseline_taken and not owned_baseline:
            # The baseline's Tune trial was never checkpointed: run the base config again.
            self._baseline_taken = False
            self._ot_study.enqueue_trial(self._baseline_params)
        if orphans:
            log.info("study %s: marked %d orphaned trial(s) FAIL", self._study_name, len(orphans))
        return len(orphans)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study


class PerCategorySearch(Searcher):
    """One ``StudySearch`` per category, scheduled concurrently in one Tuner.

    New trials go to the category with the fewest trials so far, so that every study
    progresses at the same pace; each study stops suggesting after ``num_trials``.
    """

    def __init__(
        self, searchers: Mapping[str, StudySearch], num_trials: int, *, share: bool = False
    ) -> None:
        super().__init__(metric=OBJECTIVE, mode="max")
        self._searchers = dict(searchers)
        self._num_trials = num_trials
        self._started = {c: 0 for c in self._searchers}
        self._owner: dict[str, str] = {}
        self._share = share

    def suggest(self, trial_id: str) -> dict | None:
        open_ = [c for c in self._searchers if self._started[c] < self._num_trials]
        if not open_:
            return Searcher.FINISHED
        category = min(open_, key=lambda c: self._started[c])
        config = self._searchers[category].suggest(trial_id)
        if config is None:
            return None
        self._started[category] += 1
        self._owner[trial_id] = category
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._owner:
            self._searchers[self._owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id not in self._owner:
            return
        category = self._owner[trial_id]
        searcher = self._searchers[category]
        searcher.on_trial_complete(trial_id, result, error)
        if getattr(self, "_share", False) and not error:
            self._share_top(category, searcher._ot_trials.get(trial_id))

    def _share_top(self, category: str, trial: Any) -> None:
        """Enqueues a fully trained trial into the other studies if it is in its study's top
        ``SHARE_TOP_K`` (each study then trains it on its own category: values of different
        categories are never mixed in one study)."""
        if trial is None:
            return
        study = self._searchers[category].study
        frozen = study.get_trials(deepcopy=False)[trial.number]
        if frozen.state != TrialState.COMPLETE:
            return
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if sum(t.value > frozen.value for t in done) >= SHARE_TOP_K:
            return
        for other, searcher in self._searchers.items():
            if other != category and self._started[other] < self._num_trials:
                searcher.study.enqueue_trial(frozen.params, skip_if_exists=True)

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        return True  # the sub-searchers were built with their metric and mode

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        for searcher in self._searchers.values():
            searcher.relocate()
            searcher.fail_orphans()

    @property
    def studies(self) -> dict[str, optuna.Study]:
        return {c: s.study for c, s in self._searchers.items()}


class RelocatingGenerator(SearchGenerator):
    """Tune's ``SearchGenerator`` whose new trials write where the resumed experiment now is.

    Tune restores the generator's experiment spec with the storage it was saved with, and
    moves only the trials it restores to the experiment's new place (Ray 2.60): a trial that
    a resumed copy (or a moved experiment) creates would write its results and checkpoints
    into the original. On restore, within ``search.storage.resuming``, the spec's storage is
    pointed at the experiment being resumed.
    """

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        current = resumed_experiment()
        if current is not None and self._experiment is not None:
            self._experiment.spec["storage"] = relocated(
                self._experiment.spec.get("storage"), current[0]
            )


def relocated(storage: Any, location: str) -> Any:
    """A copy of Tune's ``StorageContext`` for the experiment at ``location`` (path or URI)."""
    if storage is None:
        return None
    fs, path = pafs.FileSystem.from_uri(location)
    path = path.rstrip("/")
    if (storage.storage_fs_path, storage.experiment_dir_name) == (
        posixpath.dirname(path),
        posixpath.basename(path),
    ):
        return storage
    moved = copy.copy(storage)
    moved.storage_filesystem = fs
    moved.storage_fs_path = posixpath.dirname(path)
    moved.experiment_dir_name = posixpath.basename(path)
    return moved


class PlannedTrials(RelocatingGenerator):
    """Tune's ``SearchGenerator`` whose trial budget is the experiment's ``sweep.json``.

    Tune restores a resumed sweep's trial count from its own saved state, so a sweep could
    never grow. This generator reads ``planned_trials`` from the stored spec whenever Tune
    sets its budget (a new sweep, a restore) and keeps the larger: ``sweep --resume --set
    search.num_trials=N`` rewrites the spec, and the restored sweep runs the extra trials.
    """

    def __init__(self, searcher: Searcher, *, location: str) -> None:
        super().__init__(searcher)
        self._location = location

    def _follow_spec(self) -> None:
        planned = planned_trials(load_spec(self._location))
        if planned > self._total_samples:
            self._total_samples = planned
            self._finished = False

    def add_configurations(self, experiments: Any) -> None:
        super().add_configurations(experiments)
        self._follow_spec()

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        current = resumed_experiment()
        if current is not None:  # read the spec of the experiment resumed, not the original
            self._location = current[0]
        self._follow_spec()


class RetryingLimiter(ConcurrencyLimiter):
    """Ray's ``ConcurrencyLimiter`` that also follows failed trials re-run by a resume.

    The limiter forgets a trial when it errors and drops the completion of any trial it does
    not count as live, so a trial re-run by ``Tuner.restore(resume_errored=True)``
    (``launch.py resume --retry-failed``) would never tell the study how it ended. A trial
    that reports is live again; a completion of a trial the limiter forgot still reaches the
    searcher, which ignores trials it did not suggest or already closed.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._limit_concurrency and trial_id not in self.live_trials:
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1
        super().on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if self._limit_concurrency and trial_id not in self.live_trials:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
            return
        super().on_trial_complete(trial_id, result=result, error=error)


def make_searcher(
    spec: SweepSpec, experiment_dir: Path, *, storage: optuna.storages.BaseStorage | None = None
) -> StudySearch | PerCategorySearch:
    """The searcher of a sweep: one study, or one per category (``objective.per_category``).

    ``storage`` replaces the experiment's study journal (the replay benchmark keeps its
    thousands of simulated studies in memory).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own table
    space = spec.space
    baseline = space.baseline(spec.base)
    storage = storage if storage is not None else study_storage(experiment_dir)
    warm = [load_warm_trials(source) for source in spec.sweep.search.warm_start]
    o = spec.sweep.objective
    common: dict[str, Any] = {
        "baseline": baseline,
        "storage": storage,
        "objectives": o.objectives,
        "guards": spec.guard_violations if o.guard else None,
    }
    n_objectives = len(o.objectives)
    if not o.per_category:
        trials = warm_trials(space, [t for source in warm for t in _all(source)], n_objectives)
        searcher = StudySearch(
            space,
            study_name=spec.sweep.name,
            sampler=make_sampler(spec, space, warm=trials),
            **common,
        )
        searcher.study.add_trials(trials)
        return searcher
    searchers = {}
    for i, cat in enumerate(spec.categories):
        # A per-category source gives each category its own study's trials; otherwise all.
        old = [t for source in warm for t in source.get(cat, _all(source))]
        trials = warm_trials(space, old, n_objectives)
        searchers[cat] = StudySearch(
            space,
            study_name=f"{spec.sweep.name}/{cat}",
            sampler=make_sampler(spec, space, seed_offset=i, warm=trials),
            category=cat,
            **common,
        )
        searchers[cat].study.add_trials(trials)
    return PerCategorySearch(
        searchers, spec.sweep.search.num_trials, share=spec.sweep.search.share_across_categories
    )


def _all(source: Mapping[str | None, list]) -> list:
    return [t for trials in source.values() for t in trials]
