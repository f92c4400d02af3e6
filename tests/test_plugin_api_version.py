"""The versioned plugin API: `agent.API_VERSION`, the `agent_api` range a plugin declares, and what the
agent does with a plugin written for another API (refuses it when enabled, lists it as refused).

Third-party plugins are installed as hand-written dist-info folders, as in test_third_party_plugins.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import agent
from agent.api import API_VERSION, CURRENT_API_RANGE, InvalidApiRange, api_accepts
from agent.manager import PluginLoadError, build_plugin_manager, collect_plugins

from .test_third_party_plugins import install_fake_distribution, one_line_error, run_cli

PLUGIN_MODULE = """
    from agent import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, BatchBuilder, Plugin, PolledSource, hookimpl

    class AnswerSource(PolledSource):
        async def poll(self, points: BatchBuilder, timestamp_ns: int) -> None:
            points.add("answer", 42, timestamp_ns, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER)

    class {cls}(Plugin):
        name = "{name}"
        version = "3.1.0"
        description = "A plugin written for another version of the API."
        provides = ("source",)
        {api_line}

        def start(self, ctx, config) -> None:
            ctx.add_source(AnswerSource())

    @hookimpl
    def agent_plugins():
        return [{cls}]
"""


def install_plugin(site: Path, name: str, api_line: str) -> None:
    package = f"agent_{name}"
    source = PLUGIN_MODULE.format(cls="ThePlugin", name=name, api_line=api_line)
    install_fake_distribution(
        site, f"agent-{name}", "3.1.0", {package: source}, f"[agent.plugins]\n{name} = {package}\n"
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    install_plugin(site, "future", 'agent_api = ">=2,<3"')
    install_plugin(site, "undeclared", "")
    return site


REFUSAL = (
    "plugin error: plugin 'future' (from agent-future 3.1.0) is refused:"
    f" it wants agent API >=2,<3 and this agent has API {API_VERSION}"
)


def test_api_version_is_semantic_and_exported() -> None:
    assert agent.API_VERSION == API_VERSION
    assert re.fullmatch(r"\d+\.\d+\.\d+", API_VERSION)
    assert api_accepts(CURRENT_API_RANGE) and api_accepts(None)
    major = int(API_VERSION.split(".")[0])
    assert not api_accepts(f">={major + 1}") and not api_accepts(f"<{major}")
    assert api_accepts(">=1,<2", "1.7.3") and not api_accepts(">=1.8,<2", "1.7.3")
    for bad in ("1 or 2", "", "~>1"):
        with pytest.raises(InvalidApiRange):
            api_accepts(bad)


def test_enabling_a_refused_plugin_exits_1_with_one_line(tmp_path: Path, site: Path) -> None:
    (tmp_path / "agent.toml").write_text("[plugins.future]\n[plugins.csv]\n")
    for args in (["--once"], ["--plugins", "future,csv", "--once"], ["exec", "--", "true"]):
        result = run_cli(args, tmp_path, site)
        assert result.returncode == 1, result.stderr
        assert one_line_error(result) == REFUSAL
    assert not (tmp_path / "agent-output.csv").exists()  # nothing ran


def test_a_refused_plugin_that_is_not_enabled_changes_nothing(tmp_path: Path, site: Path) -> None:
    (tmp_path / "agent.toml").write_text(
        "[agent]\nself_metrics_interval = '0s'\n[plugins.system]\n[plugins.csv]\npath = 'out.csv'\n"
    )
    result = run_cli(["--once"], tmp_path, site)
    assert result.returncode == 0, result.stderr
    assert "future" not in result.stderr
    assert (tmp_path / "out.csv").read_text().count("\n") > 1

    listed = run_cli(["plugins", "list"], tmp_path, site)
    assert listed.returncode == 0, listed.stderr
    rows = {row.split()[0]: row.split(maxsplit=5) for row in listed.stdout.splitlines()[1:]}
    assert rows["future"] == ["future", "3.1.0", "source", "refused", ">=2,<3", "agent-future 3.1.0"]
    assert rows["undeclared"][3:5] == ["no", "any"]
    assert rows["csv"][3] == "yes"


def test_plugins_list_as_json(tmp_path: Path, site: Path) -> None:
    (tmp_path / "agent.toml").write_text("[plugins.csv]\n[plugins.future]\nenable = false\n")
    result = run_cli(["plugins", "list", "--format", "json"], tmp_path, site)
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["future"] == {
        "name": "future",
        "version": "3.1.0",
        "kinds": ["source"],
        "description": "A plugin written for another version of the API.",
        "enabled": False,
        "refused": f"it wants agent API >=2,<3 and this agent has API {API_VERSION}",
        "api": ">=2,<3",
        "origin": {"builtin": False, "distribution": "agent-future", "version": "3.1.0"},
    }
    assert plugins["undeclared"]["api"] is None and plugins["undeclared"]["refused"] is None
    assert plugins["csv"]["enabled"] is True and plugins["system"]["enabled"] is False
    assert plugins["csv"]["origin"] == {"builtin": True, "distribution": "measurement-agent", "version": agent.__version__}
    # Every built-in plugin declares the range it was written for, and it holds this API version.
    for entry in plugins.values():
        if entry["origin"]["builtin"]:
            assert entry["api"] and api_accepts(entry["api"]), entry

    bad = run_cli(["plugins", "list", "--format", "yaml"], tmp_path, site)
    assert bad.returncode == 2
    assert one_line_error(bad) == "usage error: --format: expected table or json, got 'yaml'"


def test_a_plugin_without_a_range_runs_with_one_warning(tmp_path: Path, site: Path) -> None:
    (tmp_path / "agent.toml").write_text("[agent]\nself_metrics_interval = '0s'\n[plugins.undeclared]\n[plugins.csv]\n")
    result = run_cli(["--once"], tmp_path, site)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "agent_api" in line]
    assert len(warnings) == 1, result.stderr
    assert "WARNING" in warnings[0]
    assert "plugin 'undeclared' (from agent-undeclared 3.1.0) declares no agent_api" in warnings[0]
    assert "answer;" in (tmp_path / "agent-output.csv").read_text()


def test_a_range_that_is_not_a_specifier_names_the_plugin_and_its_distribution(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_plugin(site, "sloppy", 'agent_api = "version one"')
    result = run_cli(["plugins", "list"], tmp_path, site)
    assert result.returncode == 1
    assert one_line_error(result) == (
        "plugin error: plugin 'sloppy' (from agent-sloppy 3.1.0):"
        """ agent_api 'version one' is not a version range such as ">=1,<2\""""
    )


def test_collect_plugins_marks_the_refused_ones_in_process() -> None:
    from agent import Plugin, hookimpl

    class Old(Plugin):
        name = "old"
        agent_api = "<1"

        def start(self, ctx, config) -> None:
            pass

    class Module:
        @staticmethod
        @hookimpl
        def agent_plugins():
            return [Old]

    plugins = collect_plugins(build_plugin_manager([Module()], load_entry_points=False))
    assert plugins["old"].refusal == f"it wants agent API <1 and this agent has API {API_VERSION}"
    from agent.manager import check_enabled

    with pytest.raises(PluginLoadError, match=r"^plugin 'old' is refused: it wants agent API <1"):
        check_enabled(plugins, ["old"])


def test_a_deprecated_name_keeps_working_and_warns_once_with_what_to_use(caplog) -> None:
    """StartContext.agent_config (untyped) gave way to typed fields in API 1.0; it works until 1.1."""
    from pathlib import Path
    from types import SimpleNamespace

    from agent.api import warn_deprecated
    from agent.model import MetricRegistry
    from agent.plugin import StartContext

    warn_deprecated.cache_clear()
    legacy = SimpleNamespace(agent=SimpleNamespace(grace_period=7.0), path=None)
    ctx = StartContext("old-plugin", MetricRegistry(), Path("data"), legacy_agent_config=legacy)
    with pytest.warns(DeprecationWarning, match="use ctx.grace_period, ctx.config_dir and ctx.data_dir"):
        assert ctx.agent_config.agent.grace_period == 7.0
    assert ctx.agent_config is legacy  # a second use says nothing more
    lines = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert lines == [
        "StartContext.agent_config is deprecated and goes in agent API 1.1:"
        " use ctx.grace_period, ctx.config_dir and ctx.data_dir"
    ]
