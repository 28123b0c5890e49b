"""Bad and unusual input, caught early and named: image files, the data check, the image cache,
checkpoints and weight files, and the CLI's messages about configs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image, write_mask
from PIL import Image
from test_search import _driver_env
from test_search import cli as search_cli

from mmr import data
from mmr.checkpoint import load_checkpoint
from mmr.config import ConfigError, DataConfig, load_config
from mmr.data import list_tasks
from mmr.datacheck import check_data
from mmr.errors import DataError, UserInputError
from mmr.weights import read_state_dict

ROOT = Path(__file__).resolve().parent.parent


def mvtec(root: Path, categories: object = ("bottle",)) -> DataConfig:
    return DataConfig(dataset="mvtec", root=str(root), categories=categories)  # type: ignore[arg-type]


def cli(*args: str) -> subprocess.CompletedProcess:
    return search_cli(*args, env=_driver_env(), timeout=300)


# ----------------------------------------------------------------------------- image files


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path, cache_dir: Path) -> None:
    arr = np.full((8, 8), 40000, np.uint16)
    arr[:, :4] = 1000
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    (img,) = data.load_images([path], size=8)
    assert img.shape == (3, 8, 8)
    # 40000/65535*255 = 155.6 and 1000/65535*255 = 3.9; clipping would give 255 everywhere.
    assert set(img[0, :, 6].tolist()) == {156} and set(img[:, 3, 1].tolist()) == {4}


def test_rgba_image_drops_alpha(tmp_path: Path, cache_dir: Path) -> None:
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2], arr[..., 3] = 200, 100, 50, 0  # fully transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(arr, "RGBA").save(path)
    (img,) = data.load_images([path], size=8)
    assert img[:, 4, 4].tolist() == [200, 100, 50]


def test_grayscale_image_with_rgb_mask(tmp_path: Path, cache_dir: Path) -> None:
    root = tmp_path / "mvtec"
    cat = root / "bottle"
    for i in range(2):
        write_image(cat / "train/good" / f"{i}.png", gray=True, seed=i)
        write_image(cat / "test/good" / f"{i}.png", gray=True, seed=5 + i)
    write_image(cat / "test/crack/0.png", gray=True, seed=9)
    mask = np.zeros((16, 20, 3), np.uint8)
    mask[:8, :10] = 255  # upper-left quarter, white in all three channels
    (cat / "ground_truth/crack").mkdir(parents=True)
    Image.fromarray(mask, "RGB").save(cat / "ground_truth/crack/0_mask.png")
    (task,) = check_data(mvtec(root))
    defect = [s for s in task.test if s.label == 1]
    (m,) = data.load_masks(defect, size=8)
    expected = np.zeros((8, 8), np.uint8)
    expected[:4, :4] = 1
    assert np.array_equal(m[0].numpy(), expected)
    (img,) = data.load_images([defect[0].image], size=20)
    gray = np.asarray(Image.open(defect[0].image).resize((20, 20), Image.Resampling.BICUBIC))
    assert all(np.array_equal(img[c].numpy(), gray) for c in range(3))  # gray copied to RGB


# ----------------------------------------------------------------------------- data check


def test_data_check_names_a_truncated_png(fake_mvtec: Path, cache_dir: Path) -> None:
    bad = fake_mvtec / "bottle/test/crack/001.png"
    bad.write_bytes(bad.read_bytes()[:-200])  # the header survives, the pixels are cut
    with pytest.raises(DataError, match=r"crack/001.png.*corrupt or truncated"):
        check_data(mvtec(fake_mvtec))
    assert not list(cache_dir.glob("*.npy"))  # nothing decoded into the cache


def test_data_check_accepts_bytes_after_the_end_and_other_formats(
    fake_mvtec: Path, cache_dir: Path
) -> None:
    padded = fake_mvtec / "bottle/train/good/001.png"
    padded.write_bytes(padded.read_bytes() + b"\0" * 16)  # decodes fine: must pass
    write_image(fake_mvtec / "bottle/train/good/009.jpg")
    (task,) = check_data(mvtec(fake_mvtec))
    assert len(task.train) == 5


def test_data_check_names_a_missing_mask_and_a_mask_of_another_size(
    fake_mvtec: Path, cache_dir: Path
) -> None:
    write_mask(fake_mvtec / "bottle/ground_truth/broken/001_mask.png", size=(10, 8))
    with pytest.raises(DataError, match=r"001_mask.png is 10x8 but its image .*001.png is 20x16"):
        check_data(mvtec(fake_mvtec))
    (fake_mvtec / "bottle/ground_truth/broken/001_mask.png").unlink()
    with pytest.raises(DataError, match=r"broken/001.png has no mask"):
        check_data(mvtec(fake_mvtec))


def test_data_check_names_a_file_that_is_no_image(fake_mvtec: Path) -> None:
    (fake_mvtec / "bottle/test/good/007.png").write_text("not an image")
    with pytest.raises(DataError, match=r"test/good/007.png.*corrupt or not an image"):
        check_data(mvtec(fake_mvtec))


def test_missing_training_folder_message(fake_mvtec: Path) -> None:
    for p in (fake_mvtec / "bottle/train/good").iterdir():
        if p.is_file():
            p.unlink()
    with pytest.raises(DataError, match=r"\(the folder exists\)"):
        list_tasks(mvtec(fake_mvtec))


# ----------------------------------------------------------------------------- image cache


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.npy"))


@pytest.mark.parametrize("damage", ["garbage", "wrong shape", "empty"])
def test_damaged_cache_entry_is_rebuilt(fake_mvtec: Path, cache_dir: Path, damage: str) -> None:
    paths = [s.image for s in list_tasks(mvtec(fake_mvtec))[0].train]
    first = data.load_images(paths, size=8).clone()
    (entry,) = _entries(cache_dir)
    if damage == "garbage":
        entry.write_bytes(b"\x93NUMPY garbage" * 3)
    elif damage == "wrong shape":
        np.save(entry, np.zeros((2, 3, 8, 8), np.uint8))
    else:
        entry.write_bytes(b"")
    again = data.load_images(paths, size=8)
    assert torch.equal(again, first)
    assert np.load(entry).shape == (len(paths), 3, 8, 8)  # the entry was written again


def test_unwritable_cache_dir_is_a_clear_error(
    fake_mvtec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = [s.image for s in list_tasks(mvtec(fake_mvtec))[0].train]
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("MMR_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(DataError, match=r"cannot create the image cache directory .*CACHE_DIR"):
        data.load_images(paths, size=8)
    # A directory that exists but takes no files (even for root: /proc).
    monkeypatch.setenv("MMR_CACHE_DIR", "/proc")
    with pytest.raises(DataError, match=r"cannot write to the image cache directory /proc"):
        data.load_images(paths, size=8)


# ----------------------------------------------------------------------------- checkpoints


RANDOM = np.random.default_rng(0).bytes(4096)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (RANDOM, "is not a weights file"),
        (b"\x80\x04" + RANDOM, "is corrupt or truncated"),  # random bytes after a pickle start
        ("half", "is corrupt or truncated"),
        ("object", r"holds pickled Python objects \(.*Path"),
    ],
    ids=["empty", "random", "pickle-garbage", "truncated", "python-object"],
)
def test_bad_checkpoint_files_say_what_is_wrong(tmp_path: Path, content: object, message: str):
    path = tmp_path / "checkpoint.pt"
    if content == "half":
        torch.save({"a": torch.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif content == "object":
        torch.save({"format": "mmr-sweep/1", "where": Path("/x")}, path)
    else:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(UserInputError, match=message) as err:
        load_checkpoint(tmp_path)
    assert "weights_only" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ConfigError, match=message) as err:
        read_state_dict(path, key="model.teacher_checkpoint")
    assert "weights_only" not in str(err.value) and "model.teacher_checkpoint" in str(err.value)


def test_corrupt_model_file_through_the_cli_is_one_line(
    tmp_path: Path, synthetic_root: Path
) -> None:
    bad = tmp_path / "teacher.pth"
    bad.write_bytes(RANDOM)
    proc = cli(
        "train",
        "--config",
        "configs/tiny.yaml",
        "--set",
        f"model.teacher_checkpoint={bad}",
        "--set",
        f"data.root={synthetic_root}",
        "--set",
        "data.categories=[disk]",
        "--set",
        "data.resize=40",
        "--set",
        "data.image_size=32",
        "--out",
        str(tmp_path / "out"),
    )
    assert proc.returncode == 2, proc.stderr
    assert "is not a weights file" in proc.stderr and "weights_only" not in proc.stderr


# ----------------------------------------------------------------------------- messages


def test_one_category_as_a_plain_string_hints_the_list() -> None:
    with pytest.raises(ConfigError, match=r"data.categories .*write \[bottle\]"):
        load_config(None, ["data.categories=bottle"])


def test_a_config_of_the_other_kind_says_which_command_takes_it(tmp_path: Path) -> None:
    proc = cli("train", "--config", "configs/demo_sweep.yaml", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "is a sweep config" in proc.stderr and "launch.py sweep --config" in proc.stderr
    assert not (tmp_path / "o").exists()
    proc = cli("sweep", "--config", "configs/tiny.yaml")
    assert proc.returncode == 2
    assert "is a training config" in proc.stderr and "launch.py train --config" in proc.stderr
    assert "sweep --set base=configs/tiny.yaml" in proc.stderr
