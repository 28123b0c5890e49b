"""Speed of mmr.metrics against straightforward references, measured side by side.

References: scikit-learn for AUROC and F1-max, and a threshold-loop AUPRO written like the
usual MVTec AD reference code (evenly spaced thresholds over the score range; at each one,
label the ground-truth regions of every image and measure each region's overlap).

Run: ``python -m benchmarks.bench_metrics [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from benchmarks.common import format_row, row
from mmr.metrics import aupro, evaluate, pixel_auroc, pixel_f1_max

__all__ = ["make_data", "reference_aupro", "reference_evaluate", "run"]


def make_data(
    n: int = 64, size: int = 224, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smooth float32 anomaly maps; half the images carry 2-5 rectangular/elliptic defects.

    Returns:
        ``(maps, masks, labels)``: N x H x W float32, N x H x W uint8 0/1, N int64.
    """
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n // 2, n):
        for _ in range(rng.integers(2, 6)):
            cy, cx = rng.integers(0, size, size=2)
            ry, rx = rng.integers(3, size // 10, size=2)
            if rng.random() < 0.5:
                masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:
                masks[i, max(cy - ry, 0) : cy + ry, max(cx - rx, 0) : cx + rx] = 1
    noise = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 4, 4))
    bump = ndimage.gaussian_filter(masks.astype(np.float64), sigma=(0, 3, 3))
    maps = noise / noise.std() + 2.0 * bump
    labels = (masks.reshape(n, -1).max(axis=1) > 0).astype(np.int64)
    return maps.astype(np.float32), masks, labels


def reference_aupro(
    maps: np.ndarray, masks: np.ndarray, *, num_thresholds: int = 200, fpr_limit: float = 0.3
) -> float:
    """AUPRO as the widely copied MVTec AD ``compute_pro`` loop computes it.

    Same loop as that code (evenly spaced thresholds from min to max; at each, binarise all
    maps, label each ground-truth mask and sum each region's hits through its coordinates;
    FPR from ``1 - masks``), with scipy's 8-connected labelling instead of skimage and the
    standard integration (cut at ``fpr_limit`` by interpolation, divided by ``fpr_limit``)
    instead of that code's rescaling of the FPR axis.
    """
    structure = np.ones((3, 3), dtype=int)
    binary_maps = np.zeros_like(maps, dtype=bool)
    low, high = float(maps.min()), float(maps.max())
    fprs, pros = [], []
    for threshold in np.arange(low, high, (high - low) / num_thresholds):
        binary_maps[maps <= threshold] = 0
        binary_maps[maps > threshold] = 1
        overlaps = []
        for binary_map, mask in zip(binary_maps, masks, strict=True):
            labelled, n_regions = ndimage.label(mask, structure=structure)
            for k in range(1, n_regions + 1):
                coords = np.nonzero(labelled == k)
                overlaps.append(binary_map[coords].sum() / len(coords[0]))
        inverse_masks = 1 - masks
        fprs.append(np.logical_and(inverse_masks, binary_maps).sum() / inverse_masks.sum())
        pros.append(float(np.mean(overlaps)))
    fprs, pros = [0.0, *fprs[::-1]], [0.0, *pros[::-1]]  # highest threshold first
    area = 0.0
    for k in range(1, len(fprs)):
        x0, y0, x1, y1 = fprs[k - 1], pros[k - 1], fprs[k], pros[k]
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:  # cut the segment at fpr_limit by linear interpolation
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
            break
    return area / fpr_limit


def _sklearn_f1_max(maps: np.ndarray, masks: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(masks.ravel(), maps.ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmax(2 * precision * recall / (precision + recall)))


def reference_evaluate(
    maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, *, num_thresholds: int = 200
) -> dict[str, float]:
    """The four metrics computed separately: sklearn three times plus the reference AUPRO."""
    return {
        "image_auroc": float(roc_auc_score(labels, maps.max(axis=(1, 2)))),
        "pixel_auroc": float(roc_auc_score(masks.ravel(), maps.ravel())),
        "aupro": reference_aupro(maps, masks, num_thresholds=num_thresholds),
        "pixel_f1": _sklearn_f1_max(maps, masks),
    }


def _side_by_side(
    project: Callable[[], object],
    reference: Callable[[], object],
    repeats: int,
    reference_warmup: Callable[[], object] | None = None,
) -> tuple[float, float]:
    """Median wall times of ``project`` and ``reference``, timed alternately after a warm-up.

    Alternating the two keeps a change in machine load from favouring either side.
    """
    project()
    (reference_warmup or reference)()
    project_s, reference_s = [], []
    for _ in range(repeats):
        for fn, times in ((project, project_s), (reference, reference_s)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(project_s), statistics.median(reference_s)


SECTION = "metrics"
TARGET = ">= 20x, |diff| < 1e-3"


def _row(
    benchmark: str,
    figure: str,
    times: tuple[float, float],
    note: str,
    *,
    diff: float,
    with_target: bool = False,
) -> dict:
    project_s, reference_s = times
    ratio = reference_s / project_s
    return row(
        benchmark,
        figure,
        project_s,
        reference_s,
        note=note,
        section=SECTION,
        target=TARGET if with_target else None,
        met=(ratio >= 20 and diff < 1e-3) if with_target else None,
        diff=diff,
        summary=f"|diff| {diff:.1e}",
    )


def run(quick: bool = False, smoke: bool = False) -> list[dict]:
    """Times each metric against its reference on the same data, in this process.

    Args:
        quick: 32 maps and one repeat instead of 64 maps and the median of 3.
        smoke: a code-path check only (4 maps of 64 px, 20 thresholds): figures mean nothing.

    Returns:
        One row per benchmark (see ``benchmarks.common``), ``ratio = reference_s / project_s``
        and ``diff`` = largest |project - reference| of the metric values.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the references run on one core: compare like with like
    try:
        if smoke:
            return _run(4, 20, 1, size=64)
        return _run(*((32, 200, 1) if quick else (64, 200, 3)))
    finally:
        torch.set_num_threads(threads)


def _run(n: int, num_thresholds: int, repeats: int, *, size: int = 224) -> list[dict]:
    """The rows of ``run`` for ``n`` maps and a reference with ``num_thresholds`` thresholds."""
    maps, masks, labels = make_data(n, size)
    figure = f"median s/call, {n} maps {size}x{size} float32, 1 thread"
    rows = []

    def ref_aupro() -> float:
        return reference_aupro(maps, masks, num_thresholds=num_thresholds)

    def warm_aupro() -> float:  # the full reference loop is too slow to run just to warm up
        return reference_aupro(maps, masks, num_thresholds=2)

    ours, theirs = aupro(maps, masks), ref_aupro()
    rows.append(
        _row(
            "aupro",
            figure,
            _side_by_side(lambda: aupro(maps, masks), ref_aupro, repeats, warm_aupro),
            f"|diff|={abs(ours - theirs):.1e} (value {ours:.4f}); reference: "
            f"{num_thresholds} thresholds, per-threshold region loop",
            diff=abs(ours - theirs),
            with_target=True,
        )
    )
    for name, fn, ref in (
        ("pixel_auroc", pixel_auroc, lambda: roc_auc_score(masks.ravel(), maps.ravel())),
        ("pixel_f1_max", pixel_f1_max, lambda: _sklearn_f1_max(maps, masks)),
    ):
        diff = abs(fn(maps, masks) - ref())
        rows.append(
            _row(
                name,
                figure,
                _side_by_side(lambda fn=fn: fn(maps, masks), ref, repeats),
                f"|diff|={diff:.1e}; reference: sklearn",
                diff=diff,
            )
        )
    ours_all = evaluate(maps, masks, labels)
    theirs_all = reference_evaluate(maps, masks, labels, num_thresholds=num_thresholds)
    diff = max(abs(ours_all[key] - theirs_all[key]) for key in ours_all)
    rows.append(
        _row(
            "evaluate",
            figure,
            _side_by_side(
                lambda: evaluate(maps, masks, labels),
                lambda: reference_evaluate(maps, masks, labels, num_thresholds=num_thresholds),
                repeats,
                lambda: reference_evaluate(maps, masks, labels, num_thresholds=2),
            ),
            f"max |diff|={diff:.1e} over 4 metrics; reference: sklearn x3 + reference AUPRO",
            diff=diff,
            with_target=True,
        )
    )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller, under a minute")
    for result in run(quick=parser.parse_args().quick):
        print(format_row(result))
