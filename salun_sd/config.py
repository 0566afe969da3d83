"""Configs are dataclasses; YAML files and `--section.key value` flags map onto them, for every command.

One mapping serves every command (`add_config_arguments` + `config_from_args`): a YAML file gives the
whole run, each scalar field is also a command-line flag (e.g. `--unlearn.learning_rate 1e-5`), and
unknown keys are errors, not surprises. How a field is written:

    learning_rate: float = setting(1e-5, "Adam's learning rate")      # its --help text is the field's metadata
    optimizer: Literal["adam", "adam_fused"] = setting("adam", "...")  # a choice: validated here, listed in --help
    groups: list[str] = setting(factory=list, doc="...")               # a mutable default
    batch_size: int = setting(8, "...", at_least=1)                      # a range: checked here, shown in --help

Choices are `typing.Literal` types and a number's range is a bound in its field (`setting(8, "...", at_least=1)`,
`above=0`, `at_most=1`, `below=1`: a bounded float must also be finite), both checked in one place
(`check_settings`: after the flags, and by each section's `check()` for configs built in code); "" among the
choices means "left empty: the protocol's or the built-in value"; None in an optional number means the same. A key that was renamed stays listed in its dataclass's `RENAMED` ({old: new}), so a
config or flag still using it is refused with the new name, in one line.

Why not a library: tyro, jsonargparse and simple-parsing each map nested dataclasses to flags too, but each
would change the flags' spelling or nesting rules and the error messages, or add a large dependency, and
HfArgumentParser takes no nested dataclasses; the mapping here is ~150 lines on argparse and PyYAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import yaml

from salun_sd.errors import UserError

T = TypeVar("T")
SCALARS = (int, float, str, bool)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The numbers a setting takes (each limit closed or open); a bounded float must also be finite, so NaN and inf never pass."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None

    def holds(self, value: float) -> bool:
        return ((not isinstance(value, float) or math.isfinite(value))
                and (self.at_least is None or value >= self.at_least) and (self.above is None or value > self.above)
                and (self.at_most is None or value <= self.at_most) and (self.below is None or value < self.below))

    def __str__(self) -> str:
        low = self.at_least if self.above is None else self.above
        high = self.at_most if self.below is None else self.below
        if low is not None and high is not None:
            return f"in {'[' if self.above is None else '('}{low:g}, {high:g}{']' if self.below is None else ')'}"
        if low == 0:
            return "a non-negative number" if self.above is None else "a positive number"
        if low is not None:
            return f"{'at least' if self.above is None else 'above'} {low:g}"
        return f"{'at most' if self.below is None else 'below'} {high:g}"

    def check(self, value: float, where: str) -> None:
        if not self.holds(value):
            raise UserError(f"{where} must be {self}, got {value!r}")


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Callable[[], Any] | None = None, **limits: float) -> Any:
    """A config field with its `--help` text (the field's metadata); `factory` for a mutable default; `limits` (Bounds'
    at_least, above, at_most, below) for a number's range, which holds for each item of a list."""
    metadata = {"help": doc, **({"bounds": Bounds(**limits)} if limits else {})}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _scalar_type(tp: Any) -> Any:
    """The Python type a flag's text converts to: a Literal's is its values' type."""
    return type(typing.get_args(tp)[0]) if typing.get_origin(tp) is Literal else tp


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
    tp = _scalar_type(tp)
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


def choices_text(choices: tuple) -> str:
    named = ", ".join(str(c) for c in choices if c != "")
    return f"{named} (or empty)" if "" in choices else named


def check_settings(cfg: Any, where: str = "") -> None:
    """Every Literal field of `cfg` and of its sections holds one of its values and every bounded number lies in its
    range: the one check of every choice and range (`where` prefixes the names in the messages)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        tp, value, name = _unwrap_optional(hints[f.name]), getattr(cfg, f.name), f"{where}{f.name}"
        listed = typing.get_origin(tp) is list and isinstance(value, list)
        item_tp = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        bounds = f.metadata.get("bounds")
        for i, item in enumerate(value if listed else [value]):
            if dataclasses.is_dataclass(item):
                check_settings(item, f"{name}[{i}]." if listed else f"{name}.")
            elif item is None and tp is not hints[f.name]:
                continue  # an optional setting left empty
            elif typing.get_origin(item_tp) is Literal and item not in typing.get_args(item_tp):
                raise UserError(f"{name} must be one of {choices_text(typing.get_args(item_tp))}, got {item!r}")
            elif bounds is not None:
                bounds.check(item, name)


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


def _renamed_flags(cls: type, prefix: str = "") -> Iterator[tuple[str, str]]:
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


def _scalar_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, Any, Any, str]]:
    """(key, type, default, help) of every field a flag can set: scalars and choices, and lists of them (type `list[...]`);
    the help ends with the field's range, if it has one."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints[f.name])
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        if dataclasses.is_dataclass(tp):
            yield from _scalar_fields(tp, f"{prefix}{f.name}.")
        elif _scalar_type(item) in SCALARS:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            bounds = f.metadata.get("bounds")
            yield f"{prefix}{f.name}", tp, default, f.metadata.get("help", "") + (f" (must be {bounds})" if bounds else "")


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching (`--unlearn.max_step 3` is an error, not --unlearn.max_steps), whose errors are one
    line; the subcommands' parsers are of the class of the parser that makes them (add_subparsers), so one class at the
    top covers them all."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message: str) -> NoReturn:
        """One line, as every other refusal (argparse prints the whole usage first: dozens of lines for a config's flags)."""
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists what it takes)\n")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, configs: str = "configs/") -> None:
    """The optional YAML config and one `--key` flag per scalar or list field (dotted for nested sections); flags override the YAML.

    A list flag takes its items space-separated (`--metrics nudenet clip`); given with none it empties the list.
    """
    parser.add_argument("config", nargs="?", help=f"YAML config (see {configs}); the flags below override its keys")
    parser.set_defaults(config_class=cls)
    group = parser.add_argument_group("config overrides (each key of the YAML config)")
    for key, tp, default, doc in _scalar_fields(cls):
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        metavar = {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}[_scalar_type(item)]
        extra = {"nargs": "*"} if item is not tp else {"nargs": "?", "const": "true"} if tp is bool else {}  # `--overwrite` alone means true
        choices = typing.get_args(item) if typing.get_origin(item) is Literal else ()
        if choices and not all(re.search(rf"\b{re.escape(c)}\b", doc) for c in choices if c):  # the text may name them already
            doc = f"{doc} (one of {choices_text(choices)})" if doc else f"one of {choices_text(choices)}"
        text = doc if "(default:" in doc else f"{doc} (default: {default!r})" if doc else f"default: {default!r}"
        group.add_argument(f"--{key}", dest=f"cfg:{key}", metavar=metavar, default=None, help=text.replace("%", "%%"), **extra)
    for old, new in _renamed_flags(cls):  # hidden: only there to say the new name
        parser.add_argument(f"--{old}", dest=f"renamed:{old}:{new}", nargs="*", default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> Any:
    """The command's config: its YAML file (or the defaults), then every `--key` flag given, then the choices and ranges checked."""
    cls = args.config_class
    cfg = load_yaml(cls, args.config) if args.config else cls()
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
    check_settings(cfg)
    return cfg


def add_step_group(subparsers: argparse._SubParsersAction, name: str, summary: str, steps: dict, cfg_cls: type, epilog: str, configs: str) -> None:
    """A command with steps (`salun-sd ddpm train`, `salun-sd classify forget`): each step takes the YAML config
    (`configs` names the shipped ones) and a flag per config key; `steps` maps a step to (function, help)."""
    parser = subparsers.add_parser(name, help=summary, description=summary)
    group = parser.add_subparsers(dest=f"{name}_command", metavar="STEP", required=True)
    for step, (func, help_text) in steps.items():
        p = group.add_parser(step, help=help_text, description=help_text, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_arguments(p, cfg_cls, configs)
        p.set_defaults(func=func)
