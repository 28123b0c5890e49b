"""Shared helpers of the benchmark suite: result rows, child processes, test data, machine facts.

A benchmark module exposes ``run(quick: bool = False, smoke: bool = False) -> list[dict]``.
Each row is a dict with

- ``benchmark``: short name; ``section``: the suite's section it belongs to (see ``run.py``);
- ``figure``: what was measured; ``note``: how, and what the reference is;
- ``project_s`` / ``reference_s``: the two measurements, in ``unit`` (seconds unless the row
  has another ``unit``, e.g. ``MB`` or ``epochs``);
- ``ratio``: how many times better the project is, i.e. ``reference / project`` for costs and
  ``project / reference`` for scores; both sides are always measured in the same run;
- ``target`` (optional): the issue's target in words; ``met``: True/False, None without target.

This module imports only the standard library (and ``mmr.fileio``, which does too), torch-free,
so that every benchmark (and the GPU script, which has no Ray or Optuna) can use it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from mmr.fileio import atomic_write

__all__ = [
    "ROOT",
    "ChildError",
    "format_row",
    "jsonable",
    "machine_info",
    "peak_rss_mb",
    "row",
    "run_child",
    "synthetic_data",
    "write_child_result",
]

ROOT = Path(__file__).resolve().parent.parent


class ChildError(RuntimeError):
    """A benchmark child process failed or timed out; the message holds its log's tail."""


def row(
    benchmark: str,
    figure: str,
    project: float,
    reference: float,
    *,
    note: str,
    section: str,
    unit: str = "s",
    higher_is_better: bool = False,
    target: str | None = None,
    met: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One result row; ``ratio`` is oriented so that > 1 means the project is better."""
    if project == reference:  # also 0 == 0 (e.g. two AUROCs of 0 on a tiny smoke set)
        ratio = 1.0
    elif higher_is_better:
        ratio = project / reference if reference else float("nan")
    else:
        ratio = reference / project if project else float("nan")
    return {
        "benchmark": benchmark,
        "section": section,
        "figure": figure,
        "project_s": float(project),
        "reference_s": float(reference),
        "ratio": float(ratio),
        "unit": unit,
        "note": note,
        "target": target,
        "met": None if met is None else bool(met),  # numpy bools do not serialise
        **extra,
    }


def format_row(r: Mapping[str, Any]) -> str:
    """One row as two console lines: the figures, then the note."""
    unit = r.get("unit", "s")
    met = {True: "  [target met]", False: "  [target NOT met]"}.get(r.get("met"), "")
    return (
        f"{r['benchmark']:<22} project {_num(r['project_s'])} {unit:<6} reference "
        f"{_num(r['reference_s'])} {unit:<6} ratio {r['ratio']:7.2f}x{met}\n"
        f"{'':22} {r['figure']}; {r['note']}"
    )


def _num(value: float) -> str:
    return f"{value:9.4f}" if abs(value) < 10 else f"{value:9.1f}"


def peak_rss_mb() -> dict[str, float]:
    """Peak resident set size (MB) of this process and of its waited-for children.

    On Linux ``self`` is ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` survives ``exec``
    and would report the RSS of the (large) parent at ``fork`` time for a fresh child.
    """
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024**2  # KiB on Linux, B on macOS
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                own = int(line.split()[1]) / 1024
                break
    except OSError:
        pass
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return {"self": own, "children": children}


def jsonable(value: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars/arrays and paths as plain values."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_child_result(path: str | Path, result: Mapping[str, Any]) -> None:
    """Writes a child's JSON result atomically (the parent reads it after the exit)."""
    atomic_write(path, json.dumps(result, indent=1, default=jsonable))


def run_child(
    module: str,
    spec: Mapping[str, Any],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Runs ``python -m <module> --child <spec json>`` and returns its JSON result.

    The child gets ``spec["result"]`` (a file path) to write its result to; its output goes to
    a log file next to it. ``wall_s`` (interpreter start to exit, measured here) and
    ``started_at`` (``time.time()`` just before the start) are added. On a
    timeout the child gets SIGTERM first, so that it can shut down what it started (Ray).
    """
    workdir = Path(workdir or tempfile.mkdtemp(prefix="bench-child-"))
    result_path = workdir / f"result-{os.getpid()}-{time.monotonic_ns()}.json"
    log_path = result_path.with_suffix(".log")
    spec = {**spec, "result": str(result_path)}
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [child_env.get("PYTHONPATH")])]
    )
    cmd = [sys.executable, "-m", module, "--child", json.dumps(spec)]
    started_at = time.time()
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise ChildError(
                f"{module} child timed out after {timeout:.0f} s: {_tail(log_path)}"
            ) from exc
    wall = time.perf_counter() - start
    if code != 0 or not result_path.is_file():
        raise ChildError(f"{module} child exited with {code}: {_tail(log_path)}")
    result = json.loads(result_path.read_text())
    result["wall_s"] = wall
    result["started_at"] = started_at  # wall-clock stamp just before the child was started
    return result


def child_main(
    doc: str | None,
    run: Callable[..., list[dict[str, Any]]],
    child: Callable[[Any], None],
    *,
    quick_help: str,
) -> None:
    """``main`` of a benchmark module that measures in child processes: ``--child SPEC`` runs
    one child (``child(json spec)``), otherwise ``run(quick=...)`` and print its rows."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    for result in run(quick=args.quick):
        print(format_row(result))
    sys.stdout.flush()


def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-chars:]


def synthetic_data(
    out: Path, *, categories: Sequence[str], size: int, n_train: int, n_test: int
) -> Path:
    """The project's synthetic set (``mmr.synth``), ``n_test`` good + ``n_test`` defective."""
    from mmr import synth

    return synth.generate(
        out,
        categories=list(categories),
        size=size,
        seed=0,
        n_train=n_train,
        n_test_good=n_test,
        n_test_defect=n_test,
    )


def machine_info() -> dict[str, Any]:
    """CPU model, core count, RAM, load, GPU (if torch sees one) and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gib = int(line.split()[1]) / 1024**2
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "ray", "optuna", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": ram_gib,
        "load": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "versions": versions,
    }
