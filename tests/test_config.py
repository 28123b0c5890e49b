"""Training config: defaults, nested/dotted/short keys, validation, YAML round trip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from mmr.config import (
    Config,
    ConfigError,
    DataConfig,
    dump_config,
    load_config,
    parse_overrides,
)

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_official_settings():
    cfg = Config()
    assert (cfg.data.resize, cfg.data.image_size) == (256, 224)
    assert cfg.model.teacher_layers == (1, 2, 3) and cfg.model.mask_ratio == 0.4
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (200, 16, 1e-3)
    assert cfg.train.betas == (0.9, 0.95) and cfg.train.weight_decay == 0.05
    assert (cfg.train.warmup_epochs, cfg.train.lr_milestones) == (50, (120, 160))
    assert cfg.train.seed == 54 and cfg.eval.blur_sigma == 4.0
    assert cfg.num_rounds == 20


def test_nested_dotted_and_short_keys_agree():
    nested = Config.from_dict({"model": {"mask_ratio": 0.5}, "train": {"lr": 2e-3}})
    dotted = Config.from_dict({"model.mask_ratio": 0.5, "train.lr": 2e-3})
    short = Config.from_dict({"mask_ratio": 0.5, "lr": 2e-3})
    assert nested == dotted == short
    assert Config.from_dict({"scales": [2, 3]}).model.teacher_layers == (2, 3)


TRAINING_CONFIGS = sorted(
    p for p in (ROOT / "configs").glob("*.yaml") if "base" not in yaml.safe_load(p.read_text())
)  # not sweep configs


def test_every_kind_of_shipped_training_config_is_there():
    assert {p.stem for p in TRAINING_CONFIGS} == {
        "mvtec",
        "aebad_s",
        "aebad_v",
        "tiny",
        "mvtec_paper",
        "aebad_s_paper",
        "aebad_v_paper",
    }


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.stem)
def test_shipped_training_configs_round_trip_through_yaml(path: Path, tmp_path: Path):
    cfg = load_config(path)
    dump_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_mvtec_config_is_the_paper_setting():
    cfg = load_config(ROOT / "configs" / "mvtec.yaml")
    assert cfg.data.categories == "all" and cfg.model.pretrained
    assert cfg.model.teacher == "wide_resnet50_2" and cfg.model.encoder == "vit_base_patch16_224"


def test_overrides_are_yaml_values_on_dotted_keys():
    cfg = load_config(
        None,
        [
            "model.mask_ratio=0.5",
            "train.lr_milestones=[10, 20]",
            "data.categories=all",
            "model.teacher_checkpoint=null",
            "train.lr=1e-3",
        ],
    )
    assert cfg.model.mask_ratio == 0.5 and cfg.train.lr_milestones == (10, 20)
    assert cfg.data.categories == "all" and cfg.model.teacher_checkpoint is None
    assert cfg.train.lr == 1e-3  # YAML 1.1 reads "1e-3" as a string; the schema fixes it


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"model.mask_rato": 0.5}, "unknown config key 'model.mask_rato'.*mask_ratio"),
        ({"modle": {"x": 1}}, "unknown config key 'modle'"),
        ({"model.mask_ratio": "high"}, "'model.mask_ratio' must be a number"),
        ({"train.epochs": 2.5}, "'train.epochs' must be an integer"),
        ({"data.augment": "yes"}, "'data.augment' must be true or false"),
        ({"model.teacher_layers": 3}, "'model.teacher_layers' must be a list"),
        ({"model.mask_ratio": 1.0}, r"model.mask_ratio must be in \[0, 1\)"),
        ({"model.patch_size": 15}, "model.patch_size must divide data.image_size"),
        ({"model.teacher_layers": [3, 1]}, "increasing"),
        ({"model.teacher_layers": [1, 5]}, "1..4"),
        ({"data.dataset": "imagenet"}, "data.dataset must be one of"),
        ({"data.categories": []}, "must not be empty"),
        ({"data.categories": "some"}, '"all"'),
        ({"data.resize": 128}, "data.resize must be >= data.image_size"),
        ({"train.eval_every": 500}, "train.eval_every"),
        ({"train.device": "tpu"}, "train.device"),
        ({"data.test_interpolation": "nearest"}, "data.test_interpolation must be one of"),
        ({"data.mask_binarize": "otsu"}, "data.mask_binarize must be one of"),
        ({"eval.official_pro": "yes"}, "'eval.official_pro' must be true or false"),
        ({"data.train_resize": 200}, r"data.train_resize must be >= data.image_size \(224\)"),
        ({"model.teacher_seed": -1}, r"model.teacher_seed must be a seed in \[0, 2\*\*63\)"),
        ({"model.teacher_seed": 1.5}, "'model.teacher_seed': 1.5 does not fit int"),
    ],
)
def test_bad_keys_and_values_name_the_key(raw: dict, match: str):
    with pytest.raises(ConfigError, match=match):
        Config.from_dict(raw)


def test_bad_override_syntax_and_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["model.mask_ratio"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_relative_paths_are_resolved_at_launch(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = Config.from_dict(
        {
            "data.root": "data/mvtec",
            "model.encoder_checkpoint": "~/w.pth",
            "data.cache_dir": "/abs/cache",
        }
    ).resolve_paths()
    assert cfg.data.root == str(tmp_path / "data" / "mvtec")
    assert cfg.model.encoder_checkpoint == str(Path.home() / "w.pth")
    assert cfg.data.cache_dir == "/abs/cache" and cfg.model.teacher_checkpoint is None


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().model.mask_ratio = 0.9  # type: ignore[misc]


@pytest.mark.parametrize("image_size", [32, 64, 96, 224, 384])
def test_auto_train_size_down_samples_every_crop(image_size: int):
    d = Config.from_dict(
        {"data.image_size": image_size, "data.resize": image_size, "model.patch_size": 8}
    ).data
    side = d.train_size
    assert side % 16 == 0
    # the smallest RandomResizedCrop box (area 0.7, aspect 3/4) still has >= image_size rows,
    # and 16 px less would not
    assert math.sqrt(0.7 * 3 / 4) * side >= image_size
    assert math.sqrt(0.7 * 3 / 4) * (side - 16) < image_size


def test_train_size_explicit_and_without_augmentation():
    assert DataConfig().train_size == 320  # 224-px crops: 300 KiB per cached image
    assert DataConfig(train_resize=512).train_size == 512
    assert DataConfig(train_resize=512, augment=False).train_size == 256  # center crops


def test_readme_counts_the_rounds_of_sequential_categories_as_the_config_does():
    import re

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    para = text[text.index("**Categories as a fidelity**") :].split("\n- ")[0]
    assert "`train.category_order: sequential`, default `lockstep`" in para
    cats, epochs, every, rounds = map(
        int,
        re.search(
            r"\((\d+)\s+categories, (\d+) epochs, `train.eval_every=(\d+)`: (\d+) rounds\)",
            " ".join(para.split()),
        ).groups(),
    )
    cfg = Config.from_dict(
        {
            "data.categories": [f"c{i}" for i in range(cats)],
            "train.epochs": epochs,
            "train.eval_every": every,
            "train.warmup_epochs": 0,
            "train.category_order": "sequential",
        }
    )
    assert cfg.num_rounds == rounds
    assert Config().train.category_order == "lockstep"


def test_the_readme_quickstart_describes_the_demo_sweep_config():
    from search.resolve import resolve_sweep

    root = Path(__file__).resolve().parent.parent
    text = " ".join((root / "README.md").read_text().split())
    start = text.index("The demo runs offline")
    quick = text[start : text.index("## What it does", start)]
    spec = resolve_sweep(None)
    s = spec.sweep.search
    # "GP ... without early stopping"
    assert (s.sampler, spec.sweep.scheduler.type) == ("gp", "fifo")
    assert f"{s.num_trials} trials of Optuna's GP sampler without early stopping" in quick
    assert "two at a time" in quick and s.max_concurrent == 2
    assert f"train again with {s.confirm.seeds} fresh seeds" in quick and s.confirm.top_k == 1
    confirm_trials = (s.confirm.top_k + 1) * s.confirm.seeds
    assert f"its {confirm_trials} confirmation trials" in quick
    assert list(spec.base.data.categories) == ["nut"] and "on the `nut` category" in quick
