"""Device-side settings of a training process: transfers, float32 math, GPU memory.

Everything here is a no-op or inert on a CPU (the CUDA flags only steer CUDA kernels), so the
same code runs, and is tested, on both.

- :func:`to_device`: the one way host tensors reach the device in the training step: pinned
  and ``non_blocking`` on CUDA, so the host never waits for the copy.
- :func:`fp32_math`: TF32 for the model's float32 matmuls and convolutions, exact IEEE float32
  where results must match a reference (the augmentation's resampling, the anomaly-map blur).
- :func:`limit_memory` / :func:`release_memory` / :func:`allocator_env`: GPU memory that
  several trials can share.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Iterator, Mapping

import torch

__all__ = [
    "ALLOC_CONF",
    "MEMORY_HEADROOM",
    "allocator_env",
    "cudnn_benchmark",
    "fp32_math",
    "fp32_precision",
    "limit_memory",
    "release_memory",
    "to_device",
]

log = logging.getLogger(__name__)

# Fraction of a trial's GPU share it may allocate: 5% of the share is left for its CUDA
# context and the fragmentation the caching allocator cannot use.
MEMORY_HEADROOM = 0.95
# expandable_segments: the caching allocator grows segments instead of stranding free blocks
# between them, which keeps a long trial's reserved memory close to its allocated memory.
ALLOC_CONF = "expandable_segments:True"
# torch >= 2.9 also reads PYTORCH_ALLOC_CONF; the CUDA name is the one every version reads.
_ALLOC_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copies a host tensor to ``device`` without making the host wait.

    On CUDA the tensor is pinned first (a copy from pageable memory blocks the host until the
    stream reaches it) and copied ``non_blocking``; the caching host allocator keeps the pinned
    block alive until the copy has run. On a CPU this returns ``t`` itself.
    """
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _new_api() -> bool:
    # torch >= 2.9 sets TF32 per backend with fp32_precision; mixing it with the legacy
    # allow_tf32 flags is an error there, so use one API or the other, never both.
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")


def fp32_precision() -> tuple[str, str]:
    """(cuBLAS matmul, cuDNN conv) float32 precision now: ``"tf32"`` or ``"ieee"``."""
    if _new_api():
        matmul = torch.backends.cuda.matmul.fp32_precision
        if matmul == "none":  # inherits the global setting, whose default is exact
            matmul = "tf32" if torch.backends.fp32_precision == "tf32" else "ieee"
        conv = torch.backends.cudnn.conv.fp32_precision
        if conv == "none":
            conv = "tf32" if torch.backends.fp32_precision == "tf32" else "ieee"
        return matmul, conv
    return (
        "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
        "tf32" if torch.backends.cudnn.allow_tf32 else "ieee",
    )


def _set_precision(matmul: str, conv: str) -> None:
    if _new_api():
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv
    else:
        torch.backends.cuda.matmul.allow_tf32 = matmul == "tf32"
        torch.backends.cudnn.allow_tf32 = conv == "tf32"


@contextlib.contextmanager
def fp32_math(mode: str) -> Iterator[None]:
    """Float32 matmuls and convolutions in ``mode`` (``"tf32"`` or ``"ieee"``) inside the block,
    the previous settings restored after.

    The model's forward and backward run in ``"tf32"``: a float32 run (``train.precision=fp32``)
    then uses the tensor cores (10-bit mantissa products, float32 accumulation), as most
    PyTorch training does; bf16 autocast runs are unaffected except for the few float32 ops
    autocast leaves. The augmentation's resampling and the anomaly-map blur run in ``"ieee"``:
    they must match PIL to one grey level and scipy's filter, which TF32 products (cuDNN's
    default for convolutions) would not guarantee. The flags are process-wide and steer only
    CUDA kernels; the autograd engine's device threads read the same flags.
    """
    if mode not in ("tf32", "ieee"):
        raise ValueError(f"mode must be 'tf32' or 'ieee', got {mode!r}")
    saved = fp32_precision()
    if saved == (mode, mode):
        yield
        return
    _set_precision(mode, mode)
    try:
        yield
    finally:
        _set_precision(*saved)


@contextlib.contextmanager
def cudnn_benchmark(device: torch.device) -> Iterator[None]:
    """cuDNN autotuning on for CUDA inside the block (restored after).

    Training batches have one shape (the last batch of an epoch and the evaluation batches add
    a few more), so the kernel search runs a handful of times and then pays on every step.
    """
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def limit_memory(gpu_share: float, device: torch.device | None = None) -> float | None:
    """Caps this process's CUDA allocations at ``gpu_share * MEMORY_HEADROOM`` of the GPU.

    With a fractional ``resources.gpu`` several trials share a GPU; without a cap one trial's
    peak can take the memory its neighbour then fails to get. With the cap a trial that needs
    more than its share fails itself, with an out-of-memory error naming its own settings.
    Returns the fraction set, or None when nothing was capped (no CUDA, or a whole GPU or
    more per trial).
    """
    if not 0 < gpu_share < 1 or not torch.cuda.is_available():
        return None
    device = device or torch.device("cuda", torch.cuda.current_device())
    fraction = gpu_share * MEMORY_HEADROOM
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    log.info("GPU memory capped at %.0f%% of %s (resources.gpu=%g)", 100 * fraction, device,
             gpu_share)  # fmt: skip
    return fraction


def release_memory() -> None:
    """Returns this process's cached GPU memory once a trial's tensors are gone.

    Ray reuses a trial's worker process for the next trial; without this the next trial, or a
    neighbour on the same GPU, would find the finished trial's blocks still reserved.
    """
    gc.collect()  # models and optimisers in reference cycles hold their CUDA tensors
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def allocator_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables that set the CUDA allocator to :data:`ALLOC_CONF`, unless the
    user configured the allocator already (their setting wins). They take effect when set
    before CUDA starts in the process (e.g. in a Ray ``runtime_env``)."""
    environ = os.environ if environ is None else environ
    if any(environ.get(name) for name in _ALLOC_VARS):
        return {}
    return {"PYTORCH_CUDA_ALLOC_CONF": ALLOC_CONF}
