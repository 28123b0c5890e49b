"""Deployment cost of a trained model: inference latency per image and trained parameters.

Both are reported once per trial, with its final validation round, so that a multi-objective
sweep can trade detection quality against speed and size (``latency_ms``, ``params_m``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmr.model import MMR

__all__ = ["latency_ms", "params_m", "speed_metrics"]

WARMUP = 2  # untimed calls first: cuDNN autotuning, allocator growth, lazy kernel loading
REPEATS = 5  # timed calls; the median resists a stray scheduler hiccup


def params_m(model: MMR) -> float:
    """Trained parameters in millions: the student (the teacher is frozen and shared)."""
    return sum(p.numel() for p in model.student.parameters()) / 1e6


@torch.no_grad()
def latency_ms(
    model: MMR,
    *,
    batch_size: int,
    blur_sigma: float,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    warmup: int = WARMUP,
    repeats: int = REPEATS,
) -> float:
    """Median wall time of one ``anomaly_map`` call per image, in milliseconds.

    Runs on the model's device with a random batch (the cost does not depend on the pixels);
    on CUDA each call is synchronised so that the time covers the kernels, not their launch.
    """
    device = next(model.student.parameters()).device
    size = model.image_size
    images = torch.randn(batch_size, 3, size, size, device=device)
    was_training = model.training
    model.eval()
    times = []
    try:
        for i in range(warmup + repeats):
            _sync(device)
            start = time.perf_counter()
            with autocast():
                model.anomaly_map(images, blur_sigma=blur_sigma)
            _sync(device)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
    finally:
        model.train(was_training)
    return 1000.0 * statistics.median(times) / batch_size


def speed_metrics(
    model: MMR,
    *,
    eval_batch_size: int,
    blur_sigma: float,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """``{"latency_ms", "latency_batch_ms", "params_m"}`` of one trained model."""
    return {
        "latency_ms": latency_ms(model, batch_size=1, blur_sigma=blur_sigma, autocast=autocast),
        "latency_batch_ms": latency_ms(
            model, batch_size=eval_batch_size, blur_sigma=blur_sigma, autocast=autocast
        ),
        "params_m": params_m(model),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
