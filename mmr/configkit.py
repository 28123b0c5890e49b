"""The one config mechanism: YAML files and ``--set`` overrides into frozen dataclasses.

Training configs (``mmr.config``), sweep configs (``search.config``) and search spaces
(``spaces``) all read YAML with ``load_yaml`` and ``--set KEY=VALUE`` items with
``parse_overrides``; the two config stacks build their dataclasses with ``build_dataclass``
(nested or dotted keys, unknown keys and wrong types named by their full dotted key) and
dump them with ``to_dict``. A root config subclasses ``Schema``, whose ``from_dict`` builds
and checks it, so no caller has to remember to validate: ``build_dataclass`` runs the
``validated`` check hook of every dataclass it builds that defines one (sections first).

Every error is one line naming the file or key and how to fix it. No Ray or Optuna here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mmr.errors import ConfigError, UserInputError

__all__ = [
    "Schema",
    "build_dataclass",
    "check",
    "load_yaml",
    "merge",
    "nest",
    "parse_override",
    "parse_overrides",
    "set_path",
    "to_dict",
    "to_plain",
]

S = TypeVar("S", bound="Schema")


class Schema:
    """Base of a root config dataclass: ``from_dict`` builds and checks, ``to_dict`` dumps."""

    @classmethod
    def from_dict(cls: type[S], raw: Mapping[str, Any] | None = None) -> S:
        """Builds a validated instance from nested and/or dotted keys over the defaults."""
        return build_dataclass(cls, raw or {})

    def to_dict(self) -> dict[str, Any]:
        """Nested plain-Python dict (lists, not tuples) that ``from_dict`` reads back equal."""
        return to_dict(self)

    def validated(self: S) -> S:
        """The check hook: raises ConfigError (see ``check``) for values the rules reject."""
        return self


def check(ok: bool, key: str, message: str) -> None:
    """Raises ``ConfigError("<key> <message>")`` unless ``ok``: one rule of a check hook."""
    if not ok:
        raise ConfigError(f"{key} {message}")


def load_yaml(
    path: str | Path, what: str, hint: str, error: type[UserInputError] = ConfigError
) -> dict[str, Any]:
    """Reads a YAML file holding a mapping (an empty file is ``{}``).

    Args:
        path: the file.
        what: how messages name it, e.g. ``"sweep config"``.
        hint: the fix when the file is missing, e.g. ``"check the path (see configs/)"``.
        error: the exception raised, one line naming the file (and the line of bad YAML).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist: {hint}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{what} {str(path)!r} is not valid YAML ({_yaml_problem(exc)})") from exc
    if loaded is not None and not isinstance(loaded, Mapping):
        raise error(
            f"{what} {str(path)!r} must hold a mapping of keys to values, "
            f"got {type(loaded).__name__}"
        )
    return dict(loaded or {})


def parse_override(item: str) -> tuple[str, Any]:
    """Splits one ``--set`` item ``KEY=VALUE``; the value is read as YAML (``""``: None)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set model.mask_ratio=0.5")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"--set {item!r}: value is not a YAML scalar or list ({_yaml_problem(exc)})"
        ) from exc
    return key.strip(), value


def parse_overrides(
    items: Sequence[str], resolve: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """Parses ``["model.mask_ratio=0.5", ...]`` into ``{key: value}``, later items winning.

    ``resolve`` maps each key to its full dotted name (raising for unknown keys).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item)
        out[resolve(key) if resolve else key] = value
    return out


def nest(
    raw: Mapping[str, Any], where: str = "config", aliases: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Turns dotted keys into nested dicts; values are kept, repeated sections merged.

    ``aliases`` renames top-level keys first (short names such as ``lr`` -> ``train.lr``).
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} must be a string")
        key = (aliases or {}).get(key, key)
        head, _, rest = key.partition(".")
        if rest:
            value = nest({rest: value})
        out[head] = merge(out[head], value) if head in out else value
    return out


def merge(base: Any, top: Any) -> Any:
    """``top`` over ``base``: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(top, dict):
        out = dict(base)
        for key, value in top.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    return top


def set_path(raw: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of nested ``raw`` with dotted ``key`` set to ``value`` (replaced, not merged)."""
    out = dict(raw)
    head, _, rest = key.partition(".")
    if rest:
        inner = out.get(head)
        out[head] = set_path(inner if isinstance(inner, Mapping) else {}, rest, value)
    else:
        out[head] = value
    return out


def build_dataclass(cls: type, raw: Mapping[str, Any], prefix: str = "") -> Any:
    """Builds (nested) frozen dataclass ``cls`` from a mapping, dotted keys allowed.

    Unknown keys and wrong types raise ConfigError naming the full dotted key; values are
    coerced to the annotations (lists to tuples, whole floats to int, "1e-3" to float).
    The result's ``validated()`` check hook runs when its class has one.
    """
    raw = nest(raw, prefix.rstrip(".") or "config")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = prefix.rstrip(".") or "config"
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}: {where} has keys {sorted(names)}"
        )
    built = cls(
        **{name: _coerce(hints[name], value, prefix + name) for name, value in raw.items()}
    )
    return built.validated() if hasattr(built, "validated") else built


def to_plain(value: Any) -> Any:
    """Tuples -> lists, recursively: what YAML/JSON dumps and ``from_dict`` reads back."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """A (nested) dataclass as a plain dict that ``build_dataclass`` reads back equal."""
    return to_plain(dataclasses.asdict(obj))


# ----------------------------------------------------------------------------- internals


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: where (1-based line and column) and what."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Converts ``value`` to the annotated type or raises naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        section = [a for a in args if dataclasses.is_dataclass(a)]
        if section and isinstance(value, Mapping):  # its own error names the bad key
            return _coerce(section[0], value, key)
        # Try None first, then the exact-type matches, so "all" stays a str for tuple|str.
        for option in sorted(args, key=lambda a: a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key {key!r}: {value!r} does not fit {_type_name(hint)}")
    if dataclasses.is_dataclass(hint):  # a section, or an optional one (``X | None``)
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"config key {key!r} must be a mapping of {hint.__name__} keys, got {value!r}"
            )
        return build_dataclass(hint, value, f"{key}.")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return {
            _coerce(args[0], k, f"{key}.{k}"): _coerce(args[1], v, f"{key}.{k}")
            for k, v in value.items()
        }
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key {key!r} must be null")
    if origin is tuple:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigError(
                f"config key {key!r} must be a list ({_type_name(hint)}), got {value!r}"
            )
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key) for v in value)
        if len(value) != len(args):
            raise ConfigError(
                f"config key {key!r} must be a list of {len(args)} values, got {value!r}"
            )
        return tuple(_coerce(a, v, key) for a, v in zip(args, value, strict=True))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" (no dot) as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    raise TypeError(f"unsupported annotation {hint!r} for {key}")  # a bug here, not user input


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "")
