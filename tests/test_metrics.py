"""Tests for mmr.metrics: known answers, agreement with sklearn and a reference AUPRO, errors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score

from mmr.metrics import aupro, evaluate, image_auroc, pixel_auroc, pixel_f1_max, pro_official

TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "raw": lambda x: x,
    "offset_1000": lambda x: x + 1000.0,
    "scaled_1e-4": lambda x: x * 1e-4,
    "negative": lambda x: x - 50.0,
}


def _random_set(seed: int, n: int = 6, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random maps with several rectangular defects per anomalous image.

    Scores are rounded to 2 decimals so that many normal and anomalous pixels tie.
    """
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(1, n):  # image 0 stays normal
        for _ in range(rng.integers(2, 5)):
            h, w = rng.integers(1, 6, size=2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            masks[i, y : y + h, x : x + w] = 1
    noise = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 1, 1))
    maps = noise / noise.std() + 1.5 * masks * rng.random((n, 1, 1))
    return np.round(maps, 2), masks


def _reference_pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[list, list]:
    """Straightforward PRO curve: one threshold per distinct score, regions one by one."""
    regions = []
    for i in range(len(masks)):
        labelled, n = ndimage.label(masks[i], structure=np.ones((3, 3), dtype=int))
        regions += [(i, labelled == k) for k in range(1, n + 1)]
    normal = masks == 0
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fprs.append((above & normal).sum() / normal.sum())
        pros.append(np.mean([above[i][region].mean() for i, region in regions]))
    return fprs, pros


def _reference_integral(fprs: list, pros: list, limit: float) -> float:
    """Trapezoids of the PRO curve up to ``limit``, the last one cut by interpolation."""
    area = 0.0
    for k in range(1, len(fprs)):
        x0, y0, x1, y1 = fprs[k - 1], pros[k - 1], fprs[k], pros[k]
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
            break
    return area / limit


def _sklearn_f1_max(masks: np.ndarray, maps: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(masks.ravel(), maps.ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmax(2 * precision * recall / (precision + recall)))


# --- image AUROC --------------------------------------------------------------------------


def test_image_auroc_known_answers() -> None:
    labels = np.array([0, 0, 1, 1])
    assert image_auroc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert image_auroc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert image_auroc(np.full(4, 3.0), labels) == 0.5
    # pairs (anomalous > normal): 0.8>0.1, 0.8>0.4, 0.4>0.1 and one tie 0.4=0.4 -> 3.5 / 4
    assert image_auroc(np.array([0.1, 0.4, 0.4, 0.8]), labels) == 0.875


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_image_auroc_matches_sklearn(transform: str) -> None:
    rng = np.random.default_rng(1)
    labels = rng.random(300) < 0.3
    scores = TRANSFORMS[transform](np.round(rng.normal(size=300) + labels, 1))  # many ties
    expected = roc_auc_score(labels, scores)
    assert image_auroc(scores, labels) == pytest.approx(expected, abs=1e-6)
    assert image_auroc(scores, labels.astype(np.int64)) == pytest.approx(expected, abs=1e-6)


# --- pixel AUROC and F1-max ---------------------------------------------------------------


def test_pixel_known_answers() -> None:
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[1, 1:3, 1:3] = 1
    maps = masks * 5.0 - 2.0
    assert pixel_auroc(maps, masks) == 1.0
    assert pixel_f1_max(maps, masks) == 1.0
    assert pixel_auroc(-maps, masks) == 0.0
    # all scores tied: a single threshold flags every pixel, F1 = 2 * 4 / (32 + 4)
    assert pixel_f1_max(np.zeros((2, 4, 4)), masks) == pytest.approx(8 / 36)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_and_f1_match_sklearn(transform: str, seed: int) -> None:
    maps, masks = _random_set(seed)
    maps = TRANSFORMS[transform](maps)
    expected_auroc = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected_auroc, abs=1e-6)
    assert pixel_f1_max(maps, masks) == pytest.approx(_sklearn_f1_max(masks, maps), abs=1e-6)


# --- AUPRO --------------------------------------------------------------------------------


def test_aupro_diagonal_when_pro_equals_fpr() -> None:
    # Striped image: row 0 one defect, row 1 normal, both scored by column. Each threshold
    # flags k of 7 columns, so PRO = FPR = k/7: the area under y = x is 0.3**2 / 2 over 0.3.
    masks = np.array([[[1] * 7, [0] * 7]], dtype=np.uint8)
    maps = np.tile(np.arange(7.0), (1, 2, 1))
    assert aupro(maps, masks) == pytest.approx(0.15, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=0.1) == pytest.approx(0.05, abs=1e-12)


def test_aupro_averages_regions_not_pixels() -> None:
    # Stripes: rows 0 and 2 are two regions (8 and 4 pixels). Region A is fully above every
    # normal pixel, region B has 1 of 4 pixels above and 3 below: PRO = (1 + 1/4) / 2 over
    # the whole FPR range, while pixel recall would be 9/12.
    masks = np.zeros((1, 4, 8), dtype=np.uint8)
    masks[0, 0, :] = 1
    masks[0, 2, :4] = 1
    maps = np.linspace(1.0, 2.0, 32).reshape(1, 4, 8)  # distinct normal scores in [1, 2]
    maps[0, 0, :] = 10.0
    maps[0, 2, :4] = [10.0, -1.0, -1.0, -1.0]
    assert aupro(maps, masks) == pytest.approx(0.625, abs=1e-12)


def test_aupro_regions_are_8_connected() -> None:
    # A 2x2 block and one pixel touching it diagonally form ONE region of 5 pixels; only the
    # diagonal pixel is detected: PRO = 1/5 (4-connectivity would give (0 + 1) / 2).
    masks = np.zeros((1, 6, 6), dtype=np.uint8)
    masks[0, 1:3, 1:3] = 1
    masks[0, 3, 3] = 1
    maps = np.linspace(0.0, 1.0, 36).reshape(1, 6, 6)
    maps[0, 1:3, 1:3] = -5.0
    maps[0, 3, 3] = 5.0
    assert aupro(maps, masks) == pytest.approx(0.2, abs=1e-12)


def test_aupro_perfect_and_inverted() -> None:
    maps, masks = _random_set(3)
    separated = np.where(masks == 1, 100.0 + maps, maps)
    assert aupro(separated, masks) == pytest.approx(1.0, abs=1e-12)
    inverted = np.where(masks == 1, -100.0 + maps, maps)
    assert aupro(inverted, masks) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_reference(seed: int) -> None:
    maps, masks = _random_set(seed)
    assert ndimage.label(masks[1:] == 1, structure=np.ones((3, 3, 3)))[1] >= 5
    fprs, pros = _reference_pro_curve(maps, masks)
    for limit in (0.3, 0.05, 1.0):
        expected = _reference_integral(fprs, pros, limit)
        assert 0.0 < expected < 1.0
        assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-3)
        # thresholds sit at the same distinct scores, so the match is in fact exact
        assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)
    expected = _reference_integral(fprs, pros, 0.3)
    for transform in TRANSFORMS.values():  # raw scores: offsets and scales change nothing
        assert aupro(transform(maps), masks) == pytest.approx(expected, abs=1e-9)


# --- official per-image PRO --------------------------------------------------------------


def _literal_pro_official(
    maps: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    num_thresholds: int = 200,
    *,
    strict: bool = True,
) -> float:
    """The official definition written out slowly: per anomalous image, per threshold, per
    region; sklearn's ``auc`` on the kept points. ``strict=False`` counts ties as positive."""
    areas = []
    for amap, mask in zip(maps[labels == 1], masks[labels == 1], strict=True):
        amap = amap.astype(np.float64)
        low, high = amap.min(), amap.max()
        regions, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        normal = mask == 0
        points = []
        for th in np.arange(low, high, (high - low) / num_thresholds):
            binary = amap > th if strict else amap >= th
            pro = np.mean(
                [binary[regions == k].sum() / (regions == k).sum() for k in range(1, n + 1)]
            )
            points.append((np.logical_and(normal, binary).sum() / normal.sum(), pro))
        kept = [(f, p) for f, p in points if f < 0.3]
        fprs = np.array([f for f, _ in kept])
        areas.append(auc(fprs / fprs.max(), [p for _, p in kept]))
    return float(np.mean(areas))


def _smooth_set(
    seed: int, n: int = 5, size: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smooth float maps (no ties); anomalous images hold 2-4 rectangular defects each."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(2, n):  # images 0 and 1 stay normal
        for _ in range(rng.integers(2, 5)):
            h, w = rng.integers(2, 8, size=2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            masks[i, y : y + h, x : x + w] = 1
    noise = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 1.5, 1.5))
    maps = noise / noise.std() + 1.2 * masks * rng.random((n, 1, 1))
    labels = (masks.reshape(n, -1).max(axis=1) > 0).astype(int)
    return maps.astype(np.float32), masks, labels


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pro_official_matches_literal_reference(seed: int) -> None:
    maps, masks, labels = _smooth_set(seed)
    per_image = [ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks[labels == 1]]
    assert max(per_image) >= 2  # several regions in at least one image
    expected = _literal_pro_official(maps, masks, labels)
    assert 0.0 < expected < 1.0
    assert pro_official(maps, masks, labels) == pytest.approx(expected, abs=1e-6)
    assert pro_official(torch.from_numpy(maps), torch.from_numpy(masks), labels) == pytest.approx(
        expected, abs=1e-6
    )
    fewer = _literal_pro_official(maps, masks, labels, num_thresholds=37)
    assert pro_official(maps, masks, labels, num_thresholds=37) == pytest.approx(fewer, abs=1e-6)


@pytest.mark.parametrize("seed", [4, 5])
def test_pro_official_ties_on_thresholds(seed: int) -> None:
    # Integer scores 0..10 and 10 thresholds (0, 1, ..., 9): every threshold lands on scores,
    # so ">" (not ">=") decides which pixels count, as in the official code.
    _, masks, labels = _smooth_set(seed)
    rng = np.random.default_rng(seed)
    ints = (np.arange(masks[0].size).reshape(masks[0].shape) % 11).astype(np.float64)
    ints = np.where(masks == 1, rng.integers(3, 11, size=masks.shape), ints[None])
    expected = _literal_pro_official(ints, masks, labels, num_thresholds=10)
    assert pro_official(ints, masks, labels, num_thresholds=10) == pytest.approx(
        expected, abs=1e-6
    )
    # Counting ties as positive gives another value on these maps (the check has teeth).
    ties_positive = _literal_pro_official(ints, masks, labels, num_thresholds=10, strict=False)
    assert expected != pytest.approx(ties_positive, abs=1e-3)


def test_pro_official_regions_are_8_connected_and_per_image() -> None:
    # Two blocks touching at a corner are ONE region: found 4/4 + 0/12 pixels -> PRO 0.25 at
    # every threshold between the block scores (4-connectivity would give (1 + 0) / 2).
    mask = np.zeros((1, 12, 12), dtype=np.uint8)
    mask[0, 2:4, 2:4] = 1  # 4 pixels, detected
    mask[0, 4:7, 4:8] = 1  # 12 pixels, touching diagonally, missed
    amap = np.zeros((1, 12, 12))
    amap[0, 2:4, 2:4] = 2.0
    amap[0, 7:, :] = np.linspace(0.0, 1.0, 60).reshape(5, 12)  # normal pixels spread in [0, 1]
    result = pro_official(amap, mask, np.array([1]))
    assert result == pytest.approx(_literal_pro_official(amap, mask, np.array([1])), abs=1e-9)
    assert result < 0.3


def test_pro_official_normalises_by_largest_kept_fpr_not_by_limit() -> None:
    # A perfect map: PRO is 1 wherever FPR < 0.3, so the official area is 1 whatever the
    # largest kept FPR is (dividing by 0.3 would give largest_fpr / 0.3 < 1).
    maps, masks, labels = _smooth_set(6)
    perfect = np.where(masks == 1, 10.0 + maps, maps)
    assert pro_official(perfect, masks, labels) == pytest.approx(1.0, abs=1e-12)


def test_pro_official_ignores_normal_images_and_skips_or_zeroes_degenerate_ones() -> None:
    maps, masks, labels = _smooth_set(7)
    base = pro_official(maps, masks, labels)
    noisy = maps.copy()
    noisy[labels == 0] = 100.0 * np.random.default_rng(0).random(noisy[labels == 0].shape)
    assert pro_official(noisy, masks, labels) == base  # normal images are not scored
    # an anomalous image without ground truth is left out of the mean
    unmasked = masks.copy()
    first = int(np.flatnonzero(labels)[0])
    unmasked[first] = 0
    rest = labels.copy()
    rest[first] = 0
    assert pro_official(maps, unmasked, labels) == pro_official(maps, unmasked, rest)
    # a constant map has no threshold range: it contributes 0
    flat = maps.copy()
    flat[first] = 1.0
    others = pro_official(maps, masks, rest)
    n = int(labels.sum())
    assert pro_official(flat, masks, labels) == pytest.approx(others * (n - 1) / n, abs=1e-12)
    with pytest.raises(ValueError, match="at least one anomalous image"):
        pro_official(maps, masks * 0, labels)
    with pytest.raises(ValueError, match="num_thresholds"):
        pro_official(maps, masks, labels, num_thresholds=0)


def test_evaluate_reports_pro_official_only_when_asked() -> None:
    maps, masks, labels = _smooth_set(8)
    assert "pro_official" not in evaluate(maps, masks, labels)
    result = evaluate(maps, masks, labels, official_pro=True)
    assert result["pro_official"] == pro_official(maps, masks, labels)
    assert result["pro_official"] != pytest.approx(result["aupro"], abs=1e-3)


# --- evaluate, encodings, tensors ---------------------------------------------------------


def test_evaluate_matches_single_metrics() -> None:
    maps, masks = _random_set(4)
    labels = masks.reshape(len(masks), -1).max(axis=1)
    result = evaluate(maps, masks, labels)
    assert list(result) == ["image_auroc", "pixel_auroc", "aupro", "pixel_f1"]
    assert result["image_auroc"] == image_auroc(maps.max(axis=(1, 2)), labels)
    assert result["pixel_auroc"] == pixel_auroc(maps, masks)
    assert result["aupro"] == aupro(maps, masks)
    assert result["pixel_f1"] == pixel_f1_max(maps, masks)
    assert evaluate(maps, masks, labels, fpr_limit=0.1)["aupro"] == aupro(
        maps, masks, fpr_limit=0.1
    )
    scores = -maps.mean(axis=(1, 2))
    assert evaluate(maps, masks, labels, scores=scores)["image_auroc"] == image_auroc(
        scores, labels
    )
    assert evaluate(maps, None, labels) == {"image_auroc": result["image_auroc"]}


def test_mask_encodings_agree() -> None:
    maps, masks = _random_set(5)
    labels = masks.reshape(len(masks), -1).max(axis=1)
    expected = evaluate(maps, masks, labels)
    for encoded in (
        masks.astype(bool),
        masks * 255,
        masks.astype(np.float32),
        masks[:, None],
        torch.from_numpy(masks * 255),
    ):
        assert evaluate(maps, encoded, labels) == expected
    assert evaluate(maps[:, None], masks, labels) == expected


def test_torch_cpu_tensors_match_numpy() -> None:
    maps, masks = _random_set(6)
    maps = maps.astype(np.float32)
    labels = masks.reshape(len(masks), -1).max(axis=1)
    expected = evaluate(maps, masks, labels)
    got = evaluate(torch.from_numpy(maps), torch.from_numpy(masks), torch.from_numpy(labels))
    assert got == expected
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    scores = torch.from_numpy(maps).amax(dim=(1, 2))
    assert image_auroc(scores, torch.from_numpy(labels)) == expected["image_auroc"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_match_numpy() -> None:
    maps, masks = _random_set(7)
    labels = masks.reshape(len(masks), -1).max(axis=1)
    expected = evaluate(maps, masks, labels)
    got = evaluate(torch.from_numpy(maps).cuda(), torch.from_numpy(masks).cuda(), labels)
    assert got == pytest.approx(expected, abs=1e-9)


def test_does_not_import_torchmetrics_or_search_libraries() -> None:
    # torchmetrics' AUROC silently applies a sigmoid to raw scores; mmr must stay Ray-free
    code = (
        "import sys, mmr.metrics; "
        "print(sorted({'torchmetrics', 'ray', 'optuna'} & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- errors -------------------------------------------------------------------------------


def _error_cases() -> list:
    maps, masks = _random_set(8, n=4, size=8)
    labels = np.array([0, 1, 1, 1])
    soft = masks * 0.5
    mixed = masks.copy()
    mixed[1, 0, 0] = 255
    return [
        ("non_binary_masks", lambda: pixel_auroc(maps, masks * 2), "masks must be binary"),
        ("soft_masks", lambda: aupro(maps, soft), "masks must be binary"),
        ("mixed_encodings", lambda: pixel_f1_max(maps, mixed), "masks must be binary"),
        ("mask_shape", lambda: pixel_auroc(maps, masks[:, :4]), "masks has shape"),
        ("mask_count", lambda: evaluate(maps, masks[:3], labels), "masks has shape"),
        ("labels_length", lambda: evaluate(maps, masks, labels[:3]), "labels must be"),
        ("labels_values", lambda: image_auroc(maps[:, 0, 0], labels * 2), "labels must be"),
        ("scores_length", lambda: image_auroc(maps[:3, 0, 0], labels), "labels must be"),
        ("scores_count", lambda: evaluate(maps, masks, labels, scores=labels[:3]), "scores"),
        ("no_anomalous_images", lambda: image_auroc(labels, labels * 0), "no anomalous images"),
        ("no_normal_images", lambda: evaluate(maps, None, labels + 1 - labels), "no normal"),
        ("no_anomalous_pixels", lambda: evaluate(maps, masks * 0, labels), "no anomalous pix"),
        ("no_normal_pixels", lambda: aupro(maps, masks * 0 + 1), "no normal pixels"),
        ("nan_maps", lambda: pixel_auroc(maps * np.nan, masks), "maps contains NaN"),
        ("inf_scores", lambda: image_auroc(labels / 0.0, labels), "scores contains NaN"),
        ("maps_ndim", lambda: pixel_auroc(maps[0], masks[0]), "maps must have shape"),
        ("fpr_limit_zero", lambda: aupro(maps, masks, fpr_limit=0.0), "fpr_limit"),
        ("fpr_limit_big", lambda: evaluate(maps, masks, labels, fpr_limit=1.5), "fpr_limit"),
        ("text_scores", lambda: image_auroc(np.array(["a"] * 4), labels), "scores must be"),
    ]


@pytest.mark.parametrize("case", _error_cases(), ids=lambda case: case[0])
def test_errors_are_clear(case: tuple) -> None:
    _, call, message = case
    with np.errstate(divide="ignore", invalid="ignore"), pytest.raises(ValueError, match=message):
        call()
