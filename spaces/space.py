"""Search spaces: YAML files turned into Optuna define-by-run functions (``spaces.Space``).

A space maps training-config keys (short names such as ``lr`` or dotted keys such as
``model.mask_ratio``) to distributions::

    mask_ratio: {type: float, low: 0.1, high: 0.8}
    patch_size: {type: categorical, choices: [8, 16, 32]}
    teacher_layers: {type: categorical, choices: [[1, 2, 3], [2, 3]]}
    lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    train.warmup_epochs:                # a list = conditional branches (each needs `when`)
      - {type: int, low: 0, high: 4, when: {patch_size: 8}}
      - {type: int, low: 2, high: 8, when: {patch_size: [16, 32]}}

Types: ``float`` / ``int`` (``low``, ``high``, optional ``log`` or ``step``), ``categorical``
(``choices``; list-valued choices such as layer sets are allowed), ``fixed`` (``value``).
A branch's ``when`` names parameters defined earlier in the file. Each conditional branch gets
its own Optuna name (``key[cond]``), because an Optuna name must keep one distribution.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from mmr.config import Config, resolve_key
from mmr.configkit import load_yaml
from mmr.errors import ConfigError, UserInputError

__all__ = ["Param", "Space", "SpaceError", "load_space", "read_space", "SPACES_DIR"]

SPACES_DIR = Path(__file__).resolve().parent
TYPES = ("float", "int", "categorical", "fixed")


class SpaceError(UserInputError):
    """A search space is malformed or names values the training config rejects."""


@dataclass(frozen=True)
class Param:
    """One searched config key (or one conditional branch of it)."""

    key: str  # full dotted training-config key, e.g. "model.mask_ratio"
    name: str  # Optuna parameter name (unique per distribution)
    type: str  # float | int | categorical | fixed
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # ((optuna name, allowed values), ...)

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether the branch applies, given the values sampled so far (by Optuna name)."""
        return all(name in values and values[name] in allowed for name, allowed in self.when)

    def labels(self) -> list[Any]:
        """Optuna-storable choice values: list choices become compact JSON strings."""
        return [_label(c) for c in self.choices]

    def suggest(self, trial: optuna.Trial) -> Any:
        """Samples this parameter on ``trial``; returns the config value."""
        if self.type == "float":
            return trial.suggest_float(
                self.name, self.low, self.high, log=self.log, step=self.step
            )
        if self.type == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        if self.type == "categorical":
            label = trial.suggest_categorical(self.name, self.labels())
            return self.choices[self.labels().index(label)]
        return self.value

    def candidate_values(self) -> list[Any]:
        """Values worth checking against the config (bounds, every choice)."""
        if self.type in ("float", "int"):
            return [self.low, self.high]
        if self.type == "categorical":
            return list(self.choices)
        return [self.value]


@dataclass(frozen=True)
class Space:
    """An ordered list of parameters; ``define`` is an Optuna define-by-run function."""

    params: tuple[Param, ...]
    source: str = "<inline>"

    def define(self, trial: optuna.Trial) -> dict[str, Any]:
        """Samples every active parameter; returns ``{dotted config key: value}``."""
        sampled: dict[str, Any] = {}  # by Optuna name, for `when` conditions
        out: dict[str, Any] = {}
        for p in self.params:
            if not p.active(sampled):
                continue
            value = p.suggest(trial)
            sampled[p.name] = _label(value) if p.type == "categorical" else value
            out[p.key] = value
        return out

    def to_overrides(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Optuna params (name -> stored value) -> ``{dotted config key: config value}``."""
        out = {}
        for name, stored in params.items():
            p = self.param(name)
            out[p.key] = p.choices[p.labels().index(stored)] if p.type == "categorical" else stored
        return out

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def baseline(self, base: Config) -> dict[str, Any]:
        """Optuna params that reproduce ``base`` exactly (for the enqueued first trial).

        Raises SpaceError when a base value lies outside the space: the baseline trial must
        run the base config unchanged.
        """
        flat = base.flat()
        sampled: dict[str, Any] = {}
        for p in self.params:
            if not p.active(sampled):
                continue
            value = flat[p.key]
            if p.type == "categorical":
                label = _label(value)
                if label not in p.labels():
                    raise SpaceError(
                        f"space {self.source}: the base config's {p.key}={value!r} is not among "
                        f"the choices {list(p.choices)}; add it to the choices, since the first "
                        "trial always runs the base config"
                    )
                sampled[p.name] = label
            elif p.type in ("float", "int"):
                if not (p.low <= value <= p.high):
                    raise SpaceError(
                        f"space {self.source}: the base config's {p.key}={value!r} lies outside "
                        f"[{p.low}, {p.high}]; widen the range, since the first trial always "
                        "runs the base config"
                    )
                sampled[p.name] = value
            elif _label(value) != _label(p.value):
                raise SpaceError(
                    f"space {self.source}: {p.key} is fixed to {p.value!r} but the "
                    f"base config has {value!r}; change one of them"
                )
            else:
                continue  # fixed values are not Optuna parameters
        return sampled

    def validate(self, base: Config) -> None:
        """Checks every bound and choice against the training-config schema and ``base``."""
        for p in self.params:
            for value in p.candidate_values():
                try:
                    base.override({p.key: value})
                except ConfigError as exc:
                    raise SpaceError(
                        f"space {self.source}: {p.name}={value!r} is rejected by "
                        f"the training config: {exc}"
                    ) from exc

    def grid(self) -> dict[str, list[Any]]:
        """The search space for Optuna's GridSampler (categorical and stepped numbers only)."""
        out: dict[str, list[Any]] = {}
        for p in self.params:
            if p.when:
                raise SpaceError(
                    f"space {self.source}: the grid sampler cannot search the "
                    f"conditional parameter {p.name}; use tpe or random"
                )
            if p.type == "categorical":
                out[p.name] = p.labels()
            elif p.type in ("float", "int") and p.step and not p.log:
                n = int(round((p.high - p.low) / p.step)) + 1
                values = [p.low + i * p.step for i in range(n)]
                out[p.name] = [int(v) for v in values] if p.type == "int" else values
            elif p.type != "fixed":
                raise SpaceError(
                    f"space {self.source}: the grid sampler needs a `step` (or "
                    f"`choices`) for {p.name}"
                )
        return out

    @property
    def keys(self) -> list[str]:
        """The distinct config keys the space searches."""
        return list(dict.fromkeys(p.key for p in self.params))


def read_space(path: str | Path) -> dict[str, Any]:
    """The mapping a space YAML file holds; raises SpaceError naming the file otherwise."""
    return load_yaml(
        path,
        "search space file",
        f"pass a YAML file such as {SPACES_DIR / 'paper.yaml'}",
        error=SpaceError,
    )


def load_space(spec: str | Path | Mapping[str, Any], source: str | None = None) -> Space:
    """Reads a space from a YAML file or a mapping; raises SpaceError on malformed entries.

    ``source`` names a mapping's file in messages (default: the path, or ``<inline>``).
    """
    if not isinstance(spec, Mapping):
        source = source or str(spec)
        spec = read_space(spec)
    source = source or "<inline>"
    if not spec:
        raise SpaceError(f"search space {source} is empty: give at least one parameter")
    params: list[Param] = []
    for raw_key, entry in spec.items():
        try:
            key = resolve_key(str(raw_key))
        except ConfigError as exc:
            raise SpaceError(f"search space {source}: {exc}") from exc
        branches = entry if isinstance(entry, list) else [entry]
        if isinstance(entry, list) and not all(
            isinstance(b, Mapping) and "when" in b for b in branches
        ):
            raise SpaceError(
                f"search space {source}: {raw_key} is a list, so every branch "
                "must be a mapping with a `when` condition"
            )
        for branch in branches:
            params.append(_parse(str(raw_key), key, branch, params, source))
    names = [p.name for p in params]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SpaceError(f"search space {source}: parameter(s) {sorted(dup)} defined twice")
    return Space(tuple(params), source)


def _parse(raw_key: str, key: str, spec: Any, earlier: list[Param], source: str) -> Param:
    where = f"search space {source}: {raw_key}"
    if not isinstance(spec, Mapping):
        raise SpaceError(f"{where} must be a mapping such as {{type: float, low: 0.1, high: 0.8}}")
    allowed = {"type", "low", "high", "log", "step", "choices", "value", "when"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise SpaceError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise SpaceError(f"{where}: type must be one of {TYPES}, got {kind!r}")
    when = _parse_when(spec.get("when"), earlier, where)
    name = key if not when else f"{key}[{','.join(f'{n}={_label(v)}' for n, v in _cond(spec))}]"
    if kind in ("float", "int"):
        low, high = spec.get("low"), spec.get("high")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
            raise SpaceError(f"{where}: {kind} needs numeric `low` and `high`")
        if low > high:
            raise SpaceError(f"{where}: low ({low}) > high ({high}); swap them")
        log, step = bool(spec.get("log", False)), spec.get("step")
        if log and low <= 0:
            raise SpaceError(f"{where}: a log scale needs low > 0, got {low}")
        if log and step is not None:
            raise SpaceError(f"{where}: `log` and `step` cannot be combined (Optuna)")
        if step is not None and (not isinstance(step, int | float) or step <= 0):
            raise SpaceError(f"{where}: step must be a positive number")
        if kind == "int" and not all(float(v).is_integer() for v in (low, high)):
            raise SpaceError(f"{where}: int bounds must be integers")
        return Param(key, name, kind, low=low, high=high, log=log, step=step, when=when)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: categorical needs a non-empty `choices` list")
        labels = [_label(c) for c in choices]
        if len(set(labels)) != len(labels):
            raise SpaceError(f"{where}: choices contain duplicates")
        return Param(key, name, kind, choices=tuple(_freeze(c) for c in choices), when=when)
    if "value" not in spec:
        raise SpaceError(f"{where}: fixed needs a `value`")
    return Param(key, name, kind, value=_freeze(spec["value"]), when=when)


def _cond(spec: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [(str(k), v) for k, v in (spec.get("when") or {}).items()]


def _parse_when(when: Any, earlier: list[Param], where: str) -> tuple:
    if when is None:
        return ()
    if not isinstance(when, Mapping) or not when:
        raise SpaceError(f"{where}: `when` must map earlier parameters to value(s)")
    out = []
    for ref, values in when.items():
        try:
            ref_key = resolve_key(str(ref))
        except ConfigError as exc:
            raise SpaceError(f"{where}: `when` names {ref!r}: {exc}") from exc
        matches = [p for p in earlier if p.key == ref_key and p.type == "categorical"]
        if not matches:
            raise SpaceError(
                f"{where}: `when` names {ref!r}, which must be a categorical "
                "parameter defined earlier in the space"
            )
        vals = values if isinstance(values, list) and not _is_list_choice(matches[0]) else [values]
        labels = tuple(_label(v) for v in vals)
        for m in matches:
            missing = [v for v in labels if v not in m.labels()]
            if missing:
                raise SpaceError(f"{where}: `when` value(s) {missing} are not choices of {ref}")
        out.extend((m.name, labels) for m in matches)
    return tuple(out)


def _is_list_choice(p: Param) -> bool:
    return any(isinstance(c, tuple) for c in p.choices)


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _label(value: Any) -> Any:
    """Optuna categorical values must be None/bool/int/float/str: encode lists as JSON."""
    if isinstance(value, list | tuple):
        return json.dumps(list(value), separators=(",", ":"))
    if isinstance(value, float) and math.isnan(value):
        raise SpaceError("NaN is not a valid choice")
    return value
