"""Training throughput (images/s) and peak memory of one trial, project against official.

Project: ``mmr.train.fit`` itself (cached uint8 images, batched ``augment_batch`` on the
training device, the MMR forward/backward and AdamW step, autocast as the config says), timed
through its ``on_epoch`` callback: epoch 0 is the warm-up, the later epochs are timed.
Reference: the official code's semantics, written here: a ``DataLoader`` over a ``Dataset``
that decodes each PNG with PIL and applies torchvision ``Resize`` + ``RandomResizedCrop`` +
flip + ``Normalize`` every epoch, then the same MMR model (same seeded init, same AdamW groups
and per-epoch learning rate) in fp32 eager mode, its teacher in the official contiguous layout
(the project runs it channels-last). Both sides use the config's thread count.

Each side runs in its own process (``python -m benchmarks.bench_train --child``), so neither
inherits the other's allocator state or forked DataLoader pages; the same process then runs one
evaluation (anomaly maps + metrics of the test images) and reports its peak RSS (and, on CUDA,
peak GPU memory): the memory of one trial. The reference runs with DataLoader ``num_workers``
0 (its RSS is then the whole trial's) and, outside quick mode, 2; the faster one is
compared. Peak RSS is ``VmHWM``, which counts the torch/timm imports (~0.8 GB
with a CUDA build of torch).

Configs: ``configs/tiny.yaml`` on the synthetic set at 256 px (what the demo trains), and the
paper config (``configs/mvtec.yaml``: wide_resnet50_2 + vit_base at 224 px, batch 16,
``pretrained=false``) on synthetic 900 px PNGs (MVTec AD images are 700-1024 px). Both with
the tiny config's category.

Run: ``python -m benchmarks.bench_train [--quick]``.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    child_main,
    peak_rss_mb,
    row,
    run_child,
    synthetic_data,
)

__all__ = ["CONFIGS", "bench_config", "run", "run_project", "run_reference"]

SECTION_TRAIN = "train"
SECTION_MEMORY = "memory"
CONFIGS = {"tiny": ROOT / "configs" / "tiny.yaml", "paper": ROOT / "configs" / "mvtec.yaml"}
# Smoke runs shrink the tiny config further (as tests/test_search.py's FAST overrides do).
SMOKE = {
    "data.resize": 40,
    "data.image_size": 32,
    "model.encoder_depth": 2,
    "train.batch_size": 4,
    "eval.blur_sigma": 0.5,
}


def _sizes(name: str, *, quick: bool, smoke: bool) -> dict[str, Any]:
    """Dataset and epoch counts of one config; ``epochs`` includes the warm-up epoch."""
    if smoke:
        return {"size": 64, "n_train": 8, "n_test": 2, "epochs": 2, "workers": (0,)}
    if name == "tiny":
        return {
            "size": 256,
            "n_train": 32 if quick else 100,
            "n_test": 8 if quick else 16,
            "epochs": 2 if quick else 3,
            "workers": (0,) if quick else (0, 2),
        }
    return {
        "size": 900,
        "n_train": 16 if quick else 48,
        "n_test": 4 if quick else 8,
        "epochs": 2,
        "workers": (0,) if quick else (0, 2),
    }


def bench_config(
    name: str,
    root: str | Path,
    *,
    category: str,
    cache_dir: str | Path,
    epochs: int,
    device: str = "cpu",
    smoke: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """The ``tiny`` or ``paper`` config on the benchmark's synthetic data, offline.

    Validation runs once, after the last epoch, on all test images.
    """
    from mmr.config import load_config

    cfg = load_config(CONFIGS[name])
    over: dict[str, Any] = {
        "data.dataset": "synthetic",
        "data.root": str(root),
        "data.categories": [category],
        "data.cache_dir": str(cache_dir),
        "data.val_split": "none",
        "model.pretrained": False,
        "train.device": device,
        "train.epochs": epochs,
        "train.eval_every": epochs,
        "train.warmup_epochs": 0,
        "train.lr_milestones": [],
        **(SMOKE if smoke else {}),
        **(overrides or {}),
    }
    return cfg.override(over)


# ----------------------------------------------------------------------------- children


def _memory(device: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"rss_mb": peak_rss_mb()}
    import torch

    if device.type == "cuda":
        out["gpu_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["gpu_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    return out


def run_project(cfg: Any, *, after_warmup: Callable[[], None] | None = None) -> dict[str, Any]:
    """``mmr.train.fit`` with per-epoch timestamps; epoch 0 is the warm-up.

    ``after_warmup`` is called once epoch 0 has ended, before the timed epochs (a barrier for
    concurrent runs).
    """
    import torch

    from mmr.data import list_tasks
    from mmr.train import fit, resolve_device

    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps: list[float] = []

    def on_epoch(epoch: int, stats: dict[str, float]) -> None:
        if epoch == 0 and after_warmup is not None:
            after_warmup()
        stamps.append(time.perf_counter())

    result = fit(cfg, on_epoch=on_epoch, final_test=False)
    n_train = len(list_tasks(cfg.data)[0].train)
    return {
        "epoch_s": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "fit_s": result["seconds"],
        "n_train": n_train,
        "batch_size": cfg.train.batch_size,
        "threads": torch.get_num_threads(),
        "val": result["val"],
        **_memory(device),
    }


def run_reference(cfg: Any, *, workers: int, tf32: bool = False) -> dict[str, Any]:
    """The official semantics: PIL decode + torchvision transforms each epoch, fp32 eager.

    ``tf32``: float32 matmuls and convolutions in TF32 (what most users enable on a GPU;
    PyTorch's default runs matmuls in exact float32 and cuDNN convolutions in TF32).
    """
    import contextlib

    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    from benchmarks.bench_data import ReferenceDataset
    from mmr.data import list_tasks
    from mmr.device import fp32_math
    from mmr.metrics import evaluate
    from mmr.model import param_groups
    from mmr.train import build_models, lr_at, resolve_device

    t, d = cfg.train, cfg.data
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    task = list_tasks(d)[0]
    model = build_models(cfg, [task.name], device)[task.name]
    model.teacher.set_memory_format(torch.contiguous_format)  # the official code's layout
    opt = torch.optim.AdamW(
        param_groups(model, weight_decay=t.weight_decay), lr=t.lr, betas=t.betas
    )
    paths = [s.image for s in task.train]
    loader = DataLoader(
        ReferenceDataset(paths, train=True, resize=d.resize, image_size=d.image_size),
        batch_size=t.batch_size,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(t.seed),
    )
    epoch_s = []
    math_scope = contextlib.ExitStack()  # the whole reference run, evaluation included
    if tf32:
        math_scope.enter_context(fp32_math("tf32"))
    for epoch in range(t.epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, cfg)
        model.train()
        start = time.perf_counter()
        for images in loader:  # decoded and transformed again every epoch
            loss = model(images.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()  # the official loop logs the loss of every step
        epoch_s.append(time.perf_counter() - start)

    class EvalSet(Dataset):
        def __init__(self) -> None:
            self.images = ReferenceDataset(
                [s.image for s in task.test],
                train=False,
                resize=d.resize,
                image_size=d.image_size,
            )
            self.mask_tf = T.Compose(
                [
                    T.Resize((d.resize, d.resize), interpolation=T.InterpolationMode.NEAREST),
                    T.CenterCrop(d.image_size),
                    T.ToTensor(),
                ]
            )

        def __len__(self) -> int:
            return len(task.test)

        def __getitem__(self, i: int) -> tuple[Any, Any, int]:
            sample = task.test[i]
            if sample.mask is None:
                mask = torch.zeros(1, d.image_size, d.image_size)
            else:
                with Image.open(sample.mask) as m:
                    mask = self.mask_tf(m.convert("L"))
            return self.images[i], (mask[0] > 0.5).to(torch.uint8), sample.label

    model.eval()
    maps, masks, labels = [], [], []
    with torch.no_grad():
        for images, m, y in DataLoader(
            EvalSet(), batch_size=cfg.eval.batch_size, num_workers=workers
        ):
            maps.append(model.anomaly_map(images.to(device), blur_sigma=cfg.eval.blur_sigma))
            masks.append(m)
            labels.append(y)
    math_scope.close()
    metrics = evaluate(torch.cat(maps).cpu(), torch.cat(masks), torch.cat(labels))
    return {
        "epoch_s": epoch_s[1:],
        "n_train": len(paths),
        "batch_size": t.batch_size,
        "threads": torch.get_num_threads(),
        "val": {task.name: metrics},
        **_memory(device),
    }


def _child(spec: dict[str, Any]) -> None:
    import torch  # noqa: F401  (the footprint of the imports alone is reported)

    import mmr.train  # noqa: F401
    from benchmarks.common import write_child_result

    imported = peak_rss_mb()["self"]
    cfg = bench_config(
        spec["config"],
        spec["root"],
        category=spec["category"],
        cache_dir=spec["cache_dir"],
        epochs=spec["epochs"],
        device=spec.get("device", "cpu"),
        smoke=spec.get("smoke", False),
        overrides=spec.get("overrides"),
    )
    if spec["mode"] == "project":
        out = run_project(cfg)
    else:
        out = run_reference(cfg, workers=spec["workers"], tf32=spec.get("tf32", False))
    out["rss_after_imports_mb"] = imported
    write_child_result(spec["result"], out)


# ----------------------------------------------------------------------------- parent


def _images_per_s(result: dict[str, Any]) -> float:
    """Images per second over the timed epochs (all but the warm-up)."""
    return result["n_train"] * len(result["epoch_s"]) / sum(result["epoch_s"])


def run(quick: bool = False, smoke: bool = False) -> list[dict[str, Any]]:
    """Measures every config in child processes; returns training and memory rows.

    Args:
        quick: fewer images and steps (the paper config: one warm-up and one timed step).
        smoke: the tiny config at 32 px on 8 images, only to exercise the code path.
    """
    from mmr.config import load_config

    category = load_config(CONFIGS["tiny"]).data.categories[0]
    rows: list[dict[str, Any]] = []
    names = ("tiny",) if smoke else ("tiny", "paper")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for name in names:
            sizes = _sizes(name, quick=quick, smoke=smoke)
            root = synthetic_data(
                Path(tmp) / f"data-{name}",
                categories=[category],
                size=sizes["size"],
                n_train=sizes["n_train"],
                n_test=sizes["n_test"],
            )
            base = {
                "config": name,
                "root": str(root),
                "category": category,
                "cache_dir": str(Path(tmp) / "cache"),
                "epochs": sizes["epochs"],
                "smoke": smoke,
            }
            timeout = 1800 if name == "paper" else 600
            project = run_child(
                "benchmarks.bench_train",
                {**base, "mode": "project"},
                timeout=timeout,
                workdir=tmp,
            )
            refs = {
                w: run_child(
                    "benchmarks.bench_train",
                    {**base, "mode": "reference", "workers": w},
                    timeout=timeout,
                    workdir=tmp,
                )
                for w in sizes["workers"]
            }
            rows += _rows(name, project, refs, sizes)
    return rows


def _rows(
    name: str, project: dict[str, Any], refs: dict[int, dict[str, Any]], sizes: dict[str, Any]
) -> list[dict[str, Any]]:
    speeds = {w: _images_per_s(r) for w, r in refs.items()}
    best = max(speeds, key=lambda w: speeds[w])
    ours = _images_per_s(project)
    batch = project["batch_size"]
    steps = math.ceil(project["n_train"] / batch)
    timed = len(project["epoch_s"])
    what = (
        "resnet18 + ViT-tiny depth 4, 64 px"
        if name == "tiny"
        else "wide_resnet50_2 + ViT-B/16, 224 px"
    )
    tried = ", ".join(f"{w}: {s:.2f}" for w, s in sorted(speeds.items()))
    rows = [
        row(
            f"train_{name}",
            f"images/s, {name} config ({what}), batch {batch}, {project['n_train']} images "
            f"({sizes['size']} px PNG), {timed} timed epoch(s) of ~{steps} steps after a "
            f"warm-up epoch",
            ours,
            speeds[best],
            note=f"project = mmr.train.fit's loop ({project['threads']} threads); reference = "
            f"PIL+torchvision DataLoader each epoch + fp32 eager, num_workers={best} (img/s by "
            f"workers {tried})",
            section=SECTION_TRAIN,
            unit="img/s",
            higher_is_better=True,
            target=">= 1.0x on CPU",
            met=ours / speeds[best] >= 1.0,
        )
    ]
    ref0 = refs[0]
    rows.append(
        row(
            f"peak_rss_{name}",
            f"peak RSS (MB) of one trial process: {timed + 1} epochs on {project['n_train']} "
            f"images + one evaluation of {2 * sizes['n_test']} images, {name} config",
            project["rss_mb"]["self"],
            ref0["rss_mb"]["self"],
            note=f"reference = the official-semantics process (num_workers=0); after imports "
            f"alone: {project['rss_after_imports_mb']:.0f} MB; a Ray worker adds its own "
            f"runtime on top",
            section=SECTION_MEMORY,
            unit="MB",
        )
    )
    return rows


def main() -> None:
    child_main(__doc__, run, _child, quick_help="fewer images and steps")


if __name__ == "__main__":
    main()
