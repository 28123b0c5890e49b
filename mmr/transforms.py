"""Batched tensor transforms of cached uint8 images, as the official MMR code applies them.

Resizing happens once, at cache time (``mmr.imagecache``: training images to
``DataConfig.train_size``, large enough that crops are down-sampled, test images to
``resize``). Training then applies ``RandomResizedCrop(scale=(0.7, 1), ratio=(3/4, 4/3),
bicubic)`` + horizontal flip, and testing a center crop; ImageNet normalisation in both.
Random crops run batched on the batch's device as tiled matrix products with PIL's antialiased
bicubic weights (crop and flip folded in) and match torchvision-on-PIL to one grey level.

A training epoch makes no host<->device synchronisation: its permutation, crop boxes and
flips are drawn at once on the CPU (``draw_epoch``) and reach the device in one pinned,
non-blocking copy; every decision that depends on them (which samples take which PIL pass
order) is taken on the CPU copy; constants are cached per device.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import PIL
import torch

from mmr.device import fp32_math, to_device

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "augment_batch",
    "sample_crops",
    "resized_crop_batch",
    "center_crop",
    "center_crop_masks",
    "normalize",
    "batch_indices",
    "draw_epoch",
    "EpochDraw",
    "HOST_DRAW",
    "train_batches",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PIL_ORDERS_PASSES = int(PIL.__version__.split(".")[0]) >= 13
# Profiler range of the epoch's host-side draws (CPU tensors by construction: the step
# profile does not count their ops as device syncs).
HOST_DRAW = "mmr::draw_epoch"


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) N x 3 x H x W -> float32 ImageNet-normalised."""
    scale, shift = _stats(images.device)
    return images.to(torch.float32, copy=True).mul_(scale).add_(shift)


def center_crop(u8: torch.Tensor, *, image_size: int) -> torch.Tensor:
    """Test transform: center crop to ``image_size`` (as torchvision CenterCrop) + normalise."""
    return normalize(_center(u8, image_size))


def center_crop_masks(masks: torch.Tensor, *, image_size: int) -> torch.Tensor:
    """The same center crop for N x 1 x S x S masks (dtype kept)."""
    return _center(masks, image_size)


def _center(t: torch.Tensor, size: int) -> torch.Tensor:
    h, w = t.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"crop size {size} is larger than the {h}x{w} images")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return t[..., top : top + size, left : left + size]


def augment_batch(
    u8: torch.Tensor,
    *,
    image_size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.7, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Train transform: RandomResizedCrop (bicubic) + horizontal flip + normalise, batched.

    Runs on ``u8``'s device; the random draws come from ``generator`` (seeded by the caller),
    so the same seed gives the same batch. ``out``: float32 ``n x 3 x image_size x image_size``
    to write into (a new tensor otherwise).
    """
    n, _, h, w = u8.shape
    boxes, flips = sample_crops(
        n, height=h, width=w, generator=generator, scale=scale, ratio=ratio, flip=flip
    )
    return resized_crop_batch(u8, boxes, flips, size=image_size, out=out)


def sample_crops(
    n: int,
    *,
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.7, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    attempts: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RandomResizedCrop boxes as torchvision draws them, vectorised over ``n`` samples.

    Returns:
        ``(boxes, flips)``: int64 ``n x 4`` (top, left, height, width) and bool ``n``.
    """
    dev = generator.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=dev, dtype=torch.float64)

    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * uniform(n, attempts))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * uniform(n, attempts))
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    ok = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)  # first valid attempt
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    found = ok.any(dim=1)
    # Fallback as torchvision: the whole image, cropped to the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    cw = torch.where(found, cw, torch.full_like(cw, fw))
    ch = torch.where(found, ch, torch.full_like(ch, fh))
    top = torch.floor(uniform(n) * (height - ch + 1))
    left = torch.floor(uniform(n) * (width - cw + 1))
    top = torch.where(found, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fw) // 2))
    flips = uniform(n) < 0.5 if flip else torch.zeros(n, dtype=torch.bool, device=dev)
    return torch.stack([top, left, ch, cw], dim=1).long(), flips


def resized_crop_batch(
    u8: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    *,
    size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crops ``boxes`` (top, left, height, width) of square uint8 images, resizes the crops to
    ``size`` (PIL's antialiased bicubic), mirrors where ``flips``, and normalises into ``out``
    (float32 ``n x C x size x size``; a new tensor if None).

    Matches torchvision's ``resized_crop`` + ``hflip`` on PIL images to one grey level; runs
    as batched matrix products on ``u8``'s device. Pass ``boxes`` and ``flips`` on the CPU:
    the pass order of each sample is decided there (boxes on the device cost a host sync).
    """
    out = _check_out(u8, size, out)
    boxes, flips = boxes.cpu(), flips.cpu()
    first = _vertical_first(boxes[:, 2] / size, boxes[:, 3] / size)
    order = torch.argsort(first.to(torch.int8), stable=True)  # horizontal-first samples first
    split = len(first) - int(first.sum())
    dev = u8.device
    if torch.equal(order, torch.arange(len(order))):
        return _crop_split(u8, to_device(boxes, dev), to_device(flips, dev), split, out)
    # Mixed orders: resample in pass-order order, then put the samples back.
    order_dev = to_device(order, dev)
    res = _crop_split(
        u8.index_select(0, order_dev),
        to_device(boxes[order], dev),
        to_device(flips[order], dev),
        split,
        _SCRATCH.get("sorted", out.shape, torch.float32, dev),
    )
    return out.index_copy_(0, order_dev, res)


def _check_out(u8: torch.Tensor, size: int, out: torch.Tensor | None) -> torch.Tensor:
    n, c, h, w = u8.shape
    if h != w:
        raise ValueError(f"expected square images (as load_images returns), got {h}x{w}")
    if out is None:
        return torch.empty((n, c, size, size), dtype=torch.float32, device=u8.device)
    if out.shape != (n, c, size, size) or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 {(n, c, size, size)}, got {out.dtype} {out.shape}")
    return out


def _crop_split(
    u8: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, split: int, out: torch.Tensor
) -> torch.Tensor:
    """``resized_crop_batch`` on the device, without a host sync: samples ``[0, split)`` take
    PIL's horizontal-first pass order, ``[split, n)`` the vertical-first one (``boxes`` int64
    n x 4 and ``flips`` n, both on ``u8``'s device)."""
    n, _, h, w = u8.shape
    size = out.shape[-1]
    boxes = boxes.to(torch.float32)
    # Exact float32 products: TF32 would move pixels by more than the one grey level allowed.
    with fp32_math("ieee"):
        rows = _taps(boxes[:, 0], boxes[:, 2], h, size)
        cols = _taps(boxes[:, 1], boxes[:, 3], w, size, reverse=flips.to(torch.bool))
        # PIL resamples in two passes with an 8-bit image in between (which shapes the bicubic
        # overshoot at sharp edges), horizontal first; Pillow >= 13 goes vertical first when
        # the height shrinks much more than the width. Each order runs on its own slice.
        for vertical, part in ((False, slice(0, split)), (True, slice(split, n))):
            if part.start == part.stop:
                continue
            whole = part.stop - part.start == n
            _two_passes(
                u8 if whole else u8[part],
                rows if whole else (rows[0][part], rows[1][part]),
                cols if whole else (cols[0][part], cols[1][part]),
                vertical_first=vertical,
                out=out if whole else out[part],
            )
    return out


def _two_passes(
    u8: torch.Tensor, rows: _Taps, cols: _Taps, *, vertical_first: bool, out: torch.Tensor
) -> torch.Tensor:
    """Resamples columns then rows (or rows then columns) with an 8-bit image in between,
    rounding half up as PIL's fixed point does (+0.5, clamp, truncate); normalises into
    ``out``."""
    n, dev = u8.shape[0], u8.device
    if vertical_first:
        middle = _banded(u8, rows, dim=2, tag="v1").add_(0.5).clamp_(0, 255)
        middle = _SCRATCH.get("middle1", middle.shape, torch.uint8, dev).copy_(middle)
        res = _banded(middle, cols, dim=3, tag="h2")
    else:
        mid = _banded(u8, cols, dim=3, tag="h").add_(0.5).clamp_(0, 255)
        # Stored rows-outermost (n x H x C x W' memory), so that the vertical pass gathers
        # whole rows; seen as n x C x H x W'.
        shape = (n, mid.shape[2], mid.shape[1], mid.shape[3])
        middle = _SCRATCH.get("middle", shape, torch.uint8, dev).permute(0, 2, 1, 3).copy_(mid)
        res = _banded(middle, rows, dim=2, tag="v")
    res = res.add_(0.5).clamp_(0, 255).floor_()
    scale, shift = _stats(dev)
    return torch.mul(res, scale, out=out).add_(shift)


_Taps = tuple[torch.Tensor, torch.Tensor]  # (positions n x out x k int64, weights n x out x k)


def _taps(
    start: torch.Tensor,
    length: torch.Tensor,
    in_size: int,
    out_size: int,
    *,
    reverse: torch.Tensor | None = None,
) -> _Taps:
    """PIL's resampling taps (bicubic a=-0.5, support widened when shrinking) mapping the
    window ``[start, start + length)`` of an axis onto ``out_size`` pixels, mirrored where
    ``reverse``. Pixels outside the window get weight 0 (PIL crops first); rows sum to 1."""
    dev = start.device
    scale = length / out_size  # input pixels per output pixel
    stretch = scale.clamp(min=1.0)[:, None, None]  # antialiasing
    k = torch.arange(out_size, device=dev, dtype=torch.float32).expand(len(start), out_size)
    if reverse is not None:
        k = torch.where(reverse[:, None], out_size - 1 - k, k)
    centers = (start[:, None] + (k + 0.5) * scale[:, None])[..., None]
    count = 2 * math.ceil(2.0 * max(in_size / out_size, 1.0)) + 1  # taps of the widest filter
    pos = torch.floor(centers - 2.0 * stretch + 0.5) + torch.arange(count, device=dev)
    inside = (pos >= start[:, None, None]) & (pos < (start + length)[:, None, None])
    weights = _cubic((pos + 0.5 - centers) / stretch) * inside
    return pos.long(), weights / weights.sum(dim=-1, keepdim=True)


def _banded(
    x: torch.Tensor, taps: _Taps, *, dim: int, tag: str = "", tile: int = 32
) -> torch.Tensor:
    """Resamples axis ``dim`` (2: rows, 3: columns) of ``x`` (n x C x H x W, any dtype) into a
    float32 scratch tensor, tile by tile: the ``tile`` outputs of a tile read only the short
    input span their taps reach, one small matrix product per tile (~5x less work than a
    dense product; gathering uint8 spans is also ~3x cheaper than gathering floats)."""
    pos, weights = taps
    n, c, in_size, dev = x.shape[0], x.shape[1], x.shape[dim], x.device
    out_size, count = pos.shape[1:]
    tiles = -(-out_size // tile)
    span = min(in_size, math.ceil(tile * in_size / out_size) + count + 1)
    pad = (0, 0, 0, tiles * tile - out_size)
    pos = torch.nn.functional.pad(pos, pad).view(n, tiles, tile, count)
    weights = torch.nn.functional.pad(weights, pad).view(n, tiles, tile, count)
    first = torch.where(weights != 0, pos, in_size).amin(dim=(2, 3))
    start = first.clamp(max=in_size - span)  # n x tiles: where each tile's span begins
    local = (pos - start[..., None, None]).clamp(0, span - 1)
    w = torch.zeros((n, tiles, tile, span), device=dev).scatter_add_(3, local, weights)
    cols = start[..., None] + torch.arange(span, device=dev)  # n x tiles x span
    other = x.shape[5 - dim]  # the axis that is not resampled
    if dim == 3:  # per tile: (C*H x span) @ (span x tile)
        index = cols[:, :, None, None, :].expand(n, tiles, c, other, span)
        spans = _gather_float(x[:, None].expand(n, tiles, *x.shape[1:]), 4, index, tag)
        prod = _SCRATCH.get(f"{tag}.prod", (n * tiles, c * other, tile), torch.float32, dev)
        torch.bmm(
            spans.view(n * tiles, c * other, span), w.transpose(2, 3).flatten(0, 1), out=prod
        )
        res = _SCRATCH.get(f"{tag}.res", (n, c, other, tiles * tile), torch.float32, dev)
        res.view(n, c, other, tiles, tile).copy_(
            prod.view(n, tiles, c, other, tile).permute(0, 2, 3, 1, 4)
        )
        return res[..., :out_size]
    # dim == 2, per tile: (tile x span) @ (span x C*W). A span of rows is gathered as whole
    # rows of the image stored rows-outermost (a copy unless it is already stored that way).
    rows_first = x.permute(0, 2, 1, 3)
    if not rows_first.is_contiguous():
        rows_first = _SCRATCH.get(f"{tag}.rows", rows_first.shape, x.dtype, dev).copy_(rows_first)
    picks = (start[..., None] + torch.arange(span, device=dev)).view(n, -1)
    picks += torch.arange(n, device=dev)[:, None] * in_size
    raw = _SCRATCH.get(f"{tag}.raw", (n * tiles * span, c * other), x.dtype, dev)
    torch.index_select(rows_first.reshape(n * in_size, c * other), 0, picks.view(-1), out=raw)
    spans = _as_float(raw, tag)
    prod = _SCRATCH.get(f"{tag}.prod", (n * tiles, tile, c * other), torch.float32, dev)
    torch.bmm(w.flatten(0, 1), spans.view(n * tiles, span, c * other), out=prod)
    res = _SCRATCH.get(f"{tag}.res", (n, c, tiles * tile, other), torch.float32, dev)
    res.view(n, c, tiles, tile, other).copy_(
        prod.view(n, tiles, tile, c, other).permute(0, 3, 1, 2, 4)
    )
    return res[:, :, :out_size]


def _gather_float(x: torch.Tensor, dim: int, index: torch.Tensor, tag: str) -> torch.Tensor:
    raw = _SCRATCH.get(f"{tag}.raw", index.shape, x.dtype, x.device)
    return _as_float(torch.gather(x, dim, index, out=raw), tag)


def _as_float(raw: torch.Tensor, tag: str) -> torch.Tensor:
    if raw.dtype == torch.float32:
        return raw
    return _SCRATCH.get(f"{tag}.float", raw.shape, torch.float32, raw.device).copy_(raw)


class _Scratch(threading.local):
    """Per-thread reusable CPU buffers. A fresh multi-MB CPU tensor costs page faults (the
    kernel zeroes every new page): about half the time of an augmented batch here. CUDA's
    caching allocator already reuses memory, so other devices get plain new tensors."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(
        self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty(tuple(shape), dtype=dtype, device=device)
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = self.buffers[name] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(tuple(shape))


_SCRATCH = _Scratch()


def _vertical_first(scale_y: torch.Tensor, scale_x: torch.Tensor) -> torch.Tensor:
    """Where Pillow runs its vertical pass first (python-pillow/Pillow#9549, Pillow 13)."""
    if not _PIL_ORDERS_PASSES:
        return torch.zeros_like(scale_y, dtype=torch.bool)
    sy, sx = scale_y.clamp(min=1.0), scale_x.clamp(min=1.0)
    return (sy - 1.0) > 2.0 * (sx - 1.0)


def _cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    t = t.abs()
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = (((t - 5.0) * t + 8.0) * t - 4.0) * a
    return torch.where(t < 1.0, near, torch.where(t < 2.0, far, torch.zeros_like(t)))


@functools.cache
def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-device constants (scale, shift) of ``(x / 255 - mean) / std``: built once per device,
    as a fresh ``torch.tensor(..., device=cuda)`` is a blocking host-to-device copy. Callers
    must not modify them."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    scale, shift = (1.0 / (255.0 * std)).float(), (-mean / std).float()
    return to_device(scale, device), to_device(shift, device)


@dataclass(frozen=True)
class EpochDraw:
    """The random draws of one training epoch, made on the CPU (see :func:`draw_epoch`).

    ``table`` is int64 ``n x 6``: image index, then the crop box (top, left, height, width),
    then 1 where the crop is mirrored; its rows are in the order the epoch visits them.
    ``batches`` holds, per batch, ``(start, stop, split)``: its rows, and the first row that
    takes PIL's vertical-first pass order (rows of each order are contiguous in a batch).
    Without augmentation the box and flip columns are zero and ``split == stop``.
    """

    table: torch.Tensor
    batches: tuple[tuple[int, int, int], ...]


def draw_epoch(
    n: int,
    *,
    batch_size: int,
    image_size: int,
    source_size: int,
    generator: torch.Generator,
    augment: bool = True,
) -> EpochDraw:
    """Draws an epoch at once: a permutation of ``n`` images (``batch_indices``), then the
    crop boxes and flips of all ``n`` samples (``sample_crops`` of ``source_size`` square
    images), in that order from ``generator`` (a CPU generator).

    Within each batch the samples are then grouped by PIL's pass order (horizontal-first
    first), so that a batch resamples as two slices. Which samples form a batch, and each
    sample's crop, stay as drawn; only the order inside a batch changes, which the loss (a
    mean over the batch) does not see.
    """
    if generator.device.type != "cpu":
        raise ValueError("draw_epoch needs a CPU generator: the draws are made on the host")
    order = torch.cat(batch_indices(n, batch_size=batch_size, generator=generator))
    table = torch.zeros((n, 6), dtype=torch.int64)
    table[:, 0] = order
    if not augment:
        bounds = range(0, n, batch_size)
        return EpochDraw(table, tuple((a, min(a + batch_size, n), min(a + batch_size, n))
                                      for a in bounds))  # fmt: skip
    boxes, flips = sample_crops(n, height=source_size, width=source_size, generator=generator)
    table[:, 1:5] = boxes
    table[:, 5] = flips
    vertical = _vertical_first(boxes[:, 2] / image_size, boxes[:, 3] / image_size)
    batch = torch.arange(n) // batch_size
    table = table[torch.argsort(batch * 2 + vertical.to(torch.int64), stable=True)]
    counts = torch.zeros(-(-n // batch_size), dtype=torch.int64).index_add_(
        0, batch, (~vertical).to(torch.int64)
    )
    batches = tuple(
        (a, min(a + batch_size, n), a + int(k))
        for a, k in zip(range(0, n, batch_size), counts.tolist(), strict=True)
    )
    return EpochDraw(table, batches)


def train_batches(
    images: torch.Tensor,
    *,
    batch_size: int,
    image_size: int,
    generator: torch.Generator,
    augment: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One training epoch of ``images`` (uint8 N x 3 x S x S): ``(indices, batch)`` pairs in a
    seeded order (:func:`draw_epoch`), each batch augmented or center-cropped, normalised.

    The epoch's draws reach ``images``' device in one pinned, non-blocking copy; no batch
    makes a host<->device synchronisation. Batches are written into buffers reused from one
    batch to the next (on a CPU a fresh multi-MB tensor per batch costs its page faults every
    time): a batch is valid until the next one is drawn, so copy it to keep it. ``indices``
    are on the device.
    """
    dev = images.device
    with torch.profiler.record_function(HOST_DRAW):
        draw = draw_epoch(
            len(images),
            batch_size=batch_size,
            image_size=image_size,
            source_size=images.shape[-1],
            generator=generator,
            augment=augment,
        )
    table = to_device(draw.table, dev)
    picked: torch.Tensor | None = None
    out: torch.Tensor | None = None
    for start, stop, split in draw.batches:
        rows = table[start:stop]
        idx = rows[:, 0]
        shape = (stop - start, *images.shape[1:])
        if picked is None or picked.shape != shape:
            picked = torch.empty(shape, dtype=images.dtype, device=dev)
        torch.index_select(images, 0, idx, out=picked)
        if not augment:
            yield idx, center_crop(picked, image_size=image_size)
            continue
        if out is None or out.shape[0] != shape[0]:
            out = torch.empty((shape[0], shape[1], image_size, image_size), dtype=torch.float32,
                              device=dev)  # fmt: skip
        yield idx, _crop_split(picked, rows[:, 1:5], rows[:, 5], split - start, out)


def batch_indices(
    n: int,
    *,
    batch_size: int,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> list[torch.Tensor]:
    """One epoch of index batches: a seeded permutation (or ``range(n)`` without a generator).

    Args:
        n: number of samples.
        batch_size: indices per batch; the last batch may be shorter unless ``drop_last``.
        generator: shuffles when given (seed it once per run, draw once per epoch).
        drop_last: drop a final incomplete batch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    batches = list(order.split(batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
