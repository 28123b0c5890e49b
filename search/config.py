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
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmr.config import Config
from mmr.configkit import Schema, check
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
]

ROOT = Path(__file__).resolve().parent.parent  # the checkout (site-packages when installed)
try:  # the shipped configs are the package data of ``configs``, installed or editable
    import configs

    CONFIGS_DIR = Path(configs.__file__).resolve().parent
except ImportError:  # an editable install made before configs was a package
    CONFIGS_DIR = ROOT / "configs"
DEMO_SWEEP = CONFIGS_DIR / "demo_sweep.yaml"
log = logging.getLogger(__name__)
SAMPLERS = ("tpe", "gp", "cmaes", "random", "grid", "nsga2")
ROUND_METRICS = METRICS  # reported after every validation round
OBJECTIVE_METRICS = (*METRICS, *SPEED_METRICS)  # anything a trial reports may be an objective
SCHEDULERS = ("asha", "median", "fifo")
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

    def validated(self) -> ObjectiveConfig:
        """Metric names, modes and guards, each error naming its key."""
        o = self
        weights = o.metric if isinstance(o.metric, dict) else {o.metric: 1.0}
        bad = sorted(set(weights) - set(OBJECTIVE_METRICS))
        check(
            not bad and bool(weights),
            "objective.metric",
            f"must be one of {OBJECTIVE_METRICS} or a mapping of them to weights, "
            f"got {o.metric!r}",
        )
        if o.metrics is not None:
            bad = sorted(set(o.metrics) - set(OBJECTIVE_METRICS))
            check(
                bool(o.metrics) and not bad,
                "objective.metrics",
                f"must be a non-empty list of {OBJECTIVE_METRICS}, got {list(o.metrics)!r}"
                + (f" (unknown: {bad})" if bad else ""),
            )
            check(
                len(set(o.metrics)) == len(o.metrics),
                "objective.metrics",
                f"lists a metric twice: {list(o.metrics)!r}",
            )
        modes = (o.mode,) if isinstance(o.mode, str) else o.mode
        check(
            bool(modes) and all(m in ("max", "min") for m in modes),
            "objective.mode",
            f"must be max or min (or a list of them), got {o.mode!r}",
        )
        if not isinstance(o.mode, str):
            count = len(o.metrics) if o.metrics else 1
            check(
                len(o.mode) == count,
                "objective.mode",
                f"lists {len(o.mode)} modes for {count} objective(s) "
                f"{list(o.metrics or [o.metric])!r}: give one mode, or one per metric",
            )
        names = [name for name, _ in o.objectives]
        check(
            any(n in ROUND_METRICS or n == "objective" for n in names),
            "objective.metrics" if o.metrics else "objective.metric",
            f"needs a validation metric ({', '.join(ROUND_METRICS)}): {', '.join(SPEED_METRICS)} "
            "are measured once, at the end of a trial, so early stopping could not compare trials",
        )
        for metric, drop in o.guard.items():
            check(
                metric in OBJECTIVE_METRICS,
                f"objective.guard.{metric}",
                f"is not a reported metric: guards take {OBJECTIVE_METRICS}",
            )
            check(drop >= 0, f"objective.guard.{metric}", f"must be >= 0, got {drop}")
        return self


@dataclass(frozen=True)
class ConfirmConfig:
    top_k: int = 0  # after the search, train its k best configurations (and the baseline) again
    seeds: int = 3  # fresh training seeds per configuration (at least 2)


@dataclass(frozen=True)
class SearchConfig:
    # tpe | gp | cmaes | random | grid | nsga2 (several objectives); None (not named): gp,
    # the evidence's pick for one objective (benchmarks.replay.DEFAULT_STRATEGY), tpe for
    # several (resolved by SweepConfig.validated, so a stored spec names it)
    sampler: str | None = None
    num_trials: int = 64  # trials per study (the baseline trial included)
    max_concurrent: int = 8  # trials running at once (per sweep)
    seed: int = 0  # sampler seed
    n_startup_trials: int = 8  # random trials before TPE/GP/CMA-ES model the space
    warm_start: tuple[str, ...] = ()  # earlier experiments whose finished trials seed the study
    share_across_categories: bool = False  # per-category studies try each other's top configs
    # CMA-ES: learn from trials the scheduler stopped (their last value), as TPE does; Optuna's
    # default ignores them, and under early stopping most trials are stopped.
    cmaes_consider_pruned: bool = False
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)  # confirmation runs (0: off)


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
class SweepConfig(Schema):
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
        """The sweep rules, each error naming its key (run by ``from_dict``)."""
        if self.search.sampler is None:
            default = "tpe" if self.objective.multi else "gp"
            search = dataclasses.replace(self.search, sampler=default)
            return dataclasses.replace(self, search=search).validated()
        if self.search.confirm.top_k > 0 and (self.objective.per_category or self.objective.multi):
            # The demo and production configs confirm; a user who turns them per-category or
            # multi-objective gets the sweep without confirmation (the stored spec says so).
            log.warning(
                "search.confirm: confirmation runs confirm one single-objective study; with %s "
                "they are off (search.confirm.top_k=0), so seed noise is not measured",
                "objective.per_category" if self.objective.per_category else "several objectives",
            )
            confirm = dataclasses.replace(self.search.confirm, top_k=0)
            search = dataclasses.replace(self.search, confirm=confirm)
            return dataclasses.replace(self, search=search).validated()
        o, s, sc, r = self.objective, self.search, self.scheduler, self.resources
        check(s.sampler in SAMPLERS, "search.sampler", f"must be one of {SAMPLERS}")
        check(
            not (o.multi and s.sampler == "cmaes"),
            "search.sampler",
            "cmaes optimises one objective: with several objective.metrics use tpe, nsga2, "
            "gp, random or grid",
        )
        check(s.num_trials >= 1, "search.num_trials", f"must be >= 1, got {s.num_trials}")
        check(s.max_concurrent >= 1, "search.max_concurrent", "must be >= 1")
        check(s.n_startup_trials >= 0, "search.n_startup_trials", "must be >= 0")
        check(
            o.per_category or not s.share_across_categories,
            "search.share_across_categories",
            "needs objective.per_category: true (a single study has no other category to share "
            "with)",
        )
        cf = s.confirm
        check(cf.top_k >= 0, "search.confirm.top_k", f"must be >= 0 (0: off), got {cf.top_k}")
        check(
            cf.top_k == 0 or cf.seeds >= 2,
            "search.confirm.seeds",
            f"must be >= 2 (a seed spread needs two), got {cf.seeds}",
        )
        check(sc.type in SCHEDULERS, "scheduler.type", f"must be one of {SCHEDULERS}")
        check(sc.grace_period >= 1, "scheduler.grace_period", "must be >= 1 round")
        check(sc.reduction_factor > 1, "scheduler.reduction_factor", "must be > 1")
        check(sc.min_samples >= 1, "scheduler.min_samples", "must be >= 1 trial")
        check(r.cpu >= 0 and r.gpu >= 0, "resources", "cpu and gpu must be >= 0")
        check(
            r.gpu <= 1 or float(r.gpu).is_integer(),
            "resources.gpu",
            "must be a fraction <= 1 or a whole number of GPUs",
        )
        check(self.max_failures >= 0, "max_failures", "must be >= 0")
        check(bool(self.name) and "/" not in self.name, "name", "must be a plain directory name")
        w = self.tracking.wandb
        if w is not None:
            check(w.mode in WANDB_MODES, "tracking.wandb.mode", f"must be one of {WANDB_MODES}")
        return self


# The top-level keys of a sweep config (``launch.py`` tells sweep from training configs by them).
SWEEP_SECTIONS = tuple(f.name for f in dataclasses.fields(SweepConfig))


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
        sweep = SweepConfig.from_dict(raw["sweep"])
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
    spec = _read_spec(local / SPEC_FILE, location)
    if not is_uri(location) and Path(location).resolve() != spec.experiment_dir.resolve():
        # The directory was moved or copied: keep working where it is now.
        spec = dataclasses.replace(spec, moved_to=str(Path(location).resolve()))
    return spec


def _read_spec(path: Path, location: str) -> SweepSpec:
    """The spec in ``path``; a one-line UserInputError when it is cut short or damaged."""
    try:
        return SweepSpec.from_dict(json.loads(path.read_text()))
    except UserInputError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        cause = exc.strerror if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        raise UserInputError(
            f"{path} (the sweep of experiment {location!r}) is unreadable or damaged "
            f"({cause}): restore it from a copy of the experiment (it is written once, at "
            "launch), or run the sweep again under another --name"
        ) from exc


def _nan(value: Any) -> bool:
    return isinstance(value, float) and value != value
