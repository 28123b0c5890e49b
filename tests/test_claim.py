"""One driver per experiment (issue 20): two sweeps of one --name never share an experiment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_search import spec_for

from mmr.errors import UserInputError
from search import sweep
from search.claim import CLAIM_FILE, claimed

ROOT = Path(__file__).resolve().parent.parent


def test_a_second_claim_is_refused_and_a_released_one_leaves_nothing(tmp_path: Path) -> None:
    exp = tmp_path / "runs" / "x"
    with claimed(exp, str(exp)) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(
            UserInputError, match=rf"{exp}' is in use: a sweep \(pid {os.getpid()}"
        ):
            with claimed(exp, str(exp)):
                pass
        assert path.is_file()  # the refused claim did not touch the holder's
    assert not exp.exists()  # created for the claim, empty: removed on release
    exp.mkdir()
    (exp / "sweep.json").write_text("{}")
    with claimed(exp, str(exp)):
        pass
    assert os.listdir(exp) == ["sweep.json"]  # an existing experiment stays, minus the claim


def test_a_claim_held_by_another_process_and_taken_over_once_it_died(tmp_path: Path) -> None:
    exp = tmp_path / "x"
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from search.claim import claimed
        with claimed(Path({str(exp)!r}), "x"):
            print("held", flush=True)
            time.sleep(120)
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(UserInputError, match=rf"in use: a sweep \(pid {child.pid} on "):
            with claimed(exp, "x"):
                pass
    finally:
        os.kill(child.pid, signal.SIGKILL)  # a crashed sweep: its claim file stays behind
        child.wait()
    assert json.loads((exp / CLAIM_FILE).read_text())["pid"] == child.pid
    with claimed(exp, "x") as path:  # stale: taken over
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_sweep_started_while_another_starts_is_refused(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second `sweep --name t` is refused before Ray starts; a failed start frees the name."""
    spec = spec_for(tmp_path, synthetic_root)
    second: list[BaseException] = []

    class Stop(Exception):
        pass

    def init_ray(*args: object, **kwargs: object) -> None:
        # The first sweep is starting up: a second one of the same name comes along.
        try:
            sweep.run_sweep(spec, export=False)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            second.append(exc)
        raise Stop  # the first one's start fails

    monkeypatch.setattr(sweep, "init_ray", init_ray)
    with pytest.raises(Stop):
        sweep.run_sweep(spec, export=False)
    assert len(second) == 1 and isinstance(second[0], UserInputError), second
    assert f"experiment {spec.experiment_location!r} is in use" in str(second[0])
    assert "another --name" in str(second[0]) and "launch.py resume" in str(second[0])
    # The failed start released its claim and left no folder: a retry may start at once.
    assert not spec.experiment_dir.exists()
    with claimed(spec.experiment_dir, spec.experiment_location):
        pass


def test_sweep_resume_refuses_values_it_cannot_apply(synthetic_root: Path, tmp_path: Path) -> None:
    """Issue 20: `sweep --name X --resume --set search.num_trials=3` silently kept 2 trials."""
    from search.config import SPEC_FILE

    stored = spec_for(tmp_path, synthetic_root, "search.num_trials=2")
    stored.experiment_dir.mkdir(parents=True)
    (stored.experiment_dir / SPEC_FILE).write_text(json.dumps(stored.to_dict()))
    changed = spec_for(tmp_path, synthetic_root, "search.num_trials=3", "train.epochs=5")
    with pytest.raises(UserInputError) as err:
        sweep.run_sweep(changed, resume=True, export=False)  # refused before Ray starts
    message = str(err.value)
    # More trials would be applied; the changed training config cannot be.
    assert "these values differ: train.epochs (4 -> 5)" in message
    assert "search.num_trials" not in message.split("these values differ:")[1]
    assert (
        "another --name" in message and f"launch.py resume {stored.experiment_location}" in message
    )
    assert os.listdir(stored.experiment_dir) == [SPEC_FILE]  # nothing written, nothing claimed
    # The same values again: nothing to refuse.
    sweep._refuse_resume_changes(spec_for(tmp_path, synthetic_root, "search.num_trials=2"), stored)


def test_sweep_resume_refuses_fewer_trials(synthetic_root: Path, tmp_path: Path) -> None:
    from search.config import SPEC_FILE

    stored = spec_for(tmp_path, synthetic_root, "search.num_trials=3")
    stored.experiment_dir.mkdir(parents=True)
    (stored.experiment_dir / SPEC_FILE).write_text(json.dumps(stored.to_dict()))
    fewer = spec_for(tmp_path, synthetic_root, "search.num_trials=2")
    with pytest.raises(UserInputError, match=r"search.num_trials \(3 -> 2\)"):
        sweep.run_sweep(fewer, resume=True, export=False)


@pytest.mark.slow
def test_sweep_resume_with_more_trials_runs_them(
    ray_session, synthetic_root: Path, tmp_path: Path
) -> None:
    """`sweep --name X --resume --set search.num_trials=3` on a finished 2-trial sweep."""
    from search.results import load_trials

    fast = ["scheduler.type=fifo", "train.epochs=2", "train.lr_milestones=[2]"]
    two = spec_for(tmp_path, synthetic_root, "search.num_trials=2", *fast)
    sweep.run_sweep(two, write=lambda _: None, dashboard=False, export=False)
    assert len(load_trials(two.experiment_dir)) == 2
    lines: list[str] = []
    three = spec_for(tmp_path, synthetic_root, "search.num_trials=3", *fast)
    sweep.run_sweep(three, resume=True, write=lines.append, dashboard=False, export=False)
    assert "search.num_trials: 2 -> 3 (the resumed sweep runs the new trials)" in lines
    df = load_trials(two.experiment_dir)
    assert len(df) == 3 and set(df["state"]) == {"done"}, df
    stored = json.loads((two.experiment_dir / "sweep.json").read_text())
    assert stored["sweep"]["search"]["num_trials"] == 3
