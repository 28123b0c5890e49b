"""Datasets as plain lists of samples: listing, the validation split, cached tensors.

``list_tasks`` turns a ``DataConfig`` into ``Task`` objects (the data of one model each) by
reading the directory layout only; images are decoded later, once, by ``load_images`` /
``load_masks`` (see ``mmr.imagecache``), and transformed on tensors by ``augment_batch`` /
``center_crop``. Layouts (see docs/design.md and the MMR notes):

- ``mvtec`` / ``synthetic``: ``<root>/<category>/{train/good, test/good, test/<defect>,
  ground_truth/<defect>/<stem>_mask.png}``; ``synthetic`` is generated into ``root`` on first use.
  Generated sets carry ``mmr.synth.MARKER``; see ``_list_synthetic`` for where one is made, and
  the real-data kinds refuse a root holding it (``_refuse_synthetic``).
- ``folder``: the same layout (``root`` may also be one category), masks optional.
- ``aebad_s``: ``<root>/AeBAD_S/{train/good/<any>/, test/<defect>/<domain>/,
  ground_truth/<defect>/<domain>/<image name>}``; one Task, grouped by domain.
- ``aebad_v``: ``<root>/AeBAD_V/{train/good/<any>/, test/<video>/<good|anomaly>/}``; one Task,
  grouped by video, no masks.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmr.config import DataConfig
from mmr.errors import DataError
from mmr.imagecache import binarize_masks, default_cache_dir, load_images, load_masks
from mmr.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment_batch,
    batch_indices,
    center_crop,
    center_crop_masks,
    normalize,
    train_batches,
)

__all__ = [
    "Sample",
    "Task",
    "list_tasks",
    "split_test",
    "split_task",
    "load_images",
    "load_masks",
    "binarize_masks",
    "augment_batch",
    "center_crop",
    "center_crop_masks",
    "normalize",
    "batch_indices",
    "train_batches",
    "default_cache_dir",
    "resolve_root",
    "IMAGE_SUFFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_JUNK_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Sample:
    """One image of a dataset."""

    image: Path  # absolute path
    label: int  # 0 good, 1 anomalous
    defect: str  # "good" or the defect type folder name
    mask: Path | None  # ground-truth mask file; None for good images and mask-less datasets
    group: str  # reporting unit: category, AeBAD-S domain or AeBAD-V video


@dataclass(frozen=True)
class Task:
    """The data of ONE model (MVTec: a category; AeBAD-S/V: the whole set)."""

    name: str  # category name, "aebad_s" or "aebad_v"
    train: tuple[Sample, ...]  # normal training images
    test: tuple[Sample, ...]  # evaluation images (split into validation and test halves)
    has_masks: bool  # False where only image-level metrics exist (aebad_v, mask-less folder)


def list_tasks(cfg: DataConfig) -> list[Task]:
    """Lists the Tasks of ``cfg.dataset`` under ``cfg.root`` for ``cfg.categories``.

    Raises:
        DataError: unknown dataset kind, missing root, unknown category, empty train set,
            defect image without mask, or no category found; the message says what to fix.
    """
    listers: dict[str, Callable[[Path, Sequence[str] | str], list[Task]]] = {
        "mvtec": lambda r, c: _list_categories(r, c, dataset="mvtec", masks="required"),
        "synthetic": _list_synthetic,
        "folder": _list_folder,
        "aebad_s": _list_aebad_s,
        "aebad_v": _list_aebad_v,
    }
    if cfg.dataset not in listers:
        raise DataError(
            f"unknown data.dataset {cfg.dataset!r}: use one of {sorted(listers)} "
            "(folder = your own train/good, test/<defect> layout)"
        )
    root = resolve_root(cfg.root)
    if cfg.dataset != "synthetic":
        _require_dir(root)
        _refuse_synthetic(root, cfg.dataset)
    tasks = listers[cfg.dataset](root, cfg.categories)
    for task in tasks:
        logger.info(
            "%s/%s: %d train, %d test images (%d anomalous)",
            cfg.dataset,
            task.name,
            len(task.train),
            len(task.test),
            sum(s.label for s in task.test),
        )
    return tasks


def resolve_root(root: str | os.PathLike[str]) -> Path:
    """``~`` expanded, relative paths made absolute against the current directory."""
    return Path(os.path.expanduser(os.fspath(root))).absolute()


# ----------------------------------------------------------------------------- listing


def _list_categories(
    root: Path, categories: Sequence[str] | str, *, dataset: str, masks: str
) -> list[Task]:
    """MVTec-like layouts: one Task per ``<root>/<category>``; ``masks`` required|optional."""
    if (root / "train").is_dir():
        raise DataError(
            f"data.root {root} holds train/ itself, i.e. it is one category: set data.root to "
            f"its parent {root.parent} and data.categories to [{root.name!r}]"
            + (" (or use data.dataset=folder)" if dataset == "mvtec" else "")
        )
    found = [d.name for d in _subdirs(root) if (d / "train").is_dir() or (d / "test").is_dir()]
    layout = "<root>/<category>/train/good/*.png"
    chosen = _select(found, categories, what="category", root=root, layout=layout)
    return [_category_task(root / name, name, masks=masks) for name in chosen]


def _category_task(cat: Path, name: str, *, masks: str) -> Task:
    train = _require_images(cat / "train" / "good", recursive=False, role="training")
    gt_root = cat / "ground_truth"
    use_masks = masks == "required" or gt_root.is_dir()
    test: list[Sample] = []
    test_dir = cat / "test"
    for defect_dir in _subdirs(test_dir):
        defect = defect_dir.name
        images = _images(defect_dir)
        if defect == "good":
            test += [Sample(p, 0, "good", None, name) for p in images]
            continue
        lookup = _MaskLookup(gt_root / defect, suffixed=True) if use_masks else None
        for p in images:
            test.append(Sample(p, 1, defect, lookup.find(p) if lookup else None, name))
    _check_test(test, test_dir, "test/good and test/<defect>")
    return Task(
        name, tuple(Sample(p, 0, "good", None, name) for p in train), tuple(test), use_masks
    )


# The synthetic set is generated only into a missing or empty folder, never beside other data,
# and carries synth.MARKER; a folder holding that marker is used as it is. A non-empty folder
# without it is refused, except a set an older version generated (before the marker) in the
# project's cache dir: when its entries are exactly generated categories in the synthetic
# layout it is taken as such and marked. The real-data kinds refuse a marked folder.
_SYNTH_CACHE = "~/.cache/mmr-sweep"  # where configs/tiny.yaml keeps the synthetic set
_SYNTH_DEFAULT_ROOT = _SYNTH_CACHE + "/synthetic"
_REAL_DEFAULT_ROOT = DataConfig.root  # /data/mvtec_ad: never generated into


def _list_synthetic(root: Path, categories: Sequence[str] | str) -> list[Task]:
    from mmr import synth  # local import: only this dataset kind needs the generator

    if not (root / synth.MARKER).is_file():
        if not root.exists() or (root.is_dir() and not _entries(root)):
            if root == resolve_root(_REAL_DEFAULT_ROOT):
                raise DataError(
                    f"data.root {root} is the default folder of the real MVTec AD data, so "
                    "data.dataset=synthetic does not generate images there: set data.root to "
                    f"an empty folder, e.g. --set data.root={_SYNTH_DEFAULT_ROOT}"
                )
            _generate_synthetic(root)
        elif _is_legacy_synthetic(root):
            logger.info("%s: a synthetic set of an earlier version; marking it", root)
            synth.write_marker(root, {"legacy": True})
        else:
            _require_dir(root)
            raise DataError(
                f"data.root {root} is not empty and is no generated synthetic set (no "
                f"{synth.MARKER}): data.dataset=synthetic generates its images only into an "
                "empty or missing folder, never beside other data; set data.root to an empty "
                f"folder (e.g. {_SYNTH_DEFAULT_ROOT}), or use data.dataset=mvtec/folder for "
                "real data"
            )
    _require_dir(root)
    return _list_categories(root, categories, dataset="synthetic", masks="required")


def _is_legacy_synthetic(root: Path) -> bool:
    """A set generated before the marker existed: in the project's cache dir, holding only
    generated category folders, each with exactly the synthetic layout."""
    from mmr import synth

    cache = resolve_root(_SYNTH_CACHE)
    if cache not in root.parents or not root.is_dir():
        return False
    names = _entries(root)
    layout = ["ground_truth", "test", "train"]
    return bool(names) and all(
        name in synth.KINDS
        and _entries(root / name) == layout
        and (root / name / "train" / "good").is_dir()
        and (root / name / "test" / "good").is_dir()
        for name in names
    )


def _refuse_synthetic(root: Path, dataset: str) -> None:
    """A DataError when ``root`` (or its parent: one category of it) is a generated set."""
    from mmr import synth

    for folder in (root, root.parent):
        if (folder / synth.MARKER).is_file():
            raise DataError(
                f"data.root {root} holds generated synthetic images ({folder / synth.MARKER}), "
                f"not real data for data.dataset={dataset}: use data.dataset=synthetic, or "
                "point data.root at the real data"
            )


def _generate_synthetic(root: Path) -> None:
    """Generates the default synthetic set into ``root`` atomically (temp dir + rename)."""
    from mmr import synth  # local import: only this dataset kind needs the generator

    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    logger.info("generating the synthetic dataset into %s (first use)", root)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        synth.generate(tmp)
        try:
            os.rename(tmp, root)  # replaces an empty dir; fails if another process won
        except OSError:
            if not (root / synth.MARKER).is_file():
                raise
            logger.info("another process generated %s first; using it", root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _list_folder(root: Path, categories: Sequence[str] | str) -> list[Task]:
    """The user's own data: ``root`` is one category (has train/) or holds categories."""
    if not (root / "train").is_dir():
        return _list_categories(root, categories, dataset="folder", masks="optional")
    if categories != "all" and list(categories) != [root.name]:
        raise DataError(
            f"data.root {root} is a single category ({root.name!r}): set data.categories to "
            f'"all" or [{root.name!r}], got {categories!r}'
        )
    return [_category_task(root, root.name, masks="optional")]


def _list_aebad_s(root: Path, categories: Sequence[str] | str) -> list[Task]:
    base = _subset_root(root, "AeBAD_S")
    train = _require_images(base / "train" / "good", recursive=True, role="training")
    by_domain: dict[str, list[Sample]] = defaultdict(list)
    test_dir = base / "test"
    for defect_dir in _subdirs(test_dir):
        defect = defect_dir.name
        label = int(defect != "good")
        lookup = _MaskLookup(base / "ground_truth" / defect, suffixed=False) if label else None
        stray = _images(defect_dir)
        if stray:
            logger.warning(
                "ignoring %d images directly in %s: AeBAD-S expects test/<defect>/<domain>/",
                len(stray),
                defect_dir,
            )
        for domain_dir in _subdirs(defect_dir):
            domain = domain_dir.name
            for p in _images(domain_dir):
                mask = lookup.find(p, sub=domain) if lookup else None
                by_domain[domain].append(Sample(p, label, defect, mask, domain))
    layout = "<root>/AeBAD_S/test/<defect>/<domain>/*.png"
    chosen = _select(sorted(by_domain), categories, what="domain", root=test_dir, layout=layout)
    test = [s for d in chosen for s in by_domain[d]]
    _check_test(test, test_dir, "test/<defect>/<domain>")
    return [Task("aebad_s", _train_samples(train, "train"), tuple(test), True)]


def _list_aebad_v(root: Path, categories: Sequence[str] | str) -> list[Task]:
    base = _subset_root(root, "AeBAD_V")
    train = _require_images(base / "train" / "good", recursive=True, role="training")
    test_dir = base / "test"
    videos = [d.name for d in _subdirs(test_dir)]
    layout = "<root>/AeBAD_V/test/<video>/<good|anomaly>/*.jpg"
    chosen = _select(videos, categories, what="video", root=test_dir, layout=layout)
    test: list[Sample] = []
    for video in chosen:
        for kind_dir in _subdirs(test_dir / video):
            label = int(kind_dir.name != "good")
            test += [Sample(p, label, kind_dir.name, None, video) for p in _images(kind_dir)]
    _check_test(test, test_dir, "test/<video>/<good|anomaly>")
    return [Task("aebad_v", _train_samples(train, "train"), tuple(test), False)]


def _train_samples(paths: Iterable[Path], group: str) -> tuple[Sample, ...]:
    return tuple(Sample(p, 0, "good", None, group) for p in paths)


class _MaskLookup:
    """Finds the mask of a defect image in ``gt_dir`` (listing each directory once)."""

    def __init__(self, gt_dir: Path, *, suffixed: bool) -> None:
        self.gt_dir = gt_dir
        self.suffixed = suffixed  # MVTec names masks <stem>_mask.png, AeBAD uses the image name
        self._files: dict[str, dict[str, Path]] = {}

    def find(self, image: Path, *, sub: str = "") -> Path:
        folder = self.gt_dir / sub if sub else self.gt_dir
        if sub not in self._files:
            self._files[sub] = {p.name: p for p in _images(folder)}
        files = self._files[sub]
        names = [image.name, image.stem + ".png"]
        mask_names = [image.stem + "_mask" + s for s in (".png", image.suffix)]
        names = mask_names + names if self.suffixed else names + mask_names
        for name in names:
            if name in files:
                return files[name]
        raise DataError(
            f"defect image {image} has no mask: expected {folder / names[0]}; add the mask "
            "(0/255 PNG at the image's resolution) or move the image out of the test set"
        )


def _subset_root(root: Path, name: str) -> Path:
    """``<root>/<name>`` if present, else ``root`` itself when it has train/ and test/."""
    if (root / name).is_dir():
        return root / name
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    raise DataError(
        f"data.root {root} has no {name}/ folder (and no train/ + test/): set data.root to "
        f"the directory that contains {name}/ (as unzipped from the AeBAD download)"
    )


def _select(
    found: Sequence[str], wanted: Sequence[str] | str, *, what: str, root: Path, layout: str
) -> list[str]:
    if not found:
        raise DataError(
            f"no {what} found under {root}: expected the layout {layout}; check data.root "
            "and data.dataset"
        )
    if wanted == "all":
        return list(found)
    names = [wanted] if isinstance(wanted, str) else list(wanted)
    missing = [n for n in names if n not in found]
    if missing:
        raise DataError(
            f"unknown {what} {missing[0]!r} in data.categories: found {list(found)} under "
            f'{root}; use some of these or "all"'
        )
    return names


def _require_dir(root: Path) -> None:
    if not root.exists():
        raise DataError(
            f"data.root {root} does not exist: set data.root to the dataset directory "
            "(relative paths resolve against the current directory), e.g. "
            "--set data.root=/data/mvtec_ad"
        )
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a directory: point it at the dataset folder")


def _require_images(folder: Path, *, recursive: bool, role: str) -> list[Path]:
    images = _images(folder, recursive=recursive)
    if not images:
        where = "exists" if folder.is_dir() else "is missing"
        raise DataError(
            f"no {role} images in {folder} (the folder {where}): put the normal images there "
            f"({', '.join(IMAGE_SUFFIXES)})"
        )
    return images


def _check_test(test: Sequence[Sample], test_dir: Path, layout: str) -> None:
    labels = {s.label for s in test}
    if labels != {0, 1}:
        missing = "good" if 0 not in labels else "anomalous"
        raise DataError(
            f"the test set under {test_dir} has no {missing} images: AUROC needs both; "
            f"expected {layout}"
        )


def _is_junk(name: str) -> bool:
    # .DS_Store, AppleDouble "._x.png" files, editor temp files, macOS zip metadata.
    return name.startswith(".") or name in _JUNK_NAMES


def _entries(folder: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(folder) if not _is_junk(n))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _subdirs(folder: Path) -> list[Path]:
    return [folder / n for n in _entries(folder) if (folder / n).is_dir()]


def _images(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Sorted image files in ``folder`` (and below if ``recursive``), junk skipped."""
    out: list[Path] = []
    for name in _entries(folder):
        path = folder / name
        if path.is_dir():
            if recursive:
                out += _images(path, recursive=True)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            out.append(path)
    return out


# ----------------------------------------------------------------------------- split


def split_test(
    samples: Sequence[Sample], *, fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Seeded split of a test set into ``(val, test)``, stratified by (group, defect).

    Every sample lands in exactly one half. Each stratum of 2+ samples puts at least one into
    each half; single-sample strata alternate between the halves, so each half keeps a good
    and an anomalous sample of every group whenever the strata allow. The result does not
    depend on the input order; each half keeps the input order.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = random.Random(f"split-{seed}")  # str seeds hash deterministically
    strata: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for s in sorted(set(samples), key=lambda s: (s.group, s.defect, str(s.image))):
        strata[(s.group, s.defect)].append(s)
    val: set[Sample] = set()
    singles: dict[tuple[str, int], list[Sample]] = defaultdict(list)
    for (group, _), members in sorted(strata.items()):
        if len(members) == 1:
            singles[(group, members[0].label)].append(members[0])
            continue
        rng.shuffle(members)
        k = min(max(_round_half_random(fraction * len(members), rng), 1), len(members) - 1)
        val.update(members[:k])
    for (group, label), members in sorted(singles.items()):
        rng.shuffle(members)
        in_val = sum(1 for s in val if s.group == group and s.label == label)
        in_test = (
            sum(len(m) for (g, _), m in strata.items() if g == group and m[0].label == label)
            - in_val
            - len(members)
        )
        # Start with the half that lacks this (group, label), then alternate.
        first_val = in_val < in_test or (in_val == in_test and rng.random() < fraction)
        for i, s in enumerate(members):
            if (i % 2 == 0) == first_val:
                val.add(s)
    return [s for s in samples if s in val], [s for s in samples if s not in val]


def _round_half_random(x: float, rng: random.Random) -> int:
    """Rounds, breaking exact .5 ties at random (odd strata do not all favour one half)."""
    low = math.floor(x)
    if x - low == 0.5:
        return low + int(rng.random() < 0.5)
    return int(round(x))


def split_task(task: Task, cfg: DataConfig, *, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """``(val, test)`` samples of a Task as ``cfg.val_split`` asks.

    ``test_half``: ``split_test`` with ``cfg.val_fraction``; ``none``: the full test set for both
    (the numbers are then not held out; say so when reporting). Keep ``seed`` fixed across the
    trials of a search, so that every trial is validated on the same images.
    """
    if cfg.val_split == "none":
        return list(task.test), list(task.test)
    if cfg.val_split != "test_half":
        raise DataError(f"unknown data.val_split {cfg.val_split!r}: use test_half or none")
    return split_test(task.test, fraction=cfg.val_fraction, seed=seed)
