"""Output directories the project owns: written with a marker, replaced only when it says so.

``launch.py train --out`` and ``launch.py export --out`` replace an earlier output of theirs, but
never a directory the project did not write. Each such directory holds ``MARKER``, a small JSON
file naming the command (``kind``), its owner (e.g. the exported experiment) and every file it
wrote; ``check_replaceable`` refuses a directory without it, of another kind or owner, or holding
any file the marker does not list (a file the user added).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from mmr.errors import UserInputError
from mmr.fileio import atomic_write, is_own_tmp

__all__ = [
    "MARKER",
    "claim_dir",
    "check_replaceable",
    "creating",
    "fresh_dir",
    "list_files",
    "read_marker",
    "release_if_unused",
    "train_output",
    "write_marker",
]

MARKER = ".mmr-sweep-output.json"
# What `launch.py train` writes into --out (mmr.train.run_training).
TRAIN_FILES = (
    "config.yaml",
    "metrics.json",
    "results.md",
    "model.pt",
    "checkpoints/checkpoint.pt",
)
# The temporaries of atomic writes into --out named the pre-mmr.fileio way (``<file>.tmp``): a
# run of an earlier version cut short may have left them. Exactly these, never any *.tmp.
_OLD_TMP_FILES = frozenset(f + ".tmp" for f in (MARKER, *TRAIN_FILES))


def list_files(folder: Path) -> list[str]:
    """Every file (and symlink) below ``folder``, as sorted POSIX paths relative to it."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        # A symlink to a directory is listed as an entry, never followed.
        names = filenames + [d for d in dirnames if (base / d).is_symlink()]
        out += [(base / n).relative_to(folder).as_posix() for n in names]
    return sorted(out)


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of ``folder`` or None (absent or unreadable)."""
    try:
        raw = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def write_marker(folder: Path, *, kind: str, owner: str, files: Iterable[str]) -> None:
    """Records ``folder`` as written by ``kind`` for ``owner``, listing the files it wrote."""
    record = {"kind": kind, "owner": owner, "files": sorted(set(files) - {MARKER})}
    atomic_write(folder / MARKER, json.dumps(record, indent=1))


def check_replaceable(
    folder: Path,
    *,
    kind: str,
    owner: str | None,
    what: str,
    fix: str,
    allowed: Callable[[str], bool] = lambda _: False,
) -> bool:
    """Whether ``folder`` exists and may be replaced; UserInputError when it must not be.

    ``folder`` may be replaced when it is an empty directory, or holds this project's marker
    of the same ``kind`` (and ``owner``, unless None) and no file the marker does not list
    (``allowed`` names further files the command may leave behind, e.g. temporary files).

    Args:
        folder: the output directory.
        kind: the command that owns such directories (``train``, ``export``).
        owner: what the output belongs to; None accepts any owner.
        what: the option, for messages (``--out runs/x``).
        fix: what to do instead, for messages.
        allowed: further relative paths that do not block replacing.

    Returns:
        False when ``folder`` does not exist, True when it exists and may be replaced.
    """
    if not folder.exists() and not folder.is_symlink():
        return False
    if not folder.is_dir():
        raise UserInputError(f"{what}: {folder} is a file, not a directory: {fix}")
    files = list_files(folder)
    if not files:
        return True
    marker = read_marker(folder)
    if marker is None or marker.get("kind") != kind:
        raise UserInputError(
            f"{what}: {folder} is not empty and was not written by `{kind}` "
            f"(no {MARKER} of `{kind}` in it), so it is left untouched: {fix}"
        )
    if owner is not None and marker.get("owner") != owner:
        raise UserInputError(
            f"{what}: {folder} holds the {kind} of {marker.get('owner')!r}, not of {owner!r}, "
            f"so it is left untouched: {fix}"
        )
    known = set(marker.get("files", [])) | {MARKER}
    extra = [f for f in files if f not in known and not allowed(f)]
    if extra:
        raise UserInputError(
            f"{what}: {folder} holds {extra[0]!r}"
            + (f" (and {len(extra) - 1} more files)" if len(extra) > 1 else "")
            + f", which `{kind}` did not write, so the folder is left untouched: "
            f"move that file out, or {fix}"
        )
    return True


@contextlib.contextmanager
def creating(folder: Path, what: str) -> Iterator[None]:
    """Turns an OSError while creating the output ``folder`` (``what``: the option, e.g.
    ``--out runs/x``) into a one-line UserInputError naming the path and the fix."""
    try:
        yield
    except OSError as exc:
        where = Path(exc.filename if exc.filename is not None else folder)
        cause = f"{where} is a file" if where.is_file() else f"{where}: {exc.strerror or exc}"
        raise UserInputError(
            f"{what}: cannot create {folder} ({cause}): pass a directory you can write to "
            "(not inside a file, not on a read-only disk)"
        ) from exc


@contextlib.contextmanager
def staged(
    out: Path, *, kind: str, owner: str, replace: bool, recheck: Callable[[], Any]
) -> Iterator[Path]:
    """Yields a staging folder beside ``out`` that becomes ``out`` when the block succeeds.

    The staging folder gets the marker (``kind``, ``owner``, the files written); an existing
    ``out`` is deleted only when ``replace`` and after ``recheck()`` (which raises if ``out``
    is no longer only an earlier output of ours). On any error the staging folder is removed
    and ``out`` is left as it was.
    """
    with creating(out, f"--out {out}"):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield staging
        write_marker(staging, kind=kind, owner=owner, files=list_files(staging))
        if replace:
            recheck()
            shutil.rmtree(out)
        staging.replace(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def claim_dir(folder: Path) -> bool:
    """Creates ``folder`` (and its parents); True when this call created it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir()
    except FileExistsError:
        return False
    return True


def fresh_dir(base: Path) -> tuple[Path, bool]:
    """Claims ``base`` if it is free, else the first free ``base-2``, ``base-3``, ...

    "Free" means absent (created here, atomically, so two runs never get the same folder) or
    an empty directory. Returns the folder and whether this call created it.
    """
    for i in range(1, 10_000):
        candidate = base if i == 1 else base.with_name(f"{base.name}-{i}")
        if claim_dir(candidate):
            return candidate, True
        if candidate.is_dir() and not any(candidate.iterdir()):
            return candidate, False
    raise UserInputError(f"no free output directory next to {base}: pass --out DIR")


def release_if_unused(folder: Path, *, created: bool) -> None:
    """After a failed run: removes the marker and folder if nothing else was written.

    Only the marker is ever deleted, and the folder itself only when this run created it
    and it is empty then.
    """
    if [f for f in list_files(folder) if f != MARKER]:
        return
    (folder / MARKER).unlink(missing_ok=True)
    if created:
        try:
            folder.rmdir()
        except OSError:  # something appeared meanwhile (empty sub-folders): keep it
            pass


@contextlib.contextmanager
def train_output(
    out: str | os.PathLike[str] | None, *, overwrite: bool, default: str = "runs/train"
) -> Iterator[Path]:
    """The output directory of one training run, claimed for it (with a marker).

    ``out=None`` picks ``default`` or, when that holds something, the first free
    ``default-2``, ``default-3``, ...: two runs never write into the same folder. An explicit
    ``out`` holding an earlier run is replaced only with ``overwrite`` (its files, and only
    those, are deleted first); a non-empty folder that ``train`` did not write is never used.
    A run that fails before writing anything leaves no folder behind.
    """
    if out is None:
        with creating(Path(default), f"the default output directory {default} (--out)"):
            folder, created = fresh_dir(Path(default))
    else:
        folder = Path(out)
        fix = "pass another --out"
        if check_replaceable(
            folder, kind="train", owner=None, what=f"--out {folder}", fix=fix, allowed=_is_tmp
        ) and list_files(folder):
            if not overwrite:
                raise UserInputError(
                    f"--out {folder} holds an earlier training run: pass --overwrite to "
                    f"replace it, or {fix} (or leave --out out: a fresh folder is picked)"
                )
            _remove_files(folder, [*TRAIN_FILES, *filter(_is_tmp, list_files(folder))])
        with creating(folder, f"--out {folder}"):
            created = claim_dir(folder)
    try:
        with creating(folder, f"--out {folder}"):
            write_marker(folder, kind="train", owner="train", files=TRAIN_FILES)
    except UserInputError:
        release_if_unused(folder, created=created)
        raise
    try:
        yield folder
    except BaseException:
        release_if_unused(folder, created=created)
        raise


def _is_tmp(name: str) -> bool:
    """Whether the relative path ``name`` is a temporary of an atomic write cut short."""
    return is_own_tmp(PurePosixPath(name).name) or name in _OLD_TMP_FILES


def _remove_files(folder: Path, names: Iterable[str]) -> None:
    for name in names:
        (folder / name).unlink(missing_ok=True)
    for sub in sorted({Path(n).parent for n in names if "/" in n}, reverse=True):
        with contextlib.suppress(OSError):
            (folder / sub).rmdir()  # only when empty
