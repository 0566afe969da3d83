"""Configs are dataclasses; YAML files and `--section.key value` flags map onto them.

One mapping serves every command: a YAML file gives the whole run, each scalar field is also a
command-line flag (e.g. `--unlearn.learning_rate 1e-5`), and unknown keys are errors, not surprises.
A key that was renamed stays listed in its dataclass's `RENAMED` ({old: new}), so a config or flag
still using it is refused with the new name, in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from salun_sd.errors import UserError

T = TypeVar("T")


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _convert(tp: Any, value: Any, where: str) -> Any:
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            value = [value]
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise UserError(f"{where} must be true or false, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be {tp.__name__}, got {value!r}") from None
    return value


def renamed_keys(cls: type) -> dict[str, str]:
    """{old key: new key} of a config dataclass (its `RENAMED` class attribute)."""
    return getattr(cls, "RENAMED", {})


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build a dataclass from a (YAML) mapping, converting types and rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    for key in unknown:
        if key in renamed_keys(cls):
            raise UserError(f"{where}: key {key} is now {renamed_keys(cls)[key]}: rename it")
    if unknown:
        raise UserError(f"unknown key {where}.{unknown[0]}; {cls.__name__} takes: {', '.join(sorted(names))}")
    return cls(**{k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def load_yaml(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}") from None
    return from_dict(cls, data, path.name)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def field_comments(cls: type) -> dict[str, str]:
    """The `# comment` after each field in the dataclass source (and its dataclass bases'): the one place a setting is documented."""
    comments: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments.update(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, flags=re.M))
    return comments


SCALARS = (int, float, str, bool)


def _renamed_flags(cls: type, prefix: str = ""):
    """(old flag key, new flag key) for every renamed key, and for every key under a renamed section."""
    hints = typing.get_type_hints(cls)
    for old, new in renamed_keys(cls).items():
        tp = _unwrap_optional(hints[new])
        if dataclasses.is_dataclass(tp):
            yield from ((f"{prefix}{old}.{key}", f"{prefix}{new}.{key}") for key, *_ in _scalar_fields(tp))
        else:
            yield f"{prefix}{old}", f"{prefix}{new}"
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            yield from _renamed_flags(tp, f"{prefix}{f.name}.")


def _scalar_fields(cls: type, prefix: str = ""):
    """(key, type, default, doc) of every field a flag can set: scalars, and lists of scalars (type `list`)."""
    hints = typing.get_type_hints(cls)
    docs = field_comments(cls)
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            yield from _scalar_fields(tp, f"{prefix}{f.name}.")
        elif tp in SCALARS or (typing.get_origin(tp) is list and typing.get_args(tp)[0] in SCALARS):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            yield f"{prefix}{f.name}", tp, default, docs.get(f.name, "")


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--key` flag per scalar or list field (dotted for nested sections); values override the YAML.

    A list flag takes its items space-separated (`--metrics nudenet clip`); given with none it empties the list.
    """
    group = parser.add_argument_group("config overrides (each key of the YAML config)")
    for key, tp, default, doc in _scalar_fields(cls):
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        metavar = {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}[item]
        extra = {"nargs": "*"} if item is not tp else {"nargs": "?", "const": "true"} if tp is bool else {}  # `--overwrite` alone means true
        text = doc if "(default:" in doc else f"{doc} (default: {default!r})" if doc else f"default: {default!r}"
        group.add_argument(f"--{key}", dest=f"cfg:{key}", metavar=metavar, default=None, help=text.replace("%", "%%"), **extra)
    for old, new in _renamed_flags(cls):  # hidden: only there to say the new name
        parser.add_argument(f"--{old}", dest=f"renamed:{old}:{new}", nargs="*", default=None, help=argparse.SUPPRESS)


def apply_config_flags(cfg: T, args: argparse.Namespace) -> T:
    """Set every `--key` flag the user gave on the config, with the field's type."""
    for dest, value in vars(args).items():
        if dest.startswith("renamed:") and value is not None:
            _, old, new = dest.split(":")
            raise UserError(f"--{old} is now --{new}")
        if not dest.startswith("cfg:") or value is None:
            continue
        *path, leaf = dest[4:].split(".")
        target = cfg
        for part in path:
            target = getattr(target, part)
        hint = typing.get_type_hints(type(target))[leaf]
        setattr(target, leaf, _convert(hint, value, f"--{dest[4:]}"))
    return cfg


def add_step_group(subparsers: argparse._SubParsersAction, name: str, summary: str, steps: dict, cfg_cls: type, epilog: str, configs: str) -> None:
    """A command with steps (`salun-sd ddpm train`, `salun-sd classify forget`): each step takes the YAML config
    (`configs` names the shipped ones) and a flag per config key; `steps` maps a step to (function, help)."""
    parser = subparsers.add_parser(name, help=summary, description=summary)
    group = parser.add_subparsers(dest=f"{name}_command", metavar="STEP", required=True)
    for step, (func, help_text) in steps.items():
        p = group.add_parser(step, help=help_text, description=help_text, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", nargs="?", help=f"YAML config ({configs}); flags below override its keys")
        add_config_flags(p, cfg_cls)
        p.set_defaults(func=func)
