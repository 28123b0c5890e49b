"""The TensorBoard callback: Tune's TBX logger of trials, with every param in the hparams
view."""

from __future__ import annotations

from typing import Any

from ray.tune.logger import TBXLoggerCallback
from ray.tune.result import TIMESTEPS_TOTAL, TRAINING_ITERATION
from ray.tune.utils import flatten_dict
from tensorboardX.proto.event_pb2 import Event, SessionLog

__all__ = ["TrialTensorBoard", "hparam_value"]


def hparam_value(value: Any) -> Any:
    """A config value as TensorBoard's hparams take it: sequences become their text."""
    if isinstance(value, list | tuple):
        return str(list(value))
    return value


class TrialTensorBoard(TBXLoggerCallback):
    """Tune's TensorBoard logger (per-round scalars of every trial, hparams at its end).

    Tune leaves list-valued params, such as ``model.teacher_layers``, out of the hparams
    summary; here they are logged as text, so that the hparams view shows every sampled param.

    Each attempt of a trial starts with a session-start event at its first round. TensorBoard
    takes every start after a run's first as a restart and hides the run's earlier values
    from that step on, so the rounds a restarted trial trains again (from its last
    checkpoint) show once, with the latest attempt's values.
    """

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if result.get("iterations_since_restore") == 1:
            if trial not in self._trial_writer:
                self.log_trial_start(trial)
            step = result.get(TIMESTEPS_TOTAL) or result[TRAINING_ITERATION]
            start = Event(step=step, session_log=SessionLog(status=SessionLog.START))
            self._trial_writer[trial].file_writer.add_event(start)
        super().log_trial_result(iteration, trial, result)

    def _try_log_hparams(self, trial: Any, result: dict) -> None:
        params = flatten_dict(trial.evaluated_params)
        trial.evaluated_params = {k: hparam_value(v) for k, v in params.items()}
        try:
            super()._try_log_hparams(trial, result)
        finally:
            trial.evaluated_params = params
