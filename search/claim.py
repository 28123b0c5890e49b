"""One driver per experiment: a sweep (or resume) claims its experiment before Ray starts.

Two sweeps of the same ``--name`` started seconds apart both passed the name check and then
shared one experiment (the first one's trials vanished). The claim is an exclusive ``flock``
on ``CLAIM_FILE`` in the experiment's local directory, taken before anything else is done and
held until the sweep has ended: a second sweep or resume of the same experiment is refused at
once, naming the process that holds it. The kernel drops the lock when its process ends,
however it ends, so a crashed sweep leaves no claim that blocks ``resume`` or a retry: the
file of a dead holder is simply locked again (taken over). The file records pid, host and
start time for the message, and is removed when the claim is released.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from mmr.errors import UserInputError

__all__ = ["CLAIM_FILE", "claimed"]

log = logging.getLogger(__name__)

CLAIM_FILE = ".mmr-sweep-claim.json"


@contextlib.contextmanager
def claimed(exp: Path, location: str) -> Iterator[Path]:
    """Holds the claim of the experiment whose local directory is ``exp``.

    Creates ``exp`` if needed (and removes it again on release when it is still empty, so a
    failed start leaves nothing behind).

    Args:
        exp: the experiment's local directory (``SweepSpec.experiment_dir``).
        location: the experiment as the user knows it (directory or URI), for messages.

    Raises:
        UserInputError: another live process holds the claim, or ``exp`` cannot be created.
    """
    created = not exp.exists()
    path = exp / CLAIM_FILE
    try:
        exp.mkdir(parents=True, exist_ok=True)
        fd = _lock(path, location)
    except OSError as exc:
        if created:
            with contextlib.suppress(OSError):
                exp.rmdir()
        raise UserInputError(
            f"cannot claim the experiment {location!r} ({exc.strerror or exc} on {path}): "
            "pick a writable --storage"
        ) from None
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                exp.rmdir()
        raise
    try:
        yield path
    finally:
        # Removed while still locked: a process waiting on the old file notices (inode check).
        path.unlink(missing_ok=True)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                exp.rmdir()  # only when empty: a start that failed before writing anything


def _lock(path: Path, location: str) -> int:
    """Opens and locks ``path``; returns the descriptor (the claim lasts while it is open)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise UserInputError(
                f"experiment {location!r} is in use: a sweep ({_describe(holder)}) is running "
                "it: pick another --name, or wait until that sweep has ended and continue it "
                f"with `launch.py resume {location}`"
            ) from None
        except OSError:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # released (removed) between our open and lock: claim the new file
    stale = _read(fd)
    if stale:
        log.info("taking over the claim of %s on %s (ended)", _describe(stale), location)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd


def _read(fd: int) -> dict:
    try:
        raw = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "process unknown"
    started = holder.get("started")
    since = (
        time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started))
        if isinstance(started, (int, float))
        else ""
    )
    return f"pid {holder.get('pid')} on {holder.get('host')}{since}"
