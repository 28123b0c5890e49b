"""``launch.py predict``: score new images with an exported model (torch or ONNX).

The preprocessing is exactly the evaluation's: each image is decoded and resized to
``data.resize`` with ``data.test_interpolation`` by the decode path of ``mmr.data.load_images``
(``mmr.imagecache.decode_image``), center-cropped to ``data.image_size`` and normalised; the
map is the model's blurred anomaly map and the image score its maximum, as in
``mmr.metrics.evaluate``. A ``model.pt`` runs through the torch model (``mmr.train``); an
``.onnx`` file (``mmr.onnx_export``) runs through onnxruntime and never imports the torch model
code.

Outputs in ``--out DIR`` (written to a staging folder that replaces ``DIR`` at the end; an
existing ``DIR`` is replaced only when it is empty or an earlier prediction, see
``mmr.outdir``)::

    predictions.csv   path, category, score, normalised_score, anomalous, error
    summary.json      counts, thresholds used, skipped images
    overlays/<name>.png  image | anomaly-map overlay (heat scaled so the pixel threshold is
                         mid-scale), unless overlays are off
    maps/<name>.npy      raw float32 maps, with ``save_maps``

``<name>`` is the image's path relative to the common folder of all inputs, with ``/`` turned
into ``__``. An image that cannot be decoded (or is smaller than the model's input) is listed
with its ``error`` and skipped; the others are scored.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmr.errors import DataError, UserInputError
from mmr.fileio import atomic_path, atomic_write
from mmr.outdir import check_replaceable, staged
from mmr.predictors import (  # noqa: F401  (re-exported: predict's public API)
    ONNX_FORMAT,
    ONNX_META_KEY,
    ModelInfo,
    Predictor,
    center_crop_np,
    load_predictor,
)
from mmr.thresholds import normalise

__all__ = [
    "CSV_COLUMNS",
    "ModelInfo",
    "PredictSummary",
    "Predictor",
    "list_images",
    "load_predictor",
    "predict",
]

log = logging.getLogger(__name__)

CSV_COLUMNS = ("path", "category", "score", "normalised_score", "anomalous", "error")
# mmr.data.IMAGE_SUFFIXES, repeated: importing mmr.data imports torch, which the ONNX path avoids.
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_SPLIT_DIRS = ("test", "train", "ground_truth", "validation")
# Called as ``progress(total)``; returns a per-image callback and a close function.
Progress = Callable[[int], tuple[Callable[[int], None], Callable[[], None]]]


@dataclass
class PredictSummary:
    """What one ``predict`` call did (``launch.py`` prints :meth:`line`)."""

    out: Path
    images: int = 0  # scored
    anomalous: int = 0
    normal: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, error)
    thresholds: dict[str, dict[str, Any]] = field(default_factory=dict)
    categories: list[str] = field(default_factory=list)

    def line(self) -> str:
        """The one-line summary."""
        parts = [f"predicted {self.images} image(s) of {', '.join(self.categories) or '-'}"]
        if self.thresholds:
            parts.append(f"{self.anomalous} anomalous, {self.normal} normal")
            parts.append(
                "threshold "
                + ", ".join(
                    f"{c} {t['image']:.4g} ({t['image_method']})"
                    for c, t in self.thresholds.items()
                )
            )
        else:
            parts.append("no threshold (raw scores only: pass --threshold)")
        parts.append(f"{len(self.skipped)} skipped")
        return "; ".join(parts) + f" -> {self.out / 'predictions.csv'}"


# ----------------------------------------------------------------------------- inputs


def list_images(items: Sequence[str]) -> list[Path]:
    """Image files from files, folders (recursive) and globs, in order, without repeats.

    Raises:
        UserInputError: an item that is no file or folder and no glob matching anything, or
            no image at all.
    """
    out: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            found = _folder_images(path)
            if not found:
                log.warning("no image files (%s) under %s", ", ".join(_IMAGE_SUFFIXES), path)
            out += found
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(item), recursive=True))
            files = [p for p in matches if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES]
            files += [q for p in matches if p.is_dir() for q in _folder_images(p)]
            if not files:
                raise UserInputError(
                    f"IMAGES: the pattern {item!r} matches no image file: check it (quote it "
                    "so the shell does not expand it)"
                )
            out += files
        else:
            raise UserInputError(
                f"IMAGES: {item} does not exist: pass image files, folders or glob patterns"
            )
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.absolute()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    if not unique:
        raise UserInputError(
            f"IMAGES: no image files ({', '.join(_IMAGE_SUFFIXES)}) in {list(items)}"
        )
    return unique


def _folder_images(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in _IMAGE_SUFFIXES:
                found.append(Path(dirpath) / name)
    return found


def _category_of(path: Path, categories: Sequence[str], chosen: str | None) -> str:
    if chosen is not None:
        return chosen
    if len(categories) == 1:
        return categories[0]
    parts = path.absolute().parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in _SPLIT_DIRS and parts[i - 1] in categories:
            return parts[i - 1]
    raise UserInputError(
        f"{path}: the model holds one MMR per category ({', '.join(categories)}) and the path "
        "names none as <category>/test/...: pass --category"
    )


def _names(paths: Sequence[Path]) -> list[str]:
    """Output file stems: each path relative to the inputs' common folder, ``/`` -> ``__``."""
    absolute = [p.absolute() for p in paths]
    base = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    return [str(p.relative_to(base).with_suffix("")).replace(os.sep, "__") for p in absolute]


# ----------------------------------------------------------------------------- predict


def predict(
    model: str | os.PathLike[str] | Predictor,
    images: Sequence[str],
    out: str | os.PathLike[str],
    *,
    category: str | None = None,
    threshold: float | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    overlays: bool = True,
    save_maps: bool = False,
    progress: Progress | None = None,
) -> PredictSummary:
    """Scores ``images`` with ``model`` and writes ``out`` (see the module docstring).

    Args:
        model: an export directory, a ``model.pt``, an ``.onnx`` file, or a loaded predictor.
        images: files, folders (searched recursively) and glob patterns.
        out: the output directory (replaced only when empty or an earlier prediction).
        category: the category's MMR to use; default: the model's only one, or the
            ``<category>/test/...`` part of each path.
        threshold: a raw-score image threshold replacing the stored ones (all categories);
            it must lie within the scores seen (validation and these images).
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: images per forward pass (default: the model's ``eval.batch_size``).
        overlays: write ``overlays/<name>.png``.
        save_maps: write the raw maps as ``maps/<name>.npy``.
        progress: called as ``progress(total)`` -> (per-image step, close).

    Raises:
        UserInputError: a bad model, image argument, category or threshold (one line,
            naming the input and the fix). Images that fail to decode do not raise: they are
            listed as skipped.
    """
    out = Path(out).absolute()
    fix = "pass an empty or new directory as --out"
    replace = check_replaceable(out, kind="predict", owner=None, what=f"--out {out}", fix=fix)
    paths = list_images(images)
    predictor = model if not isinstance(model, str | os.PathLike) else None
    if predictor is None:
        predictor = load_predictor(model, device=device)  # type: ignore[arg-type]
    info = predictor.info
    if category is not None and category not in info.categories:
        raise UserInputError(
            f"--category {category!r} is not in the model {info.source}, which holds "
            f"{', '.join(info.categories)}: pick one of these"
        )
    if batch_size is not None and batch_size < 1:
        raise UserInputError(f"--batch-size {batch_size}: must be at least 1")
    cats = [_category_of(p, info.categories, category) for p in paths]
    names = _names(paths)
    scores: dict[int, float] = {}
    errors: dict[int, str] = {}

    def recheck() -> None:
        check_replaceable(out, kind="predict", owner=None, what=f"--out {out}", fix=fix)

    with staged(out, kind="predict", owner="predict", replace=replace, recheck=recheck) as staging:
        if overlays:
            (staging / "overlays").mkdir()
        if save_maps:
            (staging / "maps").mkdir()
        step, close = progress(len(paths)) if progress else (None, None)
        try:
            for cat in dict.fromkeys(cats):
                idx = [i for i, c in enumerate(cats) if c == cat]
                size = batch_size or info.batch_size
                for start in range(0, len(idx), size):
                    chunk = idx[start : start + size]
                    _score_batch(
                        predictor, cat, chunk, paths, names, staging, scores, errors,
                        overlays=overlays, save_maps=save_maps,
                    )  # fmt: skip
                    if step is not None:
                        step(len(chunk))
        finally:
            if close is not None:
                close()
        used = _thresholds(info, threshold, scores, cats)
        summary = _write(staging, out, paths, cats, scores, errors, used, info)
    return summary


def _score_batch(
    predictor: Predictor,
    category: str,
    chunk: Sequence[int],
    paths: Sequence[Path],
    names: Sequence[str],
    staging: Path,
    scores: dict[int, float],
    errors: dict[int, str],
    *,
    overlays: bool,
    save_maps: bool,
) -> None:
    from mmr.imagecache import decode_image

    info = predictor.info
    decoded, ok = [], []
    for i in chunk:
        try:
            decoded.append(
                decode_image(
                    paths[i],
                    size=info.resize,
                    interpolation=info.interpolation,
                    min_side=info.image_size,
                )
            )
            ok.append(i)
        except DataError as exc:
            errors[i] = str(exc)
            log.warning("skipped: %s", exc)
    if not ok:
        return
    batch = np.stack(decoded)
    maps = predictor.maps(category, batch)
    pixel = info.thresholds.get(category, {}).get("pixel")
    for j, i in enumerate(ok):
        scores[i] = float(maps[j].max())  # the image score: max of the blurred map
        if save_maps:
            with atomic_path(staging / "maps" / f"{names[i]}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, maps[j])
        if overlays:
            _save_overlay(
                center_crop_np(batch[j], info.image_size), maps[j], pixel,
                staging / "overlays" / f"{names[i]}.png",
            )  # fmt: skip


def _save_overlay(image: np.ndarray, amap: np.ndarray, pixel: float | None, path: Path) -> None:
    """image | overlay; the heat is ``map / (2 * pixel threshold)`` (threshold = mid-scale),
    or the map's own min-max without a threshold."""
    import matplotlib
    from PIL import Image

    if pixel is not None and pixel > 0:
        heat = np.clip(amap / (2 * pixel), 0, 1)
    else:
        lo, hi = float(amap.min()), float(amap.max())
        heat = (amap - lo) / (hi - lo + 1e-12)
    rgb = image.transpose(1, 2, 0).astype(np.float32) / 255
    colour = matplotlib.colormaps["jet"](heat)[..., :3]
    blend = 0.55 * rgb + 0.45 * colour
    sep = np.ones((rgb.shape[0], 2, 3), np.float32)
    frame = (np.clip(np.concatenate([rgb, sep, blend], axis=1), 0, 1) * 255).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(frame).save(tmp, format="PNG")


def _thresholds(
    info: ModelInfo, threshold: float | None, scores: dict[int, float], cats: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """The thresholds applied per category: the stored ones, or ``--threshold`` for all."""
    used_cats = list(dict.fromkeys(cats))
    if threshold is None:
        return {c: info.thresholds[c] for c in used_cats if c in info.thresholds}
    seen = list(scores.values())
    for c in used_cats:
        seen += list(info.thresholds.get(c, {}).get("score_range", []))
    if seen and not min(seen) <= threshold <= max(seen):
        raise UserInputError(
            f"--threshold {threshold:g} lies outside the scores seen ({min(seen):.4g} .. "
            f"{max(seen):.4g}, validation and these images): it would flag "
            f"{'every' if threshold < min(seen) else 'no'} image; pass a raw score in that "
            "range (or leave --threshold out to use the validation threshold)"
        )
    used = {}
    for c in used_cats:
        stored = info.thresholds.get(c, {})
        used[c] = {
            "image": float(threshold),
            "image_method": "--threshold",
            "scale": stored.get("scale"),
        }
    return used


def _write(
    staging: Path,
    out: Path,
    paths: Sequence[Path],
    cats: Sequence[str],
    scores: dict[int, float],
    errors: dict[int, str],
    used: dict[str, dict[str, Any]],
    info: ModelInfo,
) -> PredictSummary:
    summary = PredictSummary(out=out, thresholds=used, categories=list(dict.fromkeys(cats)))
    with atomic_path(staging / "predictions.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for i, path in enumerate(paths):
                row = _row(str(path), cats[i], scores.get(i), errors.get(i), used.get(cats[i]))
                writer.writerow(row)
                if i in errors:
                    summary.skipped.append((str(path), errors[i]))
                    continue
                summary.images += 1
                if row[4] == "True":
                    summary.anomalous += 1
                elif row[4] == "False":
                    summary.normal += 1
    record = {
        "model": info.source,
        "model_kind": info.kind,
        "images": summary.images,
        "anomalous": summary.anomalous,
        "normal": summary.normal,
        "skipped": [{"path": p, "error": e} for p, e in summary.skipped],
        "thresholds": used,
        "normalised_score": "1 / (1 + exp(-(score - threshold) / scale))",
    }
    atomic_write(staging / "summary.json", json.dumps(record, indent=2))
    return summary


def _row(
    path: str,
    category: str,
    score: float | None,
    error: str | None,
    threshold: dict[str, Any] | None,
) -> list[str]:
    if score is None:
        return [path, category, "", "", "", error or ""]
    normalised, anomalous = "", ""
    if threshold is not None:
        anomalous = str(score >= threshold["image"])
        if threshold.get("scale"):
            normalised = repr(normalise(score, threshold["image"], threshold["scale"]))
    return [path, category, repr(score), normalised, anomalous, ""]


def iter_rows(csv_path: Path) -> Iterable[dict[str, str]]:
    """The rows of a ``predictions.csv`` (tests, scripts)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f)
