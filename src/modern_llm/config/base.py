"""Dataclass <-> dict/YAML/CLI plumbing shared by every config in the project.

Design choices
- A config is a plain (possibly nested) dataclass. Its fields are the YAML schema and the CLI: a YAML file
  fills it, ``--section.field value`` overrides one field, and ``__post_init__`` validates it.
- Values from YAML/CLI are coerced to the field's annotated type, so ``--model.n_layers 4`` gives an int and
  ``--train.compile true`` a bool. Unknown keys are errors that list the valid ones (typos never pass silently).
- No exec/eval anywhere: YAML is read with ``yaml.safe_load`` and CLI values are parsed by type.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Return (inner type, allows None) for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        return tp, type(None) in typing.get_args(tp)
    return tp, False


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to annotation ``tp``; raise ValueError naming ``where``."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in {"none", "null"}):
        return None
    if dataclasses.is_dataclass(inner) and isinstance(inner, type):
        if isinstance(value, inner):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping for {inner.__name__}, got {value!r}")
        return config_from_dict(inner, value, prefix=where)
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if inner is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if inner is float:
            return float(value)
        if inner is str:
            return str(value)
        if origin in (list, tuple):
            (elem_tp, *_) = typing.get_args(inner) or (Any,)
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
                if value is None:
                    value = []
            if not isinstance(value, (list, tuple)):
                value = [value]
            items = [coerce(v, elem_tp, f"{where}[{i}]") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        if origin is dict:  # a mapping from the CLI arrives as text: '{n_train: 100, seed: 1}'
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(f"{where}: expected a mapping like '{{key: value}}', got {value!r}")
            return value
        if origin is typing.Literal:
            allowed = typing.get_args(inner)
            if value not in allowed:
                raise ValueError(f"{where}: {value!r} is not one of {list(allowed)}")
            return value
    except (ValueError, TypeError) as err:
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where}: cannot read {value!r} as {getattr(inner, '__name__', inner)}") from None
    return value


def config_from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise with the list of valid ones."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        where = f" in '{prefix}'" if prefix else ""
        raise ValueError(f"unknown config key(s) {unknown}{where}; valid keys: {sorted(types_)}")
    kwargs = {k: coerce(v, types_[k], f"{prefix + '.' if prefix else ''}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:  # name the section, so "warmup_steps" reads as "sft_train: warmup_steps ..."
        if prefix and not str(err).startswith(prefix):
            raise ValueError(f"{prefix}: {err}") from None
        raise


def config_to_dict(cfg: Any, resolved: bool = True) -> dict[str, Any]:
    """Dataclass -> plain dict (tuples become lists so the result is YAML/JSON friendly).

    ``resolved=False`` puts back ``None`` for fields a config derived itself (listed in its ``_auto_fields``,
    e.g. ``d_ff`` from ``d_model``), so re-validating after an override derives them again.
    """

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            auto = set() if resolved else getattr(v, "_auto_fields", set())
            return {
                f.name: None if f.name in auto else plain(getattr(v, f.name)) for f in dataclasses.fields(v)
            }
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file that must hold a mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping of config keys, got {type(data).__name__}")
    return data


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["--model.n_layers", "4", "--train.lr=3e-4"]`` -> ``{"model.n_layers": "4", "train.lr": "3e-4"}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; overrides look like --section.field value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override {arg} has no value")
            value = args[i + 1]
            i += 1
        out[key.replace("-", "_")] = value
        i += 1
    return out


def apply_overrides(cfg: T, overrides: dict[str, Any] | list[str]) -> T:
    """Return a copy of ``cfg`` with dotted-key overrides applied (and re-validated via __post_init__)."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    data = config_to_dict(cfg, resolved=False)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                raise ValueError(f"unknown config section '{part}' in override --{dotted}")
            node = node[part]
        if parts[-1] not in node:
            raise ValueError(f"unknown config key '--{dotted}'; valid keys here: {sorted(node)}")
        node[parts[-1]] = value
    return config_from_dict(type(cfg), data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict | list | None = None) -> T:
    """Defaults <- YAML/JSON file <- CLI overrides, validated once at the end."""
    cfg = config_from_dict(cls, read_mapping(path)) if path else cls()
    return apply_overrides(cfg, overrides) if overrides else cfg


def save_config(cfg: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_help(cfg: Any, prefix: str = "") -> str:
    """One line per overridable field: ``--section.field  (type, default value)`` for ``--help`` epilogs."""
    lines = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines.append(config_help(value, prefix=f"{key}."))
            continue
        tp = hints[f.name]
        tp_name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        lines.append(f"  --{key:<32} {tp_name} (default: {value!r})")
    return "\n".join(lines)


def parse_config_cli(cls: type[T], argv: list[str], prog: str, description: str) -> T:
    """``--config FILE`` plus ``--section.field value`` overrides -> validated ``cls``; --help lists fields."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (override any with --field value):\n" + config_help(cls()),
    )
    parser.add_argument("--config", help="YAML/JSON file filling the config (fields below override it)")
    args, overrides = parser.parse_known_args(argv)
    try:
        return load_config(cls, args.config, overrides)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
