"""Resolving a sweep: its YAML, ``--set`` overrides, base config and space into a ``SweepSpec``.

``resolve_sweep`` loads both files a sweep names, applies the overrides (sweep keys such as
``search.num_trials`` or training keys such as ``train.epochs``), checks the combination (rung
structure against the rounds, warm-up against the epochs, warm-start sources, official PRO)
and returns a spec holding everything inline.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmr.config import SHORT_KEYS, Config, ConfigError, load_config
from mmr.configkit import check, load_yaml, nest, parse_override, set_path
from mmr.errors import UserInputError
from search.config import (
    CONFIGS_DIR,
    DEMO_SWEEP,
    ROOT,
    SWEEP_SECTIONS,
    ObjectiveConfig,
    SchedulerConfig,
    SweepConfig,
    SweepSpec,
    TrackingConfig,
    is_experiment,
    load_spec,
)
from search.storage import SPEC_FILE, is_uri
from spaces import SPACES_DIR, Space, SpaceError, load_space, read_space

__all__ = ["load_sweep_config", "resolve_sweep"]

log = logging.getLogger(__name__)


def load_sweep_config(path: str | Path | None) -> tuple[dict[str, Any], Path]:
    """Reads a sweep YAML (default: the demo); returns the raw mapping and its directory."""
    path = Path(path) if path is not None else DEMO_SWEEP
    hint = f"check the path (see {DEMO_SWEEP} for an example)"
    return load_yaml(path, "sweep config", hint), path.resolve().parent


def resolve_sweep(
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    name: str | None = None,
    storage: str | None = None,
    categories: Sequence[str] | None = None,
) -> SweepSpec:
    """Loads, overrides and validates a sweep; the base config and space are read now.

    An override whose first key part is a sweep section (``search.num_trials=8``) replaces
    that value of the sweep config; any other (``train.epochs=4``) goes to the base config.
    """
    raw, config_dir = load_sweep_config(config)
    merged = nest(raw)
    train_over: list[str] = []
    for item in overrides:
        key, value = parse_override(item)
        if key.partition(".")[0] in SWEEP_SECTIONS:
            merged = set_path(merged, key, value)
        else:
            _check_section(key)
            train_over.append(item)
    if name:
        merged["name"] = name
    if storage:
        merged["storage"] = storage
    sweep = SweepConfig.from_dict(merged)
    base_path = _find(sweep.base, config_dir, "base")
    space_path = _find(sweep.space, config_dir, "space")
    base = load_config(base_path, train_over).resolve_paths()
    base = _check_category_order(base, sweep.objective, categories)
    storage_path = (
        sweep.storage if is_uri(sweep.storage) else str(Path(sweep.storage).expanduser().resolve())
    )
    sweep = dataclasses.replace(
        sweep,
        base=str(base_path),
        space=str(space_path),
        storage=storage_path,
        tracking=_resolve_tracking(sweep.tracking),
    )
    sweep = dataclasses.replace(sweep, scheduler=_check_rungs(sweep.scheduler, base))
    _check_official_pro(sweep.objective, base)
    space_spec = read_space(space_path)
    space = load_space(space_spec, source=str(space_path))
    space.validate(base)
    _check_warmup(space, base)
    space.baseline(base)
    if sweep.search.sampler == "grid":
        space.grid()
    cats = tuple(categories) if categories else _categories(base)
    spec = SweepSpec(sweep, base, space_spec, cats)
    return _check_warm_start(spec)


def _check_section(key: str) -> None:
    """An override key of neither a sweep nor a training section: suggests the closest of
    both kinds (``serch.num_trials`` -> ``search.num_trials``)."""
    train_sections = [f.name for f in dataclasses.fields(Config)]
    section, dot, rest = key.partition(".")
    if section in train_sections or key in SHORT_KEYS:
        return  # the training config names its unknown keys (with that section's keys)
    close = difflib.get_close_matches(section, [*SWEEP_SECTIONS, *train_sections], n=1)
    hint = f"did you mean {close[0] + dot + rest!r}? " if close else ""
    raise ConfigError(
        f"unknown config key {key!r}: {hint}--set takes sweep keys (sections "
        f"{list(SWEEP_SECTIONS)}, e.g. search.num_trials=8) or training keys (sections "
        f"{train_sections}, e.g. train.epochs=4, or a short name from {sorted(SHORT_KEYS)})"
    )


def _check_warm_start(spec: SweepSpec) -> SweepSpec:
    """Resolves ``search.warm_start`` paths and checks each is an experiment of the same space.

    Runs before anything is written, so a wrong path fails the launch, not a trial.
    """
    sources = []
    for item in spec.sweep.search.warm_start:
        location = item if is_uri(item) else str(Path(item).expanduser().resolve())
        if not is_experiment(location):
            raise UserInputError(
                f"search.warm_start: {item!r} is not an mmr-sweep experiment (no {SPEC_FILE}): "
                "list the directories (or storage URIs) of earlier sweeps, e.g. runs/<name>"
            )
        keys = load_spec(location).space.keys
        if sorted(keys) != sorted(spec.space.keys):
            raise UserInputError(
                f"search.warm_start: {item!r} searched {sorted(keys)}, this sweep searches "
                f"{sorted(spec.space.keys)}: warm-start only from sweeps of the same space keys"
            )
        sources.append(location)
    search = dataclasses.replace(spec.sweep.search, warm_start=tuple(sources))
    sweep = dataclasses.replace(spec.sweep, search=search)
    return dataclasses.replace(spec, sweep=sweep)


def _check_category_order(
    base: Config, objective: ObjectiveConfig, categories: Sequence[str] | None = None
) -> Config:
    """``train.category_order: sequential`` makes the categories a fidelity of one study's
    trials: refused with per-category studies (one category per trial, nothing to order);
    ``data.categories: all`` is listed into the base (or replaced by the ``categories`` the
    caller names), since the rounds of a trial (and the order its categories train in)
    depend on them."""
    if not base.sequential:
        return base
    check(
        not objective.per_category,
        "train.category_order=sequential",
        "orders the categories within a trial, but objective.per_category: true trains one "
        "category per trial: set train.category_order=lockstep or objective.per_category=false",
    )
    if base.num_tasks is not None:
        return base
    if categories:
        return dataclasses.replace(
            base, data=dataclasses.replace(base.data, categories=tuple(categories))
        )
    from mmr.data import list_tasks
    from mmr.train import with_listed_tasks

    listed = with_listed_tasks(base, list_tasks(base.data))
    log.info("data.categories: all -> %s (train.category_order=sequential)",
             list(listed.data.categories))  # fmt: skip
    return listed


def _check_rungs(scheduler: SchedulerConfig, base: Config) -> SchedulerConfig:
    """ASHA and median stopping need a round below the last one to stop at, or they can never
    stop a trial early.

    A trial of one round (a smoke test, ``train.epochs=1``) has no such round whatever the
    grace period: the sweep runs without early stopping (FIFO), with a warning. With more
    rounds a grace period at or above them is refused (it is most likely a mistake).
    """
    rounds, t = base.num_rounds, base.train
    per_trial = f"train.epochs={t.epochs} / train.eval_every={t.eval_every}"
    if base.sequential:
        per_trial += f", x {base.num_tasks} categories in sequence"
    if rounds == 1 and scheduler.type != "fifo":
        log.warning(
            "1 evaluation round per trial (train.epochs=%d / train.eval_every=%d) is not "
            "above scheduler.grace_period=%d, so %s has no round to stop a trial at: early "
            "stopping off (scheduler.type=fifo), trials run every round",
            t.epochs,
            t.eval_every,
            scheduler.grace_period,
            "ASHA" if scheduler.type == "asha" else "median stopping",
        )
        return dataclasses.replace(scheduler, type="fifo")
    check(
        scheduler.type == "fifo" or scheduler.grace_period < rounds,
        f"scheduler.grace_period={scheduler.grace_period}",
        f"is not below the {rounds} evaluation round(s) of a trial ({per_trial}), so "
        f"{'ASHA' if scheduler.type == 'asha' else 'median stopping'} could never stop a trial "
        f"early: set scheduler.grace_period below {rounds}, raise train.epochs or lower "
        "train.eval_every, or use scheduler.type=fifo",
    )
    return scheduler


def _check_warmup(space: Space, base: Config) -> None:
    """A space over ``train.epochs`` and ``train.warmup_epochs`` must not sample a warm-up at
    or above the epochs (``Space.validate`` checks each bound with the base's other value)."""

    def bounds(key: str) -> list[Any]:
        return [v for p in space.params if p.key == key for v in p.candidate_values()]

    warmups, epochs = bounds("train.warmup_epochs"), bounds("train.epochs")
    if not warmups or not epochs:
        return
    most, least = max(warmups), min(epochs)
    if most >= least:
        raise SpaceError(
            f"space {space.source}: train.warmup_epochs reaches {most} and train.epochs goes "
            f"down to {least}, so a trial could warm up for all its epochs (its learning rate "
            f"never reaching train.lr): keep train.warmup_epochs below {least}, or raise the "
            "lowest train.epochs"
        )


def _check_official_pro(objective: ObjectiveConfig, base: Config) -> None:
    """Trials report ``pro_official`` only with ``eval.official_pro``: refuse to optimise or
    guard it otherwise (every trial would fail for a missing metric)."""
    names = {name for name, _ in objective.objectives} | set(objective.guard)
    if isinstance(objective.metric, Mapping):
        names |= set(objective.metric)
    check(
        "pro_official" not in names or base.eval.official_pro,
        "the objective",
        "uses pro_official, which trials report only with eval.official_pro: true: set it in "
        "the base config or add --set eval.official_pro=true",
    )


def _categories(base: Config) -> tuple[str, ...]:
    """Category names of the base config (listing the dataset when it says ``all``)."""
    if base.data.categories != "all":
        return tuple(base.data.categories)
    from mmr.data import list_tasks

    units: list[str] = []
    for task in list_tasks(base.data):
        units += [s.group for s in task.test if s.group not in units]
    return tuple(units)


def _resolve_tracking(tracking: TrackingConfig) -> TrackingConfig:
    """A local MLflow store becomes an absolute path: resume may run from another directory."""
    m = tracking.mlflow
    if m is None or m.tracking_uri is None:
        return tracking
    uri = m.tracking_uri
    if ":" in uri or uri == "databricks":  # a URL (http://, file:, sqlite:, databricks://)
        return tracking
    local = Path(uri).expanduser().resolve()
    local = f"sqlite:///{local}" if local.suffix == ".db" else str(local)
    return dataclasses.replace(tracking, mlflow=dataclasses.replace(m, tracking_uri=local))


def _find(value: str, config_dir: Path, key: str) -> Path:
    """Resolves a path from the working directory, the sweep file's folder or the project.

    The project's own files (``configs/tiny.yaml``, ``spaces/demo.yaml``) are looked up
    where the packages are installed, so the shipped sweeps run without a checkout too.
    """
    path = Path(value).expanduser()
    candidates = (
        [path] if path.is_absolute() else [Path.cwd() / path, config_dir / path, _shipped(path)]
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(
        f"sweep {key} {value!r} not found (looked in "
        f"{', '.join(str(c.parent) for c in candidates)}): fix the path"
    )


def _shipped(path: Path) -> Path:
    """A project-relative path in the installed ``configs`` or ``spaces`` package, if it
    names one (the checkout's own copy in an editable install), else under ``ROOT``."""
    packages = {"configs": CONFIGS_DIR, "spaces": SPACES_DIR}
    top, *rest = path.parts or ("",)
    return packages[top].joinpath(*rest) if top in packages and rest else ROOT / path
