"""Tests for mmr.synth: determinism, layout, masks, defect properties, safe writing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmr import synth
from mmr.config import DataConfig
from mmr.data import list_tasks
from mmr.errors import DataError

SMALL = {"size": 48, "n_train": 2, "n_test_good": 2, "n_test_defect": 5}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = synth.generate(tmp_path / "a", categories=["pill", "fabric"], seed=3, **SMALL)
    b = synth.generate(tmp_path / "b", categories=["pill", "fabric"], seed=3, **SMALL)
    c = synth.generate(tmp_path / "c", categories=["pill", "fabric"], seed=4, **SMALL)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 2 * (2 + 2 + 5 + 5)
    assert fa == fb
    assert fa.keys() == fc.keys() and all(fa[k] != fc[k] for k in fa if "/train/" in k)


def test_first_categories_do_not_depend_on_how_many(tmp_path: Path) -> None:
    one = synth.generate(tmp_path / "one", categories=1, **SMALL)
    two = synth.generate(tmp_path / "two", categories=2, **SMALL)
    assert sorted(os.listdir(two)) == [synth.MARKER, *synth.KINDS[:2]]
    assert _files(one / "disk") == _files(two / "disk")


def test_layout_is_mvtec_and_masks_are_exact(synthetic_root: Path) -> None:
    cfg = DataConfig(dataset="synthetic", root=str(synthetic_root), categories="all")
    tasks = list_tasks(cfg)
    assert [t.name for t in tasks] == ["disk", "grid"]
    for task in tasks:
        assert len(task.train) == 8 and task.has_masks
        defects = sorted({s.defect for s in task.test if s.label})
        assert defects == sorted(synth.DEFECTS)
        assert sum(s.label for s in task.test) == 8 and len(task.test) == 14
        for s in task.test:
            img = Image.open(s.image)
            assert img.mode == "RGB" and img.size == (96, 96)
            if s.label:
                mask = np.asarray(Image.open(s.mask))
                assert mask.shape == (96, 96) and set(np.unique(mask)) == {0, 255}


def test_defects_are_sized_visible_and_confined_to_their_mask() -> None:
    size = 64  # the tiny config's training resolution
    sides = []
    for kind in synth.KINDS:
        for d, defect in enumerate(synth.DEFECTS):
            for seed in range(6):
                rng = np.random.default_rng([seed, d, synth.KINDS.index(kind)])
                scene = synth._SCENES[kind](rng, size)
                image, alpha = synth._DEFECTS[defect](scene, rng, size)
                mask = alpha >= 0.5
                assert mask.sum() >= 3, (kind, defect, seed)
                ys, xs = np.nonzero(mask)
                sides.append(max(np.ptp(ys), np.ptp(xs)) + 1)
                change = np.abs(image - scene.image).max(axis=-1)
                assert change[alpha == 0].max() == 0, (kind, defect, seed)  # nothing outside
                assert change[mask].mean() > 0.02, (kind, defect, seed)  # visible inside
                if defect == "missing":  # filled with a texture, not a flat colour
                    assert image[mask].std(axis=0).max() > 0.01, (kind, seed)
    sides_arr = np.array(sides)
    assert 3 <= sides_arr.min() and sides_arr.max() <= 32
    assert 8 <= np.median(sides_arr) <= 24  # typically 2-3 teacher cells at 64 px


def test_objects_vary_in_pose() -> None:
    centers = []
    for seed in range(8):
        scene = synth._SCENES["pill"](np.random.default_rng(seed), 64)
        ys, xs = np.nonzero(scene.region < 0)
        centers.append((ys.mean(), xs.mean(), np.corrcoef(ys, xs)[0, 1]))
    spread = np.array(centers).std(axis=0)
    assert spread[0] > 0.5 and spread[1] > 0.5 and spread[2] > 0.02  # shift and rotation


def test_refuses_a_non_empty_out_and_accepts_an_empty_one(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=r"full already exists and is not empty"):
        synth.generate(tmp_path / "full", **SMALL)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    out = synth.generate(tmp_path / "empty", categories=1, **SMALL)
    assert (out / "disk/train/good/000.png").is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"categories": 0}, "between 1 and"),
        ({"categories": ["disk", "screw"]}, "unknown synthetic category"),
        ({"size": 16}, ">= 32 px"),
        ({"n_train": -1}, "must be >= 0"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        synth.generate(tmp_path / "out", **{**SMALL, **kwargs})
    assert not (tmp_path / "out").exists()


def test_a_crash_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synth.render
    calls = []

    def flaky(*args: object) -> tuple:
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(synth, "render", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        synth.generate(tmp_path / "out", categories=1, **SMALL)
    assert os.listdir(tmp_path) == []
