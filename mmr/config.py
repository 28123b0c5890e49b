"""Training configuration: frozen dataclasses loaded from YAML plus ``--set`` overrides.

Every key has a default. ``Config.from_dict`` accepts nested mappings, dotted keys
(``{"model.mask_ratio": 0.5}``), short names (``lr``) or all of them, rejects unknown keys
and wrong types with the key's full dotted name in the message, and checks the training
rules (``Config.validated``). ``Config.to_dict`` dumps back losslessly. Loading, overrides
and type coercion are the shared mechanism of ``mmr.configkit``; this module holds only the
training schema and its rules.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmr import configkit
from mmr.configkit import Schema, check, load_yaml, merge, nest
from mmr.errors import ConfigError
from mmr.fileio import atomic_write

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "TrainConfig",
    "load_config",
    "parse_overrides",
    "dump_config",
    "resolve_key",
    "PATH_KEYS",
    "SHORT_KEYS",
]

DATASETS = ("mvtec", "aebad_s", "aebad_v", "folder", "synthetic")
INTERPOLATIONS = ("bicubic", "bilinear")
MASK_BINARIZE = ("half", "official")
VAL_SPLITS = ("test_half", "none")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
CATEGORY_ORDERS = ("lockstep", "sequential")
# Datasets whose categories (domains/videos) are reporting units of one task (one model).
ONE_TASK_DATASETS = ("aebad_s", "aebad_v")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mvtec"  # mvtec | aebad_s | aebad_v | folder | synthetic
    root: str = "/data/mvtec_ad"  # dataset root; relative paths resolve against the launch cwd
    categories: tuple[str, ...] | str = ("bottle",)  # names (AeBAD: domains/videos) or "all"
    resize: int = 256  # images (and masks) are resized to resize x resize first
    image_size: int = 224  # then cropped to image_size (random-resized crop at train time)
    val_split: str = "test_half"  # test_half: seeded stratified half of test; none: full test
    val_fraction: float = 0.5  # share of each test stratum that goes to validation
    augment: bool = True  # RandomResizedCrop(scale 0.7-1.0) + horizontal flip while training
    cache_dir: str | None = None  # decoded-image cache (default $MMR_CACHE_DIR or ~/.cache)
    test_interpolation: str = "bicubic"  # test-image resize: bicubic | bilinear (official)
    mask_binarize: str = "half"  # half: resized mask > 0.5 | official: == its max in the crop
    relabel_empty: bool = False  # anomalous image with an empty mask after the crop -> good
    train_resize: int | None = None  # side of the cached copy train crops are cut from (None:
    # auto, the smallest multiple of 16 at which every crop is down-sampled; see train_size)

    @property
    def train_size(self) -> int:
        """Side of the cached training images.

        With augmentation, crops (RandomResizedCrop, scale >= 0.7, aspect 3/4..4/3) are cut
        from a copy at ``train_resize``; auto picks the smallest multiple of 16 whose
        smallest crop side (sqrt(0.7 * 3/4) of it) is >= ``image_size``, so that every crop is
        down-sampled to ``image_size`` as the official crops from the original image are (320
        for 224: 300 KiB per RGB image, 3 x side^2 bytes). Without augmentation the training
        images are center-cropped from ``resize`` like the test images.
        """
        if not self.augment:
            return self.resize
        if self.train_resize is not None:
            return self.train_resize
        smallest_crop = math.sqrt(_MIN_CROP_SCALE * _MIN_CROP_RATIO)
        return 16 * math.ceil(self.image_size / smallest_crop / 16)


# The RandomResizedCrop bounds of mmr.transforms.augment_batch (the official ones).
_MIN_CROP_SCALE, _MIN_CROP_RATIO = 0.7, 3 / 4


@dataclass(frozen=True)
class ModelConfig:
    teacher: str = "wide_resnet50_2"  # timm CNN name; frozen, features_only
    teacher_layers: tuple[int, ...] = (1, 2, 3)  # the "scales": teacher stages to reconstruct
    encoder: str = "vit_base_patch16_224"  # timm ViT name for the student encoder
    encoder_depth: int | None = None  # override the number of ViT blocks (None: the model's)
    patch_size: int = 16  # ViT patch size; pretrained patch-16 weights are resampled
    mask_ratio: float = 0.4  # share of patch tokens dropped while training (0 at test)
    pretrained: bool = True  # load hub weights (False: random init, e.g. tests/offline demo)
    teacher_checkpoint: str | None = None  # local teacher weight file (torchvision/timm keys)
    encoder_checkpoint: str | None = None  # local encoder weight file (MAE or timm format)
    teacher_seed: int | None = None  # seed of a random-init teacher (pretrained: false, no
    # teacher_checkpoint): one teacher for every training seed, as one pretrained teacher is;
    # None: drawn from train.seed, so every seed also draws its own teacher


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200  # training epochs per category
    batch_size: int = 16  # images per step
    lr: float = 1.0e-3  # AdamW peak learning rate
    weight_decay: float = 0.05  # AdamW weight decay (not on biases and 1-D params)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    warmup_epochs: int = 50  # linear warm-up, set per epoch (epoch 0 runs at lr 0)
    lr_milestones: tuple[int, ...] = (120, 160)  # lr /10 once epoch + 1 reaches each (official)
    eval_every: int = 10  # epochs between validation rounds (= one report to the search)
    seed: int = 54  # seeds model init, masking, augmentation and shuffling
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    threads: int | None = None  # torch CPU threads (None: $OMP_NUM_THREADS, which Ray sets)
    checkpoint_every: int = 1  # rounds between resumable checkpoints (the last round always)
    category_order: str = "lockstep"  # lockstep: every epoch trains every task | sequential:
    # all epochs of one task, then the next (data.categories order); see Config.num_rounds


@dataclass(frozen=True)
class EvalConfig:
    blur_sigma: float = 4.0  # Gaussian blur of the anomaly map
    batch_size: int = 32  # images per evaluation forward pass
    aupro_fpr_limit: float = 0.3  # AUPRO integrates PRO over FPR in [0, limit]
    official_pro: bool = False  # also report pro_official: the paper's per-image PRO


@dataclass(frozen=True)
class Config(Schema):
    data: DataConfig = field(default_factory=DataConfig)  # dataset, split and preprocessing
    model: ModelConfig = field(default_factory=ModelConfig)  # teacher, student, masking
    train: TrainConfig = field(default_factory=TrainConfig)  # optimiser, schedule, device
    eval: EvalConfig = field(default_factory=EvalConfig)  # anomaly maps and metrics

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None = None) -> Config:
        """Builds a validated config from nested, dotted and/or short keys over the defaults."""
        return super().from_dict(nest(raw or {}, aliases=SHORT_KEYS))

    def override(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with dotted/nested ``overrides`` applied on top of this config."""
        return Config.from_dict(merge(self.to_dict(), nest(overrides, aliases=SHORT_KEYS)))

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, e.g. ``{"model.mask_ratio": 0.4, ...}``."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out

    def validated(self) -> Config:
        """The training rules, each error naming its key."""
        d, m, t, e = self.data, self.model, self.train, self.eval
        check(
            d.dataset in DATASETS, "data.dataset", f"must be one of {DATASETS}, got {d.dataset!r}"
        )
        check(d.val_split in VAL_SPLITS, "data.val_split", f"must be one of {VAL_SPLITS}")
        check(0.0 < d.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
        check(
            d.test_interpolation in INTERPOLATIONS,
            "data.test_interpolation",
            f"must be one of {INTERPOLATIONS}, got {d.test_interpolation!r}",
        )
        check(
            d.mask_binarize in MASK_BINARIZE,
            "data.mask_binarize",
            f"must be one of {MASK_BINARIZE}, got {d.mask_binarize!r}",
        )
        if isinstance(d.categories, str):
            check(
                d.categories == "all",
                "data.categories",
                f'must be a list of names or "all": write [{d.categories}] for one category',
            )
        else:
            check(len(d.categories) > 0, "data.categories", 'must not be empty (or use "all")')
        check(
            d.image_size > 0 and d.resize >= d.image_size,
            "data.resize",
            f"must be >= data.image_size ({d.image_size}) and positive",
        )
        check(
            d.train_resize is None or d.train_resize >= d.image_size,
            "data.train_resize",
            f"must be >= data.image_size ({d.image_size}), or null for auto",
        )
        check(
            0.0 <= m.mask_ratio < 1.0, "model.mask_ratio", f"must be in [0, 1), got {m.mask_ratio}"
        )
        check(
            m.patch_size > 0 and d.image_size % m.patch_size == 0,
            "model.patch_size",
            f"must divide data.image_size ({d.image_size}), got {m.patch_size}",
        )
        check(len(m.teacher_layers) > 0, "model.teacher_layers", "must name at least one stage")
        check(
            len(set(m.teacher_layers)) == len(m.teacher_layers)
            and list(m.teacher_layers) == sorted(m.teacher_layers),
            "model.teacher_layers",
            f"must be increasing without repeats, got {list(m.teacher_layers)}",
        )
        check(
            all(1 <= i <= 4 for i in m.teacher_layers),
            "model.teacher_layers",
            f"stages are timm feature levels 1..4 (ResNet layer1..layer4), got "
            f"{list(m.teacher_layers)}",
        )
        check(m.encoder_depth is None or m.encoder_depth > 0, "model.encoder_depth", "must be > 0")
        check(
            m.teacher_seed is None or 0 <= m.teacher_seed < 2**63,
            "model.teacher_seed",
            f"must be a seed in [0, 2**63) or null, got {m.teacher_seed}",
        )
        check(t.epochs > 0, "train.epochs", "must be > 0")
        check(t.batch_size > 0, "train.batch_size", "must be > 0")
        check(t.lr > 0, "train.lr", "must be > 0")
        check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        check(
            len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
            "train.betas",
            "must be two numbers in [0, 1)",
        )
        check(t.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0")
        check(
            t.warmup_epochs < t.epochs,
            f"train.warmup_epochs={t.warmup_epochs}",
            f"is not below train.epochs={t.epochs}: the learning rate would still be warming "
            f"up from 0 when training ends, and every run would score alike: set "
            f"train.warmup_epochs below {t.epochs} (e.g. train.warmup_epochs=0 for a short "
            "run) or raise train.epochs",
        )
        check(
            list(t.lr_milestones) == sorted(t.lr_milestones),
            "train.lr_milestones",
            "must be increasing",
        )
        check(
            1 <= t.eval_every <= t.epochs,
            "train.eval_every",
            f"must be in [1, train.epochs={t.epochs}]",
        )
        check(t.device in DEVICES, "train.device", f"must be one of {DEVICES}")
        check(t.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}")
        check(t.threads is None or t.threads > 0, "train.threads", "must be > 0")
        check(t.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1 round")
        check(
            t.category_order in CATEGORY_ORDERS,
            "train.category_order",
            f"must be one of {CATEGORY_ORDERS}, got {t.category_order!r}",
        )
        check(e.blur_sigma >= 0, "eval.blur_sigma", "must be >= 0")
        check(e.batch_size > 0, "eval.batch_size", "must be > 0")
        check(0 < e.aupro_fpr_limit <= 1, "eval.aupro_fpr_limit", "must be in (0, 1]")
        return self

    def resolve_paths(self, base: str | Path | None = None) -> Config:
        """A copy whose path keys are absolute (``~`` expanded, relative to ``base``/cwd).

        Trials run in their own directories, so every user path is fixed at launch.
        """
        base = Path(base) if base is not None else Path.cwd()
        updates = {}
        for key in PATH_KEYS:
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if value is not None:
                updates[key] = _absolute(value, base)
        return self.override(updates)

    @property
    def rounds_per_task(self) -> int:
        """Evaluation rounds of one task's training (its last epoch always ends with one)."""
        return -(-self.train.epochs // self.train.eval_every)

    @property
    def num_tasks(self) -> int | None:
        """Tasks (models) a run trains; None when ``data.categories`` is "all" (only a listing
        of the dataset knows)."""
        if self.data.dataset in ONE_TASK_DATASETS:
            return 1
        if isinstance(self.data.categories, str):
            return None
        return len(self.data.categories)

    @property
    def sequential(self) -> bool:
        """Whether the tasks train one after another (``train.category_order``)."""
        return self.train.category_order == "sequential"

    @property
    def num_rounds(self) -> int:
        """Evaluation rounds of a full run: one task's rounds in lockstep, the tasks' rounds
        one after another (tasks x rounds per task) in sequential order."""
        if not self.sequential:
            return self.rounds_per_task
        tasks = self.num_tasks
        if tasks is None:
            raise ConfigError(
                'train.category_order=sequential with data.categories="all": the number of '
                "rounds depends on the categories found; list them (data.categories=[a, b]) or "
                "resolve the config with mmr.train.with_listed_tasks first"
            )
        return self.rounds_per_task * tasks

    @property
    def total_epochs(self) -> int | None:
        """Epoch steps of a full run (one per epoch in lockstep, one per task and epoch in
        sequential order; None when sequential over unlisted categories)."""
        if not self.sequential:
            return self.train.epochs
        tasks = self.num_tasks
        return None if tasks is None else self.train.epochs * tasks


# Keys holding file-system paths (resolved to absolute paths at launch).
PATH_KEYS = ("data.root", "data.cache_dir", "model.teacher_checkpoint", "model.encoder_checkpoint")

# Short names a search space or --set may use for the most common keys.
SHORT_KEYS: dict[str, str] = {
    "mask_ratio": "model.mask_ratio",
    "patch_size": "model.patch_size",
    "teacher_layers": "model.teacher_layers",
    "scales": "model.teacher_layers",
    "lr": "train.lr",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "weight_decay": "train.weight_decay",
    "warmup_epochs": "train.warmup_epochs",
}


def resolve_key(key: str) -> str:
    """Maps a short or dotted key to its full dotted name; raises for unknown keys."""
    full = SHORT_KEYS.get(key, key)
    section, _, name = full.partition(".")
    if section not in _SECTION_TYPES or not name:
        raise ConfigError(
            f"unknown config key {key!r}: use a dotted key under one of "
            f"{sorted(_SECTION_TYPES)} (e.g. model.mask_ratio) or a short name from "
            f"{sorted(SHORT_KEYS)}"
        )
    names = [f.name for f in dataclasses.fields(_SECTION_TYPES[section])]
    if name not in names:
        raise ConfigError(f"unknown config key {full!r}: {section} has keys {names}")
    return full


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Loads a YAML training config (or the defaults) and applies ``KEY=VALUE`` overrides."""
    raw = {}
    if path is not None:
        raw = load_yaml(path, "config file", "check the path (see configs/ for examples)")
    overridden = nest(parse_overrides(overrides))  # keys already full: no aliases
    return Config.from_dict(merge(nest(raw, aliases=SHORT_KEYS), overridden))


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Parses ``["model.mask_ratio=0.5", ...]`` into full dotted keys and YAML values."""
    return configkit.parse_overrides(items, resolve=resolve_key)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Writes ``cfg`` as YAML (atomically: a temporary file renamed into place)."""
    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- internals

# Section name -> its dataclass, from Config's own fields.
_SECTION_TYPES: dict[str, type] = typing.get_type_hints(Config)


def _absolute(value: str, base: Path) -> str:
    if "://" in value:  # s3://, gs://: not a local path
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())
