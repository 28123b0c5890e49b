"""GPU memory a trial holds besides activations, by number of categories, from parameter
counts (computed on a CPU), and how many such trials fit on a GPU.

    python -m benchmarks.trial_memory [--config configs/mvtec.yaml] [--categories 1,5,15]

Per category ``fit`` keeps the student's float32 parameters and AdamW's two float32 moments
(12 bytes per parameter). Gradients (4 bytes per parameter) exist only while one category
steps: lockstep trains the categories one after the other and drops the gradients before
each backward and at the end of each epoch (``zero_grad(set_to_none=True)``); before that
change every category kept
its last gradients between epochs (16 bytes per parameter per category). One frozen teacher
is shared. Not included: activations of a training step (batch, image size and precision
dependent: measure them with ``benchmarks/gpu.py --parts memory`` on a GPU), the CUDA
context (a few hundred MiB per process), the allocator's slack, and the images cached on
the device (uint8, ``3 x resize^2`` bytes per image: MVTec AD's 3629 train + 1725 test
images at 256 px are 1.0 GiB for all 15 categories, plus 0.1 GiB of test masks).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from benchmarks.common import ROOT

__all__ = ["param_counts", "table"]

GIB = 2**30
# Nominal sizes as decimal GB (80e9, 141e9 bytes): slightly less than the cards report, so the
# counts below err low.
GPUS_GIB = {"80 GB GPU": 80e9 / GIB, "141 GB GPU": 141e9 / GIB}


def param_counts(config: str | Path) -> tuple[int, int]:
    """(student parameters, teacher parameters and buffers) of a config, built weightless."""
    import torch

    from mmr.config import load_config
    from mmr.model import MMR, build_teacher

    cfg = load_config(config).override({"model.pretrained": False})
    with torch.device("meta"):
        teacher = build_teacher(cfg.model)
        model = MMR(cfg.model, image_size=cfg.data.image_size, teacher=teacher)
    student = sum(p.numel() for p in model.student.parameters())
    frozen = sum(t.numel() for t in (*teacher.parameters(), *teacher.buffers()))
    return student, frozen


def table(config: str | Path, categories: list[int]) -> list[str]:
    """Markdown rows: categories, GiB held now / before, trials per GPU (upper bounds)."""
    student, frozen = param_counts(config)
    rows = [
        f"student {student / 1e6:.1f} M parameters, teacher {frozen / 1e6:.1f} M (float32)",
        "",
        "| categories per trial | held now (GiB) | held before (GiB) | "
        + " | ".join(f"trials per {g}, at most" for g in GPUS_GIB)
        + " |",
        "|---|---|---|" + "---|" * len(GPUS_GIB),
    ]
    for n in categories:
        now = (n * 12 * student + 4 * student + 4 * frozen) / GIB
        before = (n * 16 * student + 4 * frozen) / GIB
        # A trial sharing a GPU may allocate 0.95 of its share (mmr.device.limit_memory).
        fits = [str(math.floor(0.95 * g / now)) for g in GPUS_GIB.values()]
        rows.append(f"| {n} | {now:.1f} | {before:.1f} | " + " | ".join(fits) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "mvtec.yaml"))
    parser.add_argument("--categories", default="1,5,15")
    args = parser.parse_args()
    for line in table(args.config, [int(c) for c in args.categories.split(",")]):
        print(line)


if __name__ == "__main__":
    main()
