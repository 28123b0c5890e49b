"""GPU benchmarks, for a session lent a GPU: training speed, MFU, packing, memory, a full run.

Needs only torch, torchvision, timm, numpy, PIL, scipy and pandas (through ``mmr``), never Ray,
Optuna or the network (the model is built with ``pretrained=false``). Parts (``--parts``):

- ``peak``: bf16 matmul TFLOP/s (8192^3, CUDA events): the ceiling MFU is measured against.
- ``step``: images/s of the project's training step (``mmr.train.fit``: cached uint8 images
  on the device, batched augmentation, bf16 autocast) against the official semantics (PIL
  decode + torchvision transforms in DataLoader workers every epoch, fp32 eager, batches
  copied to the GPU), tiny and paper config at batch 16 (target >= 3x); the paper config at
  batch 64 with its FLOPs counted (``torch.utils.flop_counter``) gives achieved TFLOP/s and MFU
  (target >= 35%); two what-ifs the project does not do yet, ``channels_last`` for the
  student's convolutions as well (the teacher runs channels-last already) and
  ``torch.compile``, at batch 64 (adopt one only if it pays).
- ``memory``: peak GPU memory of one trial (tiny and paper config), and how many paper-config
  trials fit on a 40 / 80 GB GPU (fractional ``resources.gpu``).
- ``pack``: 1, 2 and 4 concurrent paper-config trainings (processes) on one GPU: total
  images/s against one alone.
- ``run200``: wall time of a full 200-epoch paper-config run on 209 images at 224 px (the
  official schedule, validation every 10 epochs; target <= 3 minutes on one H200).

``--dry-run`` runs every part on the CPU with the tiny config and tiny sizes, only to check
the code path: its figures are not GPU figures and are marked so (never copy them anywhere).

Run on the GPU machine (not yet timed there: an estimate is 8-10 minutes on one H200, about 15
processes that each import torch, ``run200`` and compiling; a device call is capped at 10
minutes, so split it in two calls when the budget is tight):
    python benchmarks/gpu.py --parts peak,step,memory --json $OUT/gpu1.json
    python benchmarks/gpu.py --parts pack,run200 --json $OUT/gpu2.json
or all at once: ``python benchmarks/gpu.py --json $OUT/gpu.json``. The JSON is rewritten after
every part, so a run cut short keeps the parts it finished.
Then copy the JSON to ``benchmarks/gpu_results.json``: ``benchmarks/run.py`` puts it into
BENCHMARKS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.common import (  # noqa: E402
    ROOT,
    format_row,
    jsonable,
    machine_info,
    row,
    run_child,
    synthetic_data,
    write_child_result,
)

__all__ = ["PARTS", "run"]

SECTION = "gpu"
PARTS = ("peak", "step", "memory", "pack", "run200", "predict")
DRY = "DRY RUN on CPU (tiny config, tiny sizes): checks the code path, not a GPU figure; "


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- peak


def measure_peak(device: str, *, dry: bool) -> float:
    """bf16 matmul TFLOP/s: the median of 5 timings of ``iters`` back-to-back products."""
    import torch

    n, iters = (256, 3) if dry else (8192, 50)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    del a, b
    if device == "cuda":  # the memory part's children must not see this process's cache
        torch.cuda.empty_cache()
    return 2 * n**3 * iters / times[len(times) // 2] / 1e12


# ----------------------------------------------------------------------------- step

# Datasheet dense (no sparsity) bf16 tensor-core TFLOP/s, by a substring of the device name;
# the first match wins (so "H100 PCIe" before "H100", "L40S" before "L4").
DATASHEET_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def datasheet_peak(device_name: str) -> float | None:
    """Datasheet dense bf16 TFLOP/s of a GPU model (None when the name is not known)."""
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run: H100 assumed)"


def _cfg(name: str, root: Path, cache: Path, *, device: str, dry: bool, **over: Any) -> Any:
    from benchmarks.bench_train import bench_config
    from mmr.config import load_config

    category = load_config(ROOT / "configs" / "tiny.yaml").data.categories[0]
    epochs = over.pop("epochs", 2)
    return bench_config(
        "tiny" if dry else name,
        root,
        category=category,
        cache_dir=cache,
        epochs=epochs,
        device=device,
        smoke=dry,
        overrides=over,
    )


def count_flops_per_image(cfg: Any) -> float:
    """FLOPs of one training step (forward + backward, autocast as configured) per image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmr.data import augment_batch
    from mmr.train import build_models, precision_autocast, resolve_device

    device = resolve_device(cfg.train.device)
    model = build_models(cfg, ["m"], device)["m"]
    model.train()
    batch = cfg.train.batch_size
    u8 = torch.randint(0, 256, (batch, 3, cfg.data.resize, cfg.data.resize), dtype=torch.uint8)
    x = augment_batch(
        u8.to(device), image_size=cfg.data.image_size, generator=torch.Generator().manual_seed(0)
    )
    with FlopCounterMode(display=False) as counter:
        with precision_autocast(cfg, device):
            loss = model(x)
        loss.backward()
    del model
    return counter.get_total_flops() / batch


def custom_steps(
    cfg: Any, *, channels_last: bool, compile_backend: str | None, steps: int
) -> float:
    """Images/s of fit's step with a what-if change (``channels_last``, ``torch.compile``).

    Mirrors ``mmr.train.train_epoch`` (same batches, augmentation, autocast, AdamW); the first
    ``steps`` steps (compilation included) are the warm-up, the next ``steps`` are timed.
    """
    import torch

    from mmr.data import augment_batch, batch_indices, list_tasks, load_images
    from mmr.device import fp32_math
    from mmr.train import build_models, make_optimizer, precision_autocast, resolve_device

    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    task = list_tasks(cfg.data)[0]
    images = load_images(
        [s.image for s in task.train], size=cfg.data.train_size, cache_dir=cfg.data.cache_dir
    ).to(device)
    model = build_models(cfg, [task.name], device)[task.name]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:  # the student too (the teacher runs channels-last already)
        model = model.to(memory_format=fmt)
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    opt = make_optimizer(model, cfg, device)
    gen = torch.Generator().manual_seed(0)
    model.train()

    def batches() -> Any:
        while True:
            for idx in batch_indices(len(images), batch_size=cfg.train.batch_size, generator=gen):
                if len(idx) == cfg.train.batch_size:  # full batches: no recompilation
                    yield idx

    it = batches()
    elapsed = 0.0
    for phase in ("warm-up", "timed"):
        _sync(device.type)
        start = time.perf_counter()
        for _ in range(steps):
            idx = next(it)
            x = augment_batch(
                images[idx.to(device)], image_size=cfg.data.image_size, generator=gen
            ).contiguous(memory_format=fmt)
            with fp32_math("tf32"):
                with precision_autocast(cfg, device):
                    loss = forward(x)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device.type)
        elapsed = time.perf_counter() - start if phase == "timed" else elapsed
    return steps * cfg.train.batch_size / elapsed


def _ips(result: dict[str, Any]) -> float:
    return result["n_train"] * len(result["epoch_s"]) / sum(result["epoch_s"])


def _train_ips(spec: dict[str, Any], ctx: dict[str, Any]) -> float:
    """Images/s of one ``benchmarks.bench_train`` child (project or reference side)."""
    return _ips(run_child("benchmarks.bench_train", spec, timeout=900, workdir=ctx["tmp"]))


def part_step(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    dry, device, root, cache = ctx["dry"], ctx["device"], ctx["root"], ctx["cache"]
    workers = 0 if dry else min(8, os.cpu_count() or 1)
    rows = []
    base = {"root": str(root), "cache_dir": str(cache), "device": device, "smoke": dry}
    from mmr.config import load_config

    base["category"] = load_config(ROOT / "configs" / "tiny.yaml").data.categories[0]
    timed = 1 if dry else 3
    for name in ("tiny",) if dry else ("tiny", "paper"):
        spec = {
            **base,
            "config": "tiny" if dry else name,
            "epochs": 1 + timed,
            "overrides": {"train.batch_size": 8 if dry else 16},
        }
        ours = _train_ips({**spec, "mode": "project"}, ctx)
        ref_spec = {**spec, "epochs": 2, "mode": "reference", "workers": workers}
        ref = _train_ips(ref_spec, ctx)
        # What a user of the official code would likely run on a GPU: the same fp32 eager
        # loop with TF32 on for matmuls too (PyTorch's default keeps them exact float32).
        ref_tf32 = _train_ips({**ref_spec, "tf32": True}, ctx)
        batch = spec["overrides"]["train.batch_size"]
        compared = (
            ("", ref, "fp32 eager with PyTorch's default precision (matmuls exact float32, "
             "cuDNN convolutions TF32)", ">= 3x on a GPU"),
            ("_vs_tf32", ref_tf32, "fp32 eager with TF32 on for matmuls as well (what a user "
             f"who enables TF32 runs; {ref:.1f} img/s without)", None),
        )  # fmt: skip
        for suffix, reference, how, target in compared:
            rows.append(
                row(
                    f"gpu_train_{name}{suffix}",
                    f"images/s, {name} config, batch {batch}, {ctx['n_train']} images, "
                    f"{timed} timed epochs after a warm-up",
                    ours,
                    reference,
                    unit="img/s",
                    higher_is_better=True,
                    section=SECTION,
                    note=(DRY if dry else "") + "project = mmr.train.fit (bf16 autocast on "
                    "CUDA, images cached on the device); reference = PIL+torchvision "
                    f"DataLoader (num_workers={workers}) each epoch + {how}, one timed epoch",
                    target=target,
                    met=None if dry or target is None else ours / reference >= 3,
                )
            )

    # MFU: the paper config at batch 64 (a dry run reuses its tiny batch-8 figure).
    big = 8 if dry else 64
    if dry:
        ours = rows[0]["project_s"]
    else:
        spec = {
            **base,
            "config": "paper",
            "epochs": 1 + timed,
            "overrides": {"train.batch_size": big},
        }
        ours = _train_ips({**spec, "mode": "project"}, ctx)
    cfg = _cfg("paper", root, cache, device=device, dry=dry, **{"train.batch_size": big})
    flops = count_flops_per_image(cfg)
    achieved = flops * ours / 1e12
    peak = ctx.get("peak") or measure_peak(device, dry=dry)
    ctx["peak"] = peak
    rows.append(
        row(
            "gpu_mfu_paper_b64",
            f"achieved TFLOP/s of the paper config's training step, batch {big}, "
            f"against the measured bf16 matmul peak ({peak:.3g} TFLOP/s)",
            achieved,
            peak,
            higher_is_better=True,
            unit="TFLOP/s",
            section=SECTION,
            note=(DRY if dry else "") + f"{flops / 1e9:.1f} GFLOP per image (fwd+bwd, "
            f"torch.utils.flop_counter) x {ours:.1f} img/s (mmr.train.fit); ratio = MFU",
            target="MFU >= 35%",
            met=None if dry else achieved / peak >= 0.35,
            images_per_s=ours,
        )
    )
    name = _device_name(device)
    datasheet = datasheet_peak(name)
    if datasheet is not None:
        rows.append(
            row(
                "gpu_mfu_datasheet_b64",
                f"achieved TFLOP/s of the paper config's training step, batch {big}, against "
                f"the datasheet dense bf16 peak of the {name} ({datasheet:.0f} TFLOP/s)",
                achieved,
                datasheet,
                higher_is_better=True,
                unit="TFLOP/s",
                section=SECTION,
                note=(DRY if dry else "") + "the same achieved figure as gpu_mfu_paper_b64; "
                "ratio = MFU against the datasheet (dense, no sparsity), which no real "
                "kernel reaches: the measured matmul peak is the attainable ceiling",
                target="MFU >= 35%",
                met=None if dry else achieved / datasheet >= 0.35,
            )
        )
    else:
        ctx["errors"].append(f"no datasheet bf16 peak known for {name!r}: MFU row skipped")
    variants = [("channels_last", True, None)]
    if not ctx["skip_compile"]:
        variants.append(("torch.compile", False, "eager" if dry else "inductor"))
    steps = 2 if dry else 10
    eager = custom_steps(cfg, channels_last=False, compile_backend=None, steps=steps)
    for label, channels_last, backend in variants:
        try:
            what = custom_steps(
                cfg, channels_last=channels_last, compile_backend=backend, steps=steps
            )
        except Exception as exc:  # a failed what-if must not cost the other figures
            ctx["errors"].append(f"what-if {label}: {type(exc).__name__}: {exc}")
            continue
        rows.append(
            row(
                f"gpu_whatif_{label.replace('.', '_')}",
                f"images/s of fit's step with {label} "
                f"(not in mmr.train yet for the student), paper config, batch {big}, "
                f"{steps} timed steps",
                what,
                eager,
                unit="img/s",
                higher_is_better=True,
                section=SECTION,
                note=(DRY if dry else "") + f"reference = the same loop without {label}; "
                "worth adopting only if the ratio is clearly above 1 (compile time not counted)",
            )
        )
    return rows


# ----------------------------------------------------------------------------- memory, pack


def _pack_child(spec: dict[str, Any]) -> None:
    """One of several concurrent trainings: warm-up epoch, barrier, timed epochs."""
    import torch

    from benchmarks.bench_train import run_project

    ready, go = Path(spec["ready"]), Path(spec["go"])

    def barrier() -> None:
        ready.write_text("ready")
        deadline = time.time() + 900
        while not go.exists():
            if time.time() > deadline:
                raise TimeoutError("no go signal")
            time.sleep(0.05)

    cfg = _cfg(
        spec["config"],
        Path(spec["root"]),
        Path(spec["cache"]),
        device=spec["device"],
        dry=spec["dry"],
        epochs=spec["epochs"],
        **spec.get("overrides", {}),
    )
    out = run_project(cfg, after_warmup=barrier)
    if spec["device"] == "cuda":
        free, total = torch.cuda.mem_get_info()
        out["gpu_used_now_mb"] = (total - free) / 2**20
        out["gpu_reserved_now_mb"] = torch.cuda.memory_reserved() / 2**20
        out["gpu_total_mb"] = total / 2**20
        out["gpu_process_mb"] = _process_gpu_mb(os.getpid())
    out["categories"] = len(cfg.data.categories) if isinstance(cfg.data.categories, list) else 0
    write_child_result(spec["result"], out)


def _process_gpu_mb(pid: int) -> float | None:
    """GPU memory the driver accounts to process ``pid`` (its context, its allocator's
    reserved memory and libraries' workspaces), from nvidia-smi; None where unavailable.

    The device's used memory (``mem_get_info``) would also count every other process, the
    benchmark's parent included.
    """
    try:
        query = ["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
        text = subprocess.run(
            ["nvidia-smi", *query], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            return float(fields[1])
    return None


def run_concurrent(
    ctx: dict[str, Any],
    k: int,
    config: str,
    epochs: int,
    *,
    root: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[dict]:
    """Starts ``k`` training processes (each a fresh process: no allocator cache or CUDA
    context of earlier work); times their epochs after a common barrier."""
    tmp = Path(tempfile.mkdtemp(dir=ctx["tmp"], prefix=f"pack{k}-"))
    go = tmp / "go"
    procs, specs = [], []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for i in range(k):
        spec = {
            "config": config,
            "root": str(root or ctx["root"]),
            "cache": str(ctx["cache"]),
            "overrides": overrides or {},
            "device": ctx["device"],
            "dry": ctx["dry"],
            "epochs": epochs,
            "ready": str(tmp / f"ready{i}"),
            "go": str(go),
            "result": str(tmp / f"result{i}.json"),
        }
        log = open(tmp / f"log{i}.txt", "w")  # noqa: SIM115 - closed below
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.gpu", "--child", json.dumps(spec)],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
        specs.append(spec)
    try:
        deadline = time.time() + 900
        while not all(Path(s["ready"]).exists() for s in specs):
            failed = [p for p, _ in procs if p.poll() not in (None, 0)]
            if failed or time.time() > deadline:
                raise RuntimeError(
                    f"pack {k}: a child failed before the barrier: "
                    f"{(tmp / 'log0.txt').read_text()[-2000:]}"
                )
            time.sleep(0.05)
        go.write_text("go")
        for proc, _ in procs:
            proc.wait(timeout=1800)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    results = []
    for i, spec in enumerate(specs):
        path = Path(spec["result"])
        if not path.is_file():
            raise RuntimeError(
                f"pack {k}: child {i} wrote no result: {(tmp / f'log{i}.txt').read_text()[-2000:]}"
            )
        results.append(json.loads(path.read_text()))
    return results


def _many_categories(ctx: dict[str, Any], n: int) -> Path:
    """An MVTec-layout root holding the benchmark's category under ``n`` names (copies):
    memory per trial depends on the number of categories, not on their content."""
    root = Path(ctx["tmp"]) / f"data-{n}"
    if not root.is_dir():
        src = next(p for p in Path(ctx["root"]).iterdir() if p.is_dir())
        for i in range(n):
            shutil.copytree(src, root / f"c{i:02d}")
    return root


def part_memory(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    many = 2 if ctx["dry"] else 15  # MVTec AD's 15 categories in one lockstep trial
    cases = [("tiny", 1)] if ctx["dry"] else [("tiny", 1), ("paper", 1)]
    cases.append(("tiny" if ctx["dry"] else "paper", many))
    for name, n in cases:
        extra: dict[str, Any] = {}
        if n > 1:
            extra = {
                "root": _many_categories(ctx, n),
                "overrides": {"data.dataset": "mvtec", "data.categories": "all"},
            }
        (result,) = run_concurrent(ctx, 1, name, epochs=2, **extra)
        rss = result["rss_mb"]["self"]
        label = f"gpu_memory_{name}" + (f"_{n}cat" if n > 1 else "")
        if ctx["device"] != "cuda":
            rows.append(
                row(
                    label,
                    f"peak memory of one {n}-category trial (no GPU: RSS only)",
                    rss,
                    rss,
                    unit="MB",
                    section=SECTION,
                    note=DRY + "peak RSS of the training process",
                )
            )
            continue
        reserved = result["gpu_reserved_mb"]
        own = result.get("gpu_process_mb")
        # Without nvidia-smi: reserved peak + what the device uses beyond this process's
        # reserved memory now (its context, but also any other process's memory).
        context = (
            max(own - result["gpu_reserved_now_mb"], 0.0)
            if own is not None
            else max(result["gpu_used_now_mb"] - result["gpu_reserved_now_mb"], 0.0)
        )
        per_trial = reserved + context
        source = "nvidia-smi, this process" if own is not None else "device total: upper bound"
        fits = {g: math.floor(0.95 * g * 1e9 / 2**20 / per_trial) for g in (40, 80, 141)}
        rows.append(
            row(
                label,
                f"peak GPU memory of one {name}-config trial with {n} categor"
                f"{'y' if n == 1 else 'ies'} (batch {result['batch_size']}): torch reserved "
                "peak + this process's CUDA context, measured in a fresh process",
                per_trial,
                result["gpu_allocated_mb"],
                unit="MB",
                section=SECTION,
                note=f"allocated peak {result['gpu_allocated_mb']:.0f} MB, reserved peak "
                f"{reserved:.0f} MB, context ~{context:.0f} MB "
                f"({source}), host RSS {rss:.0f} MB; fits {fits[40]} / {fits[80]} / "
                f"{fits[141]} such trials on a 40 / 80 / 141 GB GPU (each capped at 0.95 of "
                "its share); ratio = allocated / (reserved + context)",
                trials_40gb=fits[40],
                trials_80gb=fits[80],
                trials_141gb=fits[141],
                categories=n,
            )
        )
    return rows


def part_pack(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    counts = (1, 2) if ctx["dry"] else (1, 2, 4)
    epochs = 2 if ctx["dry"] else 3
    totals, batch = {}, 0
    for k in counts:
        results = run_concurrent(ctx, k, "paper", epochs=epochs)
        totals[k] = sum(_ips(r) for r in results)
        batch = results[0]["batch_size"]
    rows = []
    for k in counts[1:]:
        rows.append(
            row(
                f"gpu_pack_{k}",
                f"total images/s of {k} concurrent paper-config trainings on one "
                f"device (batch {batch}, {epochs - 1} timed epochs after a barrier)",
                totals[k],
                totals[1],
                unit="img/s",
                higher_is_better=True,
                section=SECTION,
                note=(DRY if ctx["dry"] else "") + f"reference = one training alone "
                f"({totals[1]:.1f} img/s); ratio > 1: packing fractional trials pays",
            )
        )
    return rows


def part_predict(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """Predict images/s: torch on the device vs onnxruntime (CUDA provider, else CPU)."""
    from benchmarks.bench_predict import throughput
    from mmr.errors import UserInputError

    dry = ctx["dry"]
    kwargs = {"batch": 4, "rounds": 1, "calls": 1} if dry else {
        "batch": 32, "rounds": 7, "calls": 5, "image_size": 224}  # fmt: skip
    provider = "cuda" if ctx["device"] == "cuda" else "cpu"
    try:
        result = throughput(device=ctx["device"], onnx_device=provider, **kwargs)
    except UserInputError:  # onnxruntime without the CUDA provider (not onnxruntime-gpu)
        provider = "cpu"
        result = throughput(device=ctx["device"], onnx_device=provider, **kwargs)
    return [
        row(
            "gpu_predict_onnx",
            f"predict images/s, tiny model at {kwargs.get('image_size', 64)} px, batch "
            f"{kwargs['batch']}: onnxruntime ({provider} provider) vs torch eager on "
            f"{ctx['device']}",
            result["onnx"],
            result["torch"],
            unit="img/s",
            higher_is_better=True,
            section=SECTION,
            note=(DRY if dry else "")
            + "interleaved rounds, medians (benchmarks/bench_predict.py)",
        )
    ]


def part_run200(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    dry = ctx["dry"]
    epochs = 2 if dry else 200
    over = {
        "train.eval_every": 1 if dry else 10,
        "train.warmup_epochs": 1 if dry else 50,
        "train.lr_milestones": [2] if dry else [120, 160],
        "data.val_split": "test_half",
    }
    spec = {
        "config": "tiny" if dry else "paper",
        "root": str(ctx["root"]),
        "cache_dir": str(ctx["cache"]),
        "device": ctx["device"],
        "smoke": dry,
        "epochs": epochs,
        "overrides": over,
        "mode": "project",
    }
    from mmr.config import load_config

    spec["category"] = load_config(ROOT / "configs" / "tiny.yaml").data.categories[0]
    result = run_child("benchmarks.bench_train", spec, timeout=1800, workdir=ctx["tmp"])
    return [
        row(
            "gpu_run200",
            f"wall time of a {epochs}-epoch paper-config run on {ctx['n_train']} "
            f"images at 224 px, validation every {over['train.eval_every']} epochs",
            result["fit_s"],
            180.0,
            section=SECTION,
            note=(DRY if dry else "") + f"mmr.train.fit's own time (cache, model build, training, "
            f"{epochs // over['train.eval_every']} validations); process wall "
            f"{result['wall_s']:.0f} s; reference = the 3-minute target",
            target="<= 180 s on one H200",
            met=None if dry else result["fit_s"] <= 180,
        )
    ]


# ----------------------------------------------------------------------------- driver


def run(
    *,
    dry_run: bool = False,
    parts: tuple[str, ...] = PARTS,
    skip_compile: bool = False,
    json_path: str | Path | None = None,
    command: str = "python benchmarks/gpu.py",
) -> dict[str, Any]:
    """Runs ``parts``; returns ``{"device", "dry_run", "machine", "rows", "errors", ...}``.

    With ``json_path`` the result is (re)written after every part, so that a run cut short
    still leaves the parts it finished.
    """
    import torch

    device = "cpu" if dry_run else _device()
    if device != "cuda" and not dry_run:
        raise SystemExit("no CUDA GPU visible: run with --dry-run to check the code path on CPU")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        from mmr.config import load_config

        category = load_config(ROOT / "configs" / "tiny.yaml").data.categories[0]
        n_train = 16 if dry_run else 209  # MVTec AD bottle has 209 training images
        root = synthetic_data(
            Path(tmp) / "data",
            categories=[category],
            size=64 if dry_run else 900,
            n_train=n_train,
            n_test=2 if dry_run else 40,
        )
        ctx = {
            "dry": dry_run,
            "device": device,
            "root": root,
            "cache": Path(tmp) / "cache",
            "tmp": tmp,
            "n_train": n_train,
            "skip_compile": skip_compile,
            "errors": [],
        }
        rows: list[dict[str, Any]] = []

        def result() -> dict[str, Any]:
            return {
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "dry_run": dry_run,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime(
                    "%Y-%m-%d %H:%M UTC"
                ),
                "command": command,
                "peak_bf16_tflops": ctx.get("peak"),
                "seconds": time.time() - started,
                "machine": machine_info(),
                "errors": ctx["errors"],
                # gpu.py must run where Ray and Optuna are not installed
                "imported_ray_or_optuna": sorted(m for m in ("ray", "optuna") if m in sys.modules),
                "rows": rows,
            }

        if "peak" in parts:
            ctx["peak"] = measure_peak(device, dry=dry_run)
        for name, fn in (
            ("step", part_step),
            ("memory", part_memory),
            ("pack", part_pack),
            ("run200", part_run200),
            ("predict", part_predict),
        ):
            if name in parts:
                try:
                    part_rows = fn(ctx)
                except Exception as exc:  # one failing part must not cost the others
                    traceback.print_exc()
                    ctx["errors"].append(f"part {name}: {type(exc).__name__}: {exc}"[:3000])
                    continue
                for r in part_rows:
                    print(format_row(r), flush=True)
                rows += part_rows
                if json_path:
                    Path(json_path).write_text(json.dumps(result(), indent=1, default=jsonable))
        out = result()
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=1, default=jsonable))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: code path only")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile what-if")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _pack_child(json.loads(args.child))
        return
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}: choose from {','.join(PARTS)}")
    result = run(
        dry_run=args.dry_run,
        parts=parts,
        skip_compile=args.skip_compile,
        json_path=args.json,
        command=" ".join(["python benchmarks/gpu.py", *sys.argv[1:]]),
    )
    print(
        f"done in {result['seconds']:.0f} s on {result['device']}"
        + (" (DRY RUN: not GPU figures)" if result["dry_run"] else "")
    )
    for error in result["errors"]:
        print(f"ERROR {error}")


if __name__ == "__main__":
    main()
