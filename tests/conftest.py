"""Shared fixtures: fake dataset layouts, a small synthetic dataset, isolated image caches.

Fixtures:
    synthetic_root: session-wide synthetic MVTec-layout dataset (categories "disk" and
        "grid", 96 px, 8 train / 6 good / 8 defective test images each). Read-only.
    cache_dir: a fresh image-cache directory for one test ($MMR_CACHE_DIR points at it).
    fake_mvtec, fake_aebad_s, fake_aebad_v, fake_folder: tiny on-disk layouts (a few PNG/JPG
        images, some grayscale, non-square, with macOS junk) built fresh for each test, so a
        test may break them.
Every test session also gets its own $MMR_CACHE_DIR, so no test writes to ~/.cache, and
MMR_DASHBOARD=0 (sweeps start their embedded Ray without the dashboard).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmr import synth


@pytest.fixture(scope="session", autouse=True)
def _no_embedded_dashboard() -> Iterator[None]:
    """Sweeps the tests launch start their embedded Ray without the dashboard (MMR_DASHBOARD=0:
    about 3 CPU-seconds less per sweep); the dashboard's own tests remove the variable."""
    old = os.environ.get("MMR_DASHBOARD")
    os.environ["MMR_DASHBOARD"] = "0"
    yield
    if old is None:
        os.environ.pop("MMR_DASHBOARD", None)
    else:
        os.environ["MMR_DASHBOARD"] = old


@pytest.fixture(scope="session", autouse=True)
def _session_image_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("mmr-image-cache")
    old = os.environ.get("MMR_CACHE_DIR")
    os.environ["MMR_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MMR_CACHE_DIR", None)
    else:
        os.environ["MMR_CACHE_DIR"] = old


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty image-cache directory; ``$MMR_CACHE_DIR`` points at it."""
    path = tmp_path / "image-cache"
    monkeypatch.setenv("MMR_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset in MVTec layout: categories disk (object) and grid (texture)."""
    root = tmp_path_factory.mktemp("synthetic") / "data"
    return synth.generate(
        root, categories=["disk", "grid"], size=96, seed=0, n_train=8, n_test_good=6,
        n_test_defect=8,
    )  # fmt: skip


# ----------------------------------------------------------------------------- fake layouts


def write_image(
    path: Path, *, size: tuple[int, int] = (20, 16), gray: bool = False, seed: int = 0
) -> Path:
    """A small random image (``size`` = width, height); PNG or JPEG from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def write_mask(path: Path, *, size: tuple[int, int] = (20, 16)) -> Path:
    """A 0/255 mask with a rectangle of 255 in its upper-left part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0]), np.uint8)
    arr[2 : size[1] // 2, 3 : size[0] // 2] = 255
    Image.fromarray(arr).save(path)
    return path


def add_junk(folder: Path) -> None:
    """macOS zip leftovers that listing must ignore."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "._000.png").write_bytes(b"\0\5\26\7AppleDouble")
    write_image(folder / "__MACOSX" / "._junk.png")


@pytest.fixture
def fake_mvtec(tmp_path: Path) -> Path:
    """``bottle`` (RGB 20x16) and ``cable`` (grayscale 24x18), 2 defect types each."""
    root = tmp_path / "mvtec"
    for cat, gray, size in (("bottle", False, (20, 16)), ("cable", True, (24, 18))):
        base = root / cat
        for i in range(4):
            write_image(base / "train/good" / f"{i:03d}.png", size=size, gray=gray, seed=i)
        for i in range(3):
            write_image(base / "test/good" / f"{i:03d}.png", size=size, gray=gray, seed=10 + i)
        for d, defect in enumerate(("broken", "crack")):
            for i in range(2 + d):
                write_image(
                    base / "test" / defect / f"{i:03d}.png", size=size, gray=gray, seed=20 + i
                )
                write_mask(base / "ground_truth" / defect / f"{i:03d}_mask.png", size=size)
        add_junk(base / "train/good")
        add_junk(base / "test")
    add_junk(root)
    (root / "readme.txt").write_text("MVTec AD (fake)")
    return root


AEBAD_DOMAINS = ("same", "background", "illumination", "view")


@pytest.fixture
def fake_aebad_s(tmp_path: Path) -> Path:
    """``<root>/AeBAD_S``: 30x20 images, train subfolders, masks named like their images."""
    root = tmp_path / "aebad"
    base = root / "AeBAD_S"
    size = (30, 20)
    for sub, count in (("IMG_train_a", 3), ("IMG_train_b", 2)):
        for i in range(count):
            write_image(base / "train/good" / sub / f"{sub}_{i}.png", size=size, seed=i)
    for defect in ("good", "ablation", "groove"):
        for domain in AEBAD_DOMAINS:
            for i in range(2):
                name = f"{defect}_{domain}_{i}.png"
                write_image(base / "test" / defect / domain / name, size=size, seed=i)
                if defect != "good":
                    write_mask(base / "ground_truth" / defect / domain / name, size=size)
    add_junk(root)
    add_junk(base / "test" / "ablation")
    return root


@pytest.fixture
def fake_aebad_v(tmp_path: Path) -> Path:
    """``<root>/AeBAD_V``: JPEG frames, train subfolders per video, no masks."""
    root = tmp_path / "aebad"
    base = root / "AeBAD_V"
    for video in ("video1", "video2", "video3"):
        for i in range(2):
            write_image(base / "train/good" / f"{video}_train" / f"{i:04d}.jpg", seed=i)
        for kind, count in (("good", 2), ("anomaly", 3)):
            for i in range(count):
                write_image(base / "test" / video / kind / f"{i:04d}.jpg", seed=i)
    add_junk(base / "test")
    return root


@pytest.fixture
def fake_folder(tmp_path: Path) -> Path:
    """A user's own single-category folder: same-name masks, one grayscale image."""
    root = tmp_path / "my_parts"
    for i in range(3):
        write_image(root / "train/good" / f"ok_{i}.png", seed=i)
    write_image(root / "test/good/ok_9.png", gray=True)
    for i in range(2):
        write_image(root / "test/dent" / f"dent_{i}.png", seed=i)
        write_mask(root / "ground_truth/dent" / f"dent_{i}.png")
    add_junk(root / "test")
    return root


# ----------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """One local Ray for the whole test session (no dashboard, no token auth); yields the
    GCS address so that driver subprocesses can join it."""
    import os

    os.environ["RAY_AUTH_MODE"] = "disabled"  # MMR_DASHBOARD=0: _no_embedded_dashboard
    import ray

    from cluster.auth import _refresh_ray_auth_config

    _refresh_ray_auth_config()  # in case an earlier test switched Ray's config to token mode

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
