"""The sweep's progress callback: a live terminal table of the running trials."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from search.config import SweepSpec
from search.contract import OBJECTIVE, ROUNDS_KEY
from search.storage import failure_reason

__all__ = ["ProgressTable"]


class ProgressTable(Callback):
    """Prints a line per trial event and, every ``interval`` seconds, the running trials.

    Each status block shows counts (running / pending / done / stopped early / failed), the
    best objective so far with its trial and params, and the elapsed time.
    """

    def __init__(
        self,
        spec: SweepSpec,
        *,
        write: Callable[[str], None],
        started: float,
        interval: float = 15.0,
    ) -> None:
        self._write = write
        self._started = started
        self._interval = interval
        self._last = 0.0
        self._params = list(spec.space.keys)
        self._best: tuple[float, str, dict[str, Any]] | None = None
        self._results: dict[str, dict[str, Any]] = {}
        self._states: dict[str, str] = {}

    def _elapsed(self) -> str:
        s = int(time.time() - self._started)
        return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"

    def _describe(self, config: dict[str, Any]) -> str:
        parts = []
        for key in self._params:
            if key in config:
                value = config[key]
                value = f"{value:.3g}" if isinstance(value, float) else value
                parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
        if config.get("baseline"):
            parts.append("(baseline)")
        return " ".join(parts)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._states[trial.trial_id] = "running"
        restart = _restart(trial)
        if restart is not None:
            self._results.pop(trial.trial_id, None)  # its last round runs again: "starting"
            self._write(f"[{self._elapsed()}] restart {trial.trial_id} {restart}")
            return
        self._write(f"[{self._elapsed()}] start  {trial.trial_id}: {self._describe(trial.config)}")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._results[trial.trial_id] = result
        value = result.get(OBJECTIVE)
        if value is not None and (self._best is None or value > self._best[0]):
            self._best = (value, trial.trial_id, dict(trial.config))
        if time.time() - self._last >= self._interval:
            self._last = time.time()
            self._write(self.block(trials))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = self._results.get(trial.trial_id, {})
        rounds, total = result.get("training_iteration", 0), result.get(ROUNDS_KEY, 0)
        state = "done" if rounds >= total else f"stopped early at round {rounds}/{total}"
        self._states[trial.trial_id] = "done" if rounds >= total else "stopped"
        value = result.get(OBJECTIVE)
        shown = f"{value:.4f}" if value is not None else "-"
        self._write(f"[{self._elapsed()}] {state}: {trial.trial_id} {OBJECTIVE} {shown}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._states[trial.trial_id] = "failed"
        reason = failure_reason(trial)
        self._write(
            f"[{self._elapsed()}] FAILED {trial.trial_id}"
            + (f": {reason}" if reason else "")
            + f" (see {trial.path}/error.txt)"
        )

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._write(self.block(trials))

    def block(self, trials: list) -> str:
        """Counts, best so far and the running trials' latest rounds."""
        counts = {"running": 0, "pending": 0, "done": 0, "stopped": 0, "failed": 0}
        running = []
        for trial in trials:
            state = self._states.get(trial.trial_id)
            if trial.status == "RUNNING":
                state = "running"
                result = self._results.get(trial.trial_id, {})
                value = result.get(OBJECTIVE)
                rounds = (
                    f"round {result['training_iteration']}/{result[ROUNDS_KEY]}"
                    if result
                    else "starting"
                )
                running.append(
                    f"  {trial.trial_id}  {rounds}  {OBJECTIVE} "
                    f"{'-' if value is None else f'{value:.4f}'}  "
                    f"{self._describe(trial.config)}"
                )
            elif trial.status == "PENDING":
                state = "pending"
            elif trial.status == "ERROR":
                state = "failed"
            counts[state or "pending"] += 1
        best = "-"
        if self._best is not None:
            value, trial_id, config = self._best
            best = f"{value:.4f} ({trial_id}: {self._describe(config)})"
        head = (
            f"[{self._elapsed()}] trials: "
            + ", ".join(f"{n} {s}" for s, n in counts.items())
            + f" | best {OBJECTIVE} so far {best}"
        )
        return "\n".join([head, *running])


def _restart(trial: Any) -> str | None:
    """Where a trial that reported before continues (a retry after a lost worker, or a
    resumed sweep), and which rounds it trains again; None for a first start.

    A retry of a recorded deterministic failure ends at once and trains nothing.
    """
    if not trial.has_reported_at_least_once:  # (last_result would wait for a default one)
        return None
    reached = int(trial.last_result.get("training_iteration", 0) or 0)
    if not reached or failure_reason(trial) is not None:
        return None
    saved = trial.latest_checkpoint_result
    kept = int(saved.metrics.get("training_iteration", 0) or 0) if saved else 0
    if reached == kept + 1:
        again = f"round {reached} runs again"
    elif reached > kept:
        again = f"rounds {kept + 1}-{reached} run again"
    else:
        again = "no round runs again"
    where = f"its round-{kept} checkpoint" if kept else "the start (no checkpoint)"
    return f"from {where}, having reached round {reached}: {again}"
