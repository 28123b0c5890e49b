"""Packaging: one version, dependency bounds stated once (pyproject.toml), a non-editable install.

pyproject.toml is the one place that states the project's version source and the Ray/Optuna
bounds; the installed releases and the Ray release the cluster images pin are checked against
it here, so that nothing else repeats the numbers unchecked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from fast import FAST_SWEEP
from packaging.requirements import Requirement
from packaging.version import Version

import mmr

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Files that pin a Ray release or name the project's image tag.
CLUSTER_FILES = sorted(
    p for p in (ROOT / "cluster").rglob("*") if p.is_file() and p.suffix in {".yaml", ""}
)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _requirement(name: str) -> Requirement:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    (req,) = [r for r in reqs if r.name == name]
    return req


def test_the_version_is_written_only_in_mmr_init() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    dynamic = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "mmr.__version__"}
    assert Version(mmr.__version__)  # a valid version


def test_image_tags_of_the_project_follow_its_version() -> None:
    tags = {}
    for path in [*CLUSTER_FILES, *DOCS]:
        for tag in re.findall(r"REGISTRY/mmr-sweep:([\w.]+)", path.read_text()):
            tags[f"{path.relative_to(ROOT)}: {tag}"] = tag
    assert tags  # the Dockerfile and the KubeRay manifests name one
    assert {k for k, t in tags.items() if t != mmr.__version__} == set()


@pytest.mark.parametrize("name", ["ray", "optuna"])
def test_private_internals_users_are_bounded_and_the_installed_release_fits(name: str) -> None:
    spec = _requirement(name).specifier
    # search/ uses private internals: an unbounded range lets CI pick an untested release.
    assert any(s.operator == "<" for s in spec), f"{name} needs an upper bound"
    installed = metadata.version(name)
    assert spec.contains(installed, prereleases=True), (
        f"installed {name} {installed} is outside pyproject.toml's {name}{spec}"
    )


def test_cluster_ray_pins_fall_within_pyprojects_bound() -> None:
    spec = _requirement("ray").specifier
    pins: dict[str, str] = {}
    for path in CLUSTER_FILES:
        text = path.read_text()
        found = re.findall(r"rayproject/ray:(\d[\w.]*?)-py", text)
        found += re.findall(r"rayVersion:\s*[\"']?([\w.]+)", text)
        for version in found:
            pins[f"{path.relative_to(ROOT)}: {version}"] = version
    assert len(pins) >= 4  # Dockerfile, aws.yaml, gcp.yaml, the KubeRay manifests
    outside = [k for k, v in pins.items() if not spec.contains(v, prereleases=True)]
    assert not outside, f"cluster Ray pins outside pyproject.toml's ray{spec}: {outside}"
    assert len(set(pins.values())) == 1, f"the cluster files pin different Rays: {pins}"


# ------------------------------------------------------------------ non-editable install


def _source_copy(dest: Path) -> Path:
    """The working tree (tracked and untracked, minus ignored files) copied to ``dest``.

    pip builds from the copy, so build/ and *.egg-info never appear in the checkout.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0:  # not a git checkout (e.g. an unpacked sdist)
        ignore = shutil.ignore_patterns(
            ".git", "build", "dist", "runs", "*.egg-info", "__pycache__", ".*_cache"
        )
        shutil.copytree(ROOT, dest, ignore=ignore)
        return dest
    for name in filter(None, listed.stdout.decode().split("\0")):
        src = ROOT / name
        if src.is_file():  # listed but deleted in the working tree: skip
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _build_leftovers() -> set[str]:
    return {p.name for p in ROOT.iterdir() if p.name in {"build", "dist"} or ".egg-info" in p.name}


@pytest.mark.slow
def test_non_editable_install_runs_the_cli_and_a_demo_sweep(
    synthetic_root: Path, tmp_path: Path
) -> None:
    before = _build_leftovers()
    venv = tmp_path / "venv"
    # The dependencies come from the system site-packages: fast, and offline. Without a pip of
    # its own, the venv also builds with the system's pip and setuptools, not ensurepip's
    # older setuptools (which lacks bdist_wheel without the wheel package).
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
    )
    python, script = venv / "bin" / "python", venv / "bin" / "mmr-sweep"
    # No PYTHONPATH (it may name the checkout) and no user site: only the venv's copy counts.
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env |= {
        "PYTHONNOUSERSITE": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "RAY_AUTH_MODE": "disabled",
        "MMR_DASHBOARD": "0",
    }
    src = _source_copy(tmp_path / "src")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
        + ["--no-index", str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert _build_leftovers() == before  # nothing built into the checkout

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout
        )

    # The venv's own copy wins over the system's editable install of the checkout (its
    # finder comes after the path entries, so a copy in the venv shadows it).
    where = run(
        str(python),
        "-c",
        "import importlib.metadata as m, launch, mmr, search, spaces; "
        "print(m.version('mmr-sweep')); "
        "print('\\n'.join(x.__file__ for x in (launch, mmr, search, spaces)))",
    )
    assert where.returncode == 0, where.stderr[-3000:]
    version, *files = where.stdout.split()
    assert version == mmr.__version__
    site = venv.resolve()
    for file in files:
        assert Path(file).resolve().is_relative_to(site), f"{file} is not the venv's copy"

    helped = run(str(script), "sweep", "--help")
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "--config" in helped.stdout and "demo" in helped.stdout

    # The demo sweep (default config), as small as it gets: one trial of a few seconds.
    fast = [
        f"data.root={synthetic_root}",
        *FAST_SWEEP,
        "train.epochs=2",
        "train.lr_milestones=[1]",
        "search.num_trials=1",
        "search.max_concurrent=1",
    ]
    sets = [a for item in fast for a in ("--set", item)]
    swept = run(
        str(script), "sweep", *sets, "--name", "pkg", "--storage", str(tmp_path / "runs"),
        timeout=600,
    )  # fmt: skip
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    export = tmp_path / "runs" / "pkg" / "export"
    assert (export / "model.pt").is_file() and (export / "best.yaml").is_file()
