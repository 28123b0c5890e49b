"""Atomic file writes: readers see the old file or the whole new one, never a partial one.

Every writer puts its data into a temporary file next to the target and moves it over the
target with ``os.replace`` (atomic on one filesystem) only once the data is complete; a writer
that fails removes its temporary. The temporaries share one naming scheme,
``.<name>.<random>.mmr-tmp``: hidden, unique per writer (two processes writing the same file
never share one), and recognised by ``is_own_tmp``, so that cleanup code removes exactly the
project's own leftovers (of a process killed mid-write) and never a user's file.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TMP_SUFFIX", "atomic_path", "atomic_write", "is_own_tmp", "tmp_name"]

TMP_SUFFIX = ".mmr-tmp"
_OWN_TMP = re.compile(r"\..+\.[0-9a-f]{16}" + re.escape(TMP_SUFFIX))


def tmp_name(name: str) -> str:
    """A fresh temporary file name for an atomic write of the file ``name``."""
    return f".{name}.{secrets.token_hex(8)}{TMP_SUFFIX}"


def is_own_tmp(name: str) -> bool:
    """Whether the file name ``name`` (no directory) is a temporary of ``atomic_path``."""
    return _OWN_TMP.fullmatch(name) is not None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success it replaces ``path`` atomically.

    For writers that need a path or a file object (``torch.save``, ``DataFrame.to_csv``, a
    memory map). The temporary exists (empty) when yielded, so no other writer can take its
    name. When the block raises, ``path`` is left as it was and the temporary is removed.

    Args:
        path: the file to write; its directory must exist.
    """
    path = Path(path)
    while True:
        tmp = path.with_name(tmp_name(path.name))
        try:
            # O_EXCL reserves the name; mode 0o666 lets the umask decide, as a plain open() does.
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # 64 random bits: practically never
            continue
        break
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failure; a no-op after the replace


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Writes ``data`` (text as UTF-8, or bytes) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
