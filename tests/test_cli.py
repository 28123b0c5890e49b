"""The command line: help, errors as one clear line with exit code 2, synth."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import launch
from mmr.config import Config
from mmr.data import list_tasks

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_help_lists_every_command():
    out = run("--help").stdout
    for command in (
        "synth",
        "train",
        "sweep",
        "resume",
        "status",
        "export",
        "submit",
        "weights",
        "dashboard",
    ):
        assert command in out


def test_console_script_points_at_main():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'mmr-sweep = "launch:main"' in text
    assert callable(launch.main)


def test_synth_writes_an_mvtec_dataset_identical_for_the_same_seed(tmp_path: Path):
    for name in ("a", "b"):
        proc = run(
            "synth",
            "--out",
            str(tmp_path / name),
            "--categories",
            "2",
            "--size",
            "64",
            "--seed",
            "3",
        )
        assert proc.returncode == 0, proc.stderr
    cfg = Config.from_dict(
        {"data.dataset": "synthetic", "data.root": str(tmp_path / "a"), "data.categories": "all"}
    )
    tasks = list_tasks(cfg.data)
    assert [t.name for t in tasks] == ["disk", "pill"]
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert files_a == files_b
    assert all(
        (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["synth", "--out", "{tmp}"], "not empty"),
        (["train", "--config", "nope.yaml"], "does not exist"),
        (["train", "--set", "model.mask_ratio"], "expected KEY=VALUE"),
        (["sweep", "--set", "search.sampler=bayes"], "search.sampler must be one of"),
        (["sweep", "--config", "nope.yaml"], "does not exist"),
        (["status"], "needs an EXPERIMENT_DIR"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path, args: list, message: str):
    (tmp_path / "x").write_text("occupied")
    proc = run(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_submitted_sweep_is_labelled_with_the_name_it_will_run_under(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's dashboard metadata names the sweep as `launch.py sweep` would resolve it."""
    import cluster.jobs

    config = tmp_path / "sweep.yaml"
    config.write_text("name: from-file\n")
    assert launch._submitted_sweep_name(str(config), [], None) == "from-file"
    assert launch._submitted_sweep_name(str(config), ["name=from-set"], None) == "from-set"
    assert launch._submitted_sweep_name(str(config), ["name=x"], "from-flag") == "from-flag"
    assert launch._submitted_sweep_name(None, [], None) == "demo"  # the demo sweep's name
    assert launch._submitted_sweep_name("/on/the/cluster.yaml", [], None) is None

    sent: dict = {}
    monkeypatch.setattr(cluster.jobs, "submit_job", lambda *a, **kw: sent.update(kw) or "id")
    cluster.jobs.submit_sweep("http://x", ["--storage", "/s"], working_dir=tmp_path)
    assert sent["metadata"] == {"mmr_sweep": "sweep"}
    cluster.jobs.submit_sweep(
        "http://x", ["--storage", "/s"], working_dir=tmp_path, sweep_name="mine"
    )
    assert sent["metadata"] == {"mmr_sweep": "sweep", "mmr_sweep_name": "mine"}
