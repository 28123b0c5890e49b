"""TensorBoard logging of trials: Tune's TBX callback, with every param in the hparams view."""

from __future__ import annotations

from typing import Any

from ray.tune.logger import TBXLoggerCallback
from ray.tune.utils import flatten_dict

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
    """

    def _try_log_hparams(self, trial: Any, result: dict) -> None:
        params = flatten_dict(trial.evaluated_params)
        trial.evaluated_params = {k: hparam_value(v) for k, v in params.items()}
        try:
            super()._try_log_hparams(trial, result)
        finally:
            trial.evaluated_params = params
