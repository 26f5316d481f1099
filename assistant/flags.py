"""Command-line flags generated from the settings dataclasses, and the TOML config file, so every setting has
one name, one type and one help text (its field's), whether it comes from a flag or from a file.

- `Settings` fields become flags by name: `--state-dir`, `--base-model`, `--port`...
- each recipe's group (settings.SETTINGS_GROUPS) becomes `--<group>.<field>`: `--train.epochs 3`,
  `--curation.near-dup-threshold 0.7`, `--gate.min-corrections-match 0.5`, `--monitor.lookback-seconds 86400`;
- `--config FILE.toml` holds the same: top-level keys are `Settings` fields, tables are groups
  (`[train]` `epochs = 3`). Flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import os
import tomllib
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from assistant.settings import SETTINGS_GROUPS, Settings, checked_values, parse_auth, settings_class

NONE_WORDS = ("none", "null", "auto")      # how a flag sets an optional setting back to None
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
SPECIAL = {"home", "auth", "share", *SETTINGS_GROUPS}   # Settings fields with flags of their own shape (or none)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _parser_for(hint):
    """A string -> value converter for a field's type, with argparse's error on a bad value."""
    args = typing.get_args(hint)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)] if args and typing.get_origin(hint) is not tuple else [hint]
    kind = kinds[0]

    def parse(text: str):
        if optional and text.lower() in NONE_WORDS:
            return None
        if kind is bool:
            if text.lower() in TRUE_WORDS + FALSE_WORDS:
                return text.lower() in TRUE_WORDS
            raise argparse.ArgumentTypeError(f"{text!r}: use true or false")
        if typing.get_origin(kind) is tuple:
            return tuple(x.strip() for x in text.split(",") if x.strip())
        if kind is Path:
            return Path(text)
        try:
            return kind(text)
        except ValueError:
            wanted = {int: "a whole number", float: "a number"}.get(kind, "a value")
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
    parse.__name__ = getattr(kind, "__name__", "value")   # argparse names the type in its errors
    return parse


def _default_text(f) -> str:
    """" (default X)" for a field with a plain default; "" for one computed at run time."""
    if f.default is MISSING:
        return ""
    return f" (default {','.join(f.default) if isinstance(f.default, tuple) else f.default})"


def add_settings_flags(p: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """Flags for these `Settings` fields, each with its field's help and choices."""
    hints = typing.get_type_hints(Settings)
    by_name = {f.name: f for f in fields(Settings)}
    for name in names:
        f = by_name[name]
        meta = f.metadata
        p.add_argument(f"--{_flag(name)}", dest=name, type=_parser_for(hints[name]), choices=meta.get("choices"),
                       help=meta.get("help", "") + _default_text(f), metavar=meta.get("metavar"))


def add_group_flags(p: argparse.ArgumentParser, group: str, *, short: bool = False) -> None:
    """`--<group>.<field>` flags for a recipe's settings (with `short`, also `--<field>`)."""
    cls = settings_class(group)
    hints = typing.get_type_hints(cls)
    g = p.add_argument_group(f"{group} settings", f"also settable in a --config file's [{group}] table")
    for f in fields(cls):
        names = [f"--{group}.{_flag(f.name)}"] + ([f"--{_flag(f.name)}"] if short else [])
        g.add_argument(*names, dest=f"{group}.{f.name}", type=_parser_for(hints[f.name]), metavar="VALUE",
                       help=f.metadata.get("help", "") + _default_text(f))


def add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="settings from a TOML file: top-level keys are the "
                   "flags' names with _ (state_dir = ...), tables are settings groups ([train] epochs = 3); "
                   "flags win over the file (ASSISTANT_CONFIG)")


def read_config(path: str | os.PathLike) -> dict:
    """A TOML config file -> {field: value}, {group: {field: value}}; a message names what is wrong."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {Path(path).name}: not valid TOML ({e})") from None
    known = {f.name for f in fields(Settings)} - {"auth"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config {Path(path).name}: unknown setting(s) {unknown}; use {sorted(known)}")
    for group in SETTINGS_GROUPS:
        if group in data:
            if not isinstance(data[group], dict):
                raise ValueError(f"--config {Path(path).name}: [{group}] must be a table")
            checked_values(settings_class(group), data[group], group)   # names a bad field now, not mid-job
    return data


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the config file, then the flags given on the command line (and ASSISTANT_API_KEY)."""
    config_path = getattr(args, "config", None) or os.environ.get("ASSISTANT_CONFIG")
    values = read_config(config_path) if config_path else {}
    values = {k: (Path(v) if k in ("home", "state_dir", "adapters_dir", "cache_dir") else v) for k, v in values.items()}
    groups = {g: dict(values.pop(g, {})) for g in SETTINGS_GROUPS}
    for key, value in vars(args).items():
        if value is None:
            continue
        group, dot, name = key.partition(".")
        if dot and group in groups:
            groups[group][name] = value
        elif key in {f.name for f in fields(Settings)} - SPECIAL:
            values[key] = value
    if getattr(args, "auth", None) or getattr(args, "auth_file", None):
        values["auth"] = parse_auth(args.auth, args.auth_file)
    if getattr(args, "share", False):
        values["share"] = True
    if values.get("api_key") is None and os.environ.get("ASSISTANT_API_KEY"):
        values["api_key"] = os.environ["ASSISTANT_API_KEY"]
    if values.get("vllm_api_key") is None and os.environ.get("ASSISTANT_VLLM_API_KEY"):
        values["vllm_api_key"] = os.environ["ASSISTANT_VLLM_API_KEY"]
    for group, overrides in groups.items():
        if overrides:
            settings_class(group)(**checked_values(settings_class(group), overrides, group))   # a clear error now
    return Settings(**values, **groups)
