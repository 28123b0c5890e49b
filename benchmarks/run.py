"""The benchmark suite: every figure a ratio against a reference measured in the same run.

    python benchmarks/run.py [--quick] [--only data,metrics,train,search] [--out BENCHMARKS.md]
                             [--json results.json] [--from-json results.json]

Runs the benchmark modules one after the other, prints each row as it comes and writes
``BENCHMARKS.md`` (machine, versions, command, load, one table per benchmark, targets met or
not). A ``--quick`` run is marked as such in the file: its sizes are reduced and its figures
are indicative only. GPU figures come from ``benchmarks/gpu.py`` on a GPU machine: when
``benchmarks/gpu_results*.json`` files exist (and are not dry runs) their rows are included.

Sections: 1 data pipeline (bench_data), 2 training step (bench_train), 3 metrics
(bench_metrics), 4 search efficiency (bench_search), 5 memory (bench_train), 6 sweep overhead
(bench_search), GPU (gpu.py). Measured on a shared 2-core machine: the full run 22 min at load
~2 (search 15 min, training 5 min); ``--quick`` 6-10 min depending on the load.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.common import ROOT, format_row, jsonable, machine_info  # noqa: E402

__all__ = ["MODULES", "SECTIONS", "render", "run_suite"]

# (key, module) in the order they run: the cheap in-process ones first, Ray last.
MODULES = (
    ("data", "benchmarks.bench_data"),
    ("metrics", "benchmarks.bench_metrics"),
    ("predict", "benchmarks.bench_predict"),
    ("train", "benchmarks.bench_train"),
    ("search", "benchmarks.bench_search"),
)
# section key -> (title, what is compared)
SECTIONS = {
    "data": (
        "1. Data pipeline per epoch",
        "Project: images decoded once into the uint8 cache, then per epoch `train_batches` as "
        "`fit` runs it (index batches + `augment_batch`: batched RandomResizedCrop + flip + "
        "normalisation, into reused buffers). Reference: the "
        "official per-epoch PIL decode + torchvision transforms through a DataLoader (the "
        "faster of 0 and 2 workers). Target >= 10x on this CPU. (`benchmarks/bench_data.py`)",
    ),
    "train": (
        "2. Training step (images/s)",
        "Project: `mmr.train.fit` itself (cached uint8 on the device, batched augmentation, "
        "forward/backward/AdamW, autocast as configured: fp32 on CPU). Reference: the official "
        "semantics written in the benchmark (PIL decode + torchvision transforms each epoch "
        "in a DataLoader, the same MMR model in fp32 eager). Each side in its own process, "
        "same threads. Target >= 1.0x on CPU, >= 3x on a GPU (see GPU). "
        "(`benchmarks/bench_train.py`)",
    ),
    "metrics": (
        "3. Metrics",
        "Project: `mmr.metrics`. Reference: scikit-learn and a threshold-loop AUPRO (200 "
        "thresholds) as in the usual MVTec AD code; one thread each. Target for AUPRO and "
        "`evaluate`: >= 20x with |diff| < 1e-3. (`benchmarks/bench_metrics.py`)",
    ),
    "search": (
        "4. Search efficiency",
        "Project: the demo sweep with TPE + ASHA (grace 1, reduction 3; its default until the "
        "replay of section 7 chose CMA-ES + median stopping) on the tiny config. "
        "Reference: the same sweep with a random sampler and FIFO (no early stopping); same "
        "trial count and seeds, 2 trials at a time on a local Ray with 2 CPUs. Target: >= 3x "
        "fewer epochs with a best validation AUROC within 0.01. (`benchmarks/bench_search.py`)",
    ),
    "memory": (
        "5. Memory of one trial",
        "Peak RSS of a process that trains a few steps and evaluates once (the project's "
        "`fit` vs the official-semantics loop with num_workers=0). GPU memory per trial and "
        "trials per 40/80 GB GPU come from `benchmarks/gpu.py` (see GPU). No target: these "
        "size `resources.cpu/gpu` and the memory of workers.",
    ),
    "overhead": (
        "6. Sweep overhead",
        "Wall time of a sweep's process (interpreter start, imports, `ray.init`, Tuner, "
        "Optuna, actors, `ray.shutdown`) against the trials' in-trainable time (sum of "
        "`time_total_s` / trials at a time); ratio = compute / wall. Target: <= 15% of the "
        "wall time outside trial compute.",
    ),
    "replay": (
        "7. Replay of recorded learning curves",
        "Search strategies replayed in simulated time through the project's own searchers and "
        "schedulers over learning curves recorded once (`benchmarks/curves.py`, table "
        "`benchmarks/data/curves.csv`; `benchmarks/replay.py`). Target: the chosen default >= "
        "3x fewer epochs than FIFO + random to the target test AUROC (median over 30 search "
        "seeds) with the median final test AUROC within 0.005; warm start >= 2x fewer epochs "
        "than a cold start; 30 seeds x all strategies <= 10 min. Copied from "
        "`benchmarks/data/replay.md` (written by `python -m benchmarks.replay --markdown`; this "
        "suite does not rerun it). While the recording (resumable: `OMP_NUM_THREADS=1 nice -n "
        "19 python -m benchmarks.curves`) is incomplete, that summary may come from "
        "`--made-up` curves and then says so in bold: a timing and code-path check only.",
    ),
    "predict": (
        "9. Predict throughput (torch vs ONNX)",
        "`launch.py predict`'s per-batch work (center crop, normalisation, anomaly map with "
        "blur) of the tiny config's model: its ONNX export under onnxruntime (CPU provider) "
        "against the torch model in eager mode, interleaved rounds, median images/s; ratio = "
        "onnxruntime / torch. No target. (`benchmarks/bench_predict.py`)",
    ),
    "gpu": (
        "GPU",
        "From `benchmarks/gpu.py` on a GPU machine (see its docstring).",
    ),
}
GPU_DIR = ROOT / "benchmarks"  # gpu.py's JSON files, copied here as gpu_results*.json


def run_suite(
    *, quick: bool, only: Sequence[str] | None = None, smoke: bool = False
) -> dict[str, Any]:
    """Runs the modules; returns ``{"rows", "errors", "timings", "load_start", ...}``."""
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.time()
    for key, name in MODULES:
        if only and key not in only:
            continue
        print(f"== {name} ({'smoke' if smoke else 'quick' if quick else 'full'})", flush=True)
        begin = time.perf_counter()
        try:
            module = importlib.import_module(name)
            module_rows = module.run(quick=quick, smoke=smoke)
        except Exception as exc:  # one broken benchmark must not cost the others' figures
            traceback.print_exc()
            errors[key] = f"{type(exc).__name__}: {exc}"[-2000:]
            module_rows = []
        timings[key] = time.perf_counter() - begin
        for r in module_rows:
            r.setdefault("section", key)
            r.setdefault("unit", "s")
            if smoke:  # smoke sizes say nothing about the targets
                r["met"] = None
            print(format_row(r), flush=True)
        rows += module_rows
    return {
        "rows": rows,
        "errors": errors,
        "timings": timings,
        "seconds": time.time() - started,
        "load_start": load_start,
        "load_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "machine": machine_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _fmt(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "AUROC":
        return f"{value:.4f}"
    if unit in ("MB", "epochs"):
        return f"{value:.0f}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _met(value: bool | None) -> str:
    return {True: "met", False: "**not met**"}.get(value, "")


def _table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| benchmark | project | reference | ratio | target | figure | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        unit = r.get("unit", "s")
        target = f"{r['target']}: {_met(r.get('met'))}" if r.get("target") else ""
        cells = [
            f"`{r['benchmark']}`",
            f"{_fmt(r['project_s'], unit)} {unit}",
            f"{_fmt(r['reference_s'], unit)} {unit}",
            f"{r['ratio']:.2f}x" if not math.isnan(r["ratio"]) else "-",
            target,
            r["figure"],
            r["note"],
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _replay_lines() -> list[str]:
    path = ROOT / "benchmarks" / "data" / "replay.md"
    if not path.is_file():
        return [
            "Not measured yet: `python -m benchmarks.replay --markdown benchmarks/data/replay.md`."
        ]
    return path.read_text().rstrip("\n").split("\n")


def _gpu_lines() -> list[str]:
    files = sorted(GPU_DIR.glob("gpu_results*.json"))
    if not files:
        return [
            "Not measured: no GPU was available to the run that wrote this file. On a GPU "
            "machine run `python benchmarks/gpu.py --json gpu_results.json` (torch + timm "
            "only; see its docstring for splitting it into two calls), copy the file(s) to "
            "`benchmarks/gpu_results*.json` and rerun this suite.",
        ]
    lines: list[str] = []
    for path in files:
        data = json.loads(path.read_text())
        if data.get("dry_run"):
            lines += [
                f"`{path.name}` holds a `--dry-run` (CPU code-path check), not GPU figures: "
                "not shown.",
                "",
            ]
            continue
        versions = data["machine"]["versions"]
        peak = data.get("peak_bf16_tflops")
        lines += [
            f"`{path.name}`: measured on {data['device']} on {data['date']} with "
            f"`{data['command']}`"
            + (f" (bf16 matmul peak {peak:.0f} TFLOP/s)" if peak else "")
            + f"; python {versions.get('python')}, torch {versions.get('torch')}, timm "
            f"{versions.get('timm')}.",
            "",
            *_table(data["rows"]),
            "",
        ]
        if data.get("errors"):
            lines += ["Errors in that run:", *(f"- {e}" for e in data["errors"]), ""]
    return lines


def render(result: dict[str, Any], *, quick: bool, smoke: bool, command: str) -> str:
    """BENCHMARKS.md for a finished run."""
    m = result.get("machine") or machine_info()
    v = m["versions"]
    mode = (
        "SMOKE run (code path only: the figures mean nothing)"
        if smoke
        else "QUICK run (`--quick`: reduced sizes, figures indicative only)"
        if quick
        else "full run"
    )
    load = result["load_start"], result["load_end"]
    load_text = (
        f"load average (1/5/15 min) {' / '.join(f'{x:.2f}' for x in load[0])} at the start, "
        f"{' / '.join(f'{x:.2f}' for x in load[1])} at the end"
        if load[0] and load[1]
        else "load average unknown"
    )
    rows = result["rows"]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{command}` on {result['date']}: **{mode}**, "
        f"{result['seconds'] / 60:.1f} min in all "
        f"({', '.join(f'{k} {s:.0f} s' for k, s in result['timings'].items())}).",
        "Every ratio compares the project with a reference measured in the same run; ratio > 1 "
        "means the project is better (reference / project for costs, project / reference for "
        "throughput and scores) unless the row's note says otherwise.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, nproc {m['nproc']}"
        + (f" (usable {m['affinity']})" if m.get("affinity") else "")
        + (f", RAM {m['ram_gib']:.1f} GiB" if m.get("ram_gib") else "")
        + ", no GPU used by this suite (see GPU)",
        f"- {load_text}: timings on a loaded machine are noisy",
        f"- Versions: Python {v['python']}, torch {v['torch']}, torchvision {v['torchvision']}, "
        f"timm {v['timm']}, ray {v['ray']}, optuna {v['optuna']}, numpy {v['numpy']}",
        f"- Platform: {m['platform']}",
        "",
        "## Targets",
        "",
        "| section | benchmark | target | ratio | detail | result |",
        "|---|---|---|---|---|---|",
    ]
    order = {key: i for i, key in enumerate(SECTIONS)}
    for r in sorted(rows, key=lambda r: order.get(r["section"], len(order))):
        if r.get("target"):
            title = SECTIONS.get(r["section"], (r["section"],))[0]
            lines.append(
                f"| {title} | `{r['benchmark']}` | {_cell(r['target'])} | {r['ratio']:.2f}x | "
                f"{_cell(r.get('summary') or '')} | {_met(r.get('met'))} |"
            )
    for key, (title, text) in SECTIONS.items():
        lines += ["", f"## {title}", "", text, ""]
        if key == "gpu":
            lines += _gpu_lines()
            continue
        if key == "replay":
            lines += _replay_lines()
            continue
        section_rows = [r for r in rows if r["section"] == key]
        module = next((k for k, _ in MODULES if k == key), None)
        if module in result["errors"]:
            lines.append(f"**Failed**: {result['errors'][module]}")
        elif section_rows:
            lines += _table(section_rows)
        else:
            lines.append("Not run in this invocation.")
    for key, error in result["errors"].items():
        if key not in SECTIONS:
            lines += ["", f"**{key} failed**: {error}"]
    return "\n".join(lines) + "\n"


# Sections below this line in BENCHMARKS.md come from other commands (each names its own);
# a rerun of the suite keeps them.
KEPT_MARKER = "<!-- sections below: measured by the commands they name, kept by run.py -->"


def kept_sections(path: Path) -> str:
    """The part of an existing BENCHMARKS.md from :data:`KEPT_MARKER` on ("" if none)."""
    text = path.read_text() if path.is_file() else ""
    at = text.find(KEPT_MARKER)
    return "" if at < 0 else "\n" + text[at:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes")
    parser.add_argument("--only", help=f"comma-separated subset of {[k for k, _ in MODULES]}")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file")
    parser.add_argument("--json", help="also save the raw results (to re-render them later)")
    parser.add_argument("--from-json", help="render a saved --json file instead of running")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    only = [k.strip() for k in args.only.split(",")] if args.only else None
    if only and set(only) - {k for k, _ in MODULES}:
        parser.error(f"--only takes {[k for k, _ in MODULES]}")
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        result, command = saved["result"], saved["command"]
        quick, smoke = saved["quick"], saved["smoke"]
    else:
        command = " ".join(["python benchmarks/run.py", *sys.argv[1:]])
        quick, smoke = args.quick, args.smoke
        result = run_suite(quick=quick, only=only, smoke=smoke)
    text = render(result, quick=quick, smoke=smoke, command=command)
    Path(args.out).write_text(text + kept_sections(Path(args.out)))
    if args.json and not args.from_json:
        saved = {"result": result, "command": command, "quick": quick, "smoke": smoke}
        Path(args.json).write_text(json.dumps(saved, indent=1, default=jsonable))
    missed = [r["benchmark"] for r in result["rows"] if r.get("met") is False]
    print(
        f"\nwrote {args.out} ({result['seconds'] / 60:.1f} min of benchmarks); targets not met: "
        f"{', '.join(missed) or 'none'}; failed: {', '.join(result['errors']) or 'none'}"
    )
    if result["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
