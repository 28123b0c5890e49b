"""Decision thresholds chosen on the validation half, and the normalised score built on them.

Per category (task), :func:`choose_thresholds` picks

- an **image threshold**: the F1-optimal one on the validation images (an image is anomalous
  when ``score >= threshold``); the threshold sits half-way between the best-F1 score and the
  next lower validation score, so that it does not hug one validation image. Where the
  validation half holds no anomalous image, an F1-optimal threshold does not exist (anomalib's
  adaptive threshold then flags every image): the ``NORMAL_QUANTILE`` (99th percentile) of the
  normal validation scores is used instead (``method: normal_p99``);
- a **pixel threshold**: the same rule over the validation pixels (the masks, center-cropped
  as the evaluation crops them); without masks (mask-less datasets) or without anomalous
  pixels it is the image threshold (``method: image``): the image score is the map's max, so a
  pixel above the image threshold is exactly what makes its image anomalous.

The **normalised score** maps the image threshold to 0.5::

    normalised = 1 / (1 + exp(-(score - threshold) / scale))

with ``scale`` the standard deviation of the validation image scores (``abs(threshold)``, or 1,
when they are all equal). It is monotonic in the raw score, so rankings (and AUROC) do not
change; it is for display and alerting only, every metric is computed on raw scores.

This module needs numpy only (``predict`` from ONNX imports it without torch model code).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "NORMAL_QUANTILE",
    "choose_thresholds",
    "f1_threshold",
    "normalise",
    "validation_thresholds",
]

# Quantile of the normal validation scores used when validation has no anomalous image.
NORMAL_QUANTILE = 0.99


def f1_threshold(scores: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """The F1-optimal threshold of ``scores`` (positive when ``score >= threshold``).

    Args:
        scores: raw scores, any shape (flattened).
        positive: bool ground truth of the same size; must hold at least one True.

    Returns:
        ``(threshold, f1)``: the threshold half-way between the best-F1 score and the next lower
        score (the best-F1 score itself when none is lower), and the F1 it reaches.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(positive, dtype=bool).ravel()
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("f1_threshold needs at least one positive")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    # Last index of each group of equal scores: thresholds at distinct scores.
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    tps = np.cumsum(y)[ends]
    predicted = ends + 1
    f1 = 2 * tps / (predicted + n_pos)
    best = int(np.argmax(f1))
    value = float(s[ends[best]])
    if best + 1 < ends.size:
        value = (value + float(s[ends[best] + 1])) / 2
    return value, float(f1[best])


def choose_thresholds(
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray | None = None,
    masks: np.ndarray | None = None,
) -> dict[str, Any]:
    """Image and pixel thresholds of one category from its validation half.

    Args:
        scores: N image scores (the max of each map).
        labels: N labels, 1 anomalous.
        maps: N x H x W anomaly maps (None: the pixel threshold is the image threshold).
        masks: N x H x W binary ground truth of the maps (None for mask-less datasets).

    Returns:
        ``{"image", "image_method", "image_f1", "pixel", "pixel_method", "pixel_f1",
        "scale", "score_range", "val_images", "val_anomalous", "normal_quantile"}``;
        methods are ``f1_max``, ``normal_p99`` or ``image`` (pixel: same as the image one).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.size == 0:
        raise ValueError("choose_thresholds needs at least one validation image")
    image_f1: float | None = None
    if y.any() and (~y).any():
        image, image_f1 = f1_threshold(s, y)
        image_method = "f1_max"
    else:
        normal = s[~y] if (~y).any() else s
        image = float(np.quantile(normal, NORMAL_QUANTILE))
        image_method = "normal_p99"
    pixel, pixel_method, pixel_f1 = image, "image", None
    if maps is not None and masks is not None:
        gt = np.asarray(masks).astype(bool)
        if gt.any() and (~gt).any() and image_method == "f1_max":
            pixel, pixel_f1 = f1_threshold(np.asarray(maps), gt)
            pixel_method = "f1_max"
    spread = float(s.std())
    scale = spread if spread > 0 else (abs(image) or 1.0)
    return {
        "image": float(image),
        "image_method": image_method,
        "image_f1": image_f1,
        "pixel": float(pixel),
        "pixel_method": pixel_method,
        "pixel_f1": pixel_f1,
        "scale": scale,
        "score_range": [float(s.min()), float(s.max())],
        "val_images": int(s.size),
        "val_anomalous": int(y.sum()),
        "normal_quantile": NORMAL_QUANTILE,
    }


def normalise(score: float, threshold: float, scale: float) -> float:
    """``1 / (1 + exp(-(score - threshold) / scale))``: the threshold maps to 0.5."""
    z = (score - threshold) / scale
    if z < -700:  # exp overflows; the limit is 0
        return 0.0
    return 1.0 / (1.0 + math.exp(-z))


def validation_thresholds(
    state: Mapping[str, Any], *, device: str = "auto"
) -> dict[str, dict[str, Any]]:
    """Thresholds of every task of a checkpoint (or model file), from its validation half.

    Evaluates the models on the validation split exactly as ``evaluate_checkpoint`` does
    (torch-side; imported here lazily so that this module stays numpy-only).
    """
    from mmr.data import center_crop_masks
    from mmr.train import evaluate_checkpoint

    cfg, _, outputs = evaluate_checkpoint(state, split="val", device=device)
    out = {}
    for task, (data, maps) in outputs.items():
        masks = None
        if data.masks is not None:
            masks = center_crop_masks(data.masks, image_size=cfg.data.image_size)[:, 0]
            masks = masks.cpu().numpy()
        m = maps.float().cpu().numpy()
        out[task] = choose_thresholds(
            m.reshape(m.shape[0], -1).max(axis=1), data.labels.numpy(), m, masks
        )
    return out
