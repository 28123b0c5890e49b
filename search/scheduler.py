"""Trial schedulers: ASHA and median stopping that survive a resume and never stop the
baseline, per-category; ``make_scheduler`` builds a sweep's.

``Tuner.restore`` brings trials and the searcher back but not a scheduler's state, so a resumed
sweep would stop nothing until it refills. ``ResumableASHA`` rebuilds its rungs and
``ResumableMedian`` its per-trial histories from the results on disk the first time it sees a
trial. ``PerCategoryScheduler`` keeps one scheduler per category, so that trials are compared
with trials of the same category only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import (
    AsyncHyperBandScheduler,
    FIFOScheduler,
    MedianStoppingRule,
    TrialScheduler,
)

from search.contract import OBJECTIVE
from search.storage import read_histories, resumed_experiment

if TYPE_CHECKING:
    from search.config import SweepSpec

__all__ = ["ResumableASHA", "ResumableMedian", "PerCategoryScheduler", "make_scheduler"]

log = logging.getLogger(__name__)


class _FromDisk:
    """What both schedulers share: on the first trial they see (after a start or a resume)
    they rebuild their state (``rebuild``) from the trials' results on disk, their category's
    only."""

    _rebuilt = False

    def _from_disk(self, experiment: str, category: str | None) -> None:
        self._experiment = str(experiment)  # a directory or a storage URI
        self._category = category

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if not self._rebuilt:
            self._rebuilt = True
            self.rebuild()
        super().on_trial_add(tune_controller, trial)  # type: ignore[misc]

    def rebuild(self) -> int:
        raise NotImplementedError

    def _recorded(self) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        """``(trial_id, results)`` of this scheduler's category's trials on disk."""
        current = resumed_experiment()
        if current is not None:  # restored from a pickle: the experiment may have moved
            self._experiment = current[0]
        for trial_id, config, results in read_histories(self._experiment):
            if self._category is None or config.get("category") == self._category:
                yield trial_id, results

    def _where(self) -> str:
        return f" [{self._category}]" if self._category is not None else ""


class ResumableASHA(_FromDisk, AsyncHyperBandScheduler):
    """ASHA (one bracket) whose rungs are rebuilt from disk after ``Tuner.restore``.

    The baseline trial is recorded in the rungs like any other but never stopped: every
    report compares the best trial against the fully trained starting point.
    """

    def __init__(
        self,
        *,
        experiment: str,
        metric: str,
        max_t: int,
        grace_period: int,
        reduction_factor: float,
        category: str | None = None,
    ) -> None:
        super().__init__(
            time_attr="training_iteration",
            metric=metric,
            mode="max",
            max_t=max_t,
            grace_period=min(grace_period, max_t),
            reduction_factor=reduction_factor,
            brackets=1,
        )
        self._from_disk(experiment, category)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and trial.config.get("baseline"):
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action

    def rebuild(self) -> int:
        """Records every trial's value at each rung it reached; returns the number recorded."""
        bracket = self._brackets[0]
        count = 0
        for trial_id, results in self._recorded():
            for milestone, recorded in bracket._rungs:
                hit = next(
                    (
                        r
                        for r in results
                        if r.get(self._time_attr, 0) >= milestone and self._metric in r
                    ),
                    None,
                )
                if hit is not None and trial_id not in recorded:
                    recorded[trial_id] = self._metric_op * hit[self._metric]
                    count += 1
        where = self._where()
        if count:
            log.info("ASHA%s: rebuilt %d rung record(s) from %s", where, count, self._experiment)
        for milestone, recorded in bracket._rungs:
            log.debug(
                "ASHA%s: rung at round %g holds trials %s", where, milestone, sorted(recorded)
            )
        return count

    @property
    def rungs(self) -> list[tuple[float, dict[str, float]]]:
        """``[(milestone, {trial_id: value}), ...]`` (values sign-adjusted for max)."""
        return self._brackets[0]._rungs


class ResumableMedian(_FromDisk, MedianStoppingRule):
    """Ray's median stopping rule (Vizier) on evaluation rounds, rebuilt from disk after
    ``Tuner.restore``.

    From round ``grace_period`` on, a trial stops when its best value so far is below the median
    of the other trials' mean values over rounds ``grace_period`` to the current one (trials
    that reached it; at least ``min_samples`` of them). Unlike Ray's rule it never pauses a trial
    for want of samples (a paused trial would train its rounds again when it comes back), keeps
    a round a restarted trial reports again once (the retry's value), does not count a trial's
    last round twice when it completes, and never stops the baseline, whose values still count
    in the medians.
    """

    def __init__(
        self,
        *,
        experiment: str,
        metric: str,
        grace_period: int,
        min_samples: int,
        category: str | None = None,
    ) -> None:
        super().__init__(
            time_attr="training_iteration",
            metric=metric,
            mode="max",
            grace_period=grace_period,
            min_samples_required=min_samples,
            hard_stop=True,
        )
        self._from_disk(experiment, category)
        self._keys: dict[str, Any] = {}  # trial id -> its key in ``self._results``

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        old = self._keys.get(trial.trial_id)
        if old is not None and old is not trial and old in self._results:
            self._results[trial] = self._results.pop(old)  # a restored trial keeps its history
        self._keys[trial.trial_id] = trial

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        t = result.get(self._time_attr)
        if t is not None and self._metric in result and self._results.get(trial):
            kept = [r for r in self._results[trial] if r[self._time_attr] < t]
            self._results[trial] = kept  # a repeated round replaces the earlier attempt's
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and trial.config.get("baseline"):
            self._stopped_trials.discard(trial)
            return TrialScheduler.CONTINUE
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        # Ray appends the final result again: it is the last round, already recorded.
        history = self._results.get(trial)
        if not result or self._metric not in result or self._time_attr not in result:
            return
        if history and history[-1][self._time_attr] >= result[self._time_attr]:
            return
        super().on_trial_complete(tune_controller, trial, result)

    def _on_insufficient_samples(self, tune_controller: Any, trial: Any, time: float) -> str:
        return TrialScheduler.CONTINUE

    def rebuild(self) -> int:
        """Records every trial's reported rounds from disk; returns the number of trials."""
        count = 0
        for trial_id, results in self._recorded():
            rounds = [
                {self._time_attr: r[self._time_attr], self._metric: r[self._metric]}
                for r in results
                if self._time_attr in r and self._metric in r
            ]
            if rounds and trial_id not in self._keys:
                self._results[trial_id] = rounds
                self._keys[trial_id] = trial_id
                count += 1
        where = self._where()
        if count:
            log.info(
                "median stopping%s: rebuilt %d trial histories from %s",
                where,
                count,
                self._experiment,
            )
        log.debug("median stopping%s: holds trials %s", where, sorted(self._keys))
        return count

    def histories(self) -> dict[str, list[float]]:
        """``{trial_id: [value per recorded round]}``."""
        return {
            getattr(key, "trial_id", key): [r[self._metric] for r in results]
            for key, results in self._results.items()
        }


class PerCategoryScheduler(FIFOScheduler):
    """Routes each trial to the scheduler of its ``config["category"]``."""

    def __init__(self, make: Callable[[str], TrialScheduler], categories: list[str]) -> None:
        super().__init__()
        self._subs = {c: make(c) for c in categories}

    def _sub(self, trial: Any) -> TrialScheduler:
        return self._subs[trial.config["category"]]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return all(s.set_search_properties(metric, mode, **spec) for s in self._subs.values())

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._sub(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._sub(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self._sub(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._sub(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._sub(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{c}: {s.debug_string()}" for c, s in self._subs.items())


def make_scheduler(spec: SweepSpec, location: str) -> TrialScheduler:
    """The scheduler of a sweep (``scheduler.type``), one per category when per-category.

    Args:
        spec: the resolved sweep.
        location: where Tune keeps the trials (the experiment dir or its storage URI); the
            resumable schedulers rebuild their state from the results there.
    """
    sc = spec.sweep.scheduler
    if sc.type == "fifo":
        return FIFOScheduler()

    def make(category: str | None) -> ResumableASHA | ResumableMedian:
        if sc.type == "median":
            return ResumableMedian(
                experiment=location,
                metric=OBJECTIVE,
                grace_period=sc.grace_period,
                min_samples=sc.min_samples,
                category=category,
            )
        return ResumableASHA(
            experiment=location,
            metric=OBJECTIVE,
            max_t=spec.base.num_rounds,
            grace_period=sc.grace_period,
            reduction_factor=sc.reduction_factor,
            category=category,
        )

    if spec.sweep.objective.per_category:
        return PerCategoryScheduler(make, list(spec.categories))
    return make(None)
