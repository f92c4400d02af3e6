"""Config loading: durations, sizes, env substitution, enable rules and the one-line errors."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from agent import config as config_mod
from agent.config import ConfigError, Overrides
from agent.manager import PluginEntry
from agent.plugin import OutputConfig, Plugin, PluginConfig
from agent.units import Duration, Size, format_duration, parse_duration, parse_size
from agent_plugins.relay.relay_client.plugin import RELAY_OUT_FLAG
from agent_plugins.relay.relay_server.plugin import RELAY_IN_FLAG


class RetryConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    max_times: int = 8
    initial_delay: Duration = Duration(0.5)


class FakeClientConfig(PluginConfig, kw_only=True):
    relay_server: str = "127.0.0.1:50051"
    buffer_timeout: Duration = Duration(30.0)
    disk_size: Size = Size(64 << 20)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)


class FakeClient(Plugin):
    name = "relay-client"
    Config = FakeClientConfig


class FakeServerConfig(PluginConfig, kw_only=True):
    address: str = "[::]:50051"

    def __post_init__(self) -> None:
        if self.address.startswith("bad"):  # stands for the real plugin's address check
            raise ValueError(f"address: expected HOST:PORT, got {self.address!r}")


class FakeServer(Plugin):
    name = "relay-server"
    Config = FakeServerConfig


class FakeCsvConfig(OutputConfig, kw_only=True):
    path: str = "out.csv"


class FakeCsv(Plugin):
    name = "csv"
    Config = FakeCsvConfig
    enabled_by_default = True


PLUGINS = {cls.name: PluginEntry(cls, "built-in") for cls in (FakeClient, FakeServer, FakeCsv)}


def resolve(
    document: dict, overrides: Overrides | None = None, env: dict | None = None, generated: bool = False
):
    return config_mod.resolve(
        document,
        PLUGINS,
        path=Path("/etc/agent/agent.toml"),
        overrides=overrides,
        env=env or {},
        generated=generated,
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30),
        ("1m30s", 90),
        ("1h", 3600),
        ("1.5s", 1.5),
        ("2m", 120),
        ("5 minutes", 300),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("seconds", [0.5, 1, 30, 90, 3600, 5400, 0.001])
def test_duration_format_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def test_sizes() -> None:
    assert parse_size("64MiB") == 64 * 1024 * 1024
    assert parse_size("10 MB") == 10_000_000
    with pytest.raises(ValueError, match="expected a size"):
        parse_size("lots")


def test_a_table_enables_its_plugin_and_converts_values() -> None:
    cfg = resolve(
        {
            "plugins": {
                "relay-client": {"enable": True, "buffer_timeout": "1m30s", "retry": {"initial_delay": "2s"}}
            }
        }
    )
    client = cfg.plugins["relay-client"]
    assert client.buffer_timeout == 90 and isinstance(client.buffer_timeout, Duration)
    assert client.retry.initial_delay == 2 and client.retry.max_times == 8
    # A file exists: plugins without a table are off, even those enabled by default.
    assert "csv" not in cfg.plugins and "csv" in cfg.disabled


def test_enable_false_disables() -> None:
    cfg = resolve({"plugins": {"csv": {"enable": False}}})
    assert cfg.plugins == {}


def test_generated_defaults_enable_only_standalone_plugins() -> None:
    cfg = resolve({}, generated=True)
    assert list(cfg.plugins) == ["csv"]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {"plugins": {"relay-client": {"buffer_timeout": "soon"}}},
            'plugins.relay-client.buffer_timeout: expected a duration like "30s", "500ms" or "1m30s", got \'soon\'',
        ),
        (
            {"plugins": {"relay-client": {"retry": {"max_times": "x"}}}},
            "plugins.relay-client.retry.max_times: expected int, got str",
        ),
        (
            {"plugins": {"relay-client": {"bufer_timeout": "1s"}}},
            "plugins.relay-client.bufer_timeout: unknown key",
        ),
        (
            {"plugins": {"relay-client": {"disk_size": "huge"}}},
            "plugins.relay-client.disk_size: expected a size like",
        ),
        ({"plugins": {"nosuch": {}}}, "plugins.nosuch: no plugin of that name is installed"),
        ({"agent": {"grace_period": "forever"}}, "agent.grace_period: expected a duration"),
        ({"agent": {"data_dri": "x"}}, "agent.data_dri: unknown key"),
        (
            {"plugins": {"csv": {"overflow": "explode"}}},
            "plugins.csv.overflow: invalid enum value 'explode'; expected one of: block, drop_oldest",
        ),
        ({"extra": {}}, "extra: unknown table"),
    ],
)
def test_errors_name_the_path(document: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(document)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_env_substitution_with_default_and_unset() -> None:
    cfg = resolve(
        {"plugins": {"relay-client": {"enable": True, "relay_server": "${HOST}:${PORT:-50051}"}}},
        env={"HOST": "collector"},
    )
    assert cfg.plugins["relay-client"].relay_server == "collector:50051"
    cfg = resolve({"plugins": {"relay-client": {"enable": True, "relay_server": "${NOPE}"}}})
    assert cfg.plugins["relay-client"].relay_server == ""


def test_env_values_cannot_change_structure() -> None:
    cfg = resolve(
        {"plugins": {"relay-server": {"enable": True, "address": "${EVIL}"}}},
        env={"EVIL": '"\n[plugins.csv]\nenable = true'},
    )
    assert "csv" not in cfg.plugins
    assert cfg.plugins["relay-server"].address.startswith('"\n[plugins.csv]')


def test_relay_flags_enable_their_plugin_without_a_table() -> None:
    cfg = resolve(
        {"plugins": {"csv": {"enable": True}}}, Overrides(plugin_flags=[(RELAY_OUT_FLAG, "10.1.2.3:50051"), (RELAY_IN_FLAG, "0.0.0.0:6000")])
    )
    assert cfg.plugins["relay-client"].relay_server == "10.1.2.3:50051"
    assert cfg.plugins["relay-server"].address == "0.0.0.0:6000"
    assert "csv" in cfg.plugins


def test_only_plugins_flag() -> None:
    cfg = resolve(
        {"plugins": {"csv": {"enable": True}, "relay-server": {"enable": True}}},
        Overrides(only_plugins=["csv"]),
    )
    assert list(cfg.plugins) == ["csv"]
    with pytest.raises(ConfigError, match="--plugins: no plugin named 'nosuch'"):
        resolve({}, Overrides(only_plugins=["nosuch"]))


def test_data_dir_is_relative_to_the_config_file() -> None:
    cfg = resolve({"agent": {"data_dir": "state"}})
    assert cfg.data_dir == Path("/etc/agent/state")
    assert resolve({}).data_dir == Path("/etc/agent/agent-data")  # the default: beside the config
    assert resolve({"agent": {"data_dir": "/var/lib/agent"}}).data_dir == Path("/var/lib/agent")


def test_a_bad_value_from_a_relay_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        resolve({}, Overrides(plugin_flags=[(RELAY_IN_FLAG, "bad-address")]))
    assert str(info.value) == "--relay-in: expected HOST:PORT, got 'bad-address'"
    # The same value from the file names the table.
    with pytest.raises(ConfigError) as info:
        resolve({"plugins": {"relay-server": {"address": "bad-address"}}})
    assert str(info.value) == "plugins.relay-server.address: expected HOST:PORT, got 'bad-address'"
    # Another bad key of a table that a flag enables is still named by its table.
    with pytest.raises(ConfigError, match=r"^plugins\.relay-client\.buffer_timeout: expected a duration"):
        resolve({"plugins": {"relay-client": {"buffer_timeout": "soon"}}}, Overrides(plugin_flags=[(RELAY_OUT_FLAG, "c:1")]))


def test_an_empty_plugins_flag_is_an_error() -> None:
    with pytest.raises(ConfigError, match="^--plugins: expected plugin names separated by commas"):
        resolve({}, Overrides(only_plugins=[]))


def test_log_level_is_one_of_the_known_levels() -> None:
    assert resolve({"agent": {"log_level": "debug"}}).agent.log_level == "debug"
    with pytest.raises(
        ConfigError, match="^agent.log_level: invalid enum value 'loud'; expected one of: debug, info"
    ):
        resolve({"agent": {"log_level": "loud"}})


def test_generated_config_parses_back_to_the_defaults() -> None:
    import tomllib

    text = config_mod.generate(PLUGINS)
    document = tomllib.loads(text)
    cfg = resolve(document)
    assert list(cfg.plugins) == ["csv"]
    assert document["plugins"]["relay-client"]["enable"] is False
    assert document["plugins"]["relay-client"]["retry"]["initial_delay"] == "500ms"
    assert cfg.agent.grace_period == 10


def test_broken_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[plugins.csv\nenable = true\n")
    with pytest.raises(ConfigError) as info:
        config_mod.load(path, PLUGINS)
    assert str(info.value).startswith(f"{path}: invalid TOML:")


def test_a_table_without_enable_turns_its_plugin_on() -> None:
    # The contract configs of the relay and Graphite plugins have no `enable` key.
    cfg = resolve({"plugins": {"relay-server": {"address": "127.0.0.1:7000"}, "csv": {"enable": False}}})
    assert list(cfg.plugins) == ["relay-server"]


def test_the_readme_config_is_valid_and_shows_the_defaults() -> None:
    import re
    import tomllib

    import msgspec

    from agent.config import AgentSection
    from agent.manager import build_plugin_manager, collect_plugins

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Config") :]
    block = re.search(r"```toml\n(.*?)```", section, re.DOTALL)
    assert block is not None
    installed = collect_plugins(build_plugin_manager(load_entry_points=False))
    cfg = config_mod.resolve(
        tomllib.loads(block.group(1)), installed, path=Path("/etc/agent/agent.toml"), env={}
    )
    assert cfg.agent == AgentSection()
    assert list(cfg.plugins) == ["system", "csv"]
    for name, config in cfg.plugins.items():
        defaults = msgspec.structs.replace(installed[name].cls.Config(), enable=True)
        assert config == defaults, f"README.md's [plugins.{name}] differs from the defaults"


def test_enabled_plugins_come_in_the_order_of_their_tables() -> None:
    # Installed order: relay-client, relay-server, csv. Transforms run in config order.
    cfg = resolve({"plugins": {"csv": {}, "relay-server": {}}}, Overrides(plugin_flags=[(RELAY_OUT_FLAG, "collector:1")]))
    assert list(cfg.plugins) == ["csv", "relay-server", "relay-client"]


class InnerChecked(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    max_delay: Duration = Duration(4.0)

    def __post_init__(self) -> None:
        if self.max_delay < 0.01:
            raise ValueError(f"max_delay: must be at least 10ms, got {self.max_delay}")


class Checked(PluginConfig, kw_only=True):
    timeout: Duration = Duration(1.0)
    retry: InnerChecked = msgspec.field(default_factory=InnerChecked)

    def __post_init__(self) -> None:
        if self.timeout < 0:
            raise ValueError(f"timeout: must not be negative, got {self.timeout}")


def test_checks_in_a_struct_name_their_key_in_the_path() -> None:
    with pytest.raises(ConfigError) as info:
        config_mod.convert_section({"timeout": -1}, Checked, "plugins.x")
    assert str(info.value) == "plugins.x.timeout: must not be negative, got -1s"
    with pytest.raises(ConfigError) as info:
        config_mod.convert_section({"retry": {"max_delay": "1ms"}}, Checked, "plugins.x")
    assert str(info.value) == "plugins.x.retry.max_delay: must be at least 10ms, got 1ms"
