"""Tests for mmr.data / mmr.imagecache: listing, bad input, split, cache, transforms."""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import AEBAD_DOMAINS, write_image, write_mask
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from mmr import data, imagecache, synth, transforms
from mmr.config import DataConfig
from mmr.data import Sample, Task, list_tasks, split_task, split_test
from mmr.errors import DataError
from mmr.fileio import is_own_tmp


def cfg(dataset: str, root: Path | str, categories: object = "all", **kw: object) -> DataConfig:
    return DataConfig(dataset=dataset, root=str(root), categories=categories, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- listing


def test_mvtec_lists_each_category_with_masks_and_ignores_junk(fake_mvtec: Path) -> None:
    tasks = list_tasks(cfg("mvtec", fake_mvtec))
    assert [t.name for t in tasks] == ["bottle", "cable"]
    bottle = tasks[0]
    assert bottle.has_masks
    assert [s.image.name for s in bottle.train] == ["000.png", "001.png", "002.png", "003.png"]
    assert all(s.label == 0 and s.mask is None and s.group == "bottle" for s in bottle.train)
    assert Counter(s.defect for s in bottle.test) == {"good": 3, "broken": 2, "crack": 3}
    for s in bottle.test:
        assert s.image.is_absolute() and s.group == "bottle"
        if s.label:
            assert (
                s.mask
                == fake_mvtec / "bottle/ground_truth" / s.defect / f"{s.image.stem}_mask.png"
            )
        else:
            assert s.mask is None and s.defect == "good"
    names = {s.image.name for t in tasks for s in (*t.train, *t.test)}
    assert not any(n.startswith(".") for n in names)


def test_mvtec_selects_categories(fake_mvtec: Path) -> None:
    tasks = list_tasks(cfg("mvtec", fake_mvtec, ("cable",)))
    assert [t.name for t in tasks] == ["cable"]


def test_root_relative_and_home_are_resolved(
    fake_mvtec: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(fake_mvtec.parent)
    tasks = list_tasks(cfg("mvtec", fake_mvtec.name, ("bottle",)))
    assert tasks[0].train[0].image == fake_mvtec / "bottle/train/good/000.png"
    monkeypatch.setenv("HOME", str(fake_mvtec.parent))
    assert data.resolve_root("~/mvtec") == fake_mvtec
    assert list_tasks(cfg("mvtec", "~/mvtec", ("bottle",)))[0].train == tasks[0].train


def test_aebad_s_is_one_task_grouped_by_domain(fake_aebad_s: Path) -> None:
    (task,) = list_tasks(cfg("aebad_s", fake_aebad_s))
    assert task.name == "aebad_s" and task.has_masks
    assert {s.image.parent.name for s in task.train} == {"IMG_train_a", "IMG_train_b"}
    assert len(task.train) == 5
    assert {s.group for s in task.test} == set(AEBAD_DOMAINS)
    assert Counter(s.defect for s in task.test) == {"good": 8, "ablation": 8, "groove": 8}
    for s in task.test:
        assert s.group == s.image.parent.name
        if s.label:
            # AeBAD masks carry the image's own name, no _mask suffix.
            expected = fake_aebad_s / "AeBAD_S/ground_truth" / s.defect / s.group / s.image.name
            assert s.mask == expected
    (only,) = list_tasks(cfg("aebad_s", fake_aebad_s, ("view", "same")))
    assert {s.group for s in only.test} == {"view", "same"}
    assert only.train == task.train


def test_aebad_v_is_one_task_grouped_by_video_without_masks(fake_aebad_v: Path) -> None:
    (task,) = list_tasks(cfg("aebad_v", fake_aebad_v))
    assert task.name == "aebad_v" and not task.has_masks
    assert len(task.train) == 6
    assert Counter(s.group for s in task.test) == {"video1": 5, "video2": 5, "video3": 5}
    assert all(s.mask is None for s in task.test)
    assert sum(s.label for s in task.test) == 9
    # The subset folder itself also works as root.
    (v2,) = list_tasks(cfg("aebad_v", fake_aebad_v / "AeBAD_V", ("video2",)))
    assert {s.group for s in v2.test} == {"video2"}


def test_folder_single_category_with_same_name_masks(fake_folder: Path) -> None:
    (task,) = list_tasks(cfg("folder", fake_folder))
    assert task.name == "my_parts" and task.has_masks
    dents = [s for s in task.test if s.label]
    assert [s.mask for s in dents] == [
        fake_folder / "ground_truth/dent/dent_0.png",
        fake_folder / "ground_truth/dent/dent_1.png",
    ]
    assert list_tasks(cfg("folder", fake_folder, ("my_parts",)))[0] == task
    with pytest.raises(DataError, match="single category"):
        list_tasks(cfg("folder", fake_folder, ("bottle",)))


def test_folder_without_ground_truth_has_no_masks(fake_folder: Path) -> None:
    for p in sorted((fake_folder / "ground_truth").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (fake_folder / "ground_truth").rmdir()
    (task,) = list_tasks(cfg("folder", fake_folder))
    assert not task.has_masks
    assert all(s.mask is None for s in task.test) and sum(s.label for s in task.test) == 2


def test_folder_root_with_several_categories(fake_mvtec: Path) -> None:
    tasks = list_tasks(cfg("folder", fake_mvtec))
    assert [t.name for t in tasks] == ["bottle", "cable"]


def test_synthetic_generates_on_first_use_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmr import synth

    real = synth.generate
    calls: list[Path] = []

    def small(out: Path) -> Path:
        calls.append(out)
        return real(out, categories=1, size=48, n_train=2, n_test_good=2, n_test_defect=4)

    def crash(out: Path) -> Path:
        real(out, categories=1, size=48, n_train=1, n_test_good=1, n_test_defect=4)
        raise RuntimeError("killed mid-way")

    root = tmp_path / "synthetic"
    monkeypatch.setattr(synth, "generate", crash)
    with pytest.raises(RuntimeError):
        list_tasks(cfg("synthetic", root))
    assert not root.exists() and os.listdir(tmp_path) == []  # nothing half-written

    monkeypatch.setattr(synth, "generate", small)
    (task,) = list_tasks(cfg("synthetic", root))
    assert task.name == "disk" and len(task.train) == 2 and len(task.test) == 6
    assert list_tasks(cfg("synthetic", root)) == [task]
    assert len(calls) == 1  # generated once, then listed
    assert sorted(os.listdir(tmp_path)) == ["synthetic"]


def test_synthetic_root_lists_as_synthetic_only(synthetic_root: Path) -> None:
    tasks = list_tasks(cfg("synthetic", synthetic_root))
    assert [t.name for t in tasks] == ["disk", "grid"]
    assert (synthetic_root / synth.MARKER).is_file()
    # Generated images are never taken for real data, nor is one category of them.
    for dataset, root in [
        ("mvtec", synthetic_root),
        ("folder", synthetic_root),
        ("folder", synthetic_root / "disk"),
        ("aebad_s", synthetic_root),
        ("aebad_v", synthetic_root),
    ]:
        with pytest.raises(DataError, match="holds generated synthetic images.*dataset=synthetic"):
            list_tasks(cfg(dataset, root))


def test_synthetic_never_generates_beside_other_data(
    fake_mvtec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = sorted(os.listdir(fake_mvtec))
    with pytest.raises(DataError, match="not empty and is no generated synthetic set.*empty"):
        list_tasks(cfg("synthetic", fake_mvtec))
    assert sorted(os.listdir(fake_mvtec)) == before  # nothing generated beside the real data
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        list_tasks(cfg("synthetic", tmp_path / "notes"))
    assert os.listdir(tmp_path / "notes") == ["todo.txt"]
    # The real-data default root is never generated into, even when it is missing.
    monkeypatch.setattr(data, "_REAL_DEFAULT_ROOT", str(tmp_path / "mvtec_ad"))
    with pytest.raises(DataError, match="default folder of the real MVTec AD data"):
        list_tasks(cfg("synthetic", tmp_path / "mvtec_ad"))
    assert not (tmp_path / "mvtec_ad").exists()


def test_an_unmarked_synthetic_set_of_an_earlier_version(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taken (and marked) in the project's cache dir only; refused anywhere else."""
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    old = tmp_path / "home/.cache/mmr-sweep/synthetic"
    shutil.copytree(synthetic_root, old, ignore=shutil.ignore_patterns(synth.MARKER))
    elsewhere = shutil.copytree(old, tmp_path / "elsewhere")
    assert [t.name for t in list_tasks(cfg("synthetic", old))] == ["disk", "grid"]
    assert (old / synth.MARKER).is_file()
    with pytest.raises(DataError, match="mvtec"):  # now marked: no longer taken for real data
        list_tasks(cfg("mvtec", old))
    with pytest.raises(DataError, match="no generated synthetic set"):
        list_tasks(cfg("synthetic", elsewhere))
    assert not (elsewhere / synth.MARKER).exists()
    # In the cache, but holding something else too: refused, left as it was.
    other = shutil.copytree(elsewhere, tmp_path / "home/.cache/mmr-sweep/other")
    (other / "bottle" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no generated synthetic set"):
        list_tasks(cfg("synthetic", other))
    assert not (other / synth.MARKER).exists()


# ----------------------------------------------------------------------------- bad input


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.root .*nope.* does not exist"):
        list_tasks(cfg("mvtec", tmp_path / "nope"))


def test_unknown_category_lists_the_found_ones(fake_mvtec: Path) -> None:
    with pytest.raises(DataError, match=r"unknown category 'screw'.*\['bottle', 'cable'\]"):
        list_tasks(cfg("mvtec", fake_mvtec, ("bottle", "screw")))


def test_unknown_domain_lists_the_found_ones(fake_aebad_s: Path) -> None:
    with pytest.raises(DataError, match=r"unknown domain 'bottle'.*'illumination'"):
        list_tasks(cfg("aebad_s", fake_aebad_s, ("bottle",)))


def test_empty_train_good(fake_mvtec: Path) -> None:
    for p in (fake_mvtec / "cable/train/good").glob("*.png"):
        p.unlink()
    with pytest.raises(DataError, match=r"no training images in .*cable/train/good"):
        list_tasks(cfg("mvtec", fake_mvtec, ("cable",)))


def test_defect_image_without_mask(fake_mvtec: Path) -> None:
    (fake_mvtec / "bottle/ground_truth/crack/001_mask.png").unlink()
    with pytest.raises(DataError, match=r"crack/001.png has no mask: expected .*001_mask.png"):
        list_tasks(cfg("mvtec", fake_mvtec, ("bottle",)))


def test_defect_image_without_mask_aebad(fake_aebad_s: Path) -> None:
    (fake_aebad_s / "AeBAD_S/ground_truth/groove/view/groove_view_1.png").unlink()
    with pytest.raises(DataError, match="groove_view_1.png has no mask"):
        list_tasks(cfg("aebad_s", fake_aebad_s))


def test_mask_size_differs_from_image(fake_mvtec: Path, cache_dir: Path) -> None:
    write_mask(fake_mvtec / "bottle/ground_truth/broken/000_mask.png", size=(10, 8))
    (task,) = list_tasks(cfg("mvtec", fake_mvtec, ("bottle",)))
    with pytest.raises(DataError, match=r"000_mask.png is 10x8 but its image .*000.png is 20x16"):
        data.load_masks(task.test, size=8)


def test_corrupt_png_is_named_at_decode(fake_mvtec: Path, cache_dir: Path) -> None:
    bad = fake_mvtec / "bottle/train/good/002.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    (task,) = list_tasks(cfg("mvtec", fake_mvtec, ("bottle",)))  # listing does not decode
    with pytest.raises(DataError, match=r"cannot decode .*002.png.*corrupt or truncated"):
        data.load_images([s.image for s in task.train], size=8)
    left = [p.name for p in cache_dir.iterdir()] if cache_dir.exists() else []
    assert not [n for n in left if n.endswith(".npy") or is_own_tmp(n)], left


def test_unknown_dataset_kind(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unknown data.dataset 'imagenet'.*aebad_s"):
        list_tasks(cfg("imagenet", tmp_path))


def test_all_on_an_empty_root(tmp_path: Path) -> None:
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    with pytest.raises(DataError, match="no category found under"):
        list_tasks(cfg("mvtec", tmp_path))


def test_category_dir_given_as_mvtec_root(fake_mvtec: Path) -> None:
    with pytest.raises(DataError, match=r"it is one category: set data.root to its parent"):
        list_tasks(cfg("mvtec", fake_mvtec / "bottle"))


def test_test_set_without_defects(fake_folder: Path) -> None:
    for p in (fake_folder / "test/dent").glob("*.png"):
        p.unlink()
    with pytest.raises(DataError, match="has no anomalous images"):
        list_tasks(cfg("folder", fake_folder))


# ----------------------------------------------------------------------------- split


def _samples(counts: dict[tuple[str, str], int]) -> list[Sample]:
    out = []
    for (group, defect), n in counts.items():
        for i in range(n):
            label = int(defect != "good")
            out.append(Sample(Path(f"/d/{group}/{defect}/{i}.png"), label, defect, None, group))
    return out


def test_split_is_disjoint_complete_seeded_and_stratified() -> None:
    samples = _samples({("a", "good"): 10, ("a", "x"): 7, ("b", "good"): 4, ("b", "y"): 3})
    val, test = split_test(samples, fraction=0.5, seed=1)
    assert set(val).isdisjoint(test) and sorted(val + test, key=str) == sorted(samples, key=str)
    strata = Counter((s.group, s.defect) for s in val)
    assert strata[("a", "good")] == 5 and strata[("b", "good")] == 2
    assert strata[("a", "x")] in (3, 4) and strata[("b", "y")] in (1, 2)
    assert split_test(samples, fraction=0.5, seed=1) == (val, test)
    assert split_test(list(reversed(samples)), fraction=0.5, seed=1)[0] == val[::-1]
    others = {tuple(split_test(samples, fraction=0.5, seed=s)[0]) for s in range(5)}
    assert len(others) > 1
    v3, _ = split_test(samples, fraction=0.3, seed=1)
    assert Counter((s.group, s.defect) for s in v3)[("a", "good")] == 3


def test_split_keeps_good_and_defective_in_each_half() -> None:
    # Every defect type has a single image: the halves must still both get defects.
    samples = _samples({("g", "good"): 2, ("g", "a"): 1, ("g", "b"): 1, ("g", "c"): 1})
    samples += _samples({("h", "good"): 3, ("h", "a"): 2})
    for seed in range(20):
        for fraction in (0.2, 0.5, 0.8):
            for half in split_test(samples, fraction=fraction, seed=seed):
                for group in ("g", "h"):
                    labels = {s.label for s in half if s.group == group}
                    assert labels == {0, 1}, (seed, fraction, group)


def test_split_task_modes() -> None:
    samples = tuple(_samples({("c", "good"): 4, ("c", "x"): 4}))
    task = Task("c", (), samples, True)
    val, test = split_task(task, DataConfig(val_split="none"))
    assert val == test == list(samples)
    val, test = split_task(task, DataConfig(val_fraction=0.25), seed=3)
    assert len(val) == 2 and len(test) == 6
    assert (val, test) == split_test(samples, fraction=0.25, seed=3)


# ----------------------------------------------------------------------------- cache


def test_load_images_matches_torchvision_resize(fake_mvtec: Path, cache_dir: Path) -> None:
    paths = [fake_mvtec / "bottle/train/good/000.png", fake_mvtec / "cable/train/good/001.png"]
    out = data.load_images(paths, size=12)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 12, 12)
    for i, p in enumerate(paths):
        ref = TF.resize(Image.open(p).convert("RGB"), [12, 12], InterpolationMode.BICUBIC)
        assert torch.equal(out[i], TF.pil_to_tensor(ref))
    assert torch.equal(out[1, 0], out[1, 2])  # grayscale -> 3 equal channels
    assert len(list(cache_dir.glob("rgb-12px-2-*.npy"))) == 1


def test_cache_hit_does_not_decode(
    fake_mvtec: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = sorted((fake_mvtec / "bottle/test").rglob("[0-9]*.png"))
    first = data.load_images(paths, size=10)

    def fail(path: Path, size: int, **_: object) -> np.ndarray:
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(imagecache, "_decode_image", fail)
    again = data.load_images(paths, size=10)
    assert torch.equal(first, again)
    again[0] = 0  # copy-on-write: the cache file is untouched
    assert torch.equal(data.load_images(paths, size=10), first)
    with pytest.raises(AssertionError, match="decoded"):
        data.load_images(paths, size=11)  # another size is another entry


def test_changed_file_content_invalidates(fake_mvtec: Path, cache_dir: Path) -> None:
    path = fake_mvtec / "bottle/train/good/000.png"
    before = data.load_images([path], size=8)
    write_image(path, seed=99)  # same name and size, new pixels
    after = data.load_images([path], size=8)
    assert not torch.equal(before, after)
    assert len(list(cache_dir.glob("*.npy"))) == 2


def test_concurrent_loads_decode_once(
    fake_mvtec: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = sorted((fake_mvtec / "bottle").rglob("[0-9][0-9][0-9].png"))
    calls = Counter[str]()
    real = imagecache._decode_image
    lock = threading.Lock()

    def counting(path: Path, size: int, **kw: object) -> np.ndarray:
        with lock:
            calls[str(path)] += 1
        return real(path, size, **kw)

    monkeypatch.setattr(imagecache, "_decode_image", counting)
    results: list[torch.Tensor] = []
    threads = [
        threading.Thread(target=lambda: results.append(data.load_images(paths, size=9)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(torch.equal(r, results[0]) for r in results)
    assert sum(calls.values()) == len(paths)  # the lock made the others wait and reuse


def test_load_masks_binarised_with_zeros_for_good(fake_mvtec: Path, cache_dir: Path) -> None:
    (task,) = list_tasks(cfg("mvtec", fake_mvtec, ("cable",)))
    masks = data.load_masks(task.test, size=12)
    assert masks.dtype == torch.uint8 and masks.shape == (len(task.test), 1, 12, 12)
    assert set(masks.unique().tolist()) == {0, 1}
    for s, m in zip(task.test, masks, strict=True):
        assert (m.sum() > 0) == bool(s.label)
    k = max(i for i, s in enumerate(task.test) if s.label)
    ref = Image.open(task.test[k].mask).resize((12, 12), Image.Resampling.BILINEAR)
    assert torch.equal(masks[k, 0], torch.from_numpy((np.asarray(ref) > 127).astype(np.uint8)))


def test_load_masks_accepts_0_1_masks(tmp_path: Path, cache_dir: Path) -> None:
    image = write_image(tmp_path / "img.png")
    mask = tmp_path / "mask.png"
    Image.fromarray((np.asarray(Image.open(write_mask(mask))) // 255).astype(np.uint8)).save(mask)
    sample = Sample(image, 1, "x", mask, "g")
    assert data.load_masks([sample], size=16)[0, 0, 4, 4] == 1


def test_test_interpolation_bilinear_is_torchvisions_default_resize(
    fake_mvtec: Path, cache_dir: Path
) -> None:
    paths = [fake_mvtec / "bottle/train/good/000.png", fake_mvtec / "cable/train/good/001.png"]
    bilinear = data.load_images(paths, size=12, interpolation="bilinear")
    for i, p in enumerate(paths):
        ref = TF.resize(Image.open(p).convert("RGB"), [12, 12])  # torchvision's default
        assert torch.equal(bilinear[i], TF.pil_to_tensor(ref))
    assert not torch.equal(bilinear, data.load_images(paths, size=12))  # bicubic: its own entry
    assert len(list(cache_dir.glob("rgb-bilinear-12px-2-*.npy"))) == 1
    with pytest.raises(ValueError, match="interpolation"):
        data.load_images(paths, size=12, interpolation="nearest")


def _soft_mask_sample(tmp_path: Path, box: tuple[int, int, int, int]) -> Sample:
    """A 40x40 image with a 0/255 mask holding one rectangle (top, left, bottom, right)."""
    image = write_image(tmp_path / "img.png", size=(40, 40))
    arr = np.zeros((40, 40), np.uint8)
    arr[box[0] : box[2], box[1] : box[3]] = 255
    mask = tmp_path / "mask.png"
    Image.fromarray(arr).save(mask)
    return Sample(image, 1, "x", mask, "g")


def test_mask_binarize_official_keeps_only_the_crops_maximum(
    tmp_path: Path, cache_dir: Path
) -> None:
    sample = _soft_mask_sample(tmp_path, (9, 9, 27, 30))  # edges fall between resized pixels
    grey = TF.pil_to_tensor(Image.open(sample.mask).resize((16, 16), Image.Resampling.BILINEAR))
    assert len(grey.unique()) > 2  # soft edges after the bilinear resize
    half = data.load_masks([sample], size=16)
    official = data.load_masks([sample], size=16, binarize="official", crop=12)
    assert torch.equal(half[0], (grey > 127).to(torch.uint8))
    peak = grey[:, 2:14, 2:14].max()  # the center 12x12 crop's maximum
    assert torch.equal(official[0], (grey == peak).to(torch.uint8))
    assert 0 < official.sum() < half.sum()  # mask / max: only pixels equal to 1 count
    # The maximum is the crop's: a band whose full-strength rows the crop cuts away still
    # leaves its soft edge row (divided by its own maximum, as the official transform does).
    band = _soft_mask_sample(tmp_path, (0, 0, 6, 40))
    grey = TF.pil_to_tensor(Image.open(band.mask).resize((16, 16), Image.Resampling.BILINEAR))
    peak = grey[:, 2:14, 2:14].max()
    assert 0 < peak < grey.max()
    official = data.load_masks([band], size=16, binarize="official", crop=12)
    assert torch.equal(official[0], (grey == peak).to(torch.uint8))
    with pytest.raises(ValueError, match="binarize"):
        data.load_masks([sample], size=16, binarize="otsu")


def test_relabel_empty_turns_a_cropped_away_defect_into_a_good_image(
    tmp_path: Path, cache_dir: Path
) -> None:
    from mmr.config import Config
    from mmr.train import prepare_eval

    sample = _soft_mask_sample(tmp_path, (0, 0, 4, 4))  # in the corner the crop removes
    task = Task("t", (), (sample,), True)
    base = {"data.resize": 20, "data.image_size": 12, "model.patch_size": 4}
    kept = prepare_eval(Config.from_dict(base), task, [sample], torch.device("cpu"))
    assert kept.labels.tolist() == [1]
    paper = Config.from_dict({**base, "data.relabel_empty": True})
    relabelled = prepare_eval(paper, task, [sample], torch.device("cpu"))
    assert relabelled.labels.tolist() == [0]
    inside = _soft_mask_sample(tmp_path, (15, 15, 25, 25))
    task = Task("t", (), (inside,), True)
    assert prepare_eval(paper, task, [inside], torch.device("cpu")).labels.tolist() == [1]


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MMR_CACHE_DIR", str(tmp_path / "env"))
    assert data.default_cache_dir("~/x") == Path.home() / "x"
    assert data.default_cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("MMR_CACHE_DIR")
    assert data.default_cache_dir(None) == Path.home() / ".cache/mmr-sweep/images"


def test_empty_lists_need_no_cache(tmp_path: Path) -> None:
    assert data.load_images([], size=8, cache_dir=tmp_path / "c").shape == (0, 3, 8, 8)
    assert data.load_masks([], size=8, cache_dir=tmp_path / "c").shape == (0, 1, 8, 8)


# ----------------------------------------------------------------------------- transforms


def _u8(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.rand(n, 3, size // 8, size // 8, generator=g)
    up = torch.nn.functional.interpolate(smooth, size=(size, size), mode="bilinear")
    return (up * 255).round().to(torch.uint8)


def test_center_crop_matches_torchvision() -> None:
    u8 = _u8(2, 40)
    out = data.center_crop(u8, image_size=32)
    ref = TF.normalize(
        TF.center_crop(u8.float() / 255, [32, 32]), data.IMAGENET_MEAN, data.IMAGENET_STD
    )
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-6)
    masks = torch.zeros(2, 1, 40, 40, dtype=torch.uint8)
    masks[:, :, 3, 3] = 1  # outside the crop (it starts at 4)
    masks[:, :, 5, 5] = 1  # inside, at (1, 1)
    cropped = data.center_crop_masks(masks, image_size=32)
    assert cropped.shape == (2, 1, 32, 32) and cropped.sum() == 2 and cropped[0, 0, 1, 1] == 1


def test_resized_crop_matches_torchvision_on_pil() -> None:
    g = torch.Generator().manual_seed(1)
    u8 = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=g)  # worst case
    # Whole image, shrink both, widen one axis, and (Pillow >= 13 runs these vertical-first)
    # a height that shrinks much more than the width.
    boxes = torch.tensor([[0, 0, 64, 64], [5, 9, 50, 41], [12, 3, 47, 60], [0, 4, 64, 40],
                          [2, 1, 62, 52]])  # fmt: skip
    flips = torch.tensor([False, True, False, True, False])
    out = transforms.resized_crop_batch(u8, boxes, flips, size=48)
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        pil = TF.to_pil_image(u8[i])
        ref = TF.resized_crop(pil, top, left, h, w, [48, 48], InterpolationMode.BICUBIC)
        if flips[i]:
            ref = TF.hflip(ref)
        # The batch mixes both pass orders; alone, a sample takes its order's path only.
        alone = transforms.resized_crop_batch(u8[i : i + 1], boxes[i : i + 1], flips[i : i + 1],
                                              size=48)  # fmt: skip
        for got in out[i], alone[0]:
            levels = (got * std + mean) * 255
            # Same filter, same 8-bit rounding between passes: off by at most one grey level.
            assert (levels - TF.pil_to_tensor(ref).float()).abs().max() < 1.01, i


def test_banded_resampling_equals_the_dense_product() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 2, 70, 70, generator=g) * 255
    # Shrinking, enlarging (crop smaller than the output), mirrored, and an output size that
    # the tiles do not divide.
    starts = torch.tensor([0.0, 3.0, 10.0, 0.0, 30.0, 5.0])
    lengths = torch.tensor([70.0, 60.0, 40.0, 70.0, 20.0, 65.0])
    reverse = torch.tensor([False, True, False, True, False, False])
    for out_size in (50, 33):
        pos, weights = transforms._taps(starts, lengths, 70, out_size, reverse=reverse)
        assert torch.allclose(weights.sum(-1), torch.ones(6, out_size))
        dense = torch.zeros(6, out_size, 70).scatter_add_(2, pos.clamp(0, 69), weights)
        plain = transforms._taps(starts, lengths, 70, out_size)
        unmirrored = torch.zeros(6, out_size, 70).scatter_add_(2, plain[0].clamp(0, 69), plain[1])
        assert torch.allclose(dense[reverse], unmirrored[reverse].flip(1))
        assert torch.allclose(dense[~reverse], unmirrored[~reverse])
        outside = torch.arange(70) < starts[:, None]  # PIL crops first: no weight outside
        assert (dense.sum(1)[outside] == 0).all()
        cols = transforms._banded(x, (pos, weights), dim=3, tile=8, tag="a")
        rows = transforms._banded(x, (pos, weights), dim=2, tile=8, tag="b")
        assert torch.allclose(cols, x @ dense.transpose(1, 2)[:, None], atol=1e-3)
        assert torch.allclose(rows, dense[:, None] @ x, atol=1e-3)


def test_sample_crops_follow_random_resized_crop_ranges() -> None:
    g = torch.Generator().manual_seed(0)
    boxes, flips = transforms.sample_crops(4000, height=256, width=256, generator=g)
    top, left, h, w = boxes.T.double()
    area = h * w / 256**2
    assert area.min() >= 0.69 and area.max() <= 1.0
    assert (w / h).min() >= 0.74 and (w / h).max() <= 1.34
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 256).all() and (left + w <= 256).all()
    assert 0.45 < flips.double().mean() < 0.55
    # torchvision rejects boxes that do not fit, which favours small ones: same statistics.
    torch.manual_seed(0)
    image = torch.zeros(1, 256, 256)
    ref = [RandomResizedCrop.get_params(image, [0.7, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
    ref_area = torch.tensor([r[2] * r[3] / 256**2 for r in ref], dtype=torch.float64)
    assert area.mean() == pytest.approx(ref_area.mean().item(), abs=0.005)
    assert area.std() == pytest.approx(ref_area.std().item(), abs=0.005)


def test_augment_batch_is_seeded_and_normalised() -> None:
    u8 = _u8(4, 64)
    a = data.augment_batch(u8, image_size=56, generator=torch.Generator().manual_seed(7))
    b = data.augment_batch(u8, image_size=56, generator=torch.Generator().manual_seed(7))
    c = data.augment_batch(u8, image_size=56, generator=torch.Generator().manual_seed(8))
    assert a.shape == (4, 3, 56, 56) and a.dtype == torch.float32 and a.device == u8.device
    assert torch.equal(a, b) and not torch.equal(a, c)  # b, c ran after a: a is its own memory
    lo = (0 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    hi = (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    assert (a.amin(dim=(0, 2, 3)) >= lo - 1e-5).all() and (
        a.amax(dim=(0, 2, 3)) <= hi + 1e-5
    ).all()


def test_train_batches_draw_an_epoch_at_once_into_reused_buffers() -> None:
    u8 = _u8(10, 64)
    gen, ref_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = [(idx, x.clone(), x.data_ptr()) for idx, x in data.train_batches(
        u8, batch_size=4, image_size=56, generator=gen
    )]  # fmt: skip
    # The epoch is one draw: permutation, then every sample's crop; a seed gives one epoch.
    order = torch.cat(data.batch_indices(10, batch_size=4, generator=ref_gen))
    boxes, flips = transforms.sample_crops(10, height=64, width=64, generator=ref_gen)
    assert torch.equal(gen.get_state(), ref_gen.get_state())
    assert [len(i) for i, _, _ in got] == [4, 4, 2]
    for b, (idx, x, _) in enumerate(got):
        # The batch holds the drawn images, each with its own drawn crop (only the order
        # inside a batch may differ: grouped by PIL's pass order).
        drawn = order[4 * b : 4 * b + 4].tolist()
        assert sorted(idx.tolist()) == sorted(drawn)
        where = [drawn.index(i) + 4 * b for i in idx.tolist()]
        ref = transforms.resized_crop_batch(u8[idx], boxes[where], flips[where], size=56)
        assert torch.equal(x, ref)
        vertical = transforms._vertical_first(boxes[where, 2] / 56, boxes[where, 3] / 56)
        assert vertical.tolist() == sorted(vertical.tolist())  # one slice per pass order
    assert got[0][2] == got[1][2]  # full batches share one buffer
    test = [x.clone() for _, x in data.train_batches(
        u8, batch_size=4, image_size=56, generator=torch.Generator(), augment=False
    )]  # fmt: skip
    assert all(torch.equal(x, data.center_crop(u8[i], image_size=56)) for i, x in zip(
        data.batch_indices(10, batch_size=4, generator=torch.Generator()), test, strict=True
    ))  # fmt: skip


def test_draw_epoch_groups_pass_orders_inside_batches() -> None:
    draw = transforms.draw_epoch(
        64, batch_size=16, image_size=56, source_size=64,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    table = draw.table
    assert sorted(table[:, 0].tolist()) == list(range(64))
    assert [(a, b) for a, b, _ in draw.batches] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    vertical = transforms._vertical_first(table[:, 3] / 56, table[:, 4] / 56)
    if transforms._PIL_ORDERS_PASSES:  # Pillow >= 13: crops this size mix both orders
        assert 0 < vertical.sum() < 64
    for start, stop, split in draw.batches:
        assert not vertical[start:split].any() and vertical[split:stop].all()


def test_augment_batch_writes_into_out_or_names_the_expected_buffer() -> None:
    u8 = _u8(3, 64)
    out = torch.full((3, 3, 56, 56), float("nan"))
    a = data.augment_batch(u8, image_size=56, generator=torch.Generator().manual_seed(1), out=out)
    b = data.augment_batch(u8, image_size=56, generator=torch.Generator().manual_seed(1))
    assert a is out and torch.equal(a, b)
    with pytest.raises(ValueError, match=r"out must be float32 \(3, 3, 56, 56\)"):
        data.augment_batch(
            u8, image_size=56, generator=torch.Generator(), out=torch.empty(3, 3, 48, 48)
        )


def test_batch_indices() -> None:
    batches = data.batch_indices(10, batch_size=4, generator=torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert torch.cat(batches).tolist() != list(range(10))
    assert [len(b) for b in data.batch_indices(10, batch_size=4, drop_last=True)] == [4, 4]
    assert torch.cat(data.batch_indices(5, batch_size=2)).tolist() == [0, 1, 2, 3, 4]
