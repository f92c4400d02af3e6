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

import collections.abc
import enum
import ipaddress
import logging
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from agent.manager import PluginEntry
from agent.net import AddressError, parse_address
from agent.plugin import CommandLineFlag
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
    # The control API and status page over HTTP, e.g. "127.0.0.1:8090"; empty: off (the Unix socket
    # DATA_DIR/control.sock is always on). An address other than loopback needs http_token.
    http: str = ""
    # With a token, every HTTP request needs the header "Authorization: Bearer TOKEN".
    http_token: str = ""

    def __post_init__(self) -> None:
        if not self.http:
            return
        try:
            host, _ = parse_address(self.http)
        except AddressError as exc:
            raise ValueError(f"http: {exc}") from None
        if not self.http_token and not is_loopback(host):
            raise ValueError(
                f"http_token: required when http is not a loopback address (http = {self.http!r});"
                " anyone who reaches it could stop the agent"
            )


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback addresses (127.0.0.0/8, ::1); wildcards are not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


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


UNKNOWN_KEY = "unknown key (check the spelling; `agent config regen` writes every known key)"
MISSING_KEY = "required key is missing"


def convert_section(table: Any, struct_type: type, where: str) -> Any:
    """Converts a TOML table to a config Struct; errors name the full path of the bad value.

    msgspec does the conversion. When it fails, `find_problem` walks the table against the Struct's
    fields to find the bad value itself, so the path in the error never depends on the wording of
    msgspec's messages (which changes between releases); msgspec's text only describes the problem.
    """
    try:
        return msgspec.convert(table, struct_type, dec_hook=decode_config_value, str_keys=True)
    except msgspec.ValidationError as error:
        path, problem = find_problem(table, struct_type) or ("", describe_problem(error, struct_type))
        raise ConfigError(f"{where}{path}", problem) from None


def find_problem(value: Any, value_type: Any, path: str = "") -> tuple[str, str] | None:
    """The first value under `value` that does not convert to `value_type`, as (path, problem).

    The path is `.key`, `[index]` and `.key` again (`.routes[0].destinations[1].address`), relative to
    `value`; None when the whole value converts. A value that does not convert is looked for in its
    parts first (keys of a table in the order they were written, then items of a list); only when
    every part converts on its own is the value itself at fault: a check in a Struct's
    `__post_init__`, a length constraint, or a value of the wrong kind altogether.
    """
    error = _conversion_error(value, value_type)
    if error is None:
        return None
    inner = _without_annotations(value_type)
    found = _problem_inside(value, inner, path)
    if found is not None:
        return found
    problem = describe_problem(error, inner)
    if _is_struct(inner):
        # A check in a config Struct's __post_init__ says "KEY: problem": KEY joins the path.
        key, separator, rest = problem.partition(": ")
        encode_names = {f.name: f.encode_name for f in msgspec.structs.fields(inner)}
        encode_names.update((name, name) for name in list(encode_names.values()))
        if separator and rest and key in encode_names:
            return _key_path(path, encode_names[key]), rest
    return path, problem


def describe_problem(error: msgspec.ValidationError, value_type: Any) -> str:
    """One line saying what is wrong with a value that failed to convert to `value_type`.

    The text of a config check (a `dec_hook` or a Struct's `__post_init__` that raised ValueError)
    is used as written; otherwise msgspec's own description, without the location it may append.
    """
    cause = error.__cause__
    if isinstance(cause, ValueError | TypeError) and not isinstance(cause, msgspec.MsgspecError):
        text = str(cause)
    else:
        text = str(error)
        # msgspec appends " - at `$.path`" to nested errors; the path is ours, so drop it when present.
        head, at, tail = text.rpartition(" - at `$")
        if at and tail.endswith("`"):
            text = head
        text = text.replace("`", "")
        text = text[:1].lower() + text[1:]
    text = " ".join(line.strip() for line in text.splitlines() if line.strip()) or "invalid value"
    choices = _choices(_without_annotations(value_type))
    if choices:
        text = f"{text}; expected one of: {', '.join(choices)}"
    return text


def _conversion_error(value: Any, value_type: Any) -> msgspec.ValidationError | None:
    try:
        msgspec.convert(value, value_type, dec_hook=decode_config_value, str_keys=True)
    except msgspec.ValidationError as error:
        return error
    return None


def _problem_inside(value: Any, value_type: Any, path: str) -> tuple[str, str] | None:
    """The first part of `value` (a table's key, a list's item) that does not convert, if any."""
    if _is_struct(value_type):
        if isinstance(value, dict) and not value_type.__struct_config__.array_like:
            return _problem_in_table(value, value_type, path)
        return None
    origin, args = typing.get_origin(value_type), typing.get_args(value_type)
    if origin is typing.Union or origin is types.UnionType:
        member = _union_member_for(value, args)
        return None if member is None else find_problem(value, member, path)
    if origin in _SEQUENCE_TYPES and isinstance(value, list | tuple):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                return None  # a wrong length is the tuple's own problem
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        for index, (item, item_type) in enumerate(zip(value, item_types, strict=True)):
            found = find_problem(item, item_type, f"{path}[{index}]")
            if found is not None:
                return found
        return None
    if origin in _MAPPING_TYPES and isinstance(value, dict):
        key_type, item_type = args if len(args) == 2 else (Any, Any)
        for key, item in value.items():
            key_error = _conversion_error({key: None}, dict[key_type, Any])  # type: ignore[valid-type]
            if key_error is not None:
                return _key_path(path, key), f"invalid key: {describe_problem(key_error, key_type)}"
            found = find_problem(item, item_type, _key_path(path, key))
            if found is not None:
                return found
    return None


def _problem_in_table(table: dict[Any, Any], struct_type: Any, path: str) -> tuple[str, str] | None:
    """Checks a table's keys against a Struct's fields (by the names written in the file, so that
    `rename` is respected), in the order they were written, then the required keys it lacks."""
    config = struct_type.__struct_config__
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct_type)}
    for key, item in table.items():
        field_info = fields.get(key)
        if field_info is None:
            if key == config.tag_field or not config.forbid_unknown_fields:
                continue
            return _key_path(path, key), UNKNOWN_KEY
        found = find_problem(item, field_info.type, _key_path(path, key))
        if found is not None:
            return found
    for name, field_info in fields.items():
        if field_info.required and name not in table:
            return _key_path(path, name), MISSING_KEY
    return None


def _union_member_for(value: Any, members: tuple[Any, ...]) -> Any:
    """The member of a union that a table or a list can only be meant for (None for scalars, or when
    several members could take it): its parts are then checked against that member."""
    if isinstance(value, dict):
        candidates = [
            m
            for m in members
            if (_is_struct(inner := _without_annotations(m)) and not inner.__struct_config__.array_like)
            or typing.get_origin(inner) in _MAPPING_TYPES
            or inner is dict
        ]
        tagged = [m for m in candidates if _is_struct(m) and m.__struct_config__.tag is not None]
        if len(candidates) > 1 and len(tagged) == len(candidates):
            tag_field = tagged[0].__struct_config__.tag_field
            candidates = [m for m in tagged if m.__struct_config__.tag == value.get(tag_field)]
    elif isinstance(value, list):
        candidates = [m for m in members if typing.get_origin(_without_annotations(m)) in _SEQUENCE_TYPES]
    else:
        return None
    return candidates[0] if len(candidates) == 1 else None


_SEQUENCE_TYPES = (
    list,
    tuple,
    set,
    frozenset,
    collections.abc.Sequence,
    collections.abc.MutableSequence,
    collections.abc.Set,
    collections.abc.MutableSet,
)
_MAPPING_TYPES = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def _is_struct(value_type: Any) -> bool:
    return isinstance(value_type, type) and issubclass(value_type, msgspec.Struct)


def _without_annotations(value_type: Any) -> Any:
    """`Annotated[int, Meta(ge=1)]` -> int (its constraints are still checked by converting)."""
    while typing.get_origin(value_type) is typing.Annotated:
        value_type = typing.get_args(value_type)[0]
    return value_type


def _choices(value_type: Any) -> list[str]:
    """The allowed values of a Literal or Enum type, for a friendlier error."""
    if typing.get_origin(value_type) is typing.Literal:
        return [str(v) for v in typing.get_args(value_type)]
    if isinstance(value_type, type) and issubclass(value_type, enum.Enum):
        return [str(member.value) for member in value_type]
    return []


def _key_path(path: str, key: Any) -> str:
    """`path.key`, quoting the key as TOML does when it is not a bare key."""
    return f"{path}.{_toml_key(str(key))}"


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
    #: Plugin-declared flags given on the command line, with their values (`agent_command_line_flags`):
    #: each enables its plugin and sets one key of its table.
    plugin_flags: list[tuple[CommandLineFlag, str]] = field(default_factory=list)


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
        for flag, value in overrides.plugin_flags:
            if flag.plugin == name:
                table[flag.key] = value
                forced = (flag.flag, flag.key)
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
    # order), then those enabled without one (plugin flags such as --relay-out, the embedded defaults).
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
