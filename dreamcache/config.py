"""Configuration for every entry point: typed frozen dataclasses, resolved in layers by OmegaConf.

A command's configuration is a dataclass (nested for the pipeline) whose defaults are the paper's values and
whose ``__post_init__`` checks values. It is resolved from layers, each overriding the ones before:

    the dataclass's defaults < a profile (--profile tiny) < --config FILE.yaml < --set section.field=value
    < the command's own flags

OmegaConf merges the layers against the dataclass as a schema: an unknown field or a value of the wrong type
is refused with the field's dotted name, and the result is the frozen dataclass itself, built once. The
command-line side is derived from the same dataclass: ``add_flags`` makes one flag per field (``--max-steps``,
``--no-bf16``, ``--layers A B``), its help from the field's comment, and ``add_config_options`` adds
``--config``, ``--set`` and ``--print-config``. Every mistake is a ``ConfigError`` whose message names the
field the way the user wrote it, for the one ``error:`` line of ``dreamcache.usage``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration the user must fix: an unknown field, a value of the wrong type, a file that is not one."""


# ------------------------------------------------------------------------------------------- resolving

def resolve(schema: type[T], *layers: Mapping[str, Any], flags: Mapping[str, str] | None = None) -> T:
    """``schema`` (a dataclass) with ``layers`` merged over its defaults, in order. A layer is a nested mapping
    (a YAML file's) or a flat one with dotted keys (``--set``'s). ``flags`` maps dotted field names to the flag
    that set them, for messages ("--max-steps" rather than "max_steps")."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

    flags = flags or {}
    config = OmegaConf.structured(schema)
    try:
        for layer in layers:
            config = OmegaConf.merge(config, OmegaConf.create(_nest(layer)))
        return OmegaConf.to_object(config)
    except ConfigKeyError as e:
        section, _, name = str(e.full_key).rpartition(".")
        known = ", ".join(f.name for f in dataclasses.fields(_section(schema, section)))
        raise ConfigError(f"unknown config field {e.full_key!r}; known {'in ' + section if section else 'here'}: "
                          f"{known}") from None
    except MissingMandatoryValue as e:
        raise ConfigError(f"{flags.get(str(e.full_key), e.full_key)} is required") from None
    except ValidationError as e:
        key = str(e.full_key)
        expected = _type_name(field_type(schema, key))
        if key in flags:
            raise ConfigError(f"argument {flags[key]}: invalid {expected} value: {e.value!r}") from None
        raise ConfigError(f"config field {key!r} expects {expected}, got {e.value!r}") from None


def field_type(schema: type, key: str) -> Any:
    """The type of the dotted field ``key`` of ``schema``."""
    section, _, name = key.rpartition(".")
    return typing.get_type_hints(_section(schema, section))[name]


def _section(schema: type, dotted: str) -> type:
    for part in filter(None, dotted.split(".")):
        schema = typing.get_type_hints(schema)[part]
    return schema


def _type_name(kind: Any) -> str:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if args and typing.get_origin(kind) is not tuple:
        return " or ".join(_type_name(a) for a in args)
    return getattr(kind, "__name__", str(kind))


def _nest(layer: Mapping[str, Any]) -> dict[str, Any]:
    """{"targets.steps": 30} -> {"targets": {"steps": 30}}; nested mappings are merged the same way."""
    out: dict[str, Any] = {}
    for key, value in layer.items():
        *path, last = str(key).split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        if isinstance(value, Mapping):
            node.setdefault(last, {}).update(_nest(value))
        else:
            node[last] = list(value) if isinstance(value, tuple) else value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A --config file: a YAML mapping shaped like the config (an empty file: no overrides)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot read it ({type(e).__name__}: {e})") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"--config {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} holds a YAML {type(data).__name__}, not a mapping: write it shaped like "
                          "the config, e.g. 'targets: {steps: 30}' (see --print-config)")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """'targets.steps=30' -> ('targets.steps', 30); values are read as YAML scalars."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects section.field=value, got {text!r}")
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


def to_yaml(config: Any) -> str:
    """The resolved config as YAML, in field order (what --print-config prints and --config reads back)."""
    return yaml.safe_dump(_plain(dataclasses.asdict(config)), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


# ------------------------------------------------------------------------------------------- the command line

def add_config_options(parser: argparse.ArgumentParser, example: str) -> None:
    """--config, --set and --print-config; ``example`` is a field, e.g. "targets.steps=30"."""
    parser.add_argument("--config", metavar="FILE.yaml", help="overrides from a YAML file shaped like the config "
                        "(see --print-config); --set and the flags win")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"override one config field, e.g. --set {example} (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def add_flags(parser: argparse.ArgumentParser, schema: type, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """One flag per field of ``schema`` (``--max-steps``; ``--bf16/--no-bf16`` for booleans; ``--layers A B`` or
    a repeated ``--layers A --layers B`` for tuples), each taking the value as text for ``resolve`` to check,
    its help the field's comment. A field's ``metadata`` may give ``choices``. Returns {field: flag}."""
    hints, notes, flags = typing.get_type_hints(schema), field_comments(schema), {}
    for f in dataclasses.fields(schema):
        if f.name in skip:
            continue
        flag = flags[f.name] = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        options: dict[str, Any] = {"default": None, "help": notes.get(f.name, "")}
        if f.default is not dataclasses.MISSING and f.default not in ("", None, ()):
            shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            options["help"] += f" (default: {shown})"
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            options["help"] += " (required)"
        if "choices" in f.metadata:
            options["choices"] = f.metadata["choices"]
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif any(typing.get_origin(k) is tuple for k in (kind, *typing.get_args(kind))):
            options.update(nargs="+", action="extend")  # --reference a b, or --reference a --reference b
        parser.add_argument(flag, **options)
    return flags


def given(args: argparse.Namespace, flags: Mapping[str, str]) -> dict[str, Any]:
    """The fields whose flags the command line gave: {field: value}."""
    return {name: getattr(args, name) for name in flags if getattr(args, name, None) is not None}


def layers(args: argparse.Namespace, profile: Mapping[str, Any] | None = None) -> list[Mapping[str, Any]]:
    """The layers under the command's own flags: the profile's overrides, --config's file, then --set's."""
    out: list[Mapping[str, Any]] = [profile or {}]
    if getattr(args, "config", None):
        out.append(read_yaml(args.config))
    out.append(dict(parse_override(o) for o in getattr(args, "overrides", [])))
    return out


_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


def field_comments(schema: type) -> dict[str, str]:
    """{field: its trailing comment} from the dataclass's source (the comments are the fields' documentation)."""
    notes: dict[str, str] = {}
    for cls in reversed(schema.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        notes.update({m[1]: m[2].strip() for m in map(_COMMENT.match, source.splitlines()) if m})
    return notes


# ------------------------------------------------------------------------------------------- value checks

def at_least(config: Any, low: float, *names: str) -> None:
    """For ``__post_init__``: each named field is ``low`` or more (None passes), else "--name must be >= low"."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def one_of(config: Any, name: str, choices) -> None:
    """For ``__post_init__``: the field is one of ``choices``."""
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")
