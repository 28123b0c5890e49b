"""Tune's JSON and CSV result-file logger callbacks, keeping each round once in a trial's
``result.json`` and ``progress.csv`` when a restarted trial trains rounds again.

A trial reports a checkpoint every ``train.checkpoint_every`` rounds. After a lost worker
(Ray's ``max_failures`` retry) or a resumed driver it continues from its last checkpoint and
trains the rounds since then again, and Tune reports them with the same
``training_iteration``: its loggers append them, so ``result.json`` and ``progress.csv``
would hold those rounds twice, the stale values first. These loggers (Tune adds its own only
when a sweep passes none of their kind) drop a trial's rows from the repeated round on before
they append it: each round appears once, with the latest attempt's values. The dropped
``result.json`` rows go to ``REPEATED_FILE`` in the trial's directory, so the compute they
cost stays on record (``rounds_repeated`` in the trials table, counted by
``search.storage.count_repeated``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.air.constants import EXPR_PROGRESS_FILE, EXPR_RESULT_FILE
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.result import TRAINING_ITERATION

from mmr.fileio import atomic_write
from search.contract import REPEATED_FILE
from search.storage import join, read_file, write_file

__all__ = ["RoundCSVLogger", "RoundJsonLogger"]

logger = logging.getLogger(__name__)


def _json_round(line: str) -> int | None:
    try:
        return int(json.loads(line)[TRAINING_ITERATION])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a killed driver


def _rows(path: Path, skip: int) -> tuple[list[str], list[str]]:
    """The first ``skip`` lines (a header) and the other lines of a file, if it exists."""
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:  # as written: csv ends its rows with \r\n
        lines = f.readlines()
    return lines[:skip], lines[skip:]


def _last_round(rows: list[str], round_of: Callable[[str], int | None]) -> int:
    rounds = [r for r in map(round_of, rows) if r is not None]
    return rounds[-1] if rounds else 0


def _drop_from(
    path: Path, round_: int, round_of: Callable[[str], int | None], skip: int
) -> list[str]:
    """Removes the rows of rounds >= ``round_`` from the file; returns them."""
    head, rows = _rows(path, skip)
    kept = [r for r in rows if (round_of(r) or 0) < round_]
    dropped = [r for r in rows if (round_of(r) or 0) >= round_]
    atomic_write(path, "".join(head + kept))
    return dropped


class _LocalFirst:
    """Continues a trial's file from the driver's own copy, else from the storage's.

    Tune copies the file from the storage at every (re)start of a trial that has a
    checkpoint, over the driver's copy: the rows written since the last upload would be lost
    uncounted. A resumed driver has no copy of its own; it takes the storage's also for a
    trial without a checkpoint, whose rounds all run again (Tune would start a new file, and
    its upload would replace the old one).
    """

    def _restore_from_remote(self, file_name: str, trial: Any) -> None:
        local = Path(trial.local_path, file_name)
        if local.is_file():
            return
        try:
            text = read_file(
                trial.storage.storage_filesystem, join(trial.storage.trial_fs_path, file_name)
            )
        except OSError as exc:  # as Tune does: the trial goes on, with a new file
            logger.warning("cannot read %s of trial %s: %s", file_name, trial, exc)
            return
        if text is not None:
            local.write_bytes(text.encode())


class RoundJsonLogger(_LocalFirst, JsonLoggerCallback):
    """Tune's ``result.json`` logger that keeps each round once (the latest attempt's)."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[Any, int] = {}  # trial -> the last round in its file

    def log_trial_start(self, trial: Any) -> None:
        super().log_trial_start(trial)  # the file restored from storage by a resumed driver
        self._last[trial] = _last_round(_rows(self._path(trial), 0)[1], _json_round)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if trial not in self._trial_files:
            self.log_trial_start(trial)
        round_ = int(result.get(TRAINING_ITERATION, 0))
        if round_ <= self._last.get(trial, 0):  # trained again after a restart
            self._trial_files[trial].close()
            dropped = _drop_from(self._path(trial), round_, _json_round, 0)
            self._trial_files[trial] = self._path(trial).open("at")
            _record_repeated(trial, dropped)
        super().log_trial_result(iteration, trial, result)
        self._last[trial] = round_

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        super().log_trial_end(trial, failed)
        self._last.pop(trial, None)

    @staticmethod
    def _path(trial: Any) -> Path:
        return Path(trial.local_path, EXPR_RESULT_FILE)


class RoundCSVLogger(_LocalFirst, CSVLoggerCallback):
    """Tune's ``progress.csv`` logger that keeps each round once (the latest attempt's).

    A file it continues keeps its header's columns: Tune would take the columns of the first
    result it appends, which for a trial restarted at its final round (that adds
    ``latency_ms`` and ``params_m``) do not match the header.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[Any, int] = {}
        self._column: dict[Any, int] = {}  # trial -> training_iteration's column

    def _setup_trial(self, trial: Any) -> None:
        super()._setup_trial(trial)
        head, rows = _rows(self._path(trial), 1)
        self._last[trial] = 0
        if self._trial_continue[trial] and head:
            fields = next(csv.reader(io.StringIO(head[0])))
            self._trial_csv[trial] = csv.DictWriter(self._trial_files[trial], fields)
            if TRAINING_ITERATION in fields:
                self._column[trial] = fields.index(TRAINING_ITERATION)
                self._last[trial] = _last_round(rows, self._round_of(trial))

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if trial not in self._trial_files:
            self._setup_trial(trial)
        round_ = int(result.get(TRAINING_ITERATION, 0))
        if round_ <= self._last.get(trial, 0):  # trained again after a restart
            self._trial_files[trial].close()
            _drop_from(self._path(trial), round_, self._round_of(trial), 1)
            writer = self._trial_csv[trial]
            self._trial_files[trial] = self._path(trial).open("at")
            self._trial_csv[trial] = csv.DictWriter(self._trial_files[trial], writer.fieldnames)
        super().log_trial_result(iteration, trial, result)
        self._last[trial] = round_
        fields = list(self._trial_csv[trial].fieldnames)
        if trial not in self._column and TRAINING_ITERATION in fields:
            self._column[trial] = fields.index(TRAINING_ITERATION)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        super().log_trial_end(trial, failed)
        self._last.pop(trial, None)
        self._column.pop(trial, None)

    def _round_of(self, trial: Any) -> Callable[[str], int | None]:
        column = self._column.get(trial)

        def round_of(line: str) -> int | None:
            try:
                return int(float(next(csv.reader(io.StringIO(line)))[column]))
            except (ValueError, IndexError, TypeError, StopIteration):
                return None

        return round_of

    @staticmethod
    def _path(trial: Any) -> Path:
        return Path(trial.local_path, EXPR_PROGRESS_FILE)


def _record_repeated(trial: Any, rows: list[str]) -> None:
    """Appends superseded ``result.json`` rows to the trial's ``REPEATED_FILE`` on storage.

    Written to the storage, not to the driver's staging copy of the trial dir that Tune
    uploads: a resumed driver starts with an empty staging dir, whose upload would replace
    the rows an earlier driver recorded.
    """
    if not rows:
        return
    fs, path = trial.storage.storage_filesystem, join(trial.storage.trial_fs_path, REPEATED_FILE)
    fs.create_dir(trial.storage.trial_fs_path, recursive=True)
    earlier = read_file(fs, path) or ""
    write_file(fs, path, earlier + "".join(r if r.endswith("\n") else r + "\n" for r in rows))
