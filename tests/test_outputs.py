"""Output folders: `train --out`, `export --out` and `sweep --name` never delete or overwrite
what the project did not write, and two runs never collide."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_search import _driver_env
from test_search import cli as search_cli

from mmr.errors import UserInputError
from mmr.outdir import MARKER, TRAIN_FILES, check_replaceable, train_output, write_marker

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    return search_cli(*args, env=_driver_env(), timeout=300)


def user_files(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "data.csv").write_text("1,2")
    return {"notes.txt": "my notes", "sub/data.csv": "1,2"}


def intact(folder: Path, files: dict[str, str]) -> bool:
    return all((folder / k).read_text() == v for k, v in files.items())


# ----------------------------------------------------------------------------- the marker


def test_only_an_own_output_of_the_same_kind_and_owner_may_be_replaced(tmp_path: Path) -> None:
    def check(folder: Path, owner: str | None = "exp-a") -> bool:
        return check_replaceable(folder, kind="export", owner=owner, what="--out", fix="fix")

    assert check(tmp_path / "new") is False
    (tmp_path / "empty").mkdir()
    assert check(tmp_path / "empty") is True
    foreign = tmp_path / "foreign"
    user_files(foreign)
    with pytest.raises(UserInputError, match=r"not empty and was not written by `export`"):
        check(foreign)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match="is a file"):
        check(tmp_path / "file")

    own = tmp_path / "own"
    own.mkdir()
    (own / "best.yaml").write_text("a: 1")
    write_marker(own, kind="export", owner="exp-a", files=["best.yaml"])
    assert check(own) is True
    with pytest.raises(UserInputError, match=r"holds the export of 'exp-a', not of 'exp-b'"):
        check(own, owner="exp-b")
    with pytest.raises(UserInputError, match="not written by `train`"):
        check_replaceable(own, kind="train", owner=None, what="--out", fix="fix")
    (own / "mine.txt").write_text("added by the user")
    with pytest.raises(UserInputError, match=r"holds 'mine.txt'.*did not write"):
        check(own)


# ----------------------------------------------------------------------------- train --out


def test_train_output_default_never_collides(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with train_output(None, overwrite=False) as first:
        (first / "metrics.json").write_text("{}")
    with train_output(None, overwrite=False) as second:
        (second / "metrics.json").write_text("{}")
    assert first == Path("runs/train") and second == Path("runs/train-2")
    assert json.loads((first / MARKER).read_text())["kind"] == "train"


def test_train_output_refuses_an_earlier_run_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with train_output(out, overwrite=False):
        for name in TRAIN_FILES:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("old")
    with pytest.raises(UserInputError, match="holds an earlier training run.*--overwrite"):
        with train_output(out, overwrite=False):
            pass
    assert (out / "model.pt").read_text() == "old"
    with train_output(out, overwrite=True):
        assert not (out / "model.pt").exists() and not (out / "checkpoints").exists()
        (out / "model.pt").write_text("new")
    assert (out / "model.pt").read_text() == "new"


def test_train_output_never_takes_a_foreign_folder_even_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    files = user_files(out)
    (out / "config.yaml").write_text("my own config")  # a name train also writes
    for overwrite in (False, True):
        with pytest.raises(UserInputError, match="was not written by `train`"):
            with train_output(out, overwrite=overwrite):
                pass
    assert intact(out, files) and (out / "config.yaml").read_text() == "my own config"
    assert not (out / MARKER).exists()


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError):
        with train_output(out, overwrite=False):
            raise RuntimeError("data missing")
    assert not out.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError):
        with train_output(tmp_path / "empty", overwrite=False):
            raise RuntimeError("data missing")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_train_cli_refuses_a_foreign_out_and_cleans_up_a_failed_start(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    files = user_files(out)
    proc = cli("train", "--config", "configs/tiny.yaml", "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "was not written by `train`" in proc.stderr and "Traceback" not in proc.stderr
    assert intact(out, files) and sorted(os.listdir(out)) == ["notes.txt", "sub"]

    fresh = tmp_path / "fresh"
    proc = cli(
        "train",
        "--config",
        "configs/tiny.yaml",
        "--set",
        "data.dataset=mvtec",
        "--set",
        f"data.root={tmp_path / 'no-such-data'}",
        "--out",
        str(fresh),
    )
    assert proc.returncode == 2, proc.stderr
    assert "no-such-data does not exist" in proc.stderr
    assert not fresh.exists()  # a run that failed before training leaves no folder
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "train:" not in proc.stderr  # no stale bar


def test_train_overwrite_keeps_a_users_tmp_files(tmp_path: Path) -> None:
    """Issue 20: `train --out DIR --overwrite` deleted every *.tmp in DIR and its subfolders."""
    out = tmp_path / "run"
    with train_output(out, overwrite=False):  # an earlier training run in DIR
        for name in TRAIN_FILES:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("old")
    (out / "notes.tmp").write_text("my notes")
    (out / "drafts").mkdir()
    (out / "drafts" / "plan.tmp").write_text("my plan")
    (out / "checkpoints" / "mine.tmp").write_text("mine too")
    proc = cli(
        "train",
        "--config",
        "configs/tiny.yaml",
        "--set",
        "data.dataset=mvtec",
        "--set",
        f"data.root={tmp_path / 'no-such-data'}",  # fails fast should the run start
        "--out",
        str(out),
        "--overwrite",
    )
    assert proc.returncode == 2, proc.stderr
    assert ".tmp' (and 2 more files)" in proc.stderr
    assert "which `train` did not write" in proc.stderr
    assert (out / "notes.tmp").read_text() == "my notes"
    assert (out / "drafts" / "plan.tmp").read_text() == "my plan"
    assert (out / "checkpoints" / "mine.tmp").read_text() == "mine too"
    assert (out / "model.pt").read_text() == "old"  # the refused run replaced nothing


# ----------------------------------------------------------------------------- export --out


@pytest.fixture
def fake_experiment(tmp_path: Path, synthetic_root: Path) -> Path:
    """A directory with a resolved sweep.json (no trials): enough for the --out checks."""
    from search.config import SPEC_FILE
    from search.resolve import resolve_sweep

    spec = resolve_sweep(
        None, [f"data.root={synthetic_root}"], name="exp", storage=str(tmp_path / "runs")
    )
    spec.experiment_dir.mkdir(parents=True)
    (spec.experiment_dir / SPEC_FILE).write_text(json.dumps(spec.to_dict()))
    (spec.experiment_dir / "study.journal").write_text("journal")
    return spec.experiment_dir


@pytest.mark.parametrize("where", ["itself", "a trial dir", "a user folder", "the storage root"])
def test_export_refuses_an_out_it_would_destroy(fake_experiment: Path, where: str) -> None:
    from search.export import export_experiment

    out = {
        "itself": fake_experiment,
        "a trial dir": fake_experiment / "trial_abc",
        "a user folder": fake_experiment.parent.parent / "mine",
        "the storage root": fake_experiment.parent,
    }[where]
    files = user_files(out) if where == "a user folder" else {}
    before = sorted(p for p in fake_experiment.rglob("*"))
    match = "inside the experiment" if "trial" in where or where == "itself" else "not empty"
    with pytest.raises(UserInputError, match=match):
        export_experiment(fake_experiment, out)
    assert intact(out, files)
    assert sorted(p for p in fake_experiment.rglob("*")) == before
    assert (fake_experiment / "study.journal").read_text() == "journal"


def test_export_cli_refusal_is_one_line(fake_experiment: Path) -> None:
    proc = cli("export", str(fake_experiment), "--out", str(fake_experiment))
    assert proc.returncode == 2, proc.stderr
    assert "inside the experiment" in proc.stderr and "Traceback" not in proc.stderr
    assert (fake_experiment / "sweep.json").is_file()


# ----------------------------------------------------------------------------- sweep --name


def test_sweep_refuses_a_name_that_is_a_non_empty_folder(tmp_path: Path, synthetic_root) -> None:
    runs = tmp_path / "runs"
    files = user_files(runs / "photos")
    proc = cli(
        "sweep",
        "--set",
        f"data.root={synthetic_root}",
        "--name",
        "photos",
        "--storage",
        str(runs),
    )
    assert proc.returncode == 2, proc.stderr
    assert "is not empty and is not an mmr-sweep experiment" in proc.stderr
    assert "--name" in proc.stderr and "Traceback" not in proc.stderr
    assert intact(runs / "photos", files) and sorted(os.listdir(runs / "photos")) == [
        "notes.txt",
        "sub",
    ]
