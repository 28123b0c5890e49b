"""Per-epoch cost of the data pipeline against the official MMR way, measured side by side,
and how close the project's training crops are to the official ones.

Project: images decoded once into the uint8 cache (``mmr.data.load_images``; training images
at ``DataConfig.train_size``, 320 px for 224-px crops, test images at 256), then each epoch is
``train_batches`` as ``mmr.train.fit`` runs it: index batches + ``augment_batch`` (batched
RandomResizedCrop + flip + normalisation as two matrix products per batch) into reused
buffers. Reference: what the official code (``datasets/mvtec.py``) does every epoch, i.e. a
``Dataset`` that opens each PNG with PIL and applies ``RandomResizedCrop(224, scale=(0.7, 1),
bicubic)`` to the ORIGINAL image + flip + ``ToTensor`` + ``Normalize`` (test:
``Resize(256)`` (bilinear) + ``CenterCrop(224)``), through a ``DataLoader`` (batch 16,
shuffled) with ``num_workers`` 0 and 2; the faster is the reference.

Crop fidelity: the same RandomResizedCrop boxes, drawn on the full-resolution images, cut by
PIL from the original (the official crops) and by the project from its cache (the boxes scaled
to the cache's side): mean |difference| in grey levels (0-255), for the training cache and,
as the reference, for a crop from the 256-px test cache (what the project did before).

Images: generated with ``mmr.synth`` at 900 px (MVTec AD images are 700-1024 px PNGs).
Each figure is the median of repeats, all in one process on the same files: project epochs
first, then the references (forked DataLoader workers leave the parent's pages copy-on-write,
which would charge page faults to whatever runs next). The one-time cache build has its own
row.

Run: ``python -m benchmarks.bench_data [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from benchmarks.common import format_row, row
from mmr import synth
from mmr.config import DataConfig
from mmr.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    batch_indices,
    center_crop,
    load_images,
    train_batches,
)
from mmr.transforms import resized_crop_batch

__all__ = ["ReferenceDataset", "crop_fidelity", "run"]

RESIZE, IMAGE_SIZE, BATCH = 256, 224, 16
TRAIN_SIZE = DataConfig(resize=RESIZE, image_size=IMAGE_SIZE).train_size  # auto: 320
BICUBIC = T.InterpolationMode.BICUBIC


class ReferenceDataset(Dataset):
    """The official pipeline: decode + transform each image on every access (training crops
    from the original image; test images resized with torchvision's default, bilinear)."""

    def __init__(
        self, paths: list[Path], *, train: bool, resize: int = RESIZE, image_size: int = IMAGE_SIZE
    ) -> None:
        self.paths = paths
        steps = (
            [T.RandomResizedCrop(image_size, scale=(0.7, 1.0), interpolation=BICUBIC),
             T.RandomHorizontalFlip()]
            if train
            else [T.Resize(resize), T.CenterCrop(image_size)]
        )  # fmt: skip
        self.transform = T.Compose(
            [*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB"))


def _reference_epoch(paths: list[Path], *, train: bool, workers: int) -> float:
    loader = DataLoader(
        ReferenceDataset(paths, train=train), batch_size=BATCH, shuffle=train,
        num_workers=workers,
    )  # fmt: skip
    start = time.perf_counter()
    for batch in loader:
        assert batch.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
    return time.perf_counter() - start


def _project_epoch(u8: torch.Tensor, *, train: bool, generator: torch.Generator) -> float:
    """A train epoch as ``mmr.train.fit`` draws it (``train_batches``); a test epoch as its
    evaluation does (``center_crop`` of each batch)."""
    start = time.perf_counter()
    if train:
        batches = train_batches(u8, batch_size=BATCH, image_size=IMAGE_SIZE, generator=generator)
    else:
        batches = (
            (idx, center_crop(u8[idx], image_size=IMAGE_SIZE))
            for idx in batch_indices(len(u8), batch_size=BATCH)
        )
    for _, batch in batches:
        assert batch.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
    return time.perf_counter() - start


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def crop_fidelity(
    paths: list[Path], caches: list[torch.Tensor], *, crops_per_image: int, seed: int = 0
) -> list[float]:
    """Mean |difference| (grey levels) between official crops and the project's crops from
    each cached copy in ``caches``, for the same boxes and flips.

    Boxes are drawn as torchvision's RandomResizedCrop draws them on each original image; the
    official crop is ``resized_crop`` (PIL bicubic) of the original, the project's crop is
    ``resized_crop_batch`` of the cached copy with the box scaled to the copy's side.
    """
    torch.manual_seed(seed)  # RandomResizedCrop.get_params draws from the global generator
    reference, picks, boxes, flips = [], [], [], []
    for k, path in enumerate(paths):
        with Image.open(path) as img:
            original = img.convert("RGB")
        for _ in range(crops_per_image):
            box = T.RandomResizedCrop.get_params(original, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3))
            flip = bool(torch.rand(1) < 0.5)
            crop = TF.resized_crop(original, *box, [IMAGE_SIZE, IMAGE_SIZE], BICUBIC)
            reference.append(TF.pil_to_tensor(TF.hflip(crop) if flip else crop))
            # (top, left, height, width) over the original's (height, width)
            scale = (original.height, original.width, original.height, original.width)
            boxes.append([b / s for b, s in zip(box, scale, strict=True)])
            picks.append(k)
            flips.append(flip)
    official = torch.stack(reference).float()
    unit_boxes = torch.tensor(boxes, dtype=torch.float64)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for u8 in caches:
        side = u8.shape[-1]
        crops = resized_crop_batch(
            u8[torch.tensor(picks)], unit_boxes * side, torch.tensor(flips), size=IMAGE_SIZE
        )
        grey = (crops * std + mean) * 255.0  # undo the normalisation
        out.append(float((grey - official).abs().mean()))
    return out


SECTION = "data"
TARGET = ">= 10x"


def run(quick: bool = False, smoke: bool = False) -> list[dict[str, Any]]:
    """Runs the benchmark; returns rows (see ``benchmarks.common``) with ``ratio =
    reference_s / project_s``.

    Args:
        quick: 48 images and 3 repeats instead of 100 and 5.
        smoke: a code-path check only (8 small images, 1 repeat): the figures mean nothing.
    """
    n_images, size, repeats = (8, 300, 1) if smoke else (48, 900, 3) if quick else (100, 900, 5)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = synth.generate(
            Path(tmp) / "images", categories=["disk"], size=size, seed=0, n_train=n_images,
            n_test_good=0, n_test_defect=0,
        )  # fmt: skip
        paths = sorted((root / "disk/train/good").glob("*.png"))
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        cache = Path(tmp) / "cache"
        build_s = _timed(lambda: load_images(paths, size=TRAIN_SIZE, cache_dir=cache))
        train_u8 = load_images(paths, size=TRAIN_SIZE, cache_dir=cache)
        test_u8 = load_images(paths, size=RESIZE, cache_dir=cache, interpolation="bilinear")
        hit = [
            _timed(lambda: load_images(paths, size=TRAIN_SIZE, cache_dir=cache)) for _ in range(3)
        ]
        gen = torch.Generator().manual_seed(0)
        rows = []
        for train in (True, False):
            u8 = train_u8 if train else test_u8
            # Blocks, not interleaved: a forked DataLoader worker leaves every page of this
            # process copy-on-write, which would charge the next project epoch page faults.
            _project_epoch(u8, train=train, generator=gen)  # warm-up (page cache, buffers)
            times = {"project": [_project_epoch(u8, train=train, generator=gen)
                                 for _ in range(repeats)]}  # fmt: skip
            for workers in (0, 2):
                time.sleep(0.3)
                times[f"w{workers}"] = [
                    _reference_epoch(paths, train=train, workers=workers) for _ in range(repeats)
                ]
            med = {k: statistics.median(v) for k, v in times.items()}
            best = "w0" if med["w0"] <= med["w2"] else "w2"
            what = (
                f"official: RandomResizedCrop+flip from the {size}px original; project: from "
                f"the {TRAIN_SIZE}px cache"
                if train
                else f"{RESIZE} -> center crop"
            )
            ratio = med[best] / med["project"]
            rows.append(
                row(
                    "train_epoch" if train else "eval_epoch",
                    f"s/epoch, {n_images} PNGs {mb:.1f} MB {size}px, {what} {IMAGE_SIZE} + "
                    f"normalise, batch {BATCH}",
                    med["project"],
                    med[best],
                    note=f"reference = PIL + torchvision DataLoader, num_workers={best[1:]} "
                    f"(faster of 0: {med['w0']:.2f} s, 2: {med['w2']:.2f} s); project = cached "
                    f"uint8 + batched tensor ops, median of {repeats}",
                    section=SECTION,
                    target=TARGET,
                    met=ratio >= 10,
                )
            )
        fidelity, before = crop_fidelity(
            paths, [train_u8, test_u8], crops_per_image=1 if smoke else 4
        )
        rows.append(
            row(
                "crop_fidelity",
                f"mean |diff| (grey levels) of training crops vs the official PIL crops of the "
                f"{size}px originals, same boxes ({len(paths) * (1 if smoke else 4)} crops)",
                fidelity,
                before,
                unit="grey levels",
                note=f"project = crops from the {TRAIN_SIZE}px training cache "
                f"({3 * TRAIN_SIZE**2 // 1024} KiB per image); reference = crops from the "
                f"{RESIZE}px cache (the project before data.train_resize)",
                section=SECTION,
            )
        )
        ref_epoch = rows[0]["reference_s"]
        rows.append(
            row(
                "cache_build",
                f"one-time: hash + decode + resize {n_images} images into the training cache",
                build_s,
                ref_epoch,
                note="paid once per node and file content; reference = one official train epoch",
                section=SECTION,
            )
        )
        rows.append(
            row(
                "cache_hit",
                "load_images on a warm cache: hash the files + memory-map the entry",
                statistics.median(hit),
                ref_epoch,
                note="paid once per trial start; reference = one official train epoch",
                section=SECTION,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="48 images, 3 repeats")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    for result in run(quick=args.quick):
        print(format_row(result))


if __name__ == "__main__":
    main()
