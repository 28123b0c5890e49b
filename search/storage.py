"""Experiment storage: a local directory, an NFS path, or a URI such as ``s3://bucket/runs``.

Tune writes trial results and checkpoints to the storage through pyarrow in every case. The
sweep's own files (``sweep.json`` and the Optuna study journal, which needs a POSIX file) live
in a local directory: the experiment directory itself for local/NFS storage, or, for a URI, a
mirror under ``$MMR_STATE_DIR`` (default ``~/.cache/mmr-sweep/experiments``) that is uploaded
to the URI as the sweep runs, and downloaded again by ``resume``, ``status`` and ``export`` on
any machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from mmr.errors import UserInputError
from mmr.fileio import atomic_write, tmp_name
from search.contract import FAILED_MARKER, JOURNAL_FILE, REPEATED_FILE, SPEC_FILE

__all__ = [
    "MIRRORED",
    "is_uri",
    "join",
    "mirror_dir",
    "pull",
    "push",
    "exists",
    "is_empty",
    "probe_writable",
    "read_histories",
    "count_repeated",
    "failure_reason",
    "remove_from_trials",
    "read_file",
    "write_file",
    "local_checkpoint",
    "resuming",
    "resumed_experiment",
]

log = logging.getLogger(__name__)

MIRRORED = (SPEC_FILE, JOURNAL_FILE)


def is_uri(location: str | os.PathLike[str]) -> bool:
    """``s3://``, ``gs://``, ``file://``...: storage reached through pyarrow, not a path."""
    return "://" in str(location)


def join(location: str, *parts: str) -> str:
    return "/".join([str(location).rstrip("/"), *parts])


def mirror_dir(uri: str) -> Path:
    """The local directory holding a URI experiment's sweep.json and study journal."""
    root = Path(os.environ.get("MMR_STATE_DIR", "~/.cache/mmr-sweep/experiments")).expanduser()
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    digest = hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:10]
    return root / f"{name}-{digest}"


# What pyarrow raises for a bad URI (pa.ArrowInvalid, a ValueError) or unreachable storage
# (OSError: offline, no such bucket, no credentials).
STORAGE_ERRORS = (OSError, ValueError, pa.ArrowException)


@contextlib.contextmanager
def storage_errors(location: str) -> Iterator[None]:
    """Turns pyarrow's errors on ``location`` into one-line UserInputErrors naming it."""
    try:
        yield
    except UserInputError:
        raise
    except STORAGE_ERRORS as exc:
        cause = " ".join(str(exc).split()) or type(exc).__name__
        raise UserInputError(
            f"storage {location!r} cannot be used ({cause}): check the URI, the network, "
            "that the bucket exists and your credentials, or use a local/NFS directory"
        ) from exc


def _fs(location: str) -> tuple[pafs.FileSystem, str]:
    with storage_errors(location):
        return pafs.FileSystem.from_uri(location)


def write_file(fs: pafs.FileSystem, path: str, text: str) -> None:
    """Writes a small text file on a pyarrow filesystem."""
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_file(fs: pafs.FileSystem, path: str) -> str | None:
    """A small text file's content, or None when it does not exist."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def exists(location: str, name: str) -> bool:
    """Whether ``location/name`` exists (path or URI)."""
    if not is_uri(location):
        return (Path(location) / name).exists()
    fs, path = _fs(location)
    with storage_errors(location):
        return fs.get_file_info(join(path, name)).type != pafs.FileType.NotFound


def is_empty(location: str) -> bool:
    """Whether ``location`` (path or URI) is absent or an empty directory."""
    if not is_uri(location):
        path = Path(location)
        return not path.exists() or (path.is_dir() and not any(path.iterdir()))
    fs, path = _fs(location)
    with storage_errors(location):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return True
        if info.type != pafs.FileType.Directory:
            return False
        return not fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))


def probe_writable(location: str) -> None:
    """Creates ``location`` and writes/removes a probe file; UserInputError if it can't."""
    try:
        if is_uri(location):
            fs, path = _fs(location)
            fs.create_dir(path, recursive=True)
            probe = join(path, ".write-test")
            with fs.open_output_stream(probe) as f:
                f.write(b"ok")
            fs.delete_file(probe)
        else:
            Path(location).mkdir(parents=True, exist_ok=True)
            probe = Path(location) / ".write-test"
            probe.write_text("ok")
            probe.unlink()
    except OSError as exc:
        raise UserInputError(
            f"storage path {location!r} is not writable ({exc}): pass --storage DIR on a "
            "writable disk, or a URI you can write to"
        ) from exc


def push(local: Path, uri: str, names: tuple[str, ...] = MIRRORED) -> None:
    """Uploads the mirrored files of ``local`` to the experiment ``uri``."""
    fs, path = _fs(uri)
    with storage_errors(uri):
        fs.create_dir(path, recursive=True)
        for name in names:
            source = local / name
            if source.is_file():
                tmp = join(path, tmp_name(name))
                with fs.open_output_stream(tmp) as f:
                    f.write(source.read_bytes())
                fs.move(tmp, join(path, name))


def pull(uri: str) -> Path:
    """Downloads a URI experiment's mirrored files into its local mirror; returns the mirror."""
    local = mirror_dir(uri)
    local.mkdir(parents=True, exist_ok=True)
    fs, path = _fs(uri)
    for name in MIRRORED:
        remote = join(path, name)
        with storage_errors(uri):
            if fs.get_file_info(remote).type == pafs.FileType.NotFound:
                continue
            with fs.open_input_stream(remote) as f:
                data = f.read()
        atomic_write(local / name, data)
    return local


def read_histories(location: str) -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """Yields ``(trial_id, config, results)`` from each trial's ``result.json`` (path or URI).

    ``results`` holds one result per round, in round order.
    """
    fs, path = _fs(location) if is_uri(location) else (pafs.LocalFileSystem(), str(location))
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return
    for entry in sorted(entries, key=lambda e: e.path):
        if entry.type != pafs.FileType.Directory:
            continue
        result = join(entry.path, "result.json")
        if fs.get_file_info(result).type != pafs.FileType.File:
            continue
        with fs.open_input_stream(result) as f:
            text = f.read().decode()
        latest: dict[Any, dict[str, Any]] = {}
        for line in text.splitlines():
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed driver
            # A round trained again after a restart keeps its place and its latest values
            # (search.callbacks.result_files keeps each round once; older experiments may
            # repeat rounds).
            latest[result.get("training_iteration")] = result
        results = list(latest.values())
        if results:
            yield results[0]["trial_id"], results[-1].get("config", {}), results


def remove_from_trials(location: str, name: str) -> int:
    """Deletes the file ``name`` from every trial directory of an experiment; returns how many."""
    fs, path = _fs(location) if is_uri(location) else (pafs.LocalFileSystem(), str(location))
    removed = 0
    for entry in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        target = join(entry.path, name)
        if entry.type == pafs.FileType.Directory and fs.get_file_info(target).type == (
            pafs.FileType.File
        ):
            fs.delete_file(target)
            removed += 1
    return removed


def failure_reason(trial: Any) -> str | None:
    """The recorded deterministic failure of a Tune trial (driver side), or None."""
    storage = trial.storage
    text = read_file(storage.storage_filesystem, join(storage.trial_fs_path, FAILED_MARKER))
    return None if text is None else json.loads(text)["error"]


def count_repeated(trial: Any) -> int:
    """Rounds of a Tune trial that a restart trained again (recorded by ``RoundJsonLogger``)."""
    storage = trial.storage
    text = read_file(storage.storage_filesystem, join(storage.trial_fs_path, REPEATED_FILE))
    return sum(1 for line in (text or "").splitlines() if line.strip())


@contextlib.contextmanager
def local_checkpoint(checkpoint: Any) -> Iterator[Path]:
    """A local directory holding a Tune checkpoint's files (downloaded for remote storage)."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="mmr-ckpt-") as tmp:
        pafs.copy_files(checkpoint.path, tmp, source_filesystem=checkpoint.filesystem)
        yield Path(tmp)


# Tune restores the searcher and the scheduler of a resumed sweep from pickles that hold the
# experiment's place at the time they were saved; after the directory was copied or moved that
# place is the old one. ``resume_sweep`` names the current place here while Tune restores them.
_resuming: list[tuple[str, Path]] = []


@contextlib.contextmanager
def resuming(location: str, local: Path) -> Iterator[None]:
    """While resuming: the experiment's current ``location`` and its local directory."""
    _resuming.append((str(location), Path(local)))
    try:
        yield
    finally:
        _resuming.pop()


def resumed_experiment() -> tuple[str, Path] | None:
    """``(location, local dir)`` of the experiment being resumed, or None."""
    return _resuming[-1] if _resuming else None
