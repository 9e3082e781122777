"""Typed job configs: a YAML file, then ``dotted.key=value`` overrides, validated by pydantic.

Every job defines one pydantic model (``extra="forbid"``) whose fields carry their defaults and
docs. ``--smoke`` applies the model's ``SMOKE`` overrides (tiny data, few steps) before the user's.
Any problem - an unknown key, a wrong type, an impossible value, a missing file - raises
``ConfigError`` with one line naming the key; ``run_cli`` turns it into exit status 2 before any
work starts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="JobConfig")


class ConfigError(ValueError):
    """A config problem, phrased as ``<dotted.key>: <why>``."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class JobConfig(Section):
    """Base of every job's config. ``SMOKE`` holds the dotted overrides that ``--smoke`` applies."""

    SMOKE: ClassVar[dict[str, Any]] = {}


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, not a section, so {key} cannot be set")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"{text}: an override must look like dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw else None  # "epochs=3" -> 3, "x=[1,2]" -> list, "a=b" -> "b"
    except yaml.YAMLError:
        value = raw
    return key, value


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        if e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            if not e["loc"]:  # a cross-field rule: its message names the keys itself
                lines.append(msg)
                continue
        lines.append(f"{key}: {msg}")
    return "; ".join(lines)


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                smoke: bool = False) -> C:
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config: {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of keys, not {type(data).__name__}")
    pairs = list(cls.SMOKE.items()) if smoke else []
    pairs += [parse_override(o) for o in overrides]
    for key, value in pairs:
        set_dotted(data, key, value)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def require_registered(kind: str, name: str, key: str) -> None:
    """A registry name from a config must exist: say which key is wrong and what is registered."""
    from tasks.common.registry import names

    known = names(kind)
    if name not in known:
        raise ConfigError(f"{key}: unknown {kind} {name!r}; registered: {', '.join(known)}")


def run_cli(cls: type[C], main: Callable[[C], Any], argv: list[str] | None = None,
            description: str | None = None) -> Any:
    """The one CLI of every job: ``--config FILE [--smoke] [dotted.key=value ...]``; exit 2 on a bad config."""
    parser = argparse.ArgumentParser(description=description or (sys.modules["__main__"].__doc__ or ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file; defaults to the built-in values")
    parser.add_argument("--smoke", action="store_true", help="tiny data, few steps (what CI runs)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    args = parser.parse_intermixed_args(argv)  # overrides may stand before and after --smoke
    try:
        cfg = load_config(cls, args.config, args.overrides, args.smoke)
        return main(cfg)  # a job raises ConfigError from its pre-flight checks, before any work
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
