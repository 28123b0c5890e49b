"""Issue 20 (round 2), part b: errors named in one line, and sweeps that no longer fail or
mislead: storage URIs, a damaged sweep.json, an unwritable --out, one-round sweeps, warm-up
epochs, data choices of the space, sweep-section suggestions, the default sampler, and the
output after Ctrl-C or of resuming a finished sweep."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

import launch
from mmr.config import load_config
from mmr.errors import ConfigError, UserInputError
from search import storage
from search.resolve import resolve_sweep

ROOT = Path(__file__).resolve().parent.parent


def _one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert launch.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- 6: storage URIs


def test_a_bad_storage_uri_names_the_uri_and_pyarrows_cause(capsys) -> None:
    uri = "s3://bucket/runs/x?no_such_option=1"  # pyarrow.ArrowInvalid, offline
    err = _one_line_error(capsys, "status", uri)
    assert uri in err and "no_such_option" in err and "AttributeError" not in err


def test_unreachable_storage_names_the_uri_and_the_cause(monkeypatch) -> None:
    class Offline:
        def get_file_info(self, path: str) -> None:
            raise OSError("AWS Error NETWORK_CONNECTION: Could not resolve host")

    monkeypatch.setattr(storage, "_fs", lambda location: (Offline(), "bucket/runs"))
    uri = "s3://bucket/runs"
    for call in (lambda: storage.exists(uri, "sweep.json"), lambda: storage.is_empty(uri)):
        with pytest.raises(UserInputError) as err:
            call()
        assert uri in str(err.value) and "Could not resolve host" in str(err.value)


# ----------------------------------------------------------------------------- 7: sweep.json


@pytest.mark.parametrize("command", ["status", "resume"])
def test_a_truncated_sweep_json_is_one_line_naming_the_file(tmp_path, capsys, command) -> None:
    exp = tmp_path / "demo"
    exp.mkdir()
    (exp / "sweep.json").write_text('{"sweep": {"name": "demo", "ba')
    err = _one_line_error(capsys, command, str(exp))
    assert str(exp / "sweep.json") in err and "JSONDecodeError" in err
    assert "another --name" in err


# ----------------------------------------------------------------------------- 8: --out


def test_train_out_that_cannot_be_created_is_one_line(tmp_path, capsys) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder should be")
    out = blocker / "sub"
    err = _one_line_error(capsys, "train", "--config", "configs/tiny.yaml", "--out", str(out))
    assert f"--out {out}" in err and f"{blocker} is a file" in err
    assert blocker.read_text() == "a file where a folder should be"


def test_export_out_that_cannot_be_created_is_a_user_error(tmp_path) -> None:
    from mmr.outdir import creating

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = blocker / "sub"
    with pytest.raises(UserInputError, match=rf"--out {out}: cannot create .*is a file"):
        with creating(out, f"--out {out}"):
            out.parent.mkdir(parents=True, exist_ok=True)
    with pytest.raises(UserInputError, match="Permission denied"):
        with creating(out, f"--out {out}"):
            raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))


def test_export_out_inside_a_file_is_refused_before_writing(tmp_path, monkeypatch) -> None:
    import search.export as export

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    exp = tmp_path / "exp"
    spec = type("Spec", (), {"experiment_location": str(exp), "experiment_dir": exp})()
    monkeypatch.setattr(export, "load_spec", lambda experiment: spec)
    monkeypatch.setattr(export, "load_trials", lambda location: pd.DataFrame())
    monkeypatch.setattr(export, "best_trials", lambda df: {None: {"trial": "t"}})
    monkeypatch.setattr(export, "_export", lambda *a, **k: pytest.fail("exported"))
    with pytest.raises(UserInputError, match=r"--out .*sub: cannot create .*file.txt is a file"):
        export.export_experiment(exp, blocker / "sub")


# ----------------------------------------------------------------------------- 9: one round


def test_a_one_round_sweep_runs_without_early_stopping_and_says_so(tmp_path, caplog) -> None:
    over = [
        "train.epochs=1",
        "train.eval_every=1",
        "train.warmup_epochs=0",
        "scheduler.type=median",
    ]
    with caplog.at_level(logging.WARNING, logger="search.config"):
        spec = resolve_sweep(None, over, name="one", storage=str(tmp_path))
    assert spec.sweep.scheduler.type == "fifo"  # the stored spec says what runs
    assert "early stopping off" in caplog.text and "trials run every round" in caplog.text
    assert spec.to_dict()["sweep"]["scheduler"]["type"] == "fifo"


# ----------------------------------------------------------------------------- 10: warm-up


def test_warmup_not_below_the_epochs_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epochs=4", "train.warmup_epochs=4", "train.lr_milestones=[]"])
    message = str(err.value)
    assert "train.warmup_epochs=4" in message and "train.epochs=4" in message
    assert "below 4" in message


def test_a_space_cannot_sample_warmup_beyond_the_epochs(tmp_path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(
        "train.epochs: {type: int, low: 6, high: 24}\n"
        "train.warmup_epochs: {type: int, low: 0, high: 8}\n"
    )
    with pytest.raises(UserInputError, match=r"train.warmup_epochs reaches 8.*down to 6"):
        resolve_sweep(None, [f"space={space}"], name="w", storage=str(tmp_path))
    space.write_text(
        "train.epochs: {type: int, low: 12, high: 24}\n"
        "train.warmup_epochs: {type: int, low: 0, high: 8}\n"
    )
    resolve_sweep(None, [f"space={space}"], name="w", storage=str(tmp_path))


# ----------------------------------------------------------------------------- 11: data choices


def test_every_data_choice_of_the_space_is_checked_on_the_driver(tmp_path, synthetic_root) -> None:
    import shutil

    from search.sweep import check_sweep_data

    # MVTec-layout data of the user's own (a generated set without its marker).
    real = shutil.copytree(synthetic_root, tmp_path / "real")
    (real / ".mmr-synthetic.json").unlink()
    missing = tmp_path / "missing"
    space = tmp_path / "space.yaml"
    space.write_text(
        "mask_ratio: {type: float, low: 0.1, high: 0.5}\n"
        f"data.root: {{type: categorical, choices: [{real}, {missing}]}}\n"
    )
    over = [
        f"space={space}",
        "data.dataset=mvtec",
        f"data.root={real}",
        "data.categories=[disk]",
    ]
    spec = resolve_sweep(None, over, name="d", storage=str(tmp_path))
    with pytest.raises(UserInputError) as err:
        check_sweep_data(spec, address=None, write=print)
    message = str(err.value)
    assert "data.root" in message and str(missing) in message and "\n" not in message
    assert "remove the choice" in message
    space.write_text(f"data.root: {{type: categorical, choices: [{real}, data]}}\n")
    spec = resolve_sweep(None, over, name="d", storage=str(tmp_path))
    with pytest.raises(UserInputError, match="choice 'data': a relative path"):
        check_sweep_data(spec, address=None, write=print)


# ----------------------------------------------------------------------------- 12: Ctrl-C, resume


def test_rays_restore_hint_is_silenced() -> None:
    from search.sweep import _quiet_tune_output

    _quiet_tune_output()
    tune_log = logging.getLogger("ray.tune.tune")
    hint = (
        'Experiment has been interrupted, but ...\nResume experiment with: Tuner.restore(path="x")'
    )
    for msg, kept in [(hint, False), ("Trials did not complete: %s", False), ("other", True)]:
        record = tune_log.makeRecord("ray.tune.tune", logging.WARNING, "tune.py", 1, msg, (), None)
        assert bool(tune_log.filter(record)) is kept


def test_resume_of_a_finished_sweep_says_so_and_starts_nothing(tmp_path, monkeypatch) -> None:
    import search.results as results
    import search.sweep as sweep
    from mmr.fileio import atomic_write

    over = ["search.num_trials=3", "search.confirm.top_k=0"]  # (with it: confirmation to run)
    spec = resolve_sweep(None, over, name="fin", storage=str(tmp_path))
    spec.experiment_dir.mkdir(parents=True)
    atomic_write(spec.experiment_dir / "sweep.json", json.dumps(spec.to_dict()))
    monkeypatch.setattr(sweep.tune.Tuner, "can_restore", lambda location: True)
    states = ["done", "stopped", "failed"]
    monkeypatch.setattr(results, "load_trials", lambda exp: pd.DataFrame({"state": states}))

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started for a finished sweep")

    monkeypatch.setattr(sweep, "init_ray", no_ray)
    lines: list[str] = []
    run = sweep.resume_sweep(spec.experiment_dir, write=lines.append, dashboard=False)
    assert lines[0] == "fin: already complete (3 trials); nothing to resume"
    # ... and its failed trial is named, with how to run it again (nothing runs now).
    assert len(lines) == 2 and "1 trial(s) failed" in lines[1] and "--retry-failed" in lines[1]
    assert not run.interrupted
    # --retry-failed has a failed trial to run again; an unfinished sweep goes on too.
    for retry, states[:] in [(True, ["done", "stopped", "failed"]), (False, ["done", "done"])]:
        with pytest.raises(AssertionError, match="Ray started"):
            sweep.resume_sweep(spec.experiment_dir, write=lines.append, retry_failed=retry)


# ----------------------------------------------------------------------------- 13: sections


def test_a_misspelt_sweep_section_suggests_the_sweep_key(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_sweep(None, ["serch.num_trials=2"], name="s", storage=str(tmp_path))
    message = str(err.value)
    assert "did you mean 'search.num_trials'" in message
    assert "sweep keys" in message and "training keys" in message


# ----------------------------------------------------------------------------- 14: sampler


def test_the_default_sampler_is_the_evidences_and_named_in_the_spec(tmp_path) -> None:
    def sampler(*over: str) -> str:
        spec = resolve_sweep(None, list(over), name="s", storage=str(tmp_path))
        assert spec.to_dict()["sweep"]["search"]["sampler"] == spec.sweep.search.sampler
        return spec.sweep.search.sampler

    from benchmarks.replay import DEFAULT_STRATEGY, STRATEGIES

    # One objective: the evidence's pick (the demo's default); several: TPE.
    assert sampler() == STRATEGIES[DEFAULT_STRATEGY].sampler == "gp"
    assert sampler("objective.metrics=[image_auroc, aupro]") == "tpe"
    assert sampler("objective.metrics=[image_auroc, aupro]", "search.sampler=nsga2") == "nsga2"
    with pytest.raises(ConfigError, match="^search.sampler cmaes optimises one objective"):
        sampler("objective.metrics=[image_auroc, aupro]", "search.sampler=cmaes")
