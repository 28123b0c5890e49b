"""The trainer: schedule, determinism, exact resume, divergence, outputs of `launch.py train`."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmr.checkpoint import load_checkpoint, model_file
from mmr.config import Config, load_config
from mmr.errors import ConfigError
from mmr.train import (
    TrainingDiverged,
    fit,
    load_models,
    lr_at,
    run_training,
)

ROOT = Path(__file__).resolve().parent.parent


def tiny(root: Path, **overrides: object) -> Config:
    """The shipped tiny config shrunk further (32 px) on the session's synthetic set."""
    base = {
        "data.root": str(root),
        "data.categories": ["disk"],
        "data.resize": 40,
        "data.image_size": 32,
        "model.encoder_depth": 2,
        "train.epochs": 4,
        "train.eval_every": 2,
        "train.warmup_epochs": 1,
        "train.lr_milestones": [3],
        "train.batch_size": 4,
        "train.threads": 1,
        "eval.blur_sigma": 0.5,
    }
    base.update(overrides)
    return load_config(ROOT / "configs" / "tiny.yaml").override(base)


def test_lr_schedule_warms_up_per_epoch_then_steps_down():
    cfg = Config.from_dict(
        {"train": {"lr": 1e-3, "warmup_epochs": 50, "lr_milestones": [120, 160], "epochs": 200}}
    )
    assert lr_at(0, cfg) == 0.0  # epoch 0 runs at lr 0, as the official schedule
    assert lr_at(25, cfg) == pytest.approx(5e-4)
    assert lr_at(50, cfg) == pytest.approx(1e-3)
    # The official code divides by 10 when epoch + 1 reaches 120 and 160 (0-based 119, 159).
    assert lr_at(118, cfg) == pytest.approx(1e-3)
    assert lr_at(119, cfg) == pytest.approx(1e-4)
    assert lr_at(158, cfg) == pytest.approx(1e-4)
    assert lr_at(159, cfg) == pytest.approx(1e-5)
    assert lr_at(199, cfg) == pytest.approx(1e-5)


def test_lr_milestone_inside_the_warm_up_is_never_applied():
    # Official: the step is taken in the post-warm-up branch only, so milestone 10 with a
    # 50-epoch warm-up never divides the rate.
    cfg = Config.from_dict(
        {"train": {"lr": 1e-3, "warmup_epochs": 50, "lr_milestones": [10, 60], "epochs": 100}}
    )
    assert lr_at(9, cfg) == pytest.approx(1e-3 * 9 / 50)
    assert lr_at(50, cfg) == pytest.approx(1e-3)
    assert lr_at(59, cfg) == pytest.approx(1e-4)


def test_fit_reports_every_round_and_is_deterministic(synthetic_root: Path):
    cfg = tiny(synthetic_root)
    rounds: list[tuple[int, dict]] = []
    first = fit(cfg, report=lambda r, m: rounds.append((r, m)))
    assert [r for r, _ in rounds] == [1, 2]
    metrics = rounds[-1][1]
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_f1", "disk/image_auroc", "epoch"):
        assert key in metrics, key
    assert metrics["epoch"] == 4
    assert set(first["test"]) == {"disk"} and set(first["val"]) == {"disk"}
    second = fit(cfg)
    assert first["history"] == second["history"]  # same seed -> same metrics on CPU
    assert first["test"] == second["test"]


def test_restart_from_round_checkpoint_continues_exactly(synthetic_root: Path, tmp_path: Path):
    cfg = tiny(synthetic_root, **{"train.epochs": 6})
    full = fit(cfg, final_test=False)

    class Stop(Exception):
        pass

    def stop_after_first(round_: int, metrics: dict) -> None:
        if round_ == 1:
            raise Stop  # the trial is killed right after round 1 was checkpointed

    with pytest.raises(Stop):
        fit(cfg, report=stop_after_first, checkpoint_dir=tmp_path, final_test=False)
    assert load_checkpoint(tmp_path)["round"] == 1
    resumed = fit(cfg, resume_from=tmp_path, final_test=False)
    assert resumed["history"] == full["history"]


def test_a_restored_trial_owns_its_optimiser_state_when_the_file_is_written_over(
    synthetic_root: Path, tmp_path: Path, monkeypatch
):
    """The checkpoint is memory-mapped: once restored, training must not read the file."""
    import mmr.train as train

    cfg = tiny(synthetic_root, **{"train.epochs": 6})
    full = fit(cfg, final_test=False)

    def stop_after_first(round_: int, metrics: dict) -> None:
        if round_ == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, report=stop_after_first, checkpoint_dir=tmp_path, final_test=False)
    path = tmp_path / "checkpoint.pt"
    restore = train.restore_training

    def restore_then_write_over(*args, **kwargs):
        epoch = restore(*args, **kwargs)
        with path.open("r+b") as f:  # in place, as a copy onto an existing file writes
            f.write(b"\xff" * path.stat().st_size)
        return epoch

    monkeypatch.setattr(train, "restore_training", restore_then_write_over)
    resumed = fit(cfg, resume_from=tmp_path, final_test=False)
    assert resumed["history"] == full["history"]


def test_checkpoints_every_k_rounds_and_the_last_without_optimiser_state(
    synthetic_root: Path, tmp_path: Path
):
    cfg = tiny(synthetic_root, **{"train.epochs": 6, "train.checkpoint_every": 2})
    on_disk: list[int | None] = []

    def report(round_: int, metrics: dict) -> None:
        path = tmp_path / "checkpoint.pt"
        on_disk.append(load_checkpoint(path)["round"] if path.exists() else None)

    fit(cfg, report=report, checkpoint_dir=tmp_path, final_test=False)
    assert on_disk == [None, 2, 3]  # rounds 2 and 3 (the last) wrote one, before the report
    last = load_checkpoint(tmp_path)
    assert "optimizers" not in last and last["epoch"] == 6  # nothing resumes a finished run
    assert fit(cfg, resume_from=tmp_path, final_test=False)["history"] == last["history"]
    with pytest.raises(ValueError, match="no optimiser state.*train.epochs=8"):
        fit(cfg.override({"train.epochs": 8}), resume_from=tmp_path, final_test=False)


def test_checkpoint_is_memory_mapped_and_evaluated_from_one_load(
    synthetic_root: Path, tmp_path: Path, monkeypatch
):
    from mmr.train import evaluate_checkpoint

    cfg = tiny(synthetic_root, **{"train.epochs": 2})
    fit(cfg, checkpoint_dir=tmp_path, final_test=False)
    mmaps: list[bool | None] = []
    load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: mmaps.append(k.get("mmap")) or load(*a, **k)
    )
    state = load_checkpoint(tmp_path)
    _, metrics, _ = evaluate_checkpoint(state, split="val", device="cpu")  # export's path
    assert mmaps == [True] and set(metrics) == {"disk"}
    legacy = tmp_path / "legacy.pt"  # torch's old format cannot be mapped: still loads
    torch.save(model_file(state), legacy, _use_new_zipfile_serialization=False)
    assert set(load_checkpoint(legacy)["students"]) == {"disk"}


def test_resume_refuses_a_checkpoint_of_another_model(synthetic_root: Path, tmp_path: Path):
    cfg = tiny(synthetic_root, **{"train.epochs": 2})
    fit(cfg, checkpoint_dir=tmp_path, final_test=False)
    other = cfg.override({"model.mask_ratio": 0.6})
    with pytest.raises(ValueError, match="different model config"):
        fit(other, resume_from=tmp_path)


def test_nan_loss_fails_the_round_naming_the_epoch(
    synthetic_root: Path, tmp_path: Path, monkeypatch
):
    from mmr import model as model_module

    loss_fn = model_module.cosine_loss
    monkeypatch.setattr(model_module, "cosine_loss", lambda t, s: loss_fn(t, s) * math.nan)
    reports: list[int] = []
    # The loss is read once per round: the first round fails, naming the first bad epoch,
    # before anything of it is reported or checkpointed.
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 0 .*lower train.lr"):
        fit(tiny(synthetic_root), report=lambda r, m: reports.append(r), checkpoint_dir=tmp_path)
    assert reports == [] and not (tmp_path / "checkpoint.pt").exists()


def test_out_of_memory_names_the_settings_to_lower(synthetic_root: Path, monkeypatch):
    from mmr import model as model_module

    def oom(t, s):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model_module, "cosine_loss", oom)
    with pytest.raises(torch.OutOfMemoryError, match=r"train.batch_size=4.*lower train.batch_s"
                       r"ize.*resources.gpu.*Tried to allocate 2.00 GiB"):  # fmt: skip
        fit(tiny(synthetic_root))


def test_model_math_is_tf32_while_augmentation_and_blur_stay_exact(
    synthetic_root: Path, monkeypatch
):
    from mmr import device, transforms
    from mmr import model as model_module

    seen: dict[str, tuple[str, str]] = {}
    loss_fn, two_passes = model_module.cosine_loss, transforms._two_passes

    def spy_loss(t, s):
        seen.setdefault("forward", device.fp32_precision())
        s[0].register_hook(lambda g: seen.setdefault("backward", device.fp32_precision()) and g)
        return loss_fn(t, s)

    def spy_passes(*args, **kwargs):
        seen.setdefault("augment", device.fp32_precision())
        return two_passes(*args, **kwargs)

    monkeypatch.setattr(model_module, "cosine_loss", spy_loss)
    monkeypatch.setattr(transforms, "_two_passes", spy_passes)
    before = device.fp32_precision()
    one_epoch = {"train.epochs": 1, "train.eval_every": 1, "train.warmup_epochs": 0}
    fit(tiny(synthetic_root, **one_epoch), final_test=False)
    assert seen == {
        "forward": ("tf32", "tf32"),
        "backward": ("tf32", "tf32"),
        "augment": ("ieee", "ieee"),
    }
    assert device.fp32_precision() == before  # restored after each step
    conv = torch.nn.functional.conv2d

    def spy_conv(*args, **kwargs):
        seen["blur"] = device.fp32_precision()
        return conv(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy_conv)
    with device.fp32_math("tf32"):  # even where the caller allowed TF32
        model_module.gaussian_blur(torch.rand(1, 16, 16), 1.0)
    assert seen["blur"] == ("ieee", "ieee")


def test_run_training_writes_outputs_and_model_file_round_trips(
    synthetic_root: Path, tmp_path: Path
):
    cfg = tiny(synthetic_root)
    run_training(cfg, tmp_path, label="tiny")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["test"]["units"]["disk"]) == {
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "pixel_f1",
    }
    assert "Image AUROC" in (tmp_path / "results.md").read_text()
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "optimizers" not in state and set(state["students"]) == {"disk"}
    loaded_cfg, models = load_models(tmp_path / "model.pt")
    assert loaded_cfg.model.mask_ratio == cfg.model.mask_ratio
    # The loaded model reproduces the reported test metrics.
    from mmr.train import evaluate_checkpoint

    _, again, _ = evaluate_checkpoint(tmp_path / "model.pt", device="cpu")
    assert again["disk"] == pytest.approx(metrics["test"]["units"]["disk"])


def test_train_cli_bad_key_fails_before_any_work(tmp_path: Path):
    proc = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "train",
            "--config",
            "configs/tiny.yaml",
            "--set",
            "model.mask_rato=0.5",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "model.mask_rato" in proc.stderr and "mask_ratio" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_train_cli_end_to_end(synthetic_root: Path, tmp_path: Path, cache_dir: Path):
    # cache_dir: an empty image cache of its own (the run inherits $MMR_CACHE_DIR), so the
    # images are decoded here whichever tests ran before.
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "train",
            "--config",
            "configs/tiny.yaml",
            "--set",
            f"data.root={synthetic_root}",
            "--set",
            "data.categories=[disk,grid]",
            "--set",
            "data.resize=40",
            "--set",
            "data.image_size=32",
            "--set",
            "train.epochs=2",
            "--set",
            "train.warmup_epochs=1",
            "--set",
            "train.eval_every=1",
            "--set",
            "train.batch_size=4",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "results.md", "model.pt"}
    results = (out / "results.md").read_text()
    assert "| Image AUROC | Avg | disk | grid |" in results
    assert "test (held-out half)" in proc.stdout
    # Progress: decoding and the final test evaluation show; log lines start their own line
    # instead of being appended to a progress bar's.
    assert "decode images" in proc.stderr
    assert "evaluating the held-out test half" in proc.stderr
    assert re.search(r"[^\r\n]INFO ", proc.stderr) is None, proc.stderr[-2000:]


def test_device_cuda_without_gpu_is_a_config_error(synthetic_root: Path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match="train.device"):
        fit(tiny(synthetic_root, **{"train.device": "cuda"}))


def test_mmr_imports_neither_ray_nor_optuna():
    code = (
        "import sys, mmr.train, mmr.data, mmr.model, mmr.metrics, mmr.config, "
        "mmr.visualize, mmr.report, mmr.weights; "
        "print(sorted(m for m in ('ray', 'optuna') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def nut_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's object category at training size, with enough test images for a stable AUROC."""
    from mmr import synth

    return synth.generate(tmp_path_factory.mktemp("nut") / "data", categories=["nut"], size=72)


def test_short_training_lowers_the_loss_and_detects_anomalies(nut_root: Path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml").override(
        {"data.root": str(nut_root), "model.teacher_layers": [2, 3], "train.threads": 2}
    )
    epochs: list[float] = []
    result = fit(cfg, on_epoch=lambda e, s: epochs.append(s["loss"]), final_test=False)
    assert epochs[-1] < 0.5 * epochs[1]  # epoch 0 runs at lr 0 (warm-up)
    auroc = [h["image_auroc"] for h in result["history"]]
    assert auroc[-1] >= 0.65, auroc  # measured 0.72 here; chance is 0.5


def test_results_tables_show_pro_official_only_when_reported():
    from mmr.report import flatten_metrics, results_markdown

    plain = {"disk": {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7, "pixel_f1": 0.5}}
    paper = {"disk": {**plain["disk"], "pro_official": 0.654}}
    assert "PRO (official)" not in results_markdown({"a": plain}, title="t")
    table = results_markdown({"a": paper}, title="t")
    assert "| PRO (official) | Avg | disk |" in table and "| a | 65.4 | 65.4 |" in table
    assert flatten_metrics(paper)["pro_official"] == 0.654


PAPER_CONFIGS = ("mvtec_paper", "aebad_s_paper", "aebad_v_paper")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_select_the_paper_protocol(name: str):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    d = cfg.data
    assert (d.val_split, cfg.train.precision, d.test_interpolation) == ("none", "fp32", "bilinear")
    assert cfg.train.lr_milestones == (120, 160) and cfg.train.epochs == 200
    if name != "aebad_v_paper":  # AeBAD-V has no masks
        assert (d.mask_binarize, d.relabel_empty, cfg.eval.official_pro) == (
            "official",
            True,
            True,
        )


def test_mvtec_paper_config_trains_end_to_end_on_the_synthetic_set(
    synthetic_root: Path, tmp_path: Path, cache_dir: Path
):
    # The shipped paper config, made tiny with --set style overrides only.
    cfg = load_config(
        ROOT / "configs" / "mvtec_paper.yaml",
        [
            "data.dataset=synthetic",
            f"data.root={synthetic_root}",
            "data.categories=[disk]",
            "data.resize=40",
            "data.image_size=32",
            "data.train_resize=56",
            "model.teacher=resnet18",
            "model.encoder=vit_tiny_patch16_224",
            "model.encoder_depth=2",
            "model.patch_size=8",
            "model.pretrained=false",
            "train.epochs=2",
            "train.eval_every=1",
            "train.warmup_epochs=1",
            "train.lr_milestones=[2]",
            "train.batch_size=4",
            "train.threads=1",
            "eval.blur_sigma=0.5",
        ],
    )
    run_training(cfg, tmp_path, label="paper")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    units = metrics["test"]["units"]["disk"]
    assert set(units) == {"image_auroc", "pixel_auroc", "aupro", "pixel_f1", "pro_official"}
    assert 0.0 <= units["pro_official"] <= 1.0
    assert units == metrics["val"]["units"]["disk"]  # val_split none: the full test set
    assert "| PRO (official) | Avg | disk |" in (tmp_path / "results.md").read_text()
    # training crops came from the train_resize copy, test images from the bilinear resize
    assert len(list(cache_dir.glob("rgb-56px-*.npy"))) == 1
    assert len(list(cache_dir.glob("rgb-bilinear-40px-*.npy"))) == 1


def test_readme_lists_exactly_what_the_paper_configs_change():
    import yaml

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Paper protocol") :]
    block = section[section.index("```yaml") + len("```yaml") : section.index("```\n")]
    documented = Config.from_dict(yaml.safe_load(block)).flat()
    defaults = Config().flat()
    documented = {k for k, v in documented.items() if v != defaults[k]}
    for search, paper in (("mvtec", "mvtec_paper"), ("aebad_s", "aebad_s_paper")):
        a = load_config(ROOT / "configs" / f"{search}.yaml").flat()
        b = load_config(ROOT / "configs" / f"{paper}.yaml").flat()
        assert {k for k in a if a[k] != b[k]} == documented, paper


def test_final_round_reports_latency_and_trained_parameters(synthetic_root: Path):
    from mmr.speed import params_m

    cfg = tiny(synthetic_root, **{"eval.batch_size": 3})
    rounds: list[dict] = []
    result = fit(cfg, report=lambda r, m: rounds.append(m), final_test=False)
    assert "latency_ms" not in rounds[0]  # measured once, with the final round
    final = rounds[-1]
    assert final["latency_ms"] > 0 and final["latency_batch_ms"] > 0
    assert math.isfinite(final["latency_ms"])
    model = result["models"]["disk"]
    assert final["params_m"] == pytest.approx(params_m(model))
    # The student only: the frozen teacher is not trained.
    student = sum(p.numel() for p in model.student.parameters())
    assert final["params_m"] == pytest.approx(student / 1e6) and student > 0
    assert "latency_ms" not in result["history"][-1]  # the history stays machine-independent


def test_latency_is_the_median_per_image_of_timed_calls(monkeypatch):
    from types import SimpleNamespace

    from mmr import speed

    class Model(torch.nn.Module):
        image_size = 8

        def __init__(self) -> None:
            super().__init__()
            self.student = torch.nn.Linear(2, 2)
            self.calls = 0

        def anomaly_map(self, images, *, blur_sigma):
            self.calls += 1
            return images[:, 0]

    clock = iter([0.0, 9.0, 10.0, 10.5, 20.0, 20.2, 30.0, 30.3, 40.0, 40.1, 50.0, 50.4, 60, 61])
    # Only mmr.speed's clock (the real time module's is read by others too).
    monkeypatch.setattr(speed, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    model = Model()
    # Calls take 9 s (warm-up), 0.5 s, 0.2, 0.3, 0.1, 0.4, 1.0: the warm-up is dropped and
    # the median of the six timed calls is 0.35 s, for a batch of 4: 87.5 ms per image.
    ms = speed.latency_ms(model, batch_size=4, blur_sigma=0.0, warmup=1, repeats=6)
    assert model.calls == 7
    assert ms == pytest.approx((0.3 + 0.4) / 2 / 4 * 1000)
    # By default: 2 warm-up calls, then the median of 5 timed ones.
    clock = iter([0.0, 5.0, 6.0, 7.0, 10.0, 10.1, 20.0, 20.5, 30.0, 30.2, 40.0, 40.4, 50, 50.3])
    model.calls = 0
    assert speed.latency_ms(model, batch_size=1, blur_sigma=0.0) == pytest.approx(300.0)
    assert model.calls == 7


def test_an_epoch_leaves_no_gradients_held():
    """A lockstep trial trains its categories one after another: none may keep gradients."""
    from mmr.train import build_models, make_optimizer, train_epoch

    cfg = tiny(ROOT).override({"train.device": "cpu", "model.pretrained": False})
    model = build_models(cfg, ["disk"], torch.device("cpu"))["disk"]
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    before = [p.detach().clone() for p in model.student.parameters()]
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    loss = train_epoch(model, opt, images, torch.Generator().manual_seed(0), cfg)
    assert torch.isfinite(loss)
    after = list(model.student.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, after, strict=True))
    assert all(p.grad is None for p in model.student.parameters())


# ----------------------------------------------------------------------------- category order


def test_sequential_order_trains_the_same_models_as_lockstep(synthetic_root: Path):
    """Each task has its own model, optimiser, generator and masking stream, so training the
    tasks one after another gives the lockstep models exactly; the reports carry only the
    tasks started so far, over tasks x rounds global rounds."""
    cfg = tiny(synthetic_root, **{"data.categories": ["disk", "grid"]})
    lockstep = fit(cfg)
    seq_cfg = cfg.override({"train.category_order": "sequential"})
    assert (cfg.num_rounds, seq_cfg.num_rounds) == (2, 4)
    reports: list[tuple[int, dict]] = []
    sequential = fit(seq_cfg, report=lambda r, m: reports.append((r, m)))
    for name, model in lockstep["models"].items():
        ours = sequential["models"][name].student.state_dict()
        for key, value in model.student.state_dict().items():
            assert torch.equal(value, ours[key]), (name, key)
    assert sequential["val"] == lockstep["val"] and sequential["test"] == lockstep["test"]
    assert [r for r, _ in reports] == [1, 2, 3, 4]
    units = [sorted({k.split("/")[0] for k in m if "/" in k}) for _, m in reports]
    assert units == [["disk"], ["disk"], ["disk", "grid"], ["disk", "grid"]]
    assert [m["epoch"] for _, m in reports] == [2, 4, 2, 4]  # the task's own epoch
    assert [m["tasks_started"] for _, m in reports] == [1, 1, 2, 2]
    # Until grid starts the mean is disk's; then over both (disk keeps its last value).
    assert reports[1][1]["image_auroc"] == lockstep["history"][-1]["disk/image_auroc"]
    assert reports[2][1]["disk/image_auroc"] == reports[1][1]["disk/image_auroc"]
    assert reports[-1][1]["image_auroc"] == lockstep["history"][-1]["image_auroc"]
    assert "latency_ms" in reports[-1][1] and "latency_ms" not in reports[1][1]


@pytest.mark.parametrize("killed_after", [1, 3])  # inside the first task, inside the second
def test_sequential_restart_mid_task_continues_exactly(
    synthetic_root: Path, tmp_path: Path, killed_after: int
):
    cfg = tiny(
        synthetic_root,
        **{
            "data.categories": ["disk", "grid"],
            "train.category_order": "sequential",
            "train.epochs": 4,
            "train.eval_every": 2,
        },
    )
    full = fit(cfg, final_test=False)

    class Stop(Exception):
        pass

    def stop(round_: int, metrics: dict) -> None:
        if round_ == killed_after:
            raise Stop

    with pytest.raises(Stop):
        fit(cfg, report=stop, checkpoint_dir=tmp_path, final_test=False)
    saved = load_checkpoint(tmp_path)
    assert saved["round"] == killed_after and saved["epoch"] == 2 * killed_after
    resumed = fit(cfg, resume_from=tmp_path, final_test=False)
    assert resumed["history"] == full["history"]
    for name, model in full["models"].items():
        ours = resumed["models"][name].student.state_dict()
        assert all(torch.equal(v, ours[k]) for k, v in model.student.state_dict().items())
    with pytest.raises(ValueError, match="category_order=sequential"):
        fit(cfg.override({"train.category_order": "lockstep"}), resume_from=tmp_path)


def test_category_order_is_checked_and_all_categories_are_listed(synthetic_root: Path):
    from mmr.data import list_tasks
    from mmr.train import with_listed_tasks

    with pytest.raises(ConfigError, match="train.category_order.*lockstep"):
        tiny(synthetic_root, **{"train.category_order": "one_by_one"})
    cfg = tiny(synthetic_root, **{"data.categories": "all", "train.category_order": "sequential"})
    with pytest.raises(ConfigError, match="list them"):
        cfg.num_rounds  # noqa: B018
    listed = with_listed_tasks(cfg, list_tasks(cfg.data))
    assert listed.data.categories == ("disk", "grid") and listed.num_rounds == 4
    assert cfg.override({"train.category_order": "lockstep"}).num_rounds == 2
