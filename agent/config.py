"""The TOML config: one `[agent]` table and one `[plugins.NAME]` table per plugin.

Loading checks everything before anything starts: broken TOML, unknown tables, unknown keys, wrong
types and bad durations all raise `ConfigError`, whose message is the one line the CLI prints
(`config error: plugins.relay-client.buffer_timeout: expected a duration like "30s", got 'soon'`).

Rules (the contract that scripts rely on):
- a missing file is generated from every installed plugin's defaults, written, then used;
- when a file exists, a plugin without a table is disabled, a table enables its plugin unless it
  says `enable = false`, and a table for a plugin that is not installed is an error;
- `${VAR}` (and `${VAR:-default}`) in strings is replaced from the environment.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from agent.manager import PluginEntry
from agent.units import Duration, decode_config_value, encode_config_value

log = logging.getLogger(__name__)

DEFAULT_CONFIG_FILE = "agent.toml"
CONFIG_ENV_VAR = "AGENT_CONFIG"


class ConfigError(Exception):
    """A user mistake in the config or on the command line; the message is one line."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}" if where else problem)


LogLevel = Literal["debug", "info", "warning", "error"]


class AgentSection(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The `[agent]` table."""

    # Where durable state lives (relay disk buffer, Graphite spools). Relative paths are relative
    # to the config file's folder.
    data_dir: str = "agent-data"
    # How long a shutdown may take, from the signal: last polls, then writing what is buffered.
    # What is still unwritten then is dropped and logged.
    grace_period: Duration = Duration(10.0)
    # How often the agent's own counters are emitted as points; "0s" switches them off.
    self_metrics_interval: Duration = Duration(10.0)
    # Batches that may wait between the sources and the outputs' queues (backpressure beyond this).
    source_channel_size: int = 64
    # Overridden by --log-level.
    log_level: LogLevel = "info"


@dataclass
class AgentConfig:
    """The loaded config: the agent section, and for each enabled plugin its converted config Struct."""

    agent: AgentSection
    path: Path | None
    # name -> config Struct, for the enabled plugins only, in config order (see `resolve`)
    plugins: dict[str, Any] = field(default_factory=dict)
    disabled: set[str] = field(default_factory=set)

    @property
    def data_dir(self) -> Path:
        base = self.path.parent if self.path is not None else Path.cwd()
        return (base / os.path.expanduser(self.agent.data_dir)).resolve()


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(value: Any, env: Mapping[str, str], where: str = "") -> Any:
    """Replaces `${VAR}` and `${VAR:-default}` in every string of a parsed TOML document.

    Done on parsed values, not on the raw text, so that a variable's content can never change the
    structure of the config. An unset variable without a default becomes "" and is logged.
    """
    if isinstance(value, str):
        if "${" not in value:
            return value

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            log.warning(
                "%s: environment variable %s is not set; using an empty string", where or "config", name
            )
            return ""

        return _ENV_REF.sub(replace, value)
    if isinstance(value, dict):
        return {k: substitute_env(v, env, f"{where}.{k}" if where else k) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


_MSGSPEC_PATH = re.compile(r" - at `\$(.*)`$")
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `([^`]*)`$")


def convert_section(table: Any, struct_type: type, where: str) -> Any:
    """Converts a TOML table to a config Struct; errors name the full path of the bad value."""
    try:
        return msgspec.convert(table, struct_type, dec_hook=decode_config_value, str_keys=True)
    except msgspec.ValidationError as exc:
        text = str(exc)
        path = ""
        match = _MSGSPEC_PATH.search(text)
        if match:
            path = match.group(1)
            text = text[: match.start()]
        unknown = _UNKNOWN_FIELD.match(text)
        if unknown:
            path = f"{path}.{unknown.group(1)}"
            text = "unknown key (check the spelling; `agent config regen` writes every known key)"
        else:
            # A check in a config Struct's __post_init__ says "KEY: problem": KEY joins the path.
            leading = _LEADING_KEY.match(text)
            owner = _struct_at(struct_type, path) if leading else None
            if leading and owner is not None and leading.group(1) in owner.__struct_fields__:
                path = f"{path}.{leading.group(1)}"
                text = leading.group(2)
            text = text.replace("`", "")
            text = text[:1].lower() + text[1:]
            choices = _literal_choices(struct_type, path)
            if choices:
                text = f"{text}; expected one of: {', '.join(choices)}"
        raise ConfigError(f"{where}{path}", text) from None


_LEADING_KEY = re.compile(r"^([a-z_][a-z0-9_]*): (.+)$", re.DOTALL)


def _struct_at(struct_type: type, path: str) -> type | None:
    """The config Struct that holds the value at `path` (".retry" -> the retry table's Struct)."""
    import typing

    current: Any = struct_type
    for part in [p for p in re.split(r"\.|\[\d+\]", path) if p]:
        try:
            hint = typing.get_type_hints(current).get(part)
        except Exception:
            return None
        candidates = [
            a for a in (hint, *typing.get_args(hint)) if isinstance(a, type) and issubclass(a, msgspec.Struct)
        ]
        if not candidates:
            return None
        current = candidates[0]
    return current


def _literal_choices(struct_type: type, path: str) -> list[str]:
    """The allowed values of the Literal field at `path` (".a.b"), for a friendlier error."""
    import typing

    current: Any = struct_type
    for part in [p for p in re.split(r"\.|\[\d+\]", path) if p]:
        try:
            hints = typing.get_type_hints(current)
        except Exception:
            return []
        current = hints.get(part)
        if current is None:
            return []
        args = [a for a in typing.get_args(current) if isinstance(a, type) and issubclass(a, msgspec.Struct)]
        if typing.get_origin(current) is not typing.Literal and args:
            current = args[0]
    if typing.get_origin(current) is typing.Literal:
        return [str(v) for v in typing.get_args(current)]
    return []


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None


@dataclass
class Overrides:
    """What the command line changes in the config."""

    only_plugins: list[str] | None = None  # --plugins a,b
    relay_out: str | None = None  # --relay-out HOST:PORT
    relay_in: str | None = None  # --relay-in ADDR:PORT


def resolve(
    document: dict[str, Any],
    available: Mapping[str, PluginEntry],
    *,
    path: Path | None,
    overrides: Overrides | None = None,
    env: Mapping[str, str] | None = None,
    generated: bool = False,
) -> AgentConfig:
    """Checks a parsed config document against the installed plugins; returns what to run."""
    overrides = overrides or Overrides()
    document = substitute_env(document, os.environ if env is None else env)
    unknown_top = set(document) - {"agent", "plugins"}
    if unknown_top:
        name = sorted(unknown_top)[0]
        raise ConfigError(name, "unknown table (the config has [agent] and [plugins.NAME] tables)")
    agent = convert_section(document.get("agent", {}), AgentSection, "agent")
    tables = document.get("plugins", {})
    if not isinstance(tables, dict):
        raise ConfigError("plugins", "expected tables [plugins.NAME]")
    for name, table in tables.items():
        if name not in available:
            known = ", ".join(sorted(available))
            raise ConfigError(f"plugins.{name}", f"no plugin of that name is installed (installed: {known})")
        if not isinstance(table, dict):
            raise ConfigError(f"plugins.{name}", "expected a table")

    if overrides.only_plugins is not None:
        if not overrides.only_plugins:
            raise ConfigError("--plugins", "expected plugin names separated by commas, got none")
        for name in overrides.only_plugins:
            if name not in available:
                known = ", ".join(sorted(available))
                raise ConfigError("--plugins", f"no plugin named {name!r} is installed (installed: {known})")

    enabled: dict[str, Any] = {}
    disabled: set[str] = set()
    for name, entry in available.items():
        table = dict(tables.get(name, {}))
        forced = None  # (the flag, the key it sets) when the command line enables this plugin
        if name == "relay-client" and overrides.relay_out:
            table["relay_server"] = overrides.relay_out
            forced = ("--relay-out", "relay_server")
        if name == "relay-server" and overrides.relay_in:
            table["address"] = overrides.relay_in
            forced = ("--relay-in", "address")
        try:
            config = convert_section(table, entry.cls.Config, f"plugins.{name}")
        except ConfigError as exc:
            # A bad value given on the command line is named as the user typed it.
            if forced and exc.where.endswith(f".{forced[1]}"):
                raise ConfigError(forced[0], exc.problem) from None
            raise
        if overrides.only_plugins is not None:
            on = name in overrides.only_plugins or forced is not None
        elif forced is not None:
            on = True
        elif name in tables:
            # A table turns its plugin on unless it says `enable = false`.
            on = bool(config.enable) if "enable" in tables[name] else True
        else:
            # Without a table a plugin is off, except in the embedded defaults (no config file at all).
            on = generated and entry.cls.enabled_by_default
        if on:
            enabled[name] = config
        else:
            disabled.add(name)
    # Config order: the plugins with a table in the order of the tables (transforms run in that
    # order), then those enabled without one (--relay-out, --relay-in, the embedded defaults).
    ordered = {name: enabled[name] for name in tables if name in enabled}
    ordered.update((name, config) for name, config in enabled.items() if name not in ordered)
    return AgentConfig(agent=agent, path=path, plugins=ordered, disabled=disabled)


def load(
    path: Path,
    available: Mapping[str, PluginEntry],
    overrides: Overrides | None = None,
    env: Mapping[str, str] | None = None,
) -> AgentConfig:
    return resolve(load_toml(path), available, path=path, overrides=overrides, env=env)


# -- generating a config from the installed plugins --

_ENABLE_LINE = re.compile(r"^([ \t]*)enable[ \t]*=[ \t]*(true|false)[ \t]*(#.*)?$", re.MULTILINE)


def generate(available: Mapping[str, PluginEntry]) -> str:
    """A complete, commented config: the [agent] table, then every installed plugin's table.

    Each plugin's table is its `sample.toml` when it ships one (commented), else its defaults. Only the
    plugins that make sense on their own are enabled; listeners and network clients stay off.
    """
    parts = [
        "# Measurement agent configuration, generated from the installed plugins' defaults.",
        '# Durations are strings such as "500ms", "30s", "1m30s"; sizes such as "64MiB".',
        "# ${VAR} and ${VAR:-default} are replaced from the environment.",
        "",
        "[agent]",
        to_toml_body(msgspec.to_builtins(AgentSection(), enc_hook=encode_config_value)),
    ]
    for name, entry in available.items():
        enabled = "true" if entry.cls.enabled_by_default else "false"
        sample = entry.cls.sample_config()
        if sample is not None:
            text, count = _ENABLE_LINE.subn(
                lambda m, on=enabled: f"{m.group(1)}enable = {on}", sample, count=1
            )
            if count == 0:
                text = re.sub(
                    rf"^\[plugins\.{re.escape(name)}\]\s*$",
                    f"[plugins.{name}]\nenable = {enabled}",
                    text,
                    count=1,
                    flags=re.MULTILINE,
                )
            parts += ["", text.strip()]
        else:
            defaults = msgspec.to_builtins(entry.cls.Config(), enc_hook=encode_config_value)
            defaults["enable"] = entry.cls.enabled_by_default
            header = f"# {entry.cls.description}\n" if entry.cls.description else ""
            parts += ["", f"{header}[plugins.{name}]", to_toml_body(defaults, f"plugins.{name}")]
    return "\n".join(parts).rstrip() + "\n"


def to_toml_body(table: dict[str, Any], prefix: str = "") -> str:
    """Writes a table's keys in TOML: scalars and arrays first, then sub-tables and arrays of tables."""
    lines = []
    nested = []
    for key, value in table.items():
        if isinstance(value, dict):
            nested.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            nested.append((key, value))
        elif value is None:
            continue
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in nested:
        full = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
        if isinstance(value, dict):
            lines += ["", f"[{full}]", to_toml_body(value, full)]
        else:
            for item in value:
                lines += ["", f"[[{full}]]", to_toml_body(item, full)]
    return "\n".join(lines)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else msgspec.json.encode(key).decode()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")
