"""Graphite relay throughput end to end: sender process -> agent (graphite-in -> graphite-out, consistent
hashing over 4 destinations) -> counting sinks, beside graphite's own carbon-relay on the same input.

    python benchmarks/graphite.py [--lines 4000000] [--paths 100000] [--connections 32] [--agents 2]
                                  [--carbon-lines 200000] [--carbon-venv DIR] [--no-carbon]
                                  [--read-size 256KiB] [--graphite-out "queue_max_points = 10000"]
                                  [--agent-prefix "py-spy record -o a.svg --"] [--control-rounds 3]

Three kinds of processes share the machine, as in production: the sender (its own process: pre-built
lines written as fast as the relay takes them, over `--connections` TCP connections), the relay, and
the sinks (one process, 4 listening sockets, counting newlines). The relay is:

- **agent**: the real `python -m agent.cli` with a generated config: graphite-in plaintext, graphite-out
  with one `consistent_hashing` route over the 4 sinks, plaintext. graphite-out's inbox is set to
  `overflow = "block"`, so the agent back-pressures the sender instead of dropping: the figure is what
  it sustains with every line delivered (the run fails if a line is missing);
- **agents with reuse_port**: `--agents` such agents sharing the graphite-in port (SO_REUSEPORT; the
  kernel spreads the sender's connections over them), to use more than one core;
- **carbon-relay**: graphite's carbon-relay.py (`RELAY_METHOD = consistent-hashing`, the same 4 sinks as
  `DESTINATIONS`, `DESTINATION_PROTOCOL = line`), if the `carbon` package is installed in a virtualenv:
  `--carbon-venv`, $CARBON_VENV, this Python's own venv (the nox `benchmarks` session installs carbon
  there), or `.carbon-venv` in the repository. It is much slower, so it gets `--carbon-lines` lines:
  compare the rates, not the durations.

Also in the same run, **raw**: the sender straight into one sink, the ceiling of moving these bytes.

With `--control-rounds N`, one agent is then measured N more times with the control API off and on,
alternating: "on" adds `[agent] http` (rates sampled every second) and a status page open on it
(`status_poller.py`, one `GET /api/status` per second); the control socket is on in both, as in every
`agent` process.

The rate is lines over the time from the sender's first byte to the sinks' last line. Each relay's CPU
time is printed too: on a shared machine the wall-clock rate moves with the neighbours' load, lines
per CPU-second less so. The last line is JSON: {"raw_lines_per_s", "lines_per_s" (one agent),
"reuse_port_agents", "reuse_port_lines_per_s", "carbon_relay_lines_per_s" (null if carbon is not
installed), "ratio" (one agent / carbon-relay, or null)}, and with --control-rounds the medians
"control_off_lines_per_s" and "control_on_lines_per_s" with every round's figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
DESTINATIONS = 4
T0 = 1_700_000_000


def build_lines(paths: int) -> bytes:
    """One block of `paths` lines, each path once; the sender repeats it."""
    return "".join(
        f"servers.host{i % 997}.app{i % 13}.metric{i} {i % 1000 * 1.5} {T0 + i % 60}\n" for i in range(paths)
    ).encode()


# -- sinks: count newlines on 4 sockets -------------------------------------------------------------------


def sink_process(
    ready: multiprocessing.Queue, results: multiprocessing.Queue, commands: multiprocessing.Queue
) -> None:
    """Counts lines on DESTINATIONS sockets. For each command (expected count), reports the time the
    total reached it, or the total seen when nothing arrived for 5 s."""
    selector = selectors.DefaultSelector()
    listeners = []
    for _ in range(DESTINATIONS):
        listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, None)
        listeners.append(listener)
    ready.put([listener.getsockname()[1] for listener in listeners])
    total = 0
    while True:
        expected = commands.get()
        if expected is None:
            return
        total = 0
        last_data = time.monotonic()
        while total < expected:
            events = selector.select(timeout=0.5)
            for key, _ in events:
                if key.data is None:
                    connection, _ = key.fileobj.accept()
                    connection.setblocking(False)
                    selector.register(connection, selectors.EVENT_READ, "connection")
                    continue
                try:
                    data = key.fileobj.recv(1 << 20)
                except (BlockingIOError, ConnectionResetError):
                    data = None
                if data == b"":
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
                elif data:
                    total += data.count(b"\n")
                    last_data = time.monotonic()
            if not events and time.monotonic() - last_data > 5.0:
                break
        results.put((total, time.monotonic()))


# -- sender -------------------------------------------------------------------------------------------------


def sender_process(
    port: int, block: bytes, lines: int, block_lines: int, connections: int, started: multiprocessing.Queue
) -> None:
    """Sends `lines` lines (whole blocks) over `connections` connections, one thread each."""
    blocks = lines // block_lines
    share = [blocks // connections + (1 if i < blocks % connections else 0) for i in range(connections)]
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    go = threading.Barrier(connections + 1)

    def send(sock: socket.socket, count: int) -> None:
        go.wait()
        for _ in range(count):
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)

    threads = [threading.Thread(target=send, args=(s, n)) for s, n in zip(sockets, share, strict=True)]
    for thread in threads:
        thread.start()
    started.put(time.monotonic())
    go.wait()
    for thread in threads:
        thread.join()
    for sock in sockets:
        # Wait for the peer to close (it read everything), so the process does not reset the connection.
        sock.settimeout(600)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
        sock.close()


def run_sender(
    port: int, block: bytes, lines: int, block_lines: int, connections: int
) -> tuple[multiprocessing.Process, float]:
    started: multiprocessing.Queue = multiprocessing.Queue()
    process = multiprocessing.Process(
        target=sender_process, args=(port, block, lines, block_lines, connections, started), daemon=True
    )
    process.start()
    return process, started.get(timeout=30)


def measure(
    name: str,
    port: int,
    block: bytes,
    lines: int,
    block_lines: int,
    connections: int,
    sinks: tuple[multiprocessing.Queue, multiprocessing.Queue],
    relay_pids: Sequence[int] = (),
    cpu_out: list[float] | None = None,
) -> float:
    """Lines per second; `cpu_out` receives the relays' CPU seconds."""
    commands, results = sinks
    lines = lines // block_lines * block_lines
    relay = [process for pid in relay_pids for process in _processes(pid)]
    cpu_before = _cpu_seconds(relay)
    commands.put(lines)
    sender, started = run_sender(port, block, lines, block_lines, connections)
    received, finished = results.get()
    cpu = _cpu_seconds(relay) - cpu_before
    sender.terminate()
    sender.join()
    elapsed = finished - started
    rate = lines / elapsed
    status = "" if received == lines else f"  INCOMPLETE: {received} of {lines} lines arrived"
    print(
        f"{name:58s} {lines:>9d} lines in {elapsed:6.2f}s = {rate / 1e6:5.2f} M lines/s{status}", flush=True
    )
    if relay:
        # On a shared machine the wall-clock rate moves with the neighbours' load; CPU time per line less so.
        print(
            f"{'':58s} relay CPU {cpu:6.2f}s ({cpu / elapsed:4.0%} of one core) = {lines / cpu / 1e6:5.2f} M lines"
            " per CPU-second",
            flush=True,
        )
    if received != lines:
        raise SystemExit(f"{name}: {lines - received} lines were lost")
    if cpu_out is not None:
        cpu_out.append(cpu)
    return rate


def _processes(pid: int) -> list[psutil.Process]:
    """A relay's process and its children (the agent runs under a profiler with --agent-prefix)."""
    process = psutil.Process(pid)
    return [process, *process.children(recursive=True)]


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


# -- raw baseline: sender -> one sink -----------------------------------------------------------------------


def raw_rate(
    ports: list[int], block: bytes, lines: int, block_lines: int, connections: int, sinks: tuple
) -> float:
    return measure("raw: sender -> sink, no relay", ports[0], block, lines, block_lines, connections, sinks)


# -- the agent -----------------------------------------------------------------------------------------------


def agent_config(
    ports: list[int],
    data_dir: Path,
    listen: str,
    reuse_port: bool,
    read_size: str | None,
    output_options: Sequence[str] = (),
    http: str = "",
) -> str:
    destinations = ", ".join(f'"127.0.0.1:{port}:{i}"' for i, port in enumerate(ports))
    read_size_line = f'read_size = "{read_size}"' if read_size else ""
    output_lines = "\n".join(output_options)
    return f"""
[agent]
data_dir = "{data_dir}"
self_metrics_interval = "0s"
log_level = "info"
http = "{http}"

[plugins.graphite-in]
plaintext = "{listen}"
pickle = ""
reuse_port = {"true" if reuse_port else "false"}
{read_size_line}

[plugins.graphite-out]
admin_http = ""
admin_line = ""
overflow = "block"
{output_lines}
[[plugins.graphite-out.routes]]
key = "carbon"
type = "consistent_hashing"
destinations = [{destinations}]
"""


def start_agent(
    config: Path, prefix: list[str], http: list[str] | None = None
) -> tuple[subprocess.Popen, int]:
    """Starts an agent and returns it with its graphite-in port; `http` receives its status page's
    address when it serves one."""
    process = subprocess.Popen(
        [*prefix, sys.executable, "-m", "agent.cli", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        page = re.search(r"status page and control API on http://(\S+)/", line)
        if page and http is not None:
            http.append(page.group(1))
        match = re.search(r"graphite-in: listening: plaintext on 127\.0\.0\.1:(\d+)", line)
        if match:
            # Keep reading stderr so that the agent never blocks on a full pipe.
            threading.Thread(target=_show_warnings, args=(process.stderr,), daemon=True).start()
            return process, int(match.group(1))
    process.kill()
    raise SystemExit(f"the agent did not start: {process.stderr.read()}")


def _show_warnings(stream) -> None:
    for line in stream:
        if "WARNING" in line or "ERROR" in line or "spooling" in line or "graphite-in: stopped" in line:
            print("  agent:", line.rstrip(), flush=True)


def stop(process: subprocess.Popen, signum: int = signal.SIGTERM) -> None:
    process.send_signal(signum)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def run_agents(count: int, ports: list[int], block: bytes, args: argparse.Namespace, sinks: tuple) -> float:
    """Measures `count` agents sharing the graphite-in port (reuse_port when more than one)."""
    agents: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            port = 0
            for number in range(count):
                config = Path(tmp) / f"agent{number}.toml"
                config.write_text(
                    agent_config(
                        ports,
                        Path(tmp) / f"data{number}",
                        f"127.0.0.1:{port}",
                        count > 1,
                        args.read_size,
                        args.graphite_out,
                    )
                )
                agent, port = start_agent(config, args.agent_prefix.split() if number == 0 else [])
                agents.append(agent)
            name = (
                "agent: graphite-in -> consistent hashing -> graphite-out"
                if count == 1
                else f"{count} agents on one port (reuse_port), same route"
            )
            return measure(
                name, port, block, args.lines, args.paths, args.connections, sinks, [a.pid for a in agents]
            )
        finally:
            for agent in agents:
                # SIGINT: a profiler running the agent (--agent-prefix) writes its output on it.
                stop(agent, signal.SIGINT)


def run_control_rounds(
    ports: list[int], block: bytes, args: argparse.Namespace, sinks: tuple
) -> dict[str, Any]:
    """One agent, `args.control_rounds` times with the control API off and on, alternating."""
    rounds: dict[str, list[float]] = {"off": [], "on": []}
    per_cpu: dict[str, list[float]] = {"off": [], "on": []}
    for number in range(args.control_rounds):
        for mode in ("off", "on") if number % 2 == 0 else ("on", "off"):
            with tempfile.TemporaryDirectory() as tmp:
                config = Path(tmp) / "agent.toml"
                config.write_text(
                    agent_config(
                        ports,
                        Path(tmp) / "data",
                        "127.0.0.1:0",
                        False,
                        args.read_size,
                        args.graphite_out,
                        http="127.0.0.1:0" if mode == "on" else "",
                    )
                )
                http: list[str] = []
                cpu: list[float] = []
                agent, port = start_agent(config, [], http)
                poller = None
                try:
                    if mode == "on":
                        poller = subprocess.Popen(
                            [
                                sys.executable,
                                str(Path(__file__).with_name("status_poller.py")),
                                f"http://{http[0]}",
                            ],
                            stdout=subprocess.PIPE,
                        )
                        assert poller.stdout is not None
                        poller.stdout.readline()  # "ready": the page is open
                    rate = measure(
                        f"round {number + 1}, control API {mode}",
                        port,
                        block,
                        args.lines,
                        args.paths,
                        args.connections,
                        sinks,
                        [agent.pid],
                        cpu,
                    )
                    rounds[mode].append(rate)
                    per_cpu[mode].append(args.lines // args.paths * args.paths / cpu[0])
                finally:
                    if poller is not None:
                        poller.kill()
                        poller.wait()
                    stop(agent)
    for label, values, unit in (("wall clock", rounds, "lines/s"), ("agent CPU", per_cpu, "lines/CPU-s")):
        off, on = statistics.median(values["off"]), statistics.median(values["on"])
        spread = (max(values["off"]) - min(values["off"])) / off
        print(
            f"{label}: control API off: median {off:,.0f} {unit} (spread {spread:.0%} of it); on, with a"
            f" status page open: median {on:,.0f} {unit}; ratio on / off: {on / off:.3f}"
        )
    return {
        "control_off_lines_per_s": statistics.median(rounds["off"]),
        "control_on_lines_per_s": statistics.median(rounds["on"]),
        "control_off_lines_per_cpu_s": statistics.median(per_cpu["off"]),
        "control_on_lines_per_cpu_s": statistics.median(per_cpu["on"]),
        "control_off_rounds": [round(r) for r in rounds["off"]],
        "control_on_rounds": [round(r) for r in rounds["on"]],
    }


# -- carbon-relay --------------------------------------------------------------------------------------------


def find_carbon_venv(given: str | None) -> Path | None:
    """A virtualenv holding carbon-relay.py: --carbon-venv, $CARBON_VENV, this Python's own venv (the nox
    `benchmarks` session installs carbon there), or .carbon-venv in the repository."""
    this_venv = str(Path(sys.executable).parent.parent)
    for candidate in (given, os.environ.get("CARBON_VENV"), this_venv, str(REPO / ".carbon-venv")):
        if candidate and (Path(candidate) / "bin" / "carbon-relay.py").exists():
            return Path(candidate)
    return None


def start_carbon_relay(venv: Path, ports: list[int], root: Path) -> tuple[subprocess.Popen, int]:
    line_port, pickle_port = _free_port(), _free_port()
    (root / "conf").mkdir(parents=True)
    (root / "storage").mkdir()
    (root / "conf" / "storage-schemas.conf").write_text("")
    destinations = ", ".join(f"127.0.0.1:{port}:{i}" for i, port in enumerate(ports))
    (root / "conf" / "carbon.conf").write_text(
        f"""[relay]
LINE_RECEIVER_INTERFACE = 127.0.0.1
LINE_RECEIVER_PORT = {line_port}
PICKLE_RECEIVER_INTERFACE = 127.0.0.1
PICKLE_RECEIVER_PORT = {pickle_port}
RELAY_METHOD = consistent-hashing
REPLICATION_FACTOR = 1
DESTINATIONS = {destinations}
DESTINATION_PROTOCOL = line
MAX_QUEUE_SIZE = 10000
USE_FLOW_CONTROL = True
"""
    )
    process = subprocess.Popen(
        [
            str(venv / "bin" / "python"),
            str(venv / "bin" / "carbon-relay.py"),
            f"--config={root}/conf/carbon.conf",
            "--nodaemon",
            f"--logdir={root}",
            f"--pidfile={root}/relay.pid",
            "start",
        ],
        env={**os.environ, "GRAPHITE_ROOT": str(root)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", line_port), timeout=1).close()
            return process, line_port
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.2)
    process.kill()
    raise SystemExit("carbon-relay did not start")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- main ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=4_000_000)
    parser.add_argument("--paths", type=int, default=100_000, help="distinct paths (one block of lines)")
    parser.add_argument(
        "--connections",
        type=int,
        default=32,
        help="sender connections (reuse_port spreads connections, not lines)",
    )
    parser.add_argument(
        "--agents",
        type=int,
        default=2,
        help="also measure this many agents sharing the port (reuse_port); 1: only one",
    )
    parser.add_argument("--carbon-lines", type=int, default=200_000)
    parser.add_argument("--carbon-venv", default=None)
    parser.add_argument("--no-carbon", action="store_true")
    parser.add_argument("--read-size", default=None, help="graphite-in's read_size (default: the plugin's)")
    parser.add_argument(
        "--graphite-out",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='a TOML line added to [plugins.graphite-out], e.g. "queue_max_points = 100000" (repeatable)',
    )
    parser.add_argument(
        "--agent-prefix",
        default="",
        help='a command to run the agent under, e.g. "py-spy record -o agent.svg --" to profile it',
    )
    parser.add_argument(
        "--control-rounds",
        type=int,
        default=0,
        help="then N rounds of one agent with the control API off and on",
    )
    args = parser.parse_args()

    block = build_lines(args.paths)
    ready: multiprocessing.Queue = multiprocessing.Queue()
    commands: multiprocessing.Queue = multiprocessing.Queue()
    results: multiprocessing.Queue = multiprocessing.Queue()
    sink = multiprocessing.Process(target=sink_process, args=(ready, results, commands), daemon=True)
    sink.start()
    ports = ready.get()
    sinks = (commands, results)
    print(
        f"{args.paths} distinct paths, {len(block) / args.paths:.0f} bytes per line, {args.connections} sender"
        f" connections, {DESTINATIONS} destinations, {os.cpu_count()} cores",
        flush=True,
    )
    figures: dict[str, Any] = {}
    try:
        figures["raw_lines_per_s"] = raw_rate(ports, block, args.lines, args.paths, args.connections, sinks)
        figures["lines_per_s"] = run_agents(1, ports, block, args, sinks)
        if args.agents > 1:
            figures["reuse_port_agents"] = args.agents
            figures["reuse_port_lines_per_s"] = run_agents(args.agents, ports, block, args, sinks)
        if args.control_rounds:
            figures |= run_control_rounds(ports, block, args, sinks)
        figures["carbon_relay_lines_per_s"] = None
        venv = None if args.no_carbon else find_carbon_venv(args.carbon_venv)
        if venv is None:
            print("carbon-relay: not measured (no venv with graphite's carbon package; see --carbon-venv)")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                relay, port = start_carbon_relay(venv, ports, Path(tmp))
                try:
                    figures["carbon_relay_lines_per_s"] = measure(
                        "carbon-relay: consistent-hashing, line protocol",
                        port,
                        block,
                        args.carbon_lines,
                        args.paths,
                        args.connections,
                        sinks,
                        [relay.pid],
                    )
                finally:
                    stop(relay)
    finally:
        commands.put(None)
        sink.join(timeout=5)
        if sink.is_alive():
            sink.kill()
    carbon = figures.get("carbon_relay_lines_per_s")
    figures["ratio"] = round(figures["lines_per_s"] / carbon, 2) if carbon else None
    if carbon:
        print(f"agent / carbon-relay: {figures['ratio']}x")
    print(
        json.dumps(
            {
                key: (round(value) if key.endswith(("_per_s", "_per_cpu_s")) and value else value)
                for key, value in figures.items()
            }
        )
    )


if __name__ == "__main__":
    main()
