"""Trial and experiment lifecycle callbacks: ``EndDeterministicFailures`` ends Ray's retries of
a deterministic trial failure, ``MirrorSync`` uploads the sweep's own files to URI storage."""

from __future__ import annotations

from typing import Any

from ray import tune

from search.config import SweepSpec
from search.storage import failure_reason, push

__all__ = ["EndDeterministicFailures", "MirrorSync"]


class EndDeterministicFailures(tune.Callback):
    """Keeps Ray from retrying a deterministic failure more than once.

    Ray Tune retries every failed trial up to ``max_failures`` times (meant for lost workers)
    and offers no per-error choice. Once a trial recorded a deterministic failure, its retry
    ends at once (see ``search.trainable.train_trial``) and this callback makes that retry the
    last.
    """

    def __init__(self, max_failures: int) -> None:
        self._max_failures = max_failures  # the sweep's, restored once a trial runs again

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if failure_reason(trial) is not None:
            trial.max_failures = trial.run_metadata.num_failures

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if failure_reason(trial) is None:  # e.g. `resume --retry-failed` cleared the marker
            trial.max_failures = self._max_failures


class MirrorSync(tune.Callback):
    """Uploads sweep.json and the study journal to URI storage as trials finish."""

    def __init__(self, spec: SweepSpec) -> None:
        self._local = spec.experiment_dir
        self._uri = spec.experiment_location

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        push(self._local, self._uri)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        push(self._local, self._uri)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        push(self._local, self._uri)
