"""Anomaly-detection metrics on raw, unbounded scores: AUROC, AUPRO and pixel F1-max.

Pure functions on numpy arrays or torch tensors (CPU or GPU). Scores are used exactly as
given: nothing is passed through a sigmoid or rescaled (torchmetrics' AUROC applies a sigmoid
to scores outside [0, 1], which changes the result on raw anomaly scores). Ties are grouped as
scikit-learn does: one threshold per distinct score, a pixel counts as positive when its score
is >= the threshold.

All pixel metrics come from ONE pass over sorted scores: the normal pixels' values are sorted
(values only, the cheap sort), the anomalous pixels argsorted, and for each distinct anomalous
score the counts of normal pixels above and at it come from binary searches. Between two
anomalous scores only normal pixels cross the threshold, so these points describe the ROC curve
(pixel AUROC), the precision/recall points (F1-max) and the PRO curve exactly. For AUPRO each
anomalous pixel carries the weight ``1 / (num_regions * size_of_its_region)``, so the cumulative
sum of weights in descending score order is PRO (the mean over all ground-truth regions of the
fraction of the region above the threshold). Regions are 8-connected components of each mask,
as in the MVTec AD evaluation code; sorting and sums stay on the tensors' device, only the
connected components are computed on the CPU (scipy).

``pro_official`` is the official MMR code's per-image PRO (the paper's PRO numbers), offered
beside the standard AUPRO for comparisons with the paper; it works on per-image thresholds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

__all__ = ["image_auroc", "pixel_auroc", "aupro", "pixel_f1_max", "pro_official", "evaluate"]

Array = np.ndarray | torch.Tensor

logger = logging.getLogger(__name__)

# The official MMR code keeps the per-image curve points with FPR below this (not a parameter
# there either) and rescales their FPRs by the largest kept one.
_OFFICIAL_FPR_LIMIT = 0.3

# 8-connectivity inside an image and none across images: one `ndimage.label` call on the
# N x H x W stack gives every region of the whole set its own global id.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


@dataclass(frozen=True)
class _Curve:
    """Counts at each distinct *positive* score, in descending order.

    Between two consecutive distinct positive scores only negatives cross the threshold, so
    every curve (ROC, precision/recall, PRO over FPR) moves horizontally there: the points at
    the distinct positive scores, with the negatives counted strictly above (``fps_strict``) and
    at-or-above (``fps``) each, describe the whole curve exactly, ties included.
    """

    positive: torch.Tensor  # bool mask of the positives among the input scores
    order: torch.Tensor  # permutation that sorts the positives' scores in descending order
    ends: torch.Tensor  # index (in that order) of the last positive of each tie group
    tps: torch.Tensor  # int64: positives with score >= each distinct positive score
    fps: torch.Tensor  # int64: negatives with score >= it
    fps_strict: torch.Tensor  # int64: negatives with score > it
    n_pos: int
    n_neg: int


def _to_tensor(x: Array, name: str) -> torch.Tensor:
    """Returns ``x`` as a tensor (no copy for tensors and writable numeric numpy arrays)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a numeric array or tensor; got dtype {arr.dtype}.")
    if arr.dtype.kind in "iu" and arr.dtype != np.uint8:
        arr = arr.astype(np.int64)  # torch lacks most ops on uint16/32/64
    if not arr.flags.writeable:
        arr = arr.copy()  # torch.from_numpy warns on read-only arrays
    return torch.from_numpy(arr)


def _as_float(t: torch.Tensor, name: str) -> torch.Tensor:
    """Casts to float32/float64 without changing any value and rejects NaN/inf."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    elif not t.is_floating_point():
        t = t.double()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values; pass finite anomaly scores.")
    return t


def _as_maps(maps: Array) -> torch.Tensor:
    """Validates anomaly maps: N x H x W (or N x 1 x H x W), finite."""
    t = _to_tensor(maps, "maps")
    if t.ndim == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 3 or t.shape[0] == 0:
        raise ValueError(
            f"maps must have shape N x H x W (or N x 1 x H x W) with N >= 1; got {tuple(t.shape)}."
        )
    return _as_float(t, "maps")


def _as_masks(masks: Array, maps: torch.Tensor) -> torch.Tensor:
    """Validates ground-truth masks against ``maps``; returns a bool tensor on their device."""
    t = _to_tensor(masks, "masks")
    if t.ndim == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if tuple(t.shape) != tuple(maps.shape):
        raise ValueError(
            f"masks has shape {tuple(t.shape)} but maps has {tuple(maps.shape)}; pass one "
            "N x H x W (or N x 1 x H x W) mask per map, at the same resolution."
        )
    t = t.to(maps.device)
    if t.dtype != torch.bool:
        zero = t == 0
        if not bool((zero | (t == 1)).all()) and not bool((zero | (t == 255)).all()):
            raise ValueError(
                "masks must be binary, encoded as 0/1 or 0/255 (bool works too); got other "
                "values. Threshold soft or resized masks first, e.g. masks > 0.5."
            )
        t = ~zero
    return t


def _as_labels(labels: Array, n: int, device: torch.device) -> torch.Tensor:
    """Validates image labels (0 normal, 1 anomalous); returns a bool tensor on ``device``."""
    t = _to_tensor(labels, "labels").to(device)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(
            f"labels must be a 1-D array with one entry per image ({n}); got shape "
            f"{tuple(t.shape)}."
        )
    if t.dtype != torch.bool:
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError("labels must be 0 (normal) or 1 (anomalous); got other values.")
        t = t == 1
    return t


def _as_scores(scores: Array) -> torch.Tensor:
    """Validates image scores: 1-D, finite."""
    t = _to_tensor(scores, "scores")
    if t.ndim != 1:
        raise ValueError(f"scores must be a 1-D array, one per image; got {tuple(t.shape)}.")
    return _as_float(t, "scores")


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1] (MVTec AD uses 0.3); got {fpr_limit}.")


def _sorted_values(t: torch.Tensor) -> torch.Tensor:
    """Ascending sort, values only: numpy's SIMD sort on CPU (~3x faster than an argsort)."""
    if t.device.type == "cpu":
        return torch.from_numpy(np.sort(t.numpy()))
    return torch.sort(t).values


def _curve(scores: torch.Tensor, positive: torch.Tensor, *, what: str) -> _Curve:
    """Counts positives and negatives at each distinct positive score.

    Only the negatives' values are sorted in full; the positives (few pixels of a set) are
    argsorted to carry their AUPRO weights. ``what`` names the argument that holds
    ``positive`` ("labels" or "masks") in errors.
    """
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        kind = "anomalous" if n_pos == 0 else "normal"
        if what == "masks":
            raise ValueError(
                f"masks has no {kind} pixels, so pixel metrics are undefined: evaluate on images "
                "with both defect and defect-free pixels (masks=None in evaluate() gives the "
                "image-level metric only)."
            )
        raise ValueError(
            f"labels has no {kind} images, so image AUROC is undefined: evaluate on a set with "
            "both normal (0) and anomalous (1) images."
        )
    negatives = _sorted_values(scores[~positive])
    pos_sorted, order = torch.sort(scores[positive], descending=True)
    last = torch.tensor([n_pos - 1], device=scores.device)
    ends = torch.cat([torch.nonzero(pos_sorted[1:] != pos_sorted[:-1]).flatten(), last])
    thresholds = pos_sorted[ends]
    negatives = negatives.to(thresholds.device)
    fps = n_neg - torch.searchsorted(negatives, thresholds, right=False)
    fps_strict = n_neg - torch.searchsorted(negatives, thresholds, right=True)
    return _Curve(
        positive=positive,
        order=order,
        ends=ends,
        tps=ends + 1,
        fps=fps,
        fps_strict=fps_strict,
        n_pos=n_pos,
        n_neg=n_neg,
    )


def _previous(t: torch.Tensor) -> torch.Tensor:
    """The value at the previous distinct positive score (0 before the first)."""
    return torch.cat([t.new_zeros(1), t[:-1]])


def _auroc(curve: _Curve) -> float:
    """Trapezoidal ROC area in exact integer arithmetic, as sklearn's curve over all scores.

    Per distinct positive score: a horizontal run (negatives alone) up to it, then the
    diagonal of its tie group; after the last one, the horizontal run to FPR 1.
    """
    tp, fp, fs = curve.tps, curve.fps, curve.fps_strict
    tp0, fp0 = _previous(tp), _previous(fp)
    twice_area = int((2 * tp0 * (fs - fp0) + (fp - fs) * (tp0 + tp)).sum())
    twice_area += 2 * curve.n_pos * (curve.n_neg - int(fp[-1]))
    return twice_area / (2 * curve.n_pos * curve.n_neg)


def _f1_max(curve: _Curve) -> float:
    """Max over thresholds of F1 = 2 TP / (TP + FP + P); it peaks at a positive's score."""
    tps = curve.tps.double()
    return float((2 * tps / (tps + curve.fps.double() + curve.n_pos)).max())


def _region_weights(masks: torch.Tensor) -> torch.Tensor:
    """Per-pixel PRO weight: 1 / (num_regions * region_size) on anomalous pixels, else 0."""
    regions, n_regions = ndimage.label(masks.cpu().numpy(), structure=_REGION_STRUCTURE)
    sizes = np.bincount(regions.ravel())
    per_region = np.zeros(len(sizes), dtype=np.float64)
    per_region[1:] = 1.0 / (n_regions * sizes[1:].astype(np.float64))
    return torch.from_numpy(per_region[regions.ravel()]).to(masks.device)


def _aupro(curve: _Curve, weights: torch.Tensor, fpr_limit: float) -> float:
    """Area under PRO(FPR) on [0, fpr_limit], interpolated at fpr_limit, over fpr_limit."""
    w = weights.to(curve.order.device)[curve.positive][curve.order]
    pro = torch.cumsum(w, 0)[curve.ends]
    # The curve's corners: per distinct positive score, (fps_strict, PRO before) then
    # (fps, PRO after); it starts at (0, 0) and ends at FPR 1 once every region is covered.
    n = curve.n_neg
    corners_x = torch.stack([curve.fps_strict, curve.fps], 1).flatten().double() / n
    corners_y = torch.stack([_previous(pro), pro], 1).flatten()
    fpr = torch.cat([corners_x.new_zeros(1), corners_x, corners_x.new_ones(1)])
    pro = torch.cat([corners_y.new_zeros(1), corners_y, corners_y[-1:]])
    inside = int((fpr <= fpr_limit).sum())  # fpr is non-decreasing and fpr[0] = 0
    x, y = fpr[:inside], pro[:inside]
    area = float(((x[1:] - x[:-1]) * (y[1:] + y[:-1])).sum()) / 2
    if inside < fpr.numel():  # partial segment up to fpr_limit, linearly interpolated
        x0, x1 = float(fpr[inside - 1]), float(fpr[inside])
        y0, y1 = float(pro[inside - 1]), float(pro[inside])
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += (y0 + y_limit) * (fpr_limit - x0) / 2
    return area / fpr_limit


def image_auroc(scores: Array, labels: Array) -> float:
    """ROC AUC of image scores against image labels (ties handled as scikit-learn does).

    Args:
        scores: N raw anomaly scores (any real values, higher = more anomalous).
        labels: N labels, 0/False normal and 1/True anomalous; both classes must occur.

    Returns:
        The area under the ROC curve, in [0, 1].
    """
    s = _as_scores(scores)
    return _auroc(_curve(s, _as_labels(labels, s.shape[0], s.device), what="labels"))


def pixel_auroc(maps: Array, masks: Array) -> float:
    """ROC AUC over all pixels of all maps.

    Args:
        maps: N x H x W (or N x 1 x H x W) raw anomaly maps.
        masks: ground truth of the same shape, binary (bool, 0/1 or 0/255).

    Returns:
        The pixel-level area under the ROC curve.
    """
    m = _as_maps(maps)
    return _auroc(_curve(m.reshape(-1), _as_masks(masks, m).reshape(-1), what="masks"))


def pixel_f1_max(maps: Array, masks: Array) -> float:
    """Maximum pixel-level F1 over all thresholds ("F1-max").

    Args:
        maps: N x H x W (or N x 1 x H x W) raw anomaly maps.
        masks: ground truth of the same shape, binary (bool, 0/1 or 0/255).

    Returns:
        The largest F1 score reachable with one global threshold.
    """
    m = _as_maps(maps)
    return _f1_max(_curve(m.reshape(-1), _as_masks(masks, m).reshape(-1), what="masks"))


def aupro(maps: Array, masks: Array, *, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve (MVTec AD standard).

    For each threshold, FPR is the fraction of all normal pixels of the set above it and PRO
    the mean, over every connected ground-truth region of every image, of the fraction of the
    region above it. PRO is integrated over FPR in [0, fpr_limit] and divided by fpr_limit.

    Args:
        maps: N x H x W (or N x 1 x H x W) raw anomaly maps.
        masks: ground truth of the same shape, binary (bool, 0/1 or 0/255).
        fpr_limit: upper end of the FPR integration range, in (0, 1].

    Returns:
        AUPRO in [0, 1].
    """
    _check_fpr_limit(fpr_limit)
    m = _as_maps(maps)
    gt = _as_masks(masks, m)
    curve = _curve(m.reshape(-1), gt.reshape(-1), what="masks")
    return _aupro(curve, _region_weights(gt), fpr_limit)


def pro_official(maps: Array, masks: Array, labels: Array, *, num_thresholds: int = 200) -> float:
    """The per-image PRO of the official MMR code, which the paper's PRO numbers come from.

    Not the MVTec AD AUPRO (see :func:`aupro`). For each anomalous image: ``num_thresholds``
    thresholds evenly spaced over that image's own ``[min, max)`` of the map (``np.arange``);
    at each, a pixel is positive when its score is ``>`` the threshold, PRO is the mean over
    the image's 8-connected ground-truth regions of the fraction of the region that is
    positive, and FPR the fraction of the image's normal pixels that is positive. The points
    with FPR < 0.3 are kept, their FPRs divided by the largest kept FPR (not by 0.3), and PRO
    is integrated over them with the trapezoid rule. The result is the mean over anomalous
    images.

    Where the official code would fail or return NaN, this defines the value: an anomalous
    image without ground-truth pixels (or without normal pixels) is left out of the mean; an
    image whose curve has fewer than two kept points, or only kept points at FPR 0 (e.g. a
    constant map), contributes 0.

    Args:
        maps: N x H x W (or N x 1 x H x W) raw anomaly maps.
        masks: ground truth of the same shape, binary (bool, 0/1 or 0/255).
        labels: N image labels, 0 normal and 1 anomalous; only anomalous images are scored.
        num_thresholds: thresholds per image (200 in the official code).

    Returns:
        The mean per-image PRO area, in [0, 1].

    Raises:
        ValueError: bad shapes or values, or no anomalous image with ground-truth pixels.
    """
    if num_thresholds < 1:
        raise ValueError(
            f"num_thresholds must be >= 1 (the official code uses 200); got {num_thresholds}."
        )
    m = _as_maps(maps)
    gt = _as_masks(masks, m)
    anomalous = _as_labels(labels, m.shape[0], m.device).cpu().numpy()
    scores = m.cpu().numpy().astype(np.float64, copy=False)
    truth = gt.cpu().numpy()
    regions, _ = ndimage.label(truth, structure=_REGION_STRUCTURE)  # ids unique over the set
    areas = []
    skipped = 0
    for i in np.flatnonzero(anomalous):
        area = _image_pro(scores[i], truth[i], regions[i], num_thresholds)
        if area is None:
            skipped += 1
        else:
            areas.append(area)
    if skipped:
        logger.warning(
            "pro_official: %d anomalous image(s) without ground-truth or without normal "
            "pixels left out of the mean",
            skipped,
        )
    if not areas:
        raise ValueError(
            "pro_official needs at least one anomalous image (label 1) whose mask has both "
            "defect and defect-free pixels; got none."
        )
    return float(np.mean(areas))


def _image_pro(
    scores: np.ndarray, truth: np.ndarray, regions: np.ndarray, num_thresholds: int
) -> float | None:
    """One image's official PRO area (None when it has no region or no normal pixel)."""
    normal = np.sort(scores[~truth])
    if normal.size == 0 or normal.size == scores.size:
        return None
    low, high = scores.min(), scores.max()
    if high == low:
        return 0.0  # constant map: no threshold range (the official code divides by zero)
    thresholds = np.arange(low, high, (high - low) / num_thresholds)
    # Counts of pixels strictly above each threshold, from sorted values.
    fpr = (normal.size - np.searchsorted(normal, thresholds, side="right")) / normal.size
    ids = regions[truth]
    values = scores[truth]
    order = np.lexsort((values, ids))  # by region, then value
    ids, values = ids[order], values[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], ids.size]
    overlaps = [
        (e - s - np.searchsorted(values[s:e], thresholds, side="right")) / (e - s)
        for s, e in zip(starts, ends, strict=True)
    ]
    pro = np.mean(overlaps, axis=0)
    keep = fpr < _OFFICIAL_FPR_LIMIT
    x, y = fpr[keep], pro[keep]
    if x.size < 2 or x.max() == 0:
        return 0.0
    x = x / x.max()
    # x falls as the threshold rises: the area is the trapezoid sum in the other direction.
    return float(np.sum((x[:-1] - x[1:]) * (y[:-1] + y[1:])) / 2)


def evaluate(
    maps: Array,
    masks: Array | None,
    labels: Array,
    *,
    scores: Array | None = None,
    fpr_limit: float = 0.3,
    official_pro: bool = False,
) -> dict[str, float]:
    """Computes all metrics, with one sort of the pixel scores for the three pixel metrics.

    Args:
        maps: N x H x W (or N x 1 x H x W) raw anomaly maps.
        masks: ground truth of the same shape, binary (bool, 0/1 or 0/255), or None for
            datasets without masks (then only ``image_auroc`` is returned).
        labels: N image labels, 0 normal and 1 anomalous.
        scores: N image scores; default the max of each map (the MMR image score).
        fpr_limit: upper end of the FPR range of AUPRO, in (0, 1].
        official_pro: also compute ``pro_official`` (:func:`pro_official`, the paper's PRO).

    Returns:
        ``{"image_auroc", "pixel_auroc", "aupro", "pixel_f1"}`` (+ ``"pro_official"``) as
        floats (only ``image_auroc`` when ``masks`` is None).
    """
    _check_fpr_limit(fpr_limit)
    m = _as_maps(maps)
    s = m.amax(dim=(1, 2)) if scores is None else _as_scores(scores)
    if s.shape[0] != m.shape[0]:
        raise ValueError(f"scores has {s.shape[0]} entries but maps has {m.shape[0]} maps.")
    result = {
        "image_auroc": _auroc(_curve(s, _as_labels(labels, m.shape[0], s.device), what="labels"))
    }
    if masks is None:
        return result
    gt = _as_masks(masks, m)
    curve = _curve(m.reshape(-1), gt.reshape(-1), what="masks")
    result["pixel_auroc"] = _auroc(curve)
    result["aupro"] = _aupro(curve, _region_weights(gt), fpr_limit)
    result["pixel_f1"] = _f1_max(curve)
    if official_pro:
        result["pro_official"] = pro_official(m, gt, labels)
    return result
