"""Decoded-image cache: each image decoded once per (file content, size), shared by trials.

Every trial of a search reads the same images. Decoding a ~900 px PNG and resizing it costs
~15 ms; doing it once per (file content, size, resampling) and keeping the result as a compact
uint8 ``.npy`` that later loads are memory-mapped from makes an epoch a few tensor ops. Keys
are content hashes, so an edited file gets a new entry; entries are written atomically under a
file lock, so concurrent trials on a node decode each list once.

Resizing is PIL's (antialiased) ``Image.resize`` to ``size x size``, which is what torchvision's
``Resize((s, s), interpolation=...)`` does on a PIL image: bicubic or bilinear (torchvision's
default, which the official MMR test transform uses). Masks are resized bilinearly and cached
as grey levels, then binarised on load (see :func:`binarize_masks`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from mmr.config import INTERPOLATIONS, MASK_BINARIZE
from mmr.errors import DataError
from mmr.fileio import atomic_path

try:  # POSIX only; without it concurrent builders may both decode (still correct, just slower)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "INTERPOLATIONS",
    "MASK_BINARIZE",
    "binarize_masks",
    "default_cache_dir",
    "load_images",
    "load_masks",
    "check_mask_size",
    "decode_progress",
    "decode_image",
]

logger = logging.getLogger(__name__)

_CACHE_VERSION = "v1"  # bump when the decoded format or the resize method changes
_HASH_CHUNK = 1 << 20
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
assert set(_RESAMPLE) == set(INTERPOLATIONS)  # the config's choices, each with its filter


class _HasMask(Protocol):  # mmr.data.Sample, without importing it (data imports this module)
    @property
    def image(self) -> Path: ...

    @property
    def mask(self) -> Path | None: ...


# Called as ``progress(what, total)`` when decoding starts; returns a per-item callback and a
# close function. None (the library default): decoding only logs. ``launch.py train`` shows a
# progress bar through it (see ``decode_progress``).
Progress = Callable[[str, int], tuple[Callable[[], None], Callable[[], None]]]
_progress: list[Progress] = []


@contextlib.contextmanager
def decode_progress(progress: Progress) -> Iterator[None]:
    """Reports decoding progress through ``progress`` while the block runs."""
    _progress.append(progress)
    try:
        yield
    finally:
        _progress.remove(progress)


# ----------------------------------------------------------------------------- cache


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``cache_dir`` if given, else ``$MMR_CACHE_DIR``, else ``~/.cache``."""
    chosen = cache_dir or os.environ.get("MMR_CACHE_DIR") or "~/.cache/mmr-sweep/images"
    return Path(chosen).expanduser().absolute()


def load_images(
    paths: Sequence[str | os.PathLike[str]],
    *,
    size: int,
    cache_dir: str | os.PathLike[str] | None = None,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Images resized to ``size x size`` as a uint8 ``N x 3 x size x size`` tensor, cached.

    Grayscale and other modes are converted to RGB. The tensor is a copy-on-write memory map
    of the cache file: reading it is shared between processes, writing to it stays private.
    ``interpolation``: ``bicubic`` or ``bilinear`` (PIL's antialiased resampling).

    Raises:
        DataError: a file is missing or cannot be decoded (the message names the file).
    """
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    files = [Path(p) for p in paths]
    digests = _digests(files)
    # Bicubic keeps the plain "rgb" kind, so caches written before the option stay valid.
    key = _key("rgb" if interpolation == "bicubic" else f"rgb-{interpolation}", size, digests)
    jobs = [lambda p=p: _decode_image(p, size, resample=_RESAMPLE[interpolation]) for p in files]
    return _cached_array(key, (3, size, size), jobs, cache_dir, what="images")


def load_masks(
    samples: Sequence[_HasMask],
    *,
    size: int,
    cache_dir: str | os.PathLike[str] | None = None,
    binarize: str = "half",
    crop: int | None = None,
) -> torch.Tensor:
    """Ground-truth masks resized to ``size x size`` and binarised, uint8 0/1 ``N x 1 x S x S``.

    Samples without a mask give zeros. Each mask must have its image's full resolution. The
    cache holds the bilinearly resized grey levels; ``binarize`` and ``crop`` are applied on
    load (see :func:`binarize_masks`).

    Raises:
        DataError: a mask is unreadable or its size differs from its image's.
    """
    if binarize not in MASK_BINARIZE:
        raise ValueError(f"binarize must be one of {MASK_BINARIZE}, got {binarize!r}")
    files = sorted({Path(p) for s in samples if s.mask is not None for p in (s.image, s.mask)})
    digest_of = dict(zip(files, _digests(files), strict=True))
    parts = [
        "-" if s.mask is None else f"{digest_of[Path(s.image)]}:{digest_of[Path(s.mask)]}"
        for s in samples
    ]
    key = _key("maskgrey", size, parts)
    jobs = [
        (lambda: np.zeros((1, size, size), np.uint8))
        if s.mask is None
        else (lambda s=s: _decode_mask(Path(s.mask), Path(s.image), size))
        for s in samples
    ]
    grey = _cached_array(key, (1, size, size), jobs, cache_dir, what="masks")
    return binarize_masks(grey, mode=binarize, crop=crop)


def binarize_masks(grey: torch.Tensor, *, mode: str, crop: int | None = None) -> torch.Tensor:
    """Resized grey-level masks (uint8 ``N x 1 x S x S``) -> uint8 0/1 masks.

    ``half``: a pixel is defective when its grey level is above half (> 127).
    ``official``: as the official MMR test transform, the mask is divided by its maximum over
    the center ``crop x crop`` region (the whole mask when ``crop`` is None) and only pixels
    equal to 1 count, i.e. the pixels at that maximum; a mask that is empty there stays empty.
    """
    if mode == "half":
        return (grey > 127).to(torch.uint8)
    if mode != "official":
        raise ValueError(f"mode must be one of {MASK_BINARIZE}, got {mode!r}")
    h, w = grey.shape[-2:]
    size_h, size_w = (h, w) if crop is None else (crop, crop)
    top, left = int(round((h - size_h) / 2.0)), int(round((w - size_w) / 2.0))
    peak = grey[..., top : top + size_h, left : left + size_w].amax(dim=(-2, -1), keepdim=True)
    return ((grey == peak) & (peak > 0)).to(torch.uint8)


def _digests(files: Sequence[Path]) -> list[str]:
    """blake2b of each file's bytes (hashlib releases the GIL, so threads help)."""
    if not files:
        return []
    with ThreadPoolExecutor(_workers()) as pool:
        return list(pool.map(_file_digest, files))


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise DataError(
            f"cannot read {path}: {exc.strerror or exc}; check that the file exists and is "
            "readable (re-list the dataset if files were moved)"
        ) from exc
    return h.hexdigest()


def _key(kind: str, size: int, parts: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{_CACHE_VERSION}|{kind}|{size}|{len(parts)}|".encode())
    for part in parts:
        h.update(part.encode() + b"\n")
    return f"{kind}-{size}px-{len(parts)}-{h.hexdigest()}"


def _cached_array(
    key: str,
    item_shape: tuple[int, ...],
    jobs: Sequence[Callable[[], np.ndarray]],
    cache_dir: str | os.PathLike[str] | None,
    *,
    what: str,
) -> torch.Tensor:
    if not jobs:
        return torch.zeros((0, *item_shape), dtype=torch.uint8)
    root = default_cache_dir(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the image cache directory {root}: {exc.strerror or exc}; set "
            "data.cache_dir or $MMR_CACHE_DIR to a writable directory"
        ) from exc
    path = root / f"{key}.npy"
    cached = _open_cached(path, (len(jobs), *item_shape))
    if cached is None:
        try:
            with _locked(root / f"{key}.lock"):
                cached = _open_cached(path, (len(jobs), *item_shape))  # built meanwhile?
                if cached is None:
                    _build(path, item_shape, jobs, what=what)
                    cached = _open_cached(path, (len(jobs), *item_shape))
        except OSError as exc:  # decoding errors are DataErrors: this is the cache's disk
            raise DataError(
                f"cannot write to the image cache directory {root}: {exc.strerror or exc}; "
                "set data.cache_dir or $MMR_CACHE_DIR to a writable directory with free space"
            ) from exc
    else:
        logger.debug("image cache hit: %s", path.name)
    if cached is None:  # pragma: no cover - the file was just written
        raise DataError(f"image cache file {path} is unreadable after writing it: check the disk")
    return torch.from_numpy(cached)


def _open_cached(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    try:
        # "c" = copy-on-write: pages are shared with every process that maps the file, and a
        # tensor built on it is writable without touching the file.
        arr = np.load(path, mmap_mode="c")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty (cut) file
        logger.warning("ignoring unreadable image cache file %s (%s); rebuilding", path, exc)
        return None
    if arr.shape != shape or arr.dtype != np.uint8:
        logger.warning("ignoring image cache file %s with shape %s; rebuilding", path, arr.shape)
        return None
    return arr


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _build(
    path: Path,
    item_shape: tuple[int, ...],
    jobs: Sequence[Callable[[], np.ndarray]],
    *,
    what: str,
) -> None:
    start = time.perf_counter()
    step, close = _progress[-1](f"decode {what}", len(jobs)) if _progress else (None, None)
    try:
        # atomic: readers see the old state or the whole file
        with atomic_path(path) as tmp:
            shape = (len(jobs), *item_shape)
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)

            def fill(i: int, out: np.ndarray = out) -> None:
                out[i] = jobs[i]()
                if step is not None:
                    step()

            with ThreadPoolExecutor(_workers()) as pool:
                list(pool.map(fill, range(len(jobs))))
            out.flush()
            del out, fill  # close the memory map before the rename
    finally:
        if close is not None:
            close()
    logger.info(
        "decoded %d %s into the cache in %.2f s (%s)",
        len(jobs),
        what,
        time.perf_counter() - start,
        path,
    )


def _workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def _open_image(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()  # decode now so that truncated/corrupt files fail here, named
    except FileNotFoundError as exc:
        raise DataError(f"image file {path} does not exist; re-list the dataset") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib errors, ...
        raise DataError(
            f"cannot decode {path}: {type(exc).__name__}: {exc}; the file is corrupt or "
            "truncated: re-copy it from the original dataset or delete it"
        ) from exc
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float images scaled to 8 bit (PIL's convert would clip them)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))
    return img


def _decode_image(
    path: Path, size: int, *, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> np.ndarray:
    """One image as uint8 3 x size x size: RGB, resized by PIL with ``resample`` (what
    torchvision ``Resize((s, s), interpolation=...)`` does on PIL images; its default
    interpolation is bilinear, the project's training default bicubic)."""
    return _resized(_to_8bit(_open_image(path)), size, resample)


def _resized(img: Image.Image, size: int, resample: Image.Resampling) -> np.ndarray:
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = img.resize((size, size), resample)
    return np.asarray(img).transpose(2, 0, 1)


def decode_image(
    path: str | os.PathLike[str], *, size: int, interpolation: str, min_side: int = 0
) -> np.ndarray:
    """One image as ``load_images`` decodes it, uncached: uint8 3 x size x size RGB.

    ``min_side``: refuse (DataError) an image whose width or height is below it, e.g. the
    model's input size, which up-sampling would only blur into the input.
    """
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    path = Path(path)
    img = _to_8bit(_open_image(path))
    if min(img.size) < min_side:
        raise DataError(
            f"image {path} is {img.size[0]}x{img.size[1]}, smaller than the model's "
            f"{min_side}x{min_side} input: pass the camera's full-resolution image (not a "
            "thumbnail or crop)"
        )
    return _resized(img, size, _RESAMPLE[interpolation])


def check_mask_size(
    mask_path: Path, mask_size: tuple[int, int], image_path: Path, image_size: tuple[int, int]
) -> None:
    """DataError unless a mask has its image's full resolution (sizes are width, height)."""
    if tuple(mask_size) != tuple(image_size):
        raise DataError(
            f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} but its image {image_path} is "
            f"{image_size[0]}x{image_size[1]}: masks must have the image's full resolution; "
            "re-export the mask at the image's size"
        )


def _decode_mask(mask_path: Path, image_path: Path, size: int) -> np.ndarray:
    """One mask bilinearly resized, uint8 grey levels 1 x size x size (0/1 masks scaled to
    0/255 first), checked against its image's size."""
    mask = _to_8bit(_open_image(mask_path))
    try:
        with Image.open(image_path) as img:  # header only: no decode
            image_size = img.size
    except Exception as exc:
        raise DataError(
            f"cannot read {image_path} (the image of mask {mask_path}): {exc}; re-copy it"
        ) from exc
    check_mask_size(mask_path, mask.size, image_path, image_size)
    arr = np.asarray(mask.convert("L"))
    if arr.max() == 1:  # some tools write 0/1 masks instead of 0/255
        arr = arr * np.uint8(255)
    small = Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(small)[None]
