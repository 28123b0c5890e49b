"""launch.py predict, validation thresholds and the ONNX export (tiny model, synthetic data)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import launch
from mmr.config import load_config
from mmr.errors import UserInputError
from mmr.metrics import image_auroc
from mmr.outdir import MARKER
from mmr.predict import CSV_COLUMNS, load_predictor, predict
from mmr.thresholds import NORMAL_QUANTILE, choose_thresholds, f1_threshold, normalise
from tests.conftest import write_image

ROOT = Path(__file__).resolve().parent.parent


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- thresholds


def test_f1_threshold_by_hand() -> None:
    # Scores 0.1 0.2 | 0.3 (normal) 0.4 0.5 (anomalous): thresholds at 0.4 give TP 2, FP 0:
    # F1 = 4 / (2 + 2) = 1; the threshold lies half-way between 0.4 and the next lower 0.3.
    scores = np.array([0.1, 0.5, 0.2, 0.4, 0.3])
    labels = np.array([0, 1, 0, 1, 0], bool)
    t, f1 = f1_threshold(scores, labels)
    assert f1 == 1.0
    assert t == pytest.approx(0.35)
    # An overlap: 0.3 anomalous below the normal 0.35. At 0.5: F1 = 2 / (1 + 2); at 0.3:
    # TP 2 of 3 predicted, F1 = 4 / (3 + 2) = 0.8, the best; threshold half-way to 0.1.
    t, f1 = f1_threshold(np.array([0.1, 0.3, 0.35, 0.5]), np.array([0, 1, 0, 1], bool))
    assert f1 == pytest.approx(0.8)
    assert t == pytest.approx(0.2)


def test_thresholds_without_anomalies_use_the_normal_quantile() -> None:
    rng = np.random.default_rng(0)
    normal = rng.normal(1.0, 0.1, 200)
    t = choose_thresholds(normal, np.zeros(200, int))
    assert t["image_method"] == "normal_p99"
    assert t["image"] == pytest.approx(np.quantile(normal, NORMAL_QUANTILE))
    flagged = (normal >= t["image"]).mean()
    assert 0 < flagged <= 0.02  # not "everything anomalous" (anomalib #3357)
    assert t["pixel"] == t["image"] and t["pixel_method"] == "image"


def test_normalised_score_maps_the_threshold_to_half() -> None:
    assert normalise(2.0, 2.0, 0.1) == 0.5
    values = [normalise(s, 2.0, 0.1) for s in (1.0, 1.9, 2.0, 2.1, 3.0)]
    assert values == sorted(values) and values[0] < 0.01 and values[-1] > 0.99
    assert normalise(-1e9, 0.0, 1.0) == 0.0


def test_pixel_threshold_from_masks() -> None:
    maps = np.zeros((2, 4, 4))
    maps[1, :2, :2] = 5.0
    masks = np.zeros((2, 4, 4), bool)
    masks[1, :2, :2] = True
    t = choose_thresholds(maps.reshape(2, -1).max(1), np.array([0, 1]), maps, masks)
    assert t["pixel_method"] == "f1_max" and t["pixel_f1"] == 1.0
    assert 0.0 < t["pixel"] < 5.0


# ----------------------------------------------------------------------------- a trained model


@pytest.fixture(scope="module")
def trained(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `train --out` directory of a 2-epoch tiny model on categories disk and grid."""
    from mmr.train import run_training

    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"data.root={synthetic_root}",
            "data.categories=[disk, grid]",
            "train.epochs=2",
            "train.warmup_epochs=1",  # below train.epochs (the tiny config warms up for 2)
            "train.eval_every=1",
        ],
    ).resolve_paths()
    out = tmp_path_factory.mktemp("trained")
    run_training(cfg, out)
    return out


@pytest.fixture(scope="module")
def evaluation(trained: Path) -> tuple:
    from mmr.train import evaluate_checkpoint

    return evaluate_checkpoint(trained / "model.pt", device="cpu")


def test_train_stores_thresholds(trained: Path) -> None:
    state = torch.load(trained / "model.pt", weights_only=True)
    assert set(state["thresholds"]) == {"disk", "grid"}
    for t in state["thresholds"].values():
        lo, hi = t["score_range"]
        assert lo <= t["image"] <= hi


def test_predict_equals_evaluation(trained: Path, evaluation: tuple, tmp_path: Path) -> None:
    _, metrics, outputs = evaluation
    paths = [str(s.image) for _, (data, _) in outputs.items() for s in data.samples]
    out = tmp_path / "pred"
    summary = predict(trained, paths, out, device="cpu")
    rows = {r["path"]: r for r in _rows(out)}
    assert summary.images == len(paths) and not summary.skipped
    assert list(_rows(out)[0]) == list(CSV_COLUMNS)
    for task, (data, maps) in outputs.items():
        expected = maps.flatten(1).amax(1).numpy()
        got = np.array([float(rows[str(s.image)]["score"]) for s in data.samples])
        assert [rows[str(s.image)]["category"] for s in data.samples] == [task] * len(got)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
        # The AUROC from predictions.csv is the evaluation's image AUROC.
        assert image_auroc(got, data.labels.numpy()) == metrics[task]["image_auroc"]
    assert (out / "overlays").is_dir() and len(list((out / "overlays").glob("*.png"))) == len(
        paths
    )
    assert json.loads((out / MARKER).read_text())["kind"] == "predict"


def test_predict_applies_the_stored_thresholds(trained: Path, synthetic_root: Path,
                                               tmp_path: Path) -> None:  # fmt: skip
    state = torch.load(trained / "model.pt", weights_only=True)
    out = tmp_path / "pred"
    predict(trained / "model.pt", [str(synthetic_root / "grid" / "test")], out, device="cpu",
            overlays=False, save_maps=True)  # fmt: skip
    t = state["thresholds"]["grid"]
    rows = _rows(out)
    assert {r["category"] for r in rows} == {"grid"}
    for r in rows:
        score = float(r["score"])
        assert r["anomalous"] == str(score >= t["image"])
        assert (float(r["normalised_score"]) >= 0.5) == (score >= t["image"])
    assert len(list((out / "maps").glob("*.npy"))) == len(rows)


def test_model_without_thresholds_and_threshold_override(
    trained: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    state = torch.load(trained / "model.pt", weights_only=True)
    del state["thresholds"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    images = [str(synthetic_root / "disk" / "test" / "good")]
    summary = predict(old, images, tmp_path / "a", category="disk", device="cpu", overlays=False)
    rows = _rows(tmp_path / "a")
    assert not summary.thresholds
    assert all(r["anomalous"] == "" and r["normalised_score"] == "" for r in rows)
    scores = sorted(float(r["score"]) for r in rows)
    middle = (scores[0] + scores[-1]) / 2
    predict(old, images, tmp_path / "b", category="disk", threshold=middle, device="cpu",
            overlays=False)  # fmt: skip
    flags = [r["anomalous"] == "True" for r in _rows(tmp_path / "b")]
    assert flags == [float(r["score"]) >= middle for r in _rows(tmp_path / "b")]
    assert any(flags) and not all(flags)
    with pytest.raises(UserInputError, match="--threshold 1e\\+06 lies outside"):
        predict(old, images, tmp_path / "c", category="disk", threshold=1e6, device="cpu")
    assert not (tmp_path / "c").exists()


def test_bad_images_are_skipped_and_listed(
    trained: Path, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "line"
    for i, src in enumerate(sorted((synthetic_root / "disk" / "test" / "good").glob("*.png"))[:2]):
        (folder / f"ok{i}.png").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"ok{i}.png").write_bytes(src.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_image(folder / "tiny.png", size=(20, 16))
    write_image(folder / "gray.bmp", size=(100, 90), gray=True)
    code = launch.main([
        "predict", str(trained), str(folder), "--out", str(tmp_path / "p"),
        "--category", "disk", "--device", "cpu",
    ])  # fmt: skip
    assert code == 3
    rows = {Path(r["path"]).name: r for r in _rows(tmp_path / "p")}
    assert set(rows) == {"ok0.png", "ok1.png", "broken.png", "tiny.png", "gray.bmp"}
    assert "cannot decode" in rows["broken.png"]["error"] and rows["broken.png"]["score"] == ""
    assert "smaller than the model's 64x64 input" in rows["tiny.png"]["error"]
    assert rows["gray.bmp"]["error"] == "" and float(rows["gray.bmp"]["score"]) > 0
    captured = capsys.readouterr()
    assert "2 skipped" in captured.out and "skipped " in captured.err
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert len(summary["skipped"]) == 2


def test_bad_input_is_one_clear_error(
    trained: Path, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = str(next((synthetic_root / "disk" / "test" / "good").glob("*.png")))
    cases = [
        ([str(trained), str(tmp_path / "nope.png")], "IMAGES: .*nope.png does not exist"),
        ([str(tmp_path / "no-model"), image], "MODEL .*no-model does not exist"),
        ([str(trained), str(tmp_path / "*.jpg")], "matches no image file"),
        ([str(trained), image, "--category", "bolt"], "--category 'bolt' is not in the model"),
    ]
    other = tmp_path / "other.pt"
    torch.save({"format": "mmr-sweep/0", "students": {}}, other)
    cases.append(([str(other), image], "not an mmr-sweep checkpoint"))
    # A two-category model and a path that names no category.
    loose = tmp_path / "loose.png"
    loose.write_bytes(Path(image).read_bytes())
    cases.append(([str(trained), str(loose)], "names none .*: pass --category"))
    for args, message in cases:
        code = launch.main(["predict", *args, "--out", str(tmp_path / "out"), "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, args
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert re.search(message, err[0]), (message, err[0])
    assert not (tmp_path / "out").exists()


def test_out_rules(trained: Path, synthetic_root: Path, tmp_path: Path) -> None:
    images = [str(synthetic_root / "disk" / "test" / "good")]
    out = tmp_path / "p"
    predict(trained, images, out, device="cpu", overlays=False)
    predict(trained, images, out, device="cpu", overlays=False)  # its own output: replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="notes.txt"):
        predict(trained, images, out, device="cpu", overlays=False)
    assert (out / "notes.txt").read_text() == "mine"
    other = tmp_path / "user"
    other.mkdir()
    (other / "data.csv").write_text("x")
    with pytest.raises(UserInputError, match="not written by `predict`"):
        predict(trained, images, other, device="cpu")
    assert list(p.name for p in other.iterdir()) == ["data.csv"]


# ----------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def onnx_dir(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "onnx"
    assert launch.main(["export", str(trained), "--format", "onnx", "--out", str(out)]) == 0
    return out


def test_onnx_parity_with_torch(onnx_dir: Path, trained: Path, evaluation: tuple) -> None:
    import onnx

    state = torch.load(trained / "model.pt", weights_only=True)
    _, _, outputs = evaluation
    for task, (data, maps) in outputs.items():
        path = onnx_dir / f"{task}.onnx"
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        info = json.loads(meta["mmr_sweep"])
        assert info["thresholds"] == pytest.approx(state["thresholds"][task])
        assert (info["resize"], info["image_size"]) == (72, 64)
        predictor = load_predictor(path, device="cpu")
        images = data.images.cpu().numpy()
        got = np.concatenate([predictor.maps(task, images[:5]), predictor.maps(task, images[5:])])
        assert got.shape == tuple(maps.shape)  # dynamic batch: 5 and the rest
        assert float(np.abs(got - maps.numpy()).max()) < 1e-4


def test_onnx_predict_does_not_import_the_torch_model(
    onnx_dir: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    code = (
        "import sys, launch\n"
        f"rc = launch.main(['predict', {str(onnx_dir / 'grid.onnx')!r}, "
        f"{str(synthetic_root / 'grid' / 'test')!r}, '--out', {str(tmp_path / 'p')!r}])\n"
        "assert rc == 0, rc\n"
        "bad = [m for m in ('mmr.model', 'mmr.train', 'timm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
    rows = _rows(tmp_path / "p")
    assert rows and all(r["category"] == "grid" and r["anomalous"] in ("True", "False")
                        for r in rows)  # fmt: skip


def test_onnx_model_of_another_format(tmp_path: Path, onnx_dir: Path) -> None:
    import onnx

    proto = onnx.load(str(onnx_dir / "disk.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(UserInputError, match="not an mmr-sweep ONNX model"):
        load_predictor(tmp_path / "plain.onnx", device="cpu")


# ----------------------------------------------------------------------------- export tables


def test_thresholds_in_results_and_report(tmp_path: Path) -> None:
    from mmr.report import thresholds_markdown
    from search.report_page import write_report

    t = choose_thresholds(np.array([1.0, 2.0, 3.0]), np.array([0, 0, 1]))
    text = thresholds_markdown({"disk": t})
    assert "## Thresholds" in text and "| disk | 2.5 | f1_max |" in text
    (tmp_path / "plots").mkdir()
    (tmp_path / "trials.csv").write_text("trial,state\nt1,TERMINATED\n")
    summary = {"studies": {"s": {"best_trial": "t1", "thresholds": {"disk": t}}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = write_report(tmp_path, title="x", rows={}, params=[]).read_text()
    assert "id='thresholds'" in page and "f1_max" in page
