"""A cheap check of a whole dataset before any work: listing, file headers, file ends.

A sweep runs it on the driver so that a truncated image or a missing mask stops the sweep
before any trial starts, with the file named, instead of failing every trial. It reads each
file's header (format, size) and its last bytes: a PNG ends with its IEND chunk and a JPEG
with its end-of-image marker, which a truncated copy lacks. Only a file that fails this test
is decoded in full (the training decoder then names what is wrong with it), so a valid file
with trailing bytes is still accepted.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from mmr.config import DataConfig
from mmr.data import Task, list_tasks
from mmr.errors import DataError
from mmr.imagecache import _open_image, _workers, check_mask_size

__all__ = ["check_data", "check_image_file"]

logger = logging.getLogger(__name__)

_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last 8 bytes of a PNG
_JPEG_END = b"\xff\xd9"  # end-of-image marker
_TAIL = 1024  # bytes read from the end of a JPEG (some writers pad after the marker)


def check_data(cfg: DataConfig) -> list[Task]:
    """Lists the dataset and checks every image and mask file; returns the tasks.

    Raises:
        DataError: the first problem found (layout, missing mask, unreadable, truncated or
            undecodable file, mask size differing from its image's), naming the file.
    """
    tasks = list_tasks(cfg)
    samples = [s for task in tasks for s in (*task.train, *task.test)]
    files = sorted({p for s in samples for p in (s.image, s.mask) if p is not None})
    with ThreadPoolExecutor(_workers()) as pool:
        sizes = dict(zip(files, pool.map(check_image_file, files), strict=True))
    for s in samples:
        if s.mask is not None:
            check_mask_size(s.mask, sizes[s.mask], s.image, sizes[s.image])
    logger.info("checked %d image and mask files of %d task(s)", len(files), len(tasks))
    return tasks


def check_image_file(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header; DataError if it is not a whole image."""
    try:
        with Image.open(path) as img:
            size, fmt = img.size, img.format
    except FileNotFoundError as exc:
        raise DataError(f"image file {path} does not exist; re-list the dataset") from exc
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise DataError(
            f"cannot read {path}: {type(exc).__name__}: {exc}; the file is corrupt or not an "
            "image: re-copy it from the original dataset or delete it"
        ) from exc
    if not _ends_whole(path, fmt):
        _open_image(path)  # decodes in full: raises a DataError naming the file if it is cut
    return size


def _ends_whole(path: Path, fmt: str | None) -> bool:
    """Whether the file ends as a complete PNG/JPEG does (other formats: not checked)."""
    if fmt not in ("PNG", "JPEG"):
        return True
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - _TAIL))
        tail = f.read()
    if fmt == "PNG":
        return tail.endswith(_PNG_END)
    return _JPEG_END in tail
