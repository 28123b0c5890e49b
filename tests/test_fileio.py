"""mmr.fileio: atomic writes (whole file or old file, never a partial one or a leftover)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from mmr import imagecache
from mmr.fileio import atomic_path, atomic_write, is_own_tmp, tmp_name
from mmr.outdir import _is_tmp


def test_atomic_write_writes_text_and_bytes_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    atomic_write(path, '{"x": "é"}')
    assert path.read_text(encoding="utf-8") == '{"x": "é"}'
    atomic_write(path, b"\x00\x01")  # replaces the old content
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["a.json"]


def test_atomic_path_replaces_on_success(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_text("old")
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.is_file() and is_own_tmp(tmp.name)
        assert path.read_text() == "old"  # readers still see the old file meanwhile
        tmp.write_text("new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["model.pt"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.json"]
    new = tmp_path / "new.json"
    with pytest.raises(KeyboardInterrupt), atomic_path(new):
        raise KeyboardInterrupt
    assert not new.exists() and os.listdir(tmp_path) == ["metrics.json"]


def test_failed_image_cache_build_leaves_no_temporary(tmp_path: Path) -> None:
    def bad() -> np.ndarray:
        raise ValueError("corrupt")

    with pytest.raises(ValueError, match="corrupt"):
        imagecache._build(tmp_path / "x.npy", (2, 2), [bad], what="images")
    assert os.listdir(tmp_path) == []


def test_temporaries_are_unique_and_hidden(tmp_path: Path) -> None:
    names = {tmp_name("checkpoint.pt") for _ in range(1000)}
    assert len(names) == 1000
    assert all(n.startswith(".checkpoint.pt.") for n in names)
    path = tmp_path / "f"
    with atomic_path(path) as a, atomic_path(path) as b:  # two writers of one file
        assert a != b
        a.write_text("a")
        b.write_text("b")
    assert path.read_text() == "a"  # the last to finish wins, whole
    assert os.listdir(tmp_path) == ["f"]


def test_the_written_file_gets_the_usual_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f", "x")
        (tmp_path / "g").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "f").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "g").stat().st_mode) == 0o644


def test_is_own_tmp_accepts_only_the_helpers_names() -> None:
    assert is_own_tmp(tmp_name("results.md"))
    assert is_own_tmp(tmp_name(".mmr-sweep-output.json"))
    for name in [
        "notes.tmp",
        "results.md.tmp",
        ".results.md.tmp",
        "results.md",
        ".mmr-tmp",
        ".x.0123.mmr-tmp",  # too short a random part
        "x.0123456789abcdef.mmr-tmp",  # not hidden
        ".x.0123456789abcdef.mmr-tmp.bak",
    ]:
        assert not is_own_tmp(name), name


def test_train_output_tolerates_exactly_the_projects_temporaries() -> None:
    assert _is_tmp("checkpoints/" + tmp_name("checkpoint.pt"))
    assert _is_tmp(tmp_name("model.pt"))
    for old in [
        ".mmr-sweep-output.json.tmp",
        "results.md.tmp",
        "model.pt.tmp",
        "checkpoints/checkpoint.pt.tmp",
    ]:
        assert _is_tmp(old), old
    for foreign in ["notes.tmp", "data/x.tmp", "checkpoint.pt.tmp", "model.pt"]:
        assert not _is_tmp(foreign), foreign
