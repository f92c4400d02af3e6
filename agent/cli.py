"""The `agent` command.

    agent [--config PATH] [--plugins a,b] [--relay-out HOST:PORT] [--relay-in ADDR:PORT] [--once]

(`--relay-out` and `--relay-in` are declared by the relay plugins through the `agent_command_line_flags`
hook: any plugin can add a flag that enables it and sets one of its keys.)
    agent plugins list [--format json]
    agent plugins new NAME --kind source|transform|output [--dir PATH]
    agent config regen
    agent exec [--config PATH] [--plugins a,b] -- CMD ARGS...
    agent watch [--config PATH] [--plugins a,b] PID
    agent control list|status|pause|resume|set-period|poll|enable|disable|flush|reload|stop|run ...
    agent tap [--metric GLOB] [--limit N] [--format text|json]
    agent top

`agent control`, `tap` and `top` talk to a running agent through DATA_DIR/control.sock (found from the
config as the agent finds it): exit 1 with one line when no agent answers there, 2 for an unknown
element (the line lists the known ones) or a request that does not apply.

Exit codes: 0 after a clean stop (SIGINT/SIGTERM drain, `--once`), 2 for config and usage errors
(one line on stderr, no traceback), 1 when a plugin cannot start; `exec` exits with the command's code,
`watch` with 0 once the process has ended (2 if it does not exist). Both print a summary on stderr.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Annotated

import trio
import typer

from agent import __version__
from agent import config as config_mod
from agent.config import AgentConfig, ConfigError, Overrides
from agent.control import socket_path as control_socket_path
from agent.control_client import ControlClient, NoAgent, RequestFailed
from agent.errors import StartupError, describe_exception
from agent.manager import (
    PluginEntry,
    PluginLoadError,
    build_plugin_manager,
    check_enabled,
    collect_command_line_flags,
    collect_plugins,
)
from agent.plugin import CommandLineFlag, Element
from agent.runtime import Agent, PluginStartError
from agent.watching import (
    FORWARDED_SIGNALS,
    ProcessTree,
    Summary,
    SummaryObserver,
    format_summary,
    open_pidfd,
    wait_for_exit,
)

log = logging.getLogger("agent")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    invoke_without_command=True,
    help="Measurement agent and metrics relay: sources -> transforms -> outputs, on trio.",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
plugins_app = typer.Typer(help="Inspect installed plugins.", no_args_is_help=True)
config_app = typer.Typer(help="Manage the config file.", no_args_is_help=True)
control_app = typer.Typer(
    help="Control a running agent through its socket, DATA_DIR/control.sock.", no_args_is_help=True
)
app.add_typer(plugins_app, name="plugins")
app.add_typer(config_app, name="config")
app.add_typer(control_app, name="control")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="The TOML config file (as for the agent itself).")
]


class Options:
    """The global options, shared by the sub-commands through the typer context."""

    def __init__(
        self,
        config: Path,
        plugins: list[str] | None,
        plugin_flags: list[tuple[CommandLineFlag, str]],
        log_level: str | None,
    ) -> None:
        self.config_path = config
        self.overrides = Overrides(only_plugins=plugins, plugin_flags=plugin_flags)
        self.log_level = log_level


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def setup_logging(level: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise fail(f"config error: --log-level: unknown level {level!r} (debug, info, warning, error)")
    logging.basicConfig(
        level=numeric,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def discover() -> tuple[object, dict[str, PluginEntry]]:
    try:
        pm = build_plugin_manager()
        return pm, collect_plugins(pm)
    except PluginLoadError as exc:
        raise fail(f"plugin error: {exc}", 1) from None


def load_config(options: Options, plugins: dict[str, PluginEntry], *, create: bool = True) -> AgentConfig:
    """Reads the config, generating it first if the file does not exist."""
    path = options.config_path
    try:
        if not path.exists():
            if not create:
                return config_mod.resolve({}, plugins, path=path, overrides=options.overrides, generated=True)
            text = config_mod.generate(plugins)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
                typer.echo(
                    f"{path}: no config file, wrote one from the plugins' defaults and using it", err=True
                )
            except OSError as exc:
                typer.echo(
                    f"{path}: no config file and cannot write one ({exc.strerror}); using defaults", err=True
                )
            import tomllib

            return config_mod.resolve(
                tomllib.loads(text), plugins, path=path, overrides=options.overrides, generated=True
            )
        return config_mod.load(path, plugins, options.overrides)
    except ConfigError as exc:
        raise fail(f"config error: {exc}") from None


def main_callback(
    ctx: typer.Context,
    config: Annotated[
        Path, typer.Option("--config", "-c", envvar=config_mod.CONFIG_ENV_VAR, help="The TOML config file.")
    ] = Path(config_mod.DEFAULT_CONFIG_FILE),
    plugins: Annotated[
        str | None, typer.Option("--plugins", help="Enable only these plugins (comma-separated names).")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="Poll every source once, flush every output, exit.")
    ] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    **plugin_flag_values: str | None,
) -> None:
    if version:
        typer.echo(f"agent {__version__}")
        raise typer.Exit(0)
    if log_level is not None:
        setup_logging(log_level)  # checked here, so that every sub-command rejects a bad level
    only = [p.strip() for p in plugins.split(",") if p.strip()] if plugins is not None else None
    flags: dict[str, CommandLineFlag] = ctx.meta.get(PLUGIN_FLAGS, {})
    given = [(flags[key], value) for key, value in plugin_flag_values.items() if value is not None]
    ctx.obj = Options(config, only, given, log_level)
    if ctx.invoked_subcommand is None:
        raise typer.Exit(run_agent(ctx.obj, once=once))


def run_agent(
    options: Options,
    *,
    once: bool = False,
    command: list[str] | None = None,
    watch_pid: int | None = None,
) -> int:
    setup_logging(options.log_level or "info")
    if watch_pid is not None:
        # Checked before anything starts: a PID that does not exist is a usage error, said in one line.
        try:
            pidfd = open_pidfd(watch_pid)
        except ProcessLookupError:
            raise fail(f"watch: no process with PID {watch_pid}") from None
        except PermissionError:
            raise fail(f"watch: process {watch_pid} cannot be watched (permission denied)") from None
    pm, plugins = discover()
    cfg = load_config(options, plugins)
    if options.log_level is None:
        setup_logging(cfg.agent.log_level)
    try:
        check_enabled(plugins, cfg.plugins)
    except PluginLoadError as exc:
        raise fail(f"plugin error: {exc}", 1) from None
    agent = Agent(cfg, plugins, pm, control=True, overrides=options.overrides)
    observer = SummaryObserver(set())
    extra = [Element("agent", "summary", "transform", observer)] if command or watch_pid else []
    try:
        agent.start_plugins(extra_elements=extra)
    except PluginStartError as exc:
        raise fail(str(exc), 1) from None
    log.info("started plugins: %s", ", ".join(agent.started) or "none")
    try:
        if command is not None:
            return trio.run(_run_exec, agent, command, observer)
        if watch_pid is not None:
            return trio.run(_run_watch, agent, watch_pid, pidfd, observer)
        trio.run(_run, agent, once)
        if agent.forced_exit_code:
            return agent.forced_exit_code
    except StartupError as exc:
        raise fail(str(exc), 1) from None
    except BaseExceptionGroup as group:
        startup = group.subgroup(StartupError)
        if startup is not None:
            raise fail(describe_exception(startup), 1) from None
        raise
    except KeyboardInterrupt:
        return 130
    return 0


async def _run(agent: Agent, once: bool) -> None:
    await agent.run(once=once)


async def _forward_signals(pid: int) -> None:
    """Passes SIGINT, SIGTERM and SIGHUP on to the command: the agent keeps measuring until the command
    has exited, whatever the command does with the signal."""
    with trio.open_signal_receiver(*FORWARDED_SIGNALS) as signals:
        async for signum in signals:
            log.info("%s received: passed on to the command (PID %d)", signal.Signals(signum).name, pid)
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                return


async def _run_exec(agent: Agent, command: list[str], observer: SummaryObserver) -> int:
    """Measures while `command` runs: every polled source polls once before it starts and once more
    after it exits (the command's processes are announced as consumers meanwhile); prints the summary;
    returns the command's exit code (128+N if a signal N killed it)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(agent.run, handle_signals=False))
        assert agent.pipeline is not None
        await agent.pipeline.first_polls_done.wait()
        started_at = time.monotonic()
        try:
            # Not trio.run_process: the command must stay unreaped (a zombie) until the final poll
            # has read its last CPU times, and wait4 gives the whole tree's resource usage.
            process = subprocess.Popen(command)
        except OSError as exc:
            typer.echo(f"exec: cannot run {command[0]!r}: {exc.strerror or exc}", err=True)
            agent.stop(final_poll=True)
            return 127 if isinstance(exc, FileNotFoundError) else 126
        pidfd = open_pidfd(process.pid)
        tree = ProcessTree(process.pid, agent.events)
        tree.start()
        observer.pids = tree.announced
        async with trio.open_nursery() as helpers:
            helpers.start_soon(_forward_signals, process.pid)
            helpers.start_soon(tree.follow)
            await wait_for_exit(process.pid, pidfd)
            wall = time.monotonic() - started_at
            helpers.cancel_scope.cancel()
        agent.stop(final_poll=True)
    # The pipeline has drained: the final poll saw the zombie. Now reap it.
    tree.end_all()
    if pidfd is not None:
        os.close(pidfd)
    _, status, usage = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    process.returncode = code  # reaped here, not by Popen
    summary = Summary(
        wall_seconds=wall,
        user_seconds=usage.ru_utime,
        system_seconds=usage.ru_stime,
        peak_memory_bytes=usage.ru_maxrss * 1024,
        peak_memory_note="largest resident set in the tree",
        processes=len(tree.announced),
        energy=observer,
        energy_plugins="energy-attribution" in agent.started_names,
    )
    title = f"agent exec: {shlex.join(command)} exited with code {code}"
    typer.echo(format_summary(title, summary), err=True)
    return 128 - code if code < 0 else code


async def _run_watch(agent: Agent, pid: int, pidfd: int | None, observer: SummaryObserver) -> int:
    """Measures a running process and its children until it exits (or a signal stops the agent), then
    prints the summary and returns 0."""
    pipeline_done = trio.Event()
    started_at = time.monotonic()

    async def run_pipeline(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await agent.run(final_poll_on_signal=True, task_status=task_status)
        pipeline_done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(run_pipeline)
        tree = ProcessTree(pid, agent.events)
        tree.start()
        observer.pids = tree.announced
        async with trio.open_nursery() as helpers:
            helpers.start_soon(tree.follow)

            async def until_exit() -> None:
                await wait_for_exit(pid, pidfd)
                helpers.cancel_scope.cancel()

            async def until_stopped() -> None:
                await pipeline_done.wait()
                helpers.cancel_scope.cancel()

            helpers.start_soon(until_exit)
            helpers.start_soon(until_stopped)
        wall = time.monotonic() - started_at
        agent.stop(final_poll=True)
    tree.end_all()
    if pidfd is not None:
        os.close(pidfd)
    cpu = observer.cpu_by_kind
    summary = Summary(
        wall_seconds=wall,
        user_seconds=cpu.get("user", 0.0) + cpu.get("guest", 0.0),
        system_seconds=cpu.get("system", 0.0),
        peak_memory_bytes=observer.peak_resident,
        peak_memory_note="resident, the tree's largest total at one poll (procfs)",
        processes=len(tree.announced),
        energy=observer,
        energy_plugins="energy-attribution" in agent.started_names,
    )
    if "procfs" not in agent.started_names:
        log.warning(
            "watch: procfs is not enabled, so the CPU time and memory of the process are not measured"
        )
    typer.echo(format_summary(f"agent watch: process {pid} measured while it ran", summary), err=True)
    return 0


ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="The TOML config file (as before the sub-command).")
]
PluginsOption = Annotated[
    str | None, typer.Option("--plugins", help="Enable only these plugins (as before the sub-command).")
]


def _sub_command_options(options: Options, config: Path | None, plugins: str | None) -> Options:
    """`--config` and `--plugins` given after the sub-command's name win over those before it."""
    if config is not None:
        options.config_path = config
    if plugins is not None:
        options.overrides.only_plugins = [p.strip() for p in plugins.split(",") if p.strip()]
    return options


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_command(
    ctx: typer.Context,
    command: Annotated[list[str], typer.Argument(help="The command to run, after --.")],
    config: ConfigOption = None,
    plugins: PluginsOption = None,
) -> None:
    """Run a command and measure it while it runs (its processes are consumers); print a summary on
    stderr; exit with its exit code. SIGINT, SIGTERM and SIGHUP are passed on to the command."""
    options = _sub_command_options(ctx.obj, config, plugins)
    raise typer.Exit(run_agent(options, command=list(command) + list(ctx.args)))


@app.command("watch")
def watch_command(
    ctx: typer.Context,
    pid: Annotated[int, typer.Argument(help="The PID of a running process.")],
    config: ConfigOption = None,
    plugins: PluginsOption = None,
) -> None:
    """Measure a running process and its children until it exits; print a summary on stderr; exit 0.
    A PID that does not exist exits 2."""
    options = _sub_command_options(ctx.obj, config, plugins)
    raise typer.Exit(run_agent(options, watch_pid=pid))


@plugins_app.command("list")
def plugins_list(
    ctx: typer.Context,
    output_format: Annotated[
        str, typer.Option("--format", help="table (for people) or json (one array of objects).")
    ] = "table",
) -> None:
    """List installed plugins: name, version, elements, enabled, API range, origin.

    ENABLED is "refused" for a plugin whose `agent_api` range excludes this agent's API version."""
    options: Options = ctx.obj
    if output_format not in ("table", "json"):
        raise fail(f"usage error: --format: expected table or json, got {output_format!r}")
    _, plugins = discover()
    cfg = load_config(options, plugins, create=False)
    if output_format == "json":
        typer.echo(
            json.dumps([plugin_summary(entry, name in cfg.plugins) for name, entry in plugins.items()])
        )
        return
    rows = [("NAME", "VERSION", "ELEMENTS", "ENABLED", "API", "ORIGIN")]
    for name, entry in plugins.items():
        enabled = "refused" if entry.refusal is not None else "yes" if name in cfg.plugins else "no"
        rows.append(
            (
                name,
                entry.cls.version,
                ",".join(entry.cls.provides) or "-",
                enabled,
                entry.cls.agent_api or "any",
                entry.origin,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def plugin_summary(entry: PluginEntry, enabled: bool) -> dict[str, object]:
    """One plugin in `plugins list --format json`."""
    return {
        "name": entry.cls.name,
        "version": entry.cls.version,
        "kinds": list(entry.cls.provides),
        "description": entry.cls.description,
        "enabled": enabled and entry.refusal is None,
        "refused": entry.refusal,
        "api": entry.cls.agent_api,
        "origin": {
            "builtin": entry.builtin,
            "distribution": entry.distribution,
            "version": entry.distribution_version,
        },
    }


@plugins_app.command("new")
def plugins_new(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The plugin's name: lower case words joined by '-'.")],
    kind: Annotated[str, typer.Option("--kind", help="source, transform or output.")],
    directory: Annotated[Path, typer.Option("--dir", help="Where to write agent-NAME/.")] = Path("."),
) -> None:
    """Write a ready plugin package, agent-NAME/, with its tests (see agent.scaffold)."""
    from agent.scaffold import ScaffoldError, new_plugin

    _, plugins = discover()
    try:
        path = new_plugin(name, kind, directory, taken=plugins)
    except ScaffoldError as exc:
        raise fail(f"plugins new: {exc}") from None
    typer.echo(f"wrote {path}; try it: pip install -e {path} && pytest {path}", err=True)


@config_app.command("regen")
def config_regen(ctx: typer.Context) -> None:
    """Rewrite the config file from every installed plugin's defaults."""
    options: Options = ctx.obj
    _, plugins = discover()
    text = config_mod.generate(plugins)
    path = options.config_path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise fail(f"config error: {path}: cannot write: {exc.strerror or exc}") from None
    typer.echo(f"wrote {path}", err=True)


#: Where `main_callback` finds the plugin-declared flags, by parameter name, in the context's `meta`.
PLUGIN_FLAGS = "agent.plugin_flags"


def installed_flags() -> list[CommandLineFlag]:
    """Every flag that an installed plugin declares (`agent_command_line_flags`). A plugin that cannot
    be loaded adds none here: running the agent then reports it."""
    try:
        pm = build_plugin_manager()
        return collect_command_line_flags(pm, collect_plugins(pm))
    except PluginLoadError:
        return []


def register_main_callback(flags: list[CommandLineFlag]) -> None:
    """Registers `main_callback` with one more option per plugin flag.

    typer builds options from a function's signature: the callback's signature gains a keyword parameter
    per flag (`Annotated[str | None, typer.Option("--relay-out", ...)]`), whose value reaches
    `main_callback` in `**plugin_flag_values`."""
    by_param = {f"plugin_flag_{i}": flag for i, flag in enumerate(flags)}
    signature = inspect.signature(main_callback, eval_str=True)
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    added = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                str | None,
                typer.Option(
                    flag.flag,
                    metavar=flag.metavar,
                    help=flag.help or f"Enable the {flag.plugin} plugin and set its {flag.key}.",
                ),
            ],
        )
        for name, flag in by_param.items()
    ]
    parameters = fixed + added

    def callback(ctx: typer.Context, **values: object) -> None:
        ctx.meta[PLUGIN_FLAGS] = by_param
        main_callback(ctx, **values)  # type: ignore[arg-type]

    callback.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    callback.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
    callback.__doc__ = main_callback.__doc__
    app.callback()(callback)


# -- talking to a running agent --


def _client(ctx: typer.Context, config: Path | None) -> ControlClient:
    options: Options = ctx.obj
    if config is not None:
        options.config_path = config
    _, plugins = discover()
    if not options.config_path.exists():
        return ControlClient(control_socket_path(load_config(options, plugins, create=False).data_dir))
    try:
        cfg = config_mod.load(options.config_path, plugins, options.overrides)
    except ConfigError:
        # The socket depends on [agent] data_dir only: a mistake elsewhere in the file (being edited,
        # about to be reloaded) must not keep the operator from the running agent.
        try:
            section = config_mod.convert_section(
                config_mod.load_toml(options.config_path).get("agent", {}), config_mod.AgentSection, "agent"
            )
        except ConfigError as exc:
            raise fail(f"config error: {exc}") from None
        cfg = AgentConfig(section, options.config_path)
    return ControlClient(control_socket_path(cfg.data_dir))


def _request(client: ControlClient, action: str, **fields: object) -> dict:
    try:
        return client.request(action, **fields)
    except NoAgent as exc:
        raise fail(f"agent control: {exc}", 1) from None
    except RequestFailed as exc:
        raise fail(f"agent control: {exc}", 2) from None


def _echo_element(element: dict) -> None:
    line = f"{element['name']}: {element['state']}"
    if "poll_interval" in element:
        line += f" (poll_interval {element['poll_interval']}, flush_interval {element['flush_interval']})"
    typer.echo(line)


@control_app.callback()
def control_callback(ctx: typer.Context, config: ConfigOption = None) -> None:
    if config is not None:
        ctx.obj.config_path = config


@control_app.command("list")
def control_list(ctx: typer.Context, config: ConfigOption = None) -> None:
    """One element per line: its name, its kind and its state (running, paused, disabled, stopped)."""
    elements = _request(_client(ctx, config), "list")["elements"]
    width = max((len(e["name"]) for e in elements), default=0)
    for e in elements:
        typer.echo(f"{e['name'].ljust(width)}  {e['kind'].ljust(9)}  {e['state']}")


@control_app.command("status")
def control_status(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Everything the status page shows, as JSON: elements, counters, rates, plugins' sections."""
    answer = _request(_client(ctx, config), "status")
    answer.pop("ok", None)
    typer.echo(json.dumps(answer, indent=2))


def _element_command(action: str, help_text: str) -> None:
    def command(
        ctx: typer.Context,
        element: Annotated[
            str, typer.Argument(help="The element's name, as `agent control list` prints it.")
        ],
        config: ConfigOption = None,
    ) -> None:
        _echo_element(_request(_client(ctx, config), action, element=element)["element"])

    command.__doc__ = help_text
    control_app.command(action)(command)


_element_command("pause", "Pause a source: a polled one skips its polls, an autonomous one's sends wait.")
_element_command("resume", "Resume a paused source.")
_element_command("poll", "Poll a polled source now and send its points on at once.")
_element_command("enable", "Enable an output (it writes the points that arrive from now on) or a transform.")
_element_command("disable", "Disable an output (its points are dropped and counted) or a transform.")


@control_app.command("set-period")
def control_set_period(
    ctx: typer.Context,
    element: Annotated[str, typer.Argument(help="A polled source, as `agent control list` names it.")],
    duration: Annotated[str, typer.Argument(help='The new poll interval, e.g. "500ms".')],
    flush: Annotated[
        str | None, typer.Option("--flush", help="Also set the flush interval (raised to the poll interval).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Set a polled source's poll interval, at once (a pending wait is cut short); not saved to the file."""
    args = {"poll_interval": duration}
    if flush is not None:
        args["flush_interval"] = flush
    _echo_element(_request(_client(ctx, config), "set-period", element=element, args=args)["element"])


@control_app.command("flush")
def control_flush(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Polled sources send the points they hold, outputs write them without waiting for their flush interval."""
    _request(_client(ctx, config), "flush")
    typer.echo("flushed")


@control_app.command("stop")
def control_stop(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Stop the agent as SIGTERM does: sources stop, outputs write what is buffered."""
    _request(_client(ctx, config), "stop")
    typer.echo("stopping")


@control_app.command("reload")
def control_reload(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Reload the config file, as SIGHUP does: plugins whose table changed restart, the others keep
    running; a file with an error changes nothing (exit 2 with its one line)."""
    answer = _request(_client(ctx, config), "reload")["reload"]
    lines = [f"{what} {name}" for what in ("restarted", "started", "stopped") for name in answer[what]]
    lines += [f"failed {name} (see the agent's log)" for name in answer["failed"]]
    if answer["restart_needed"]:
        lines.append(f"needs a restart: [agent] {', '.join(answer['restart_needed'])}")
    typer.echo("\n".join(lines) or "config unchanged")


@control_app.command("run")
def control_run(
    ctx: typer.Context,
    section: Annotated[str, typer.Argument(help="A plugin's status section, as `status` names it.")],
    command: Annotated[str, typer.Argument(help="One of the section's commands.")],
    arguments: Annotated[str, typer.Argument(help="The command's arguments as a JSON object.")] = "{}",
    config: ConfigOption = None,
) -> None:
    """Run a command that a plugin adds (see the `commands` of its section in `agent control status`)."""
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise fail(f"agent control: arguments: not JSON: {exc}") from None
    result = _request(_client(ctx, config), "run", section=section, command=command, args=args)["result"]
    typer.echo(json.dumps(result, indent=2))


@app.command("tap")
def tap_command(
    ctx: typer.Context,
    metric: Annotated[str, typer.Option("--metric", help="Only metrics matching this glob.")] = "*",
    limit: Annotated[int, typer.Option("--limit", help="Exit after this many points (0: until Ctrl-C).")] = 0,
    output_format: Annotated[
        str, typer.Option("--format", help="text or json (one object per line).")
    ] = "text",
    config: ConfigOption = None,
) -> None:
    """Print points as they flow through a running agent, after the transforms. The tap never slows the
    agent: when this terminal is slower, points are dropped, and how many is said on stderr."""
    if output_format not in ("text", "json"):
        raise fail(f"tap: --format: expected text or json, got {output_format!r}")
    client = _client(ctx, config)
    client.timeout = None
    printed = dropped = 0
    code = 0
    try:
        for message in client.tap(metric):
            if "dropped" in message:
                dropped = int(message["dropped"])
                continue
            point = message.get("point")
            if not isinstance(point, dict):
                continue
            typer.echo(json.dumps(point) if output_format == "json" else format_tap_text(point))
            printed += 1
            if limit and printed >= limit:
                break
        else:
            typer.echo("tap: the agent stopped", err=True)
    except NoAgent as exc:
        raise fail(f"agent tap: {exc}", 1) from None
    except RequestFailed as exc:
        raise fail(f"agent tap: {exc}", 2) from None
    except KeyboardInterrupt:
        code = 0
    typer.echo(
        f"tap: {printed} points printed, {dropped} dropped by the tap (the reader was slower than the agent)",
        err=True,
    )
    raise typer.Exit(code)


def format_tap_text(point: dict) -> str:
    """timestamp metric{attributes} value resource[:id] [consumer[:id]]"""
    attrs = point.get("attributes") or {}
    labels = "{" + ",".join(f"{k}={v}" for k, v in attrs.items()) + "}" if attrs else ""
    where = point.get("resource", "")
    if point.get("resource_id"):
        where += f":{point['resource_id']}"
    if point.get("consumer"):
        where += f" {point['consumer']}" + (f":{point['consumer_id']}" if point.get("consumer_id") else "")
    return f"{point['timestamp']} {point['metric']}{labels} {point['value']} {where}".rstrip()


@app.command("top")
def top_command(
    ctx: typer.Context,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between refreshes.")] = 1.0,
    config: ConfigOption = None,
) -> None:
    """A live view of a running agent: elements, rates, queues, drops, plugins' sections. `q` quits."""
    from agent.top import run_top

    client = _client(ctx, config)
    try:
        client.request("status")
    except NoAgent as exc:
        raise fail(f"agent top: {exc}", 1) from None
    raise typer.Exit(run_top(client, max(0.1, interval)))


def main() -> None:
    register_main_callback(installed_flags())
    # Keep the process's exit code meaningful when stdout is a closed pipe (`agent plugins list | head`).
    try:
        app(prog_name="agent")
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
