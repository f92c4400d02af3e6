"""Config errors name the path of the bad value (`plugins.NAME.key`, nested tables, list indexes) and are
one line, whatever msgspec release is installed: the path comes from the config loader's own walk over
the table, never from the wording of msgspec's messages (which 0.23 changed for one error already)."""

from __future__ import annotations

import copy
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import config as config_mod
from agent.config import ConfigError, convert_section
from agent.manager import build_plugin_manager, collect_plugins
from agent.plugin import PluginConfig
from agent.units import Duration


class Destination(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    address: str
    queue_max_points: Annotated[int, msgspec.Meta(ge=1)] = 100
    timeout: Duration = Duration(5.0)


class Route(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, rename={"not_": "not"}):
    key: str
    kind: Literal["broadcast", "hashing"] = "broadcast"
    destinations: list[str | Destination] = msgspec.field(default_factory=list)
    not_: str = ""

    def __post_init__(self) -> None:
        if not self.destinations:
            raise ValueError("destinations: at least one destination is needed")


class Nested(PluginConfig, kw_only=True, rename="kebab"):
    flush_interval: Duration = Duration(1.0)
    routes: list[Route] = msgspec.field(default_factory=list)
    tokens: dict[str, str] = msgspec.field(default_factory=dict)
    ports: Annotated[list[int], msgspec.Meta(min_length=1)] = msgspec.field(default_factory=lambda: [1])


def error_of(table: dict[str, Any], struct_type: type = Nested, where: str = "plugins.x") -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        convert_section(table, struct_type, where)
    assert "\n" not in str(caught.value)
    assert " - at `$" not in str(caught.value)
    return caught.value


ROUTE = {"key": "a", "destinations": ["h:1", {"address": "h:2"}]}

# (table, the path after "plugins.x", the start of the problem)
CASES = [
    ({"flush-interval": "soon"}, ".flush-interval", 'expected a duration like "30s"'),
    ({"flush_interval": "1s"}, ".flush_interval", "unknown key"),  # the file's names are kebab-case
    ({"routes": [ROUTE, {**ROUTE, "kind": "fanout"}]}, ".routes[1].kind", "invalid enum value 'fanout'"),
    (
        {"routes": [{**ROUTE, "destinations": ["h:1", {"address": "h:2", "queue_max_points": 0}]}]},
        ".routes[0].destinations[1].queue_max_points",
        "expected int >= 1",
    ),
    (
        {"routes": [{**ROUTE, "destinations": [{"address": "h:2", "timeout": "later"}]}]},
        ".routes[0].destinations[0].timeout",
        'expected a duration like "30s"',
    ),
    ({"routes": [{**ROUTE, "destinations": [7]}]}, ".routes[0].destinations[0]", "expected str | object"),
    (
        {"routes": [{**ROUTE, "destinations": [{"adress": "h"}]}]},
        ".routes[0].destinations[0].adress",
        "unknown",
    ),
    ({"routes": [{**ROUTE, "not_": "x"}]}, ".routes[0].not_", "unknown key"),
    ({"routes": [{**ROUTE, "not": 5}]}, ".routes[0].not", "expected str, got int"),
    ({"routes": [{"destinations": ["h:1"]}]}, ".routes[0].key", "required key is missing"),
    ({"routes": [{"key": "a"}]}, ".routes[0].destinations", "at least one destination is needed"),
    ({"routes": {"key": "a"}}, ".routes", "expected array, got object"),
    ({"tokens": {"node-1": "s", "node 2": 5}}, '.tokens."node 2"', "expected str, got int"),
    ({"ports": []}, ".ports", "expected array"),
    ({"ports": [1, "2"]}, ".ports[1]", "expected int, got str"),
]


@pytest.mark.parametrize(("table", "path", "problem"), CASES)
def test_the_error_names_the_path_of_the_bad_value(table, path, problem) -> None:
    error = error_of(table)
    assert error.where == f"plugins.x{path}", str(error)
    assert error.problem.startswith(problem), str(error)


def reworded_convert(real: Any) -> Any:
    """msgspec.convert as a release that words every message differently (and names no place) would be."""

    def convert(*args: Any, **kwargs: Any) -> Any:
        try:
            return real(*args, **kwargs)
        except msgspec.ValidationError as error:
            raise msgspec.ValidationError("Value rejected") from error.__cause__

    return convert


@pytest.mark.parametrize(("table", "path", "problem"), CASES)
def test_paths_do_not_depend_on_the_wording_of_msgspec(monkeypatch, table, path, problem) -> None:
    monkeypatch.setattr(msgspec, "convert", reworded_convert(msgspec.convert))
    error = error_of(table)
    assert error.where == f"plugins.x{path}", str(error)
    # Our own checks (dec_hook, __post_init__, unknown and missing keys) keep their words; what only
    # msgspec described is described in msgspec's new words.
    described_by_msgspec = problem.startswith(("expected", "invalid enum")) and "duration" not in problem
    assert error.problem.startswith("value rejected" if described_by_msgspec else problem), str(error)


def test_a_location_suffix_is_dropped_only_when_it_is_there(monkeypatch) -> None:
    real = msgspec.convert

    def convert(*args: Any, **kwargs: Any) -> Any:
        try:
            return real(*args, **kwargs)
        except msgspec.ValidationError:
            raise msgspec.ValidationError("Expected `a port` - at `$.somewhere[3]`") from None

    monkeypatch.setattr(msgspec, "convert", convert)
    assert str(error_of({"ports": ["x"]})) == "plugins.x.ports[0]: expected a port"


def test_a_check_that_names_a_key_of_its_own_table_moves_it_into_the_path() -> None:
    # "destinations: ..." from Route.__post_init__ names a key of the route: it joins the path. A check
    # whose text starts with a word that is no key of its table keeps the table's path.
    assert str(error_of({"routes": [{"key": "a"}]})) == (
        "plugins.x.routes[0].destinations: at least one destination is needed"
    )

    class Checked(PluginConfig, kw_only=True):
        size: int = 1

        def __post_init__(self) -> None:
            raise ValueError("note: size and enable disagree")

    assert str(error_of({}, Checked)) == "plugins.x: note: size and enable disagree"


# -- the real plugins' configs --

INSTALLED = collect_plugins(build_plugin_manager())

# Tables beyond the samples' defaults, so that nested tables, lists of tables, a renamed key ("not") and
# a string-keyed table are reached too.
RICH_TABLES: dict[str, dict[str, Any]] = {
    "graphite-out": {
        "routes": [
            {
                "key": "carbon",
                "type": "consistent_hashing",
                "destinations": ["127.0.0.1:2103:a", "127.0.0.1:2203:b"],
            },
            {
                "key": "archive",
                "type": "send_all_match",
                "prefix": "servers.",
                "destinations": [{"address": "127.0.0.1:2304", "spool": False, "flush_interval": "1s"}],
            },
        ],
        "rewriters": [{"old": "/^a\\.(.*)/", "new": "b.$1", "not": "c", "max": 1}],
        "aggregators": [
            {"function": "sum", "regex": "^x\\.(.*)$", "format": "y.$1", "interval": "10s", "wait": "5s"}
        ],
        "blocklist": ["prefix junk."],
    },
    "relay-server": {"client_tokens": {"node-1": "secret"}},
    "relay-client": {"retry": {"max_times": 3, "initial_delay": "1s", "max_delay": "10s"}},
    "system": {"processes": ["python*"], "exclude_disks": ["loop*"]},
}


def base_table(name: str) -> dict[str, Any]:
    sample = INSTALLED[name].cls.sample_config()
    table = tomllib.loads(sample)["plugins"][name] if sample else {}
    return {**table, **RICH_TABLES.get(name, {})}


PLUGIN_NAMES = sorted(INSTALLED)
Slot = tuple[tuple[str | int, ...], Any]  # where a value sits in the table, and the type it must convert to


def slots(table: dict[str, Any], struct_type: Any, at: tuple[str | int, ...] = ()) -> list[Slot]:
    """Every key of the Struct (set in the table or not), and the items of its lists and string-keyed
    tables that the table has, recursively."""
    found: list[Slot] = []
    for info in msgspec.structs.fields(struct_type):
        here = (*at, info.encode_name)
        found.append((here, info.type))
        if info.encode_name in table:
            found += _slots_in(table[info.encode_name], info.type, here)
    return found


def _slots_in(value: Any, value_type: Any, at: tuple[str | int, ...]) -> list[Slot]:
    while typing.get_origin(value_type) is Annotated:
        value_type = typing.get_args(value_type)[0]
    origin, args = typing.get_origin(value_type), typing.get_args(value_type)
    if isinstance(value_type, type) and issubclass(value_type, msgspec.Struct) and isinstance(value, dict):
        return slots(value, value_type, at)
    if origin in (typing.Union, types.UnionType) and isinstance(value, dict):
        (struct_type,) = [a for a in args if isinstance(a, type) and issubclass(a, msgspec.Struct)]
        return slots(value, struct_type, at)
    if origin is list and isinstance(value, list):
        found: list[Slot] = []
        for index, item in enumerate(value):
            found.append(((*at, index), args[0]))
            found += _slots_in(item, args[0], (*at, index))
        return found
    if origin is dict and isinstance(value, dict):
        return [((*at, key), args[1]) for key in value]
    return []


def table_slots(table: dict[str, Any], struct_type: Any) -> list[tuple[str | int, ...]]:
    """Where a table (a Struct) sits: the plugin's own table and every nested table the table has."""
    return [()] + [
        at
        for at, value_type in slots(table, struct_type)
        if isinstance(_get(table, at), dict) and _struct_of(value_type) is not None
    ]


def _struct_of(value_type: Any) -> Any:
    for candidate in (value_type, *typing.get_args(value_type)):
        if isinstance(candidate, type) and issubclass(candidate, msgspec.Struct):
            return candidate
    return None


def _get(table: Any, at: tuple[str | int, ...]) -> Any:
    for part in at:
        if isinstance(table, dict) and part not in table:
            return None
        table = table[part]
    return table


def _with(table: Any, at: tuple[str | int, ...], value: Any) -> Any:
    """A deep copy of `table` with `value` at `at`."""
    changed = copy.deepcopy(table)
    parent = changed
    for part in at[:-1]:
        parent = parent[part]
    parent[at[-1]] = value
    return changed


def dotted(name: str, at: tuple[str | int, ...]) -> str:
    return f"plugins.{name}" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in at)


def converts(value: Any, value_type: Any) -> bool:
    try:
        msgspec.convert(value, value_type, dec_hook=config_mod.decode_config_value, str_keys=True)
    except msgspec.ValidationError:
        return False
    return True


def resolve_one(name: str, table: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        config_mod.resolve({"plugins": {name: table}}, INSTALLED, path=Path("/etc/agent/agent.toml"), env={})
    return caught.value


@pytest.mark.parametrize("name", PLUGIN_NAMES)
def test_the_base_tables_are_valid(name: str) -> None:
    config = config_mod.resolve(
        {"plugins": {name: base_table(name)}}, INSTALLED, path=Path("/etc/agent/agent.toml"), env={}
    )
    assert name in config.plugins or name in config.disabled


# Values of every TOML kind; "$" is left out so that environment substitution cannot change them.
TOML_VALUES = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(blacklist_characters="$", blacklist_categories=("Cs",)), max_size=12),
    st.lists(st.one_of(st.integers(), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.sampled_from(["x", "spool", "key"]), st.integers(), min_size=1, max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_wrong_value_anywhere_in_a_real_config_is_named_by_its_path(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(PLUGIN_NAMES), label="plugin")
    table = base_table(name)
    at, value_type = data.draw(st.sampled_from(slots(table, INSTALLED[name].cls.Config)), label="key")
    value = data.draw(TOML_VALUES.filter(lambda v: not converts(v, value_type)), label="value")
    error = resolve_one(name, _with(table, at, value))
    text, expected = str(error), dotted(name, at)
    assert "\n" not in text and " - at `$" not in text and error.problem
    if isinstance(value, list | dict):
        # The item or key inside that is wrong, or the value as a whole.
        assert error.where == expected or error.where.startswith((f"{expected}.", f"{expected}[")), text
    else:
        assert error.where == expected, text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_an_unknown_key_anywhere_in_a_real_config_is_named_by_its_path(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(PLUGIN_NAMES), label="plugin")
    table = base_table(name)
    config_type = INSTALLED[name].cls.Config
    at = data.draw(st.sampled_from(table_slots(table, config_type)), label="table")
    struct_type = config_type if not at else _struct_of(dict(slots(table, config_type))[at])
    known = {f.encode_name for f in msgspec.structs.fields(struct_type)}
    key = data.draw(st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True).filter(lambda k: k not in known))
    error = resolve_one(name, _with(table, (*at, key), 1))
    assert error.where == dotted(name, (*at, key)), str(error)
    assert error.problem.startswith("unknown key"), str(error)
