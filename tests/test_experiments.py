"""Experiments on disk: bad data stops a sweep before any trial, a deterministic failure runs
once, exports replace only their own output, and a copied experiment works with every command."""

from __future__ import annotations

import filecmp
import html
import json
import shutil
from pathlib import Path

import optuna
import pytest
from test_search import _driver_env, _sweep_args, cli, interrupted_sweep, spec_for, study

from mmr.errors import UserInputError
from mmr.outdir import MARKER
from search.confirm import NO_FLOOR

pytestmark = pytest.mark.slow


def copy_data(synthetic_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    return root


# ----------------------------------------------------------------------------- bad data


@pytest.mark.parametrize("damage", ["truncated png", "missing mask"])
def test_bad_data_stops_the_sweep_before_any_trial(synthetic_root, tmp_path, damage):
    root = copy_data(synthetic_root, tmp_path)
    if damage == "truncated png":
        bad = sorted((root / "disk/train/good").glob("*.png"))[3]
        bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
        named = bad.name
    else:
        bad = sorted((root / "disk/ground_truth").rglob("*_mask.png"))[0]
        bad.unlink()
        named = bad.name.replace("_mask", "")  # the defect image without its mask
    proc = cli("sweep", *_sweep_args(tmp_path, root, "bad"), env=_driver_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert named in line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "bad").exists()  # no experiment, no trial


# ----------------------------------------------------------------------------- exports, copies


@pytest.fixture(scope="module")
def finished(ray_session, synthetic_root, tmp_path_factory) -> Path:
    """A finished 2-trial sweep with its own export (read-only for the tests below)."""
    from search.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("finished")
    spec = spec_for(tmp, synthetic_root, "search.num_trials=2", "scheduler.type=fifo", name="done")
    run = run_sweep(spec, write=lambda _: None, dashboard=False)
    assert (run.export_dir / MARKER).is_file()
    return run.experiment_dir


def test_export_replaces_its_own_output_and_nothing_else(finished, tmp_path):
    from search.export import export_experiment

    out = tmp_path / "best"
    export_experiment(finished, out, overlays=2)
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "export" and "best.yaml" in marker["files"]
    export_experiment(finished, out, overlays=2)  # an earlier export of it: replaced
    assert (out / "best.yaml").is_file()
    (out / "my-notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="my-notes.txt"):
        export_experiment(finished, out, overlays=2)
    assert (out / "my-notes.txt").read_text() == "mine" and (out / "best.yaml").is_file()


def test_copied_experiment_works_with_status_export_and_resume(finished, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy, symlinks=True)
    proc = cli("status", str(copy), env=_driver_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 done" in proc.stdout
    # No confirmation ran: status and the report say that seed noise was not measured.
    assert NO_FLOOR in " ".join(proc.stdout.split())
    proc = cli("export", str(copy), "--out", str(tmp_path / "out"), env=_driver_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert NO_FLOOR in (tmp_path / "out" / "results.md").read_text()
    assert html.escape(NO_FLOOR) in (tmp_path / "out" / "report.html").read_text()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["noise_floor"] is None
    assert (tmp_path / "out" / "best.yaml").is_file()
    # Its own export/ came along from the original, and is the copy's to replace.
    proc = cli("export", str(copy), "--out", str(copy / "export"), env=_driver_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (finished / "export" / "best.yaml").is_file()  # the original's is untouched


def test_resuming_a_copy_of_an_interrupted_sweep_leaves_the_original_alone(
    ray_session, synthetic_root, tmp_path
):
    from search.results import load_trials

    exp, returncode, out = interrupted_sweep(ray_session, tmp_path, synthetic_root, "orig")
    assert returncode == 130, out[-3000:]
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(exp, copy, symlinks=True)
    journal = (exp / "study.journal").read_bytes()
    original_trials = sorted(p.name for p in exp.glob("trial_*"))
    proc = cli("resume", str(copy), "--address", ray_session, env=_driver_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(load_trials(copy)["state"]) == {"done"} and (copy / "export").is_dir()
    # The trial the resumed copy created wrote into the copy, not into the original.
    assert sorted(p.name for p in exp.glob("trial_*")) == original_trials
    copied = sorted(p.name for p in copy.glob("trial_*"))
    assert len(copied) == 2 and set(original_trials) < set(copied)
    assert all((copy / name / "result.json").is_file() for name in copied)
    finished = [t for t in study(copy, "orig").trials if t.state.is_finished()]
    assert len(finished) == 2
    # Every study write went to the copy's journal, every trial to the copy's directory.
    assert (exp / "study.journal").read_bytes() == journal
    assert not (exp / "export").exists()
    unfinished = load_trials(exp)["state"].isin(["running", "pending"]).sum()
    assert unfinished >= 1
    assert not filecmp.cmp(exp / "study.journal", copy / "study.journal", shallow=False)
    assert {t.state for t in study(copy, "orig").trials} <= {
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.FAIL,
    }


def test_resuming_a_moved_interrupted_sweep_runs_and_writes_only_where_it_now_is(
    ray_session, synthetic_root, tmp_path
):
    from search.results import load_trials

    exp, returncode, out = interrupted_sweep(ray_session, tmp_path, synthetic_root, "moved")
    assert returncode == 130, out[-3000:]
    moved = tmp_path / "archive" / "moved"
    moved.parent.mkdir()
    shutil.move(exp, moved)
    proc = cli("resume", str(moved), "--address", ray_session, env=_driver_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = load_trials(moved)
    assert set(trials["state"]) == {"done"} and len(trials) == 2
    assert all((moved / f"trial_{t}" / "result.json").is_file() for t in trials["trial"])
    assert (moved / "export" / "summary.json").is_file()
    assert not exp.exists()  # nothing written back at the old place
