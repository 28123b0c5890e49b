"""Search spaces: YAML -> Optuna define-by-run, validation against the config schema."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from mmr.config import Config
from spaces import SPACES_DIR, SpaceError, load_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample(space, n: int = 30, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.define(trial))
        study.tell(trial, 0.0)
    return out


def test_paper_space_samples_config_values_with_list_choices():
    space = load_space(SPACES_DIR / "paper.yaml")
    assert space.keys == [
        "model.mask_ratio",
        "model.patch_size",
        "model.teacher_layers",
        "train.lr",
    ]
    draws = sample(space)
    base = Config()
    for d in draws:
        assert 0.1 <= d["model.mask_ratio"] <= 0.8
        assert d["model.patch_size"] in (8, 16, 32)
        assert d["model.teacher_layers"] in ((1, 2, 3), (2, 3), (1, 2, 3, 4))
        assert 1e-4 <= d["train.lr"] <= 1e-2
        base.override(d)  # every draw is a valid training config
    assert len({d["model.teacher_layers"] for d in draws}) == 3


def test_shipped_spaces_validate_against_their_base_configs():
    root = SPACES_DIR.parent
    load_space(SPACES_DIR / "paper.yaml").validate(Config())
    from mmr.config import load_config

    tiny = load_config(root / "configs" / "tiny.yaml")
    demo = load_space(SPACES_DIR / "demo.yaml")
    demo.validate(tiny)
    assert tiny.override(demo.to_overrides(demo.baseline(tiny))) == tiny


def test_baseline_params_reproduce_the_base_config_when_enqueued():
    space = load_space(SPACES_DIR / "paper.yaml")
    base = Config()
    study = optuna.create_study()
    study.enqueue_trial(space.baseline(base))
    trial = study.ask()
    assert base.override(space.define(trial)) == base


def test_conditional_branches_get_distinct_optuna_names():
    space = load_space(
        {
            "patch_size": {"type": "categorical", "choices": [8, 16]},
            "warmup_epochs": [
                {"type": "int", "low": 0, "high": 4, "when": {"patch_size": 8}},
                {"type": "int", "low": 10, "high": 20, "when": {"patch_size": 16}},
            ],
        }
    )
    names = [p.name for p in space.params]
    assert len(set(names)) == 3
    for d in sample(space, 40):
        if d["model.patch_size"] == 8:
            assert 0 <= d["train.warmup_epochs"] <= 4
        else:
            assert 10 <= d["train.warmup_epochs"] <= 20


def test_int_log_step_and_fixed_types():
    space = load_space(
        {
            "epochs": {"type": "int", "low": 10, "high": 50, "step": 10},
            "train.batch_size": {"type": "int", "low": 4, "high": 64, "log": True},
            "eval.blur_sigma": {"type": "fixed", "value": 2.0},
        }
    )
    for d in sample(space):
        assert d["train.epochs"] in (10, 20, 30, 40, 50)
        assert 4 <= d["train.batch_size"] <= 64
        assert d["eval.blur_sigma"] == 2.0
    grid = load_space(
        {
            "epochs": {"type": "int", "low": 10, "high": 50, "step": 10},
            "patch_size": {"type": "categorical", "choices": [8, 16]},
        }
    ).grid()
    assert grid == {"train.epochs": [10, 20, 30, 40, 50], "model.patch_size": [8, 16]}


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"mask_rato": {"type": "float", "low": 0.1, "high": 0.5}}, "unknown config key"),
        ({"patch_size": {"type": "categorical", "choices": []}}, "non-empty `choices`"),
        ({"mask_ratio": {"type": "float", "low": 0.8, "high": 0.1}}, r"low \(0.8\) > high"),
        ({"lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, "log scale needs low"),
        ({"lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, "type must be one of"),
        ({"lr": {"type": "float", "low": 0.1, "high": 0.2, "lo": 1}}, "unknown field"),
        ({"lr": [{"type": "float", "low": 0.1, "high": 0.2}]}, "every branch"),
        (
            {"lr": {"type": "float", "low": 0.1, "high": 0.2, "when": {"patch_size": 8}}},
            "defined earlier",
        ),
        ({}, "empty"),
    ],
)
def test_malformed_spaces_are_rejected_with_the_key(spec, match):
    with pytest.raises(SpaceError, match=match):
        load_space(spec)


def test_values_the_config_rejects_fail_validation_before_any_trial():
    space = load_space({"patch_size": {"type": "categorical", "choices": [8, 16, 24]}})
    with pytest.raises(SpaceError, match="patch_size=24.*must divide"):
        space.validate(Config())
    space = load_space({"mask_ratio": {"type": "float", "low": 0.1, "high": 1.0}})
    with pytest.raises(SpaceError, match="mask_ratio=1.0"):
        space.validate(Config())


def test_base_config_outside_the_space_is_an_error():
    space = load_space({"lr": {"type": "float", "low": 1e-2, "high": 1e-1}})
    with pytest.raises(SpaceError, match="outside"):
        space.baseline(Config())
    space = load_space({"patch_size": {"type": "categorical", "choices": [8, 32]}})
    with pytest.raises(SpaceError, match="not among the choices"):
        space.baseline(Config())


def test_grid_needs_steps_and_no_conditions():
    with pytest.raises(SpaceError, match="needs a `step`"):
        load_space({"lr": {"type": "float", "low": 1e-3, "high": 1e-2}}).grid()


def test_missing_space_file_names_the_path(tmp_path: Path):
    with pytest.raises(SpaceError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")


def test_spaces_package_imports_no_ray():
    import subprocess
    import sys

    code = "import sys, spaces; print('ray' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=SPACES_DIR.parent,
    ).stdout
    assert out.strip() == "False"
