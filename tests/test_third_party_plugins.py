"""Third-party plugins, as `pip install` leaves them: a module and a `*.dist-info` folder declaring
the `agent.plugins` entry point, found on the path of a real `agent` process.

Writing the dist-info by hand (what an installer writes) keeps these tests fast and offline;
tests/test_contrib_rapl_install.py checks the same with the real rapl distribution.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from agent import hookimpl, hookspecs
from agent.manager import PluginLoadError, build_plugin_manager, collect_plugins
from agent.runtime import DUPLICATE_SIGNAL_WINDOW
from agent.testing import run_agent

from .test_plugin_authoring import readme_block

#: Every hook of agent.hookspecs, as the error lists them.
KNOWN_HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("agent_"))


def install_fake_distribution(
    site: Path, dist: str, version: str, modules: dict[str, str], entry_points: str
) -> None:
    """Writes modules (dotted name -> source) and the dist-info an installer would write."""
    for name, source in modules.items():
        path = site.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(site).parents:
            if parent != Path("."):
                (site / parent / "__init__.py").touch()
        path.write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def run_cli(args: list[str], cwd: Path, site: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("AGENT_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert len(lines) == 1, result.stderr
    return lines[0]


def install_readme_plugin(site: Path) -> None:
    """The README's example plugin, as `pip install` of its package would leave it in `site`."""
    entry_points = readme_block("toml", "## Writing a plugin")
    assert '[project.entry-points."agent.plugins"]\nuptime = "agent_uptime.plugin"' in entry_points
    install_fake_distribution(
        site,
        "agent-uptime",
        "1.0.0",
        {"agent_uptime.plugin": readme_block("python", "## Writing a plugin")},
        "[agent.plugins]\nuptime = agent_uptime.plugin\n",
    )


def test_the_readme_plugin_installed_appears_in_plugins_list_and_runs(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_readme_plugin(site)
    listed = run_cli(["plugins", "list"], tmp_path, site)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["NAME", "VERSION", "ELEMENTS", "ENABLED", "API", "ORIGIN"]
    table = {row.split()[0]: row.split(maxsplit=5) for row in rows}
    assert table["uptime"] == ["uptime", "1.0.0", "source,service", "no", ">=1,<2", "agent-uptime 1.0.0"]
    assert table["csv"] == ["csv", "0.1.0", "output", "yes", ">=1,<2", "built-in"]  # no config: the defaults
    assert table["system"][3] == "yes" and table["sqlite"][3] == "no"

    (tmp_path / "agent.toml").write_text("[plugins.uptime]\n[plugins.csv]\npath = 'out.csv'\n")
    ran = run_cli(["--once"], tmp_path, site)
    assert ran.returncode == 0, ran.stderr
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert [row.split(";")[0] for row in rows] == ["metric", "uptime"]


def test_the_readme_test_of_the_plugin_in_the_real_agent_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plugin author's test shown in the README, run as their pytest would run it."""
    install_readme_plugin(tmp_path / "site")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))  # what `pip install` does for the agent
    source = readme_block("python", "### Testing a plugin in the real agent")
    assert source.startswith("# the plugin's tests/test_agent.py\n")
    namespace: dict[str, object] = {}
    exec(compile(source, "README.md", "exec"), namespace)
    (tmp_path / "test").mkdir()
    namespace["test_the_agent_measures_uptime_and_tells_it"](tmp_path / "test")  # type: ignore[operator]


def test_a_misspelled_hook_is_an_error_naming_the_plugin_and_its_distribution(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_fake_distribution(
        site,
        "agent-typo",
        "0.3.0",
        {
            "agent_typo": """
                from agent import hookimpl

                @hookimpl
                def agent_plugin():  # should be agent_plugins
                    return []
            """
        },
        "[agent.plugins]\ntypo = agent_typo\n",
    )
    for args in (["plugins", "list"], ["--once"]):
        result = run_cli(args, tmp_path, site)
        assert result.returncode == 1
        assert one_line_error(result).startswith(
            "plugin error: plugin 'typo' (from agent-typo 0.3.0): unknown hook 'agent_plugin'"
        )
        assert f"(the hooks are: {', '.join(KNOWN_HOOKS)})" in result.stderr


def test_a_plugin_that_cannot_be_imported_is_named_with_its_distribution(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_fake_distribution(
        site,
        "agent-broken",
        "2.0.0",
        {"agent_broken": "import no_such_dependency\n"},
        "[agent.plugins]\nbroken = agent_broken\n",
    )
    result = run_cli(["plugins", "list"], tmp_path, site)
    assert result.returncode == 1
    assert one_line_error(result) == (
        "plugin error: the entry point broken = 'agent_broken' of agent-broken 2.0.0 cannot be loaded:"
        " ModuleNotFoundError: No module named 'no_such_dependency'"
    )


PLUGIN_MODULE = """
    import trio
    from agent import Output, OutputConfig, Plugin, PluginConfig, hookimpl

    class NeedsDeviceConfig(PluginConfig, kw_only=True):
        device: str = "/dev/nothing-here"

    class NeedsDevice(Plugin):
        name = "needs-device"
        agent_api = ">=1,<2"
        Config = NeedsDeviceConfig
        provides = ("source",)

        def start(self, ctx, config):
            raise FileNotFoundError(f"{config.device} is missing; is the module loaded?")

    class StuckOutput(Output):
        async def write(self, batches):
            await trio.sleep_forever()  # a database that never answers

    class Stuck(Plugin):
        name = "stuck"
        agent_api = ">=1,<2"
        Config = OutputConfig
        provides = ("output",)

        def start(self, ctx, config):
            ctx.add_output(StuckOutput(), config)

    @hookimpl
    def agent_plugins():
        return [NeedsDevice, Stuck]
"""


@pytest.fixture
def site_with_plugins(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    install_fake_distribution(
        site, "agent-extra", "0.9.0", {"agent_extra": PLUGIN_MODULE}, "[agent.plugins]\nextra = agent_extra\n"
    )
    return site


def test_a_plugin_that_fails_to_start_is_named_with_the_reason(
    tmp_path: Path, site_with_plugins: Path
) -> None:
    (tmp_path / "agent.toml").write_text("[plugins.csv]\n[plugins.needs-device]\ndevice = '/dev/rapl9'\n")
    for args in (["--once"], [], ["exec", "--", "true"]):
        result = run_cli(args, tmp_path, site_with_plugins)
        assert result.returncode == 1, result.stderr
        assert (
            one_line_error(result)
            == "plugin needs-device failed to start: /dev/rapl9 is missing; is the module loaded?"
        )


def test_a_third_party_table_is_checked_like_any_other(tmp_path: Path, site_with_plugins: Path) -> None:
    (tmp_path / "agent.toml").write_text("[plugins.needs-device]\ndevise = '/dev/x'\n")
    result = run_cli(["--once"], tmp_path, site_with_plugins)
    assert result.returncode == 2
    assert one_line_error(result).startswith("config error: plugins.needs-device.devise: unknown key")


def test_sigterm_with_an_output_that_never_finishes_exits_0_within_the_grace_period(
    tmp_path: Path, site_with_plugins: Path
) -> None:
    config = (
        "[agent]\ngrace_period = '1s'\nself_metrics_interval = '0s'\n"
        "[plugins.system]\npoll_interval = '100ms'\nflush_interval = '100ms'\n"
        "[plugins.csv]\n[plugins.stuck]\n"
    )
    with run_agent(config, directory=tmp_path, env={"PYTHONPATH": str(site_with_plugins)}) as agent:
        csv_path = tmp_path / "agent-output.csv"
        agent.wait_for(
            lambda: csv_path.exists() and csv_path.read_text().count("\n") > 1, 30, "points in the csv file"
        )
        signalled = time.monotonic()
        assert agent.stop() == 0, agent.stderr
        took = time.monotonic() - signalled
    assert took < 5, f"took {took:.1f}s to stop with grace_period = 1s"
    # The stuck output's points are reported, not silently lost; csv wrote everything.
    assert re.search(
        r"output stuck: \d+ points not written: the grace period ran out at shutdown", agent.stderr
    ), agent.stderr


def test_a_second_sigterm_exits_at_once_with_143(tmp_path: Path, site_with_plugins: Path) -> None:
    config = (
        "[agent]\ngrace_period = '1h'\nself_metrics_interval = '0s'\n"
        "[plugins.system]\npoll_interval = '100ms'\nflush_interval = '100ms'\n[plugins.stuck]\n"
    )
    with run_agent(config, directory=tmp_path, env={"PYTHONPATH": str(site_with_plugins)}) as agent:
        agent.send_signal(signal.SIGTERM)
        agent.wait_for(lambda: "SIGTERM received" in agent.stderr)
        # Seen after the agent took it: the duplicate window ends before this plus its length.
        window_ends = time.monotonic() + DUPLICATE_SIGNAL_WINDOW
        # The same stop delivered twice (right after the first: within the window): still waiting for
        # the output.
        agent.send_signal(signal.SIGTERM)
        agent.wait_for(lambda: "SIGTERM again within 1.0s: the same stop request" in agent.stderr)
        assert agent.returncode is None
        # The window is a length of time: only letting it pass shows a later SIGTERM is not a duplicate.
        time.sleep(max(0.0, window_ends + 0.1 - time.monotonic()))
        agent.send_signal(signal.SIGTERM)  # the operator insists
        # Buffered points were given up: not a clean exit.
        assert agent.wait(timeout=20) == 143, agent.stderr
    assert "second SIGTERM: exiting without waiting for the outputs" in agent.stderr


# -- the plugin manager in-process --


def plugin_module(name: str, **hooks: object) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookimpl(fn))
    return module


def test_check_pending_catches_a_misspelled_hook() -> None:
    def agent_pipeline_start(plugin_names, elements):  # should be agent_pipeline_started
        pass

    module = plugin_module("typo_module", agent_pipeline_start=agent_pipeline_start)
    with pytest.raises(PluginLoadError, match=r"^plugin 'typo_module': unknown hook 'agent_pipeline_start'"):
        build_plugin_manager([module], load_entry_points=False)


def test_a_hook_with_a_parameter_its_spec_lacks_is_an_error() -> None:
    def agent_pipeline_started(plugin_names, elements, when):
        pass

    module = plugin_module("extra_argument", agent_pipeline_started=agent_pipeline_started)
    with pytest.raises(PluginLoadError, match=r"^plugin 'extra_argument': .*\{'when'\}") as info:
        build_plugin_manager([module], load_entry_points=False)
    assert "\n" not in str(info.value)


def test_two_plugins_with_one_name_are_an_error_naming_both_origins() -> None:
    from agent_plugins.csv.plugin import CsvPlugin

    class OtherCsv(CsvPlugin):
        pass

    modules = [
        "agent_plugins.csv.plugin",
        plugin_module("other_csv", agent_plugins=lambda: [OtherCsv]),
    ]
    pm = build_plugin_manager(modules, load_entry_points=False)
    with pytest.raises(PluginLoadError, match="two plugins are named 'csv': from built-in and from built-in"):
        collect_plugins(pm)


def test_a_module_listing_something_else_than_a_plugin_class() -> None:
    pm = build_plugin_manager([plugin_module("odd", agent_plugins=lambda: ["csv"])], load_entry_points=False)
    with pytest.raises(PluginLoadError, match="plugin module 'odd' returned 'csv', not a named Plugin class"):
        collect_plugins(pm)


def test_the_builtins_come_from_one_list_in_order() -> None:
    from agent.manager import BUILTIN_PLUGIN_MODULES

    plugins = collect_plugins(build_plugin_manager(load_entry_points=False))
    assert list(plugins)[:6] == ["system", "csv", "sqlite", "console", "synthetic", "discard"]
    assert {entry.origin for entry in plugins.values()} == {"built-in"}
    assert len(plugins) == len(BUILTIN_PLUGIN_MODULES)
