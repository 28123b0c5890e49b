"""Sweep configuration (YAML) and its resolution into a self-contained experiment spec.

A sweep names a base training config and a search space by path; ``resolve_sweep`` loads both,
applies ``--set`` overrides (sweep keys such as ``search.num_trials`` or training keys such as
``train.epochs``), validates the space against the training schema and returns a ``SweepSpec``
holding everything inline, so that an experiment directory never depends on the files it was
launched from.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmr.config import (
    Config,
    ConfigError,
    build_dataclass,
    load_config,
    to_plain,
)
from mmr.errors import UserInputError
from mmr.report import LOWER_IS_BETTER, METRICS, SPEED_METRICS
from search.storage import SPEC_FILE, exists, is_uri, join, mirror_dir, pull
from spaces import Space, load_space

__all__ = [
    "DEMO_SWEEP",
    "SPEC_FILE",
    "is_experiment",
    "load_spec",
    "SweepConfig",
    "SweepSpec",
    "load_sweep_config",
    "resolve_sweep",
]

ROOT = Path(__file__).resolve().parent.parent
DEMO_SWEEP = ROOT / "configs" / "demo_sweep.yaml"
SAMPLERS = ("tpe", "gp", "cmaes", "random", "grid", "nsga2")
ROUND_METRICS = METRICS  # reported after every validation round
OBJECTIVE_METRICS = (*METRICS, *SPEED_METRICS)  # anything a trial reports may be an objective
SCHEDULERS = ("asha", "median", "fifo")
SWEEP_SECTIONS = (
    "name",
    "base",
    "space",
    "objective",
    "search",
    "scheduler",
    "resources",
    "storage",
    "max_failures",
    "tracking",
)
WANDB_MODES = ("online", "offline")


@dataclass(frozen=True)
class ObjectiveConfig:
    metric: str | dict[str, float] = "image_auroc"  # validation metric, or {metric: weight}
    mode: str | tuple[str, ...] = "max"  # max | min, or one per entry of metrics
    metrics: tuple[str, ...] | None = None  # several objectives (a Pareto front); wins over metric
    guard: dict[str, float] = field(default_factory=dict)  # {metric: most it may fall below
    # the baseline trial's value}; a trial breaking one is infeasible, never the best
    per_category: bool = False  # one study (and best config, or front) per category

    @property
    def objectives(self) -> tuple[tuple[str, str], ...]:
        """``((metric, mode), ...)``: ``metrics`` with their modes, or the one ``metric``.

        A weighted ``metric`` mapping counts as one objective named ``objective``.
        """
        if self.metrics:
            modes = (self.mode,) * len(self.metrics) if isinstance(self.mode, str) else self.mode
            return tuple(zip(self.metrics, modes, strict=True))
        name = self.metric if isinstance(self.metric, str) else "objective"
        mode = self.mode if isinstance(self.mode, str) else self.mode[0]
        return ((name, mode),)

    @property
    def multi(self) -> bool:
        """Several objectives: a Pareto front instead of one best trial."""
        return bool(self.metrics) and len(self.metrics) > 1


@dataclass(frozen=True)
class SearchConfig:
    sampler: str = "tpe"  # tpe | gp | cmaes | random | grid | nsga2 (several objectives)
    num_trials: int = 64  # trials per study (the baseline trial included)
    max_concurrent: int = 8  # trials running at once (per sweep)
    seed: int = 0  # sampler seed
    n_startup_trials: int = 8  # random trials before TPE/GP/CMA-ES model the space
    warm_start: tuple[str, ...] = ()  # earlier experiments whose finished trials seed the study
    share_across_categories: bool = False  # per-category studies try each other's top configs


@dataclass(frozen=True)
class SchedulerConfig:
    type: str = "asha"  # asha | median (median stopping rule) | fifo (no early stopping)
    grace_period: int = 2  # evaluation rounds a trial runs before it can be stopped
    reduction_factor: float = 3.0  # ASHA keeps the top 1/reduction_factor at each rung
    min_samples: int = 3  # median: other trials at a round before it stops one there


@dataclass(frozen=True)
class ResourcesConfig:
    cpu: float = 1.0  # CPUs per trial
    gpu: float = 0.0  # GPUs per trial; fractions pack several trials on one GPU
    custom: dict[str, float] = field(default_factory=dict)  # Ray custom resources per trial


@dataclass(frozen=True)
class MLflowConfig:
    # An MLflow server URL, a local file ending in .db (an SQLite store) or a local directory
    # (file store); local paths are made absolute at launch. None: MLflow's own default.
    tracking_uri: str | None = None
    experiment_name: str | None = None  # None: the sweep's name


@dataclass(frozen=True)
class WandbConfig:
    project: str | None = None  # None: the sweep's name
    mode: str = "online"  # online | offline (runs kept on disk; `wandb sync` uploads later)
    group: str | None = None  # None: the sweep's name


@dataclass(frozen=True)
class TrackingConfig:
    mlflow: MLflowConfig | None = None  # a run per trial in MLflow (MLflowLoggerCallback)
    wandb: WandbConfig | None = None  # a run per trial in W&B (WandbLoggerCallback)

    @property
    def enabled(self) -> bool:
        """Whether any tracker is configured (``search.tracking`` is imported only then)."""
        return self.mlflow is not None or self.wandb is not None


@dataclass(frozen=True)
class SweepConfig:
    name: str = "mmr-sweep"  # experiment name (directory under storage)
    base: str = "configs/tiny.yaml"  # training config every trial starts from
    space: str = "spaces/demo.yaml"  # search space
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    storage: str = "runs"  # local dir, NFS path or s3://...
    max_failures: int = 2  # retries of a trial whose worker died (from its last checkpoint)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow / W&B

    def validated(self) -> SweepConfig:
        o, s, sc, r = self.objective, self.search, self.scheduler, self.resources
        _check_objective(o)
        _check(s.sampler in SAMPLERS, "search.sampler", f"must be one of {SAMPLERS}")
        _check(
            not (o.multi and s.sampler == "cmaes"),
            "search.sampler",
            "cmaes optimises one objective: with several objective.metrics use tpe, nsga2, "
            "gp, random or grid",
        )
        _check(s.num_trials >= 1, "search.num_trials", f"must be >= 1, got {s.num_trials}")
        _check(s.max_concurrent >= 1, "search.max_concurrent", "must be >= 1")
        _check(s.n_startup_trials >= 0, "search.n_startup_trials", "must be >= 0")
        _check(
            o.per_category or not s.share_across_categories,
            "search.share_across_categories",
            "needs objective.per_category: true (a single study has no other category to share "
            "with)",
        )
        _check(sc.type in SCHEDULERS, "scheduler.type", f"must be one of {SCHEDULERS}")
        _check(sc.grace_period >= 1, "scheduler.grace_period", "must be >= 1 round")
        _check(sc.reduction_factor > 1, "scheduler.reduction_factor", "must be > 1")
        _check(sc.min_samples >= 1, "scheduler.min_samples", "must be >= 1 trial")
        _check(r.cpu >= 0 and r.gpu >= 0, "resources", "cpu and gpu must be >= 0")
        _check(
            r.gpu <= 1 or float(r.gpu).is_integer(),
            "resources.gpu",
            "must be a fraction <= 1 or a whole number of GPUs",
        )
        _check(self.max_failures >= 0, "max_failures", "must be >= 0")
        _check(bool(self.name) and "/" not in self.name, "name", "must be a plain directory name")
        w = self.tracking.wandb
        if w is not None:
            _check(w.mode in WANDB_MODES, "tracking.wandb.mode", f"must be one of {WANDB_MODES}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))


@dataclass(frozen=True)
class SweepSpec:
    """A fully resolved sweep: everything a trial, resume or export needs, inline."""

    sweep: SweepConfig
    base: Config  # training config of the baseline trial, paths absolute
    space_spec: dict[str, Any]  # the space as loaded (YAML mapping)
    categories: tuple[str, ...]  # categories trained (each its own study if per_category)
    # Where the experiment is now, when it was copied or moved away from storage/name. The
    # sweep's name stays what it was: the studies in the journal are named after it.
    moved_to: str | None = None

    @property
    def space(self) -> Space:
        return load_space(self.space_spec)

    @property
    def experiment_location(self) -> str:
        """Where Tune keeps the trials: a directory, or a URI for remote storage."""
        if self.moved_to is not None:
            return self.moved_to
        if is_uri(self.sweep.storage):
            return join(self.sweep.storage, self.sweep.name)
        return str(Path(self.sweep.storage) / self.sweep.name)

    @property
    def experiment_dir(self) -> Path:
        """The local directory of sweep.json and the study journal (see search.storage)."""
        if is_uri(self.experiment_location):
            return mirror_dir(self.experiment_location)
        return Path(self.experiment_location)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sweep": self.sweep.to_dict(),
            "base": self.base.to_dict(),
            "space": self.space_spec,
            "categories": list(self.categories),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SweepSpec:
        sweep = build_dataclass(SweepConfig, raw["sweep"]).validated()
        return cls(
            sweep, Config.from_dict(raw["base"]), dict(raw["space"]), tuple(raw["categories"])
        )

    def objective_value(self, metrics: Mapping[str, float]) -> float | None:
        """The scalar the scheduler ranks trials by, from flat validation metrics.

        One objective: that metric (or the weighted mix of ``objective.metric``). Several
        objectives: the first of ``objective.metrics`` that is reported every round (early
        stopping needs one number per rung; the sampler still sees every objective).
        Always to be maximised: with mode ``min`` the value is negated.
        """
        o = self.sweep.objective
        if o.metrics:
            name, mode = next((n, m) for n, m in o.objectives if n in METRICS)
            value = metrics.get(name)
            if value is None:
                return None
            return -value if mode == "min" else value
        metric = o.metric
        weights = metric if isinstance(metric, dict) else {metric: 1.0}
        total = 0.0
        for name, weight in weights.items():
            value = metrics.get(name)
            if value is None:
                return None
            total += weight * value
        value = total / sum(weights.values())
        return -value if o.objectives[0][1] == "min" else value

    def guard_violations(
        self, metrics: Mapping[str, Any], baseline: Mapping[str, Any]
    ) -> dict[str, float]:
        """``{metric: amount beyond its guard}`` (> 0: broken) against the baseline's metrics.

        A guard bounds how much worse than the baseline a metric may get: lower for quality
        metrics, higher for ``latency_ms``/``params_m``. A metric missing on either side is
        not judged (``nan``).
        """
        out: dict[str, float] = {}
        for metric, allowed in self.sweep.objective.guard.items():
            value, base = metrics.get(metric), baseline.get(metric)
            if value is None or base is None or _nan(value) or _nan(base):
                out[metric] = float("nan")
                continue
            worse = value - base if metric in LOWER_IS_BETTER else base - value
            out[metric] = float(worse - allowed)
        return out


def is_experiment(location: str | Path) -> bool:
    """Whether ``location`` (a directory or a storage URI) holds an mmr-sweep experiment."""
    return exists(str(location), SPEC_FILE)


def load_spec(experiment: str | Path) -> SweepSpec:
    """Reads the resolved sweep of an experiment (directory or URI); a clear error otherwise.

    For a URI, sweep.json and the study journal are downloaded into the local mirror first.
    """
    location = str(experiment)
    if not is_experiment(location):
        raise UserInputError(
            f"{location!r} is not an mmr-sweep experiment directory (no {SPEC_FILE}): pass "
            "the directory (or storage URI) a sweep printed, e.g. runs/<name>"
        )
    local = pull(location) if is_uri(location) else Path(location)
    spec = SweepSpec.from_dict(json.loads((local / SPEC_FILE).read_text()))
    if not is_uri(location) and Path(location).resolve() != spec.experiment_dir.resolve():
        # The directory was moved or copied: keep working where it is now.
        spec = dataclasses.replace(spec, moved_to=str(Path(location).resolve()))
    return spec


def load_sweep_config(path: str | Path | None) -> tuple[dict[str, Any], Path]:
    """Reads a sweep YAML (default: the demo); returns the raw mapping and its directory."""
    path = Path(path) if path is not None else DEMO_SWEEP
    if not path.is_file():
        raise ConfigError(
            f"sweep config {str(path)!r} does not exist: check the path (see "
            f"{DEMO_SWEEP} for an example)"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep config {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ConfigError(f"sweep config {str(path)!r} must be a mapping")
    return dict(raw), path.resolve().parent


def resolve_sweep(
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    name: str | None = None,
    storage: str | None = None,
    categories: Sequence[str] | None = None,
) -> SweepSpec:
    """Loads, overrides and validates a sweep; the base config and space are read now."""
    raw, config_dir = load_sweep_config(config)
    sweep_over: dict[str, Any] = {}
    train_over: list[str] = []
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.split(".")[0] in SWEEP_SECTIONS:
            sweep_over.update({key: yaml.safe_load(item.partition("=")[2])})
        else:
            train_over.append(item)
    merged = dict(raw)
    for key, value in sweep_over.items():
        head, _, rest = key.partition(".")
        if rest:
            section = dict(merged.get(head) or {})
            section[rest] = value
            merged[head] = section
        else:
            merged[head] = value
    if name:
        merged["name"] = name
    if storage:
        merged["storage"] = storage
    sweep = build_dataclass(SweepConfig, merged).validated()
    base_path = _find(sweep.base, config_dir, "base")
    space_path = _find(sweep.space, config_dir, "space")
    base = load_config(base_path, train_over).resolve_paths()
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
    _check_rungs(sweep.scheduler, base)
    _check_official_pro(sweep.objective, base)
    space_spec = yaml.safe_load(space_path.read_text())
    space = load_space(space_path)
    space.validate(base)
    space.baseline(base)
    if sweep.search.sampler == "grid":
        space.grid()
    cats = tuple(categories) if categories else _categories(base)
    spec = SweepSpec(sweep, base, dict(space_spec), cats)
    return _check_warm_start(spec)


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


def _check_rungs(scheduler: SchedulerConfig, base: Config) -> None:
    """ASHA and median stopping need a round below the last one to stop at, or they can never
    stop a trial early."""
    rounds = base.num_rounds
    if scheduler.type == "fifo" or scheduler.grace_period < rounds:
        return
    t = base.train
    who = "ASHA" if scheduler.type == "asha" else "median stopping"
    raise ConfigError(
        f"scheduler.grace_period={scheduler.grace_period} is not below the {rounds} "
        f"evaluation round(s) of a trial (train.epochs={t.epochs} / train.eval_every="
        f"{t.eval_every}), so {who} could never stop a trial early: set "
        f"scheduler.grace_period below {rounds}, raise train.epochs or lower "
        "train.eval_every, or use scheduler.type=fifo"
    )


def _check_official_pro(objective: ObjectiveConfig, base: Config) -> None:
    """Trials report ``pro_official`` only with ``eval.official_pro``: refuse to optimise or
    guard it otherwise (every trial would fail for a missing metric)."""
    names = {name for name, _ in objective.objectives} | set(objective.guard)
    if isinstance(objective.metric, Mapping):
        names |= set(objective.metric)
    if "pro_official" in names and not base.eval.official_pro:
        raise ConfigError(
            "the objective uses pro_official, which trials report only with "
            "eval.official_pro: true: set it in the base config or add "
            "--set eval.official_pro=true"
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
    """Resolves a path from the working directory, the sweep file's folder or the project."""
    path = Path(value).expanduser()
    candidates = (
        [path] if path.is_absolute() else [Path.cwd() / path, config_dir / path, ROOT / path]
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(
        f"sweep {key} {value!r} not found (looked in "
        f"{', '.join(str(c.parent) for c in candidates)}): fix the path"
    )


def _nan(value: Any) -> bool:
    return isinstance(value, float) and value != value


def _check_objective(o: ObjectiveConfig) -> None:
    """Metric names, modes and guards, each error naming its key."""
    weights = o.metric if isinstance(o.metric, dict) else {o.metric: 1.0}
    bad = sorted(set(weights) - set(OBJECTIVE_METRICS))
    _check(
        not bad and bool(weights),
        "objective.metric",
        f"must be one of {OBJECTIVE_METRICS} or a mapping of them to weights, got {o.metric!r}",
    )
    if o.metrics is not None:
        bad = sorted(set(o.metrics) - set(OBJECTIVE_METRICS))
        _check(
            bool(o.metrics) and not bad,
            "objective.metrics",
            f"must be a non-empty list of {OBJECTIVE_METRICS}, got {list(o.metrics)!r}"
            + (f" (unknown: {bad})" if bad else ""),
        )
        _check(
            len(set(o.metrics)) == len(o.metrics),
            "objective.metrics",
            f"lists a metric twice: {list(o.metrics)!r}",
        )
    modes = (o.mode,) if isinstance(o.mode, str) else o.mode
    _check(
        bool(modes) and all(m in ("max", "min") for m in modes),
        "objective.mode",
        f"must be max or min (or a list of them), got {o.mode!r}",
    )
    if not isinstance(o.mode, str):
        count = len(o.metrics) if o.metrics else 1
        _check(
            len(o.mode) == count,
            "objective.mode",
            f"lists {len(o.mode)} modes for {count} objective(s) "
            f"{list(o.metrics or [o.metric])!r}: give one mode, or one per metric",
        )
    names = [name for name, _ in o.objectives]
    _check(
        any(n in ROUND_METRICS or n == "objective" for n in names),
        "objective.metrics" if o.metrics else "objective.metric",
        f"needs a validation metric ({', '.join(ROUND_METRICS)}): {', '.join(SPEED_METRICS)} "
        "are measured once, at the end of a trial, so early stopping could not compare trials",
    )
    for metric, drop in o.guard.items():
        _check(
            metric in OBJECTIVE_METRICS,
            f"objective.guard.{metric}",
            f"is not a reported metric: guards take {OBJECTIVE_METRICS}",
        )
        _check(drop >= 0, f"objective.guard.{metric}", f"must be >= 0, got {drop}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")
