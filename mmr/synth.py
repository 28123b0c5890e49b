"""A synthetic anomaly-detection dataset in MVTec AD layout, for demos and tests.

Offline machines cannot download MVTec AD, so the project ships a generator. Categories are
objects on a textured background (``disk``, ``pill``, ``nut``: pose jitter, shading, prints)
and textures (``grid``, ``fabric``: period/phase/rotation jitter, noise). Defects are
``scratch``, ``spot``, ``missing`` (a chunk filled with a *different texture*) and ``color``;
sizes span ~0.06-0.4 of the image side (at 64 px: ~4-26 px, i.e. 1-3 teacher feature cells),
strengths span clearly visible to low-contrast, so the task is not trivially separable.
Masks are exact 0/255 where the defect changed the image.

Every image has its own random stream derived from (seed, category, split, index): the output
is byte-identical for the same arguments, and the first N categories of a larger set equal
the set generated with ``categories=N``.

Every generated set carries ``MARKER`` (``.mmr-synthetic.json``: the generator's arguments and
version) at its root: the real-data loaders refuse a folder holding it (see ``mmr.data``), so
generated images are never trained on as real data.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmr.errors import DataError
from mmr.fileio import atomic_write

__all__ = ["KINDS", "OBJECTS", "DEFECTS", "MARKER", "VERSION", "generate", "write_marker"]

logger = logging.getLogger(__name__)

OBJECTS = ("disk", "pill", "nut")
KINDS = (*OBJECTS, "grid", "fabric")  # objects first: they give a search the clearest signal
DEFECTS = ("scratch", "spot", "missing", "color")
_SPLITS = {"train": 0, "test": 1}
_PNG_LEVEL = 1  # fast zlib level: files are ~30% larger, writing is ~4x faster
MARKER = ".mmr-synthetic.json"  # at the root of every generated set
VERSION = 1  # of the generator's output; recorded in MARKER


@dataclass(frozen=True)
class _Scene:
    """A rendered defect-free image and what the defect painters need to know."""

    image: np.ndarray  # H x W x 3 float32 in [0, 1]
    region: np.ndarray  # H x W float32 signed distance (px) to the part; < 0 inside
    filler: np.ndarray  # H x W x 3: what shows through a "missing" chunk (a different texture)


def generate(
    out: Path,
    *,
    categories: int | Sequence[str] | None = None,
    size: int = 256,
    seed: int = 0,
    n_train: int = 100,
    n_test_good: int = 100,
    n_test_defect: int = 100,
) -> Path:
    """Writes a synthetic dataset in MVTec AD layout into ``out`` and returns ``out``.

    Args:
        out: target directory; must not exist or be empty. Written atomically: generated
            beside it under a temporary name, then renamed.
        categories: the first N of ``KINDS``, or names from ``KINDS``; None: all.
        size: image side in pixels.
        seed: random seed; the same arguments give byte-identical files.
        n_train: normal training images per category.
        n_test_good: normal test images per category.
        n_test_defect: defective test images per category, spread evenly over ``DEFECTS``.

    Raises:
        DataError: ``out`` is not empty, or the arguments are out of range.
    """
    out = Path(os.path.expanduser(os.fspath(out))).absolute()
    names = _categories(categories)
    if size < 32:
        raise DataError(f"synthetic image size must be >= 32 px, got {size}")
    if min(n_train, n_test_good, n_test_defect) < 0:
        raise DataError("synthetic image counts (n_train, n_test_*) must be >= 0")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(
            f"{out} already exists and is not empty: choose a new --out directory "
            "(or delete this one) so no existing data is overwritten"
        )
    start = time.perf_counter()
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    jobs: list[tuple[Path, Path | None, Callable[[], tuple[np.ndarray, np.ndarray | None]]]] = []
    for name in names:
        cat = tmp / name
        kind = KINDS.index(name)
        for i in range(n_train):
            jobs.append((cat / "train/good" / f"{i:03d}.png", None, _job(kind, seed, 0, 0, i)))
        for i in range(n_test_good):
            jobs.append((cat / "test/good" / f"{i:03d}.png", None, _job(kind, seed, 1, 0, i)))
        for d, defect in enumerate(DEFECTS):
            count = n_test_defect // len(DEFECTS) + (d < n_test_defect % len(DEFECTS))
            for i in range(count):
                mask = cat / "ground_truth" / defect / f"{i:03d}_mask.png"
                image = cat / "test" / defect / f"{i:03d}.png"
                jobs.append((image, mask, _job(kind, seed, 1, d + 1, i)))
    folders = {p.parent for img, mask, _ in jobs for p in (img, mask) if p is not None}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        for folder in sorted(folders):
            folder.mkdir(parents=True, exist_ok=True)

        def write(job: tuple[Path, Path | None, Callable[..., tuple]]) -> None:
            image_path, mask_path, make = job
            image, mask = make(size)
            Image.fromarray(image).save(image_path, format="PNG", compress_level=_PNG_LEVEL)
            if mask_path is not None:
                Image.fromarray(mask).save(mask_path, format="PNG", compress_level=_PNG_LEVEL)

        # Parallel over images; BLAS threads would only fight over the cores (and its
        # thread start-up dominates the small matrix products here).
        with _blas_limit(1), ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            list(pool.map(write, jobs))
        args = {"categories": names, "size": size, "seed": seed, "n_train": n_train}
        args |= {"n_test_good": n_test_good, "n_test_defect": n_test_defect}
        write_marker(tmp, args)
        if out.exists():
            out.rmdir()  # empty (checked above); rename would replace it anyway on POSIX
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "synthetic dataset: %d categories, %d images at %d px in %.1f s -> %s",
        len(names),
        len(jobs),
        size,
        time.perf_counter() - start,
        out,
    )
    return out


def write_marker(root: Path, args: dict[str, object]) -> None:
    """Marks ``root`` as a generated set (``MARKER``), recording the generator ``args``."""
    record = {"generator": "mmr.synth", "version": VERSION, "args": args}
    atomic_write(Path(root) / MARKER, json.dumps(record, indent=1) + "\n")


def _blas_limit(threads: int) -> contextlib.AbstractContextManager[object]:
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:  # pragma: no cover - only slower
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def _categories(categories: int | Sequence[str] | None) -> list[str]:
    if categories is None:
        return list(KINDS)
    if isinstance(categories, str):
        categories = [categories]
    if isinstance(categories, int):
        if not 1 <= categories <= len(KINDS):
            raise DataError(
                f"synthetic categories must be between 1 and {len(KINDS)}, got {categories}"
            )
        return list(KINDS[:categories])
    unknown = [c for c in categories if c not in KINDS]
    if unknown or not categories:
        raise DataError(f"unknown synthetic category {unknown[:1]}: choose from {list(KINDS)}")
    return list(dict.fromkeys(categories))


def _job(
    kind: int, seed: int, split: int, defect: int, index: int
) -> Callable[[int], tuple[np.ndarray, np.ndarray | None]]:
    """The maker of one (image, mask) pair, seeded from its own position in the dataset."""

    def make(size: int) -> tuple[np.ndarray, np.ndarray | None]:
        rng = np.random.default_rng([seed, kind, split, defect, index])
        return render(KINDS[kind], None if defect == 0 else DEFECTS[defect - 1], rng, size)

    return make


def render(
    kind: str, defect: str | None, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """One uint8 ``size x size x 3`` image and, for a defect, its uint8 0/255 mask."""
    scene = _SCENES[kind](rng, size)
    img, mask = scene.image, None
    if defect is not None:
        img, alpha = _DEFECTS[defect](scene, rng, size)
        mask = np.where(alpha >= 0.5, 255, 0).astype(np.uint8)
    img = img + np.float32(0.012) * rng.standard_normal(img.shape, dtype=np.float32)  # sensor
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), mask


# ----------------------------------------------------------------------------- building blocks


@functools.lru_cache(maxsize=8)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _noise(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Smooth noise of unit typical amplitude with features ~``cell`` px: a small random grid
    blurred up by two matrix products (fast and exactly reproducible)."""
    n = int(size / cell) + 4
    low = rng.standard_normal((n, n), dtype=np.float32)
    rows, cols = (_upsampler(size, n, cell, float(o)) for o in rng.uniform(0, 1, 2))
    # Each pixel is a weighted sum of iid normals: scale by the typical norm of the weights.
    norm = np.sqrt(np.mean((rows**2).sum(1)) * np.mean((cols**2).sum(1)))
    return (rows @ low @ cols.T) * np.float32(1.0 / norm)


def _upsampler(size: int, n: int, cell: float, offset: float) -> np.ndarray:
    pos = (np.arange(size, dtype=np.float32) + 0.5) / cell + 1.5 + offset
    w = np.exp(-0.5 * ((pos[:, None] - np.arange(n, dtype=np.float32)[None, :]) / 0.6) ** 2)
    return w / w.sum(1, keepdims=True)


def _smooth_alpha(distance: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in px (< 0 inside)."""
    return np.clip(0.5 - distance, 0.0, 1.0)


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = float(np.cos(angle)), float(np.sin(angle))
    return c * x + s * y, -s * x + c * y


def _tint(rng: np.random.Generator, base: Sequence[float], spread: float) -> np.ndarray:
    return (np.asarray(base, np.float32) + rng.normal(0, spread, 3)).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A mottled fabric-like backdrop for the objects."""
    base = _tint(rng, (0.30, 0.33, 0.30), 0.015)
    shade = 0.035 * _noise(rng, size, size / 6) + 0.02 * _noise(rng, size, size / 40)
    return base[None, None, :] + shade[..., None]


def _texture(rng: np.random.Generator, size: int, base: Sequence[float]) -> np.ndarray:
    """A noise texture unlike the scene's, used to fill "missing" chunks of textures."""
    base = _tint(rng, base, 0.04)
    cell = size / rng.uniform(14, 30)
    field = 0.08 * _noise(rng, size, cell) + 0.04 * _noise(rng, size, cell / 4)
    return base[None, None, :] + field[..., None]


# ----------------------------------------------------------------------------- scenes


def _disk(rng: np.random.Generator, size: int) -> _Scene:
    yy, xx = _coords(size)
    bg = _background(rng, size)
    cy, cx = (float(v) for v in size * (0.5 + rng.normal(0, 0.03, 2)))
    radius = size * 0.31 * (1 + float(rng.normal(0, 0.02)))
    x, y = _rotate(xx - cx, yy - cy, rng.uniform(0, 2 * np.pi))
    rho = np.sqrt(x * x + y * y)
    dist = rho - radius
    color = _tint(rng, (0.72, 0.62, 0.42), 0.015)
    shade = 1.0 - 0.28 * (rho / radius) ** 2 + 0.05 * _noise(rng, size, size / 10)
    groove = 1.0 - 0.35 * np.exp(-0.5 * ((rho - 0.78 * radius) / (0.02 * radius)) ** 2)
    mark = _smooth_alpha(np.sqrt((x - 0.45 * radius) ** 2 + y**2) - 0.11 * radius)
    body = color * (shade * groove)[..., None]
    body = body * (1 - 0.6 * mark[..., None])
    alpha = _smooth_alpha(dist)[..., None]
    return _Scene(alpha * body + (1 - alpha) * bg, dist, bg)


def _pill(rng: np.random.Generator, size: int) -> _Scene:
    yy, xx = _coords(size)
    bg = _background(rng, size)
    cy, cx = (float(v) for v in size * (0.5 + rng.normal(0, 0.03, 2)))
    u, v = _rotate(xx - cx, yy - cy, float(rng.normal(0, 0.2)))
    half, radius = size * 0.24, size * 0.14 * (1 + float(rng.normal(0, 0.02)))
    dist = np.sqrt(np.maximum(np.abs(u) - half, 0) ** 2 + v * v) - radius
    left = _tint(rng, (0.70, 0.22, 0.18), 0.015)
    right = _tint(rng, (0.86, 0.84, 0.80), 0.01)
    side = np.clip(0.5 + u / 2.0, 0, 1)[..., None]  # a soft seam between the two halves
    body = side * right + (1 - side) * left
    shade = 1.0 - 0.38 * np.clip(v / radius, -1, 1) ** 2 + 0.03 * _noise(rng, size, size / 12)
    # An imprint: three short dark bars on the light half.
    bars = np.ones_like(u)
    for k in (-1, 0, 1):
        du = np.abs(u - half * 0.55) - 0.012 * size
        d = np.maximum(du, np.abs(v - k * 0.05 * size) - 0.008 * size)
        bars = bars - 0.45 * _smooth_alpha(d)
    body = body * (shade * bars)[..., None]
    alpha = _smooth_alpha(dist)[..., None]
    return _Scene(alpha * body + (1 - alpha) * bg, dist, bg)


def _nut(rng: np.random.Generator, size: int) -> _Scene:
    yy, xx = _coords(size)
    bg = _background(rng, size)
    cy, cx = (float(v) for v in size * (0.5 + rng.normal(0, 0.03, 2)))
    x, y = _rotate(xx - cx, yy - cy, rng.uniform(0, np.pi / 3))
    apothem = size * 0.30 * (1 + float(rng.normal(0, 0.015)))
    hexagon = np.maximum.reduce(
        [np.abs(x * np.cos(a) + y * np.sin(a)) for a in (0.0, np.pi / 3, 2 * np.pi / 3)]
    )
    rho = np.sqrt(x * x + y * y)
    hole = 0.42 * apothem
    dist = np.maximum(hexagon - apothem, hole - rho)
    metal = _tint(rng, (0.62, 0.63, 0.66), 0.01)
    brushed = 0.05 * np.sin(rho * (2 * np.pi / (0.035 * size)) + rng.uniform(0, 6.3))
    shade = 1.0 - 0.15 * (hexagon / apothem) + brushed + 0.04 * _noise(rng, size, size / 16)
    chamfer = 1.0 - 0.25 * _smooth_alpha(np.abs(rho - 0.82 * apothem) - 0.015 * size)
    body = metal * (shade * chamfer)[..., None]
    alpha = _smooth_alpha(dist)[..., None]
    return _Scene(alpha * body + (1 - alpha) * bg, dist, bg)


def _grid(rng: np.random.Generator, size: int) -> _Scene:
    yy, xx = _coords(size)
    period = size / 8.0 * (1 + float(rng.normal(0, 0.02)))
    u, v = _rotate(xx, yy, float(rng.normal(0, 0.03)))
    u, v = u + rng.uniform(0, period), v + rng.uniform(0, period)
    width = 0.2 * period

    def lines(t: np.ndarray) -> np.ndarray:
        return _smooth_alpha(np.abs(np.mod(t, period) - period / 2) - width / 2)

    wire = np.maximum(lines(u), lines(v))
    dark, light = _tint(rng, (0.16, 0.16, 0.17), 0.01), _tint(rng, (0.66, 0.66, 0.64), 0.015)
    mottle = 0.04 * _noise(rng, size, size / 5) + 0.03 * _noise(rng, size, period / 3)
    img = dark + wire[..., None] * (light - dark) + mottle[..., None]
    region = np.full((size, size), -float(size), np.float32)
    return _Scene(img, region, _texture(rng, size, (0.40, 0.38, 0.36)))


def _fabric(rng: np.random.Generator, size: int) -> _Scene:
    yy, xx = _coords(size)
    period = size / 20.0 * (1 + float(rng.normal(0, 0.02)))
    u, v = _rotate(xx, yy, float(rng.normal(0, 0.03)))
    u, v = u + rng.uniform(0, 2 * period), v + rng.uniform(0, 2 * period)
    warp = np.cos(np.pi * u / period) ** 2
    weft = np.cos(np.pi * v / period) ** 2
    over = (np.floor(u / period) + np.floor(v / period)) % 2  # plain weave: alternate on top
    weave = np.where(over > 0, warp, weft)
    color = _tint(rng, (0.45, 0.40, 0.55), 0.01)
    mottle = 0.06 * _noise(rng, size, size / 6) + 0.05 * _noise(rng, size, period)
    shade = 0.75 + 0.3 * weave + mottle
    region = np.full((size, size), -float(size), np.float32)
    return _Scene(color * shade[..., None], region, _texture(rng, size, (0.55, 0.48, 0.35)))


_SCENES: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "disk": _disk,
    "pill": _pill,
    "nut": _nut,
    "grid": _grid,
    "fabric": _fabric,
}


# ----------------------------------------------------------------------------- defects


def _center_on_part(scene: _Scene, rng: np.random.Generator, margin: float) -> tuple[float, float]:
    """A random point at least ``margin`` px inside the part (anywhere for textures)."""
    size = scene.region.shape[0]
    inside = np.flatnonzero(scene.region.ravel() < -margin)
    if inside.size == 0:  # the part is thinner than the margin: any point on it
        inside = np.flatnonzero(scene.region.ravel() < 0)
    k = int(inside[rng.integers(inside.size)])
    return k // size + 0.5, k % size + 0.5


def _blob(rng: np.random.Generator, size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """Coverage of an irregular blob (ellipse with a wobbly outline) of mean ``radius``."""
    yy, xx = _coords(size)
    aspect = rng.uniform(0.55, 1.0)
    x, y = _rotate(xx - cx, yy - cy, rng.uniform(0, np.pi))
    phi = np.arctan2(y, x)
    wobble = 1.0 + sum(
        rng.uniform(0, 0.12) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    rho = np.sqrt(x * x + (y / aspect) ** 2)
    return _smooth_alpha((rho - radius * wobble) * float(np.sqrt(aspect)))


def _on_part(scene: _Scene, alpha: np.ndarray) -> np.ndarray:
    return alpha * _smooth_alpha(scene.region)


def _scratch(scene: _Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    length = size * rng.uniform(0.15, 0.4)
    width = size * rng.uniform(0.014, 0.035)
    cy, cx = _center_on_part(scene, rng, margin=0.08 * size)
    angle, bend = rng.uniform(0, np.pi), rng.uniform(-0.3, 0.3) * length
    t = np.linspace(-0.5, 0.5, 48, dtype=np.float32)
    # A gently bent line: a parabola through the centre, rotated.
    px = cx + np.cos(angle) * t * length - np.sin(angle) * bend * (t * t - 0.25)
    py = cy + np.sin(angle) * t * length + np.cos(angle) * bend * (t * t - 0.25)
    pad = int(width) + 2
    y0, y1 = max(int(py.min()) - pad, 0), min(int(py.max()) + pad + 1, size)
    x0, x1 = max(int(px.min()) - pad, 0), min(int(px.max()) + pad + 1, size)
    alpha = np.zeros((size, size), np.float32)
    if y1 > y0 and x1 > x0:
        yy, xx = _coords(size)
        sy, sx = yy[y0:y1, x0:x1, None], xx[y0:y1, x0:x1, None]
        dist = np.sqrt(((sy - py) ** 2 + (sx - px) ** 2).min(axis=-1))
        alpha[y0:y1, x0:x1] = _smooth_alpha(dist - width / 2)
    alpha = _on_part(scene, alpha)
    target = float(rng.choice([0.08, 0.95]))  # a dark groove or a bright scrape
    strength = rng.uniform(0.35, 0.9)
    return _mix(scene.image, np.float32(target), alpha * np.float32(strength)), alpha


def _spot(scene: _Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    radius = size * rng.uniform(0.035, 0.11)
    cy, cx = _center_on_part(scene, rng, margin=0.5 * radius)
    alpha = _on_part(scene, _blob(rng, size, cy, cx, radius))
    stain = _tint(rng, rng.choice([(0.25, 0.17, 0.10), (0.85, 0.80, 0.60)]), 0.05)
    strength = rng.uniform(0.25, 0.8)  # some stains are faint
    return _mix(scene.image, stain, alpha * strength), alpha


def _missing(scene: _Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    radius = size * rng.uniform(0.05, 0.13)
    cy, cx = _center_on_part(scene, rng, margin=0.3 * radius)
    alpha = _on_part(scene, _blob(rng, size, cy, cx, radius))
    return _mix(scene.image, scene.filler, alpha), alpha


def _color(scene: _Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    radius = size * rng.uniform(0.06, 0.15)
    cy, cx = _center_on_part(scene, rng, margin=0.5 * radius)
    alpha = _on_part(scene, _blob(rng, size, cy, cx, radius))
    # Recolour but keep shading and texture: scale the channels, brightness roughly kept.
    gains = 1.0 + rng.choice([-1, 1], 3) * rng.uniform(0.15, 0.5, 3)
    gains = (gains / gains.mean()).astype(np.float32)
    # ... plus a tint, so that dark and grey parts change colour visibly too.
    tint = (rng.choice([-1, 1], 3) * rng.uniform(0.04, 0.12, 3)).astype(np.float32)
    recoloured = scene.image * gains + tint
    return _mix(scene.image, recoloured, alpha), alpha


def _mix(image: np.ndarray, other: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return (1 - a) * image + a * other


_Painter = Callable[[_Scene, np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
_DEFECTS: dict[str, _Painter] = {
    "scratch": _scratch,
    "spot": _spot,
    "missing": _missing,
    "color": _color,
}
