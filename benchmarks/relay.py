"""Relay throughput: synthetic -> relay-client -> relay-server -> discard, beside the raw transfer rate.

    python benchmarks/relay.py [--points 20000000] [--series 10] [--points-per-batch 10000]
                               [--buffer-max-length 100000] [--control-rounds 3]

Two measurements of the same batches, in the same run, each with the sender in its own process:

- **raw**: a process encodes the batches (`batch_to_wire` + `FrameEncoder.encode`) and writes them to a
  trio TCP stream; this process decodes them (`FrameDecoder` + `batch_from_wire`). No acknowledgements,
  no buffer, no pipeline: the floor of what msgspec and trio cost.
- **end to end**: a client agent (`python -m agent.cli`, the `synthetic` source, the `relay-client`
  output with its disk buffer) sends to a relay server running in this process (the `relay-server`
  source and the `discard` output) over loopback, with acknowledgements: a batch leaves the client's
  buffer only once the server's output has it.

With `--control-rounds N`, the end-to-end measurement is then repeated N times with the control API off
and on, alternating: "on" is the server agent serving its control socket and `[agent] http` (rates sampled
every second) with a status page open on it (`status_poller.py`, one `GET /api/status` per second); "off"
is the server agent without either. The client agent is the same `agent` process in both.

The rate is points over the time from the first point received to the last one written. The last line
is JSON: {"points_per_s": ..., "raw_points_per_s": ...} (and with --control-rounds, the medians
"control_off_points_per_s", "control_on_points_per_s" and every round's figure).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from agent import config as config_mod
from agent.manager import build_plugin_manager, collect_plugins
from agent.model import Batch
from agent.runtime import Agent
from agent_plugins.relay.protocol import (
    ClientMessage,
    FrameDecoder,
    FrameEncoder,
    batch_from_wire,
    batch_to_wire,
)
from agent_plugins.synthetic.plugin import SyntheticConfig, SyntheticSource


def record_batch(series: int, points_per_batch: int, buffer_max_length: int) -> Batch:
    """What the relay client sends: `buffer_max_length` points of synthetic batches, merged."""
    source = SyntheticSource(SyntheticConfig(series=series, points_per_batch=points_per_batch))
    merged: list[Any] = []
    for i in range(max(1, buffer_max_length // points_per_batch)):
        merged += source.build_batch(source._counts, 1_700_000_000_000_000_000 + i * 1_000_000_000).series
    return Batch(merged)


# -- raw: encode, send, receive, decode --


def raw_sender(port: int, batches: int, series: int, points_per_batch: int, buffer_max_length: int) -> None:
    batch = record_batch(series, points_per_batch, buffer_max_length)
    metric_ids = {s.metric: i for i, s in enumerate(batch.series) if isinstance(s.metric, str)}

    async def send() -> None:
        encoder = FrameEncoder()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for seq in range(1, batches + 1):
                await stream.send_all(encoder.encode(batch_to_wire(seq, batch, metric_ids)))

    trio.run(send)


async def measure_raw(points: int, args: argparse.Namespace) -> float:
    batch = record_batch(args.series, args.points_per_batch, args.buffer_max_length)
    per_batch = len(batch)
    batches = max(1, points // per_batch)
    total = batches * per_batch
    names = {i: s.metric for i, s in enumerate(batch.series) if isinstance(s.metric, str)}
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    received = 0
    first: float | None = None
    done = trio.Event()

    async def serve(stream: trio.SocketStream) -> None:
        nonlocal received, first
        decoder = FrameDecoder(ClientMessage)
        async with stream:
            while received < total:
                data = await stream.receive_some(1 << 20)
                if not data:
                    break
                if first is None:
                    first = time.perf_counter()
                for message in decoder.feed(data):
                    received += len(batch_from_wire(message, names))
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve, listeners)
        command = [
            sys.executable,
            __file__,
            "--raw-sender",
            str(port),
            "--batches",
            str(batches),
            "--series",
            str(args.series),
            "--points-per-batch",
            str(args.points_per_batch),
            "--buffer-max-length",
            str(args.buffer_max_length),
        ]
        process = await trio.lowlevel.open_process(command)
        with trio.fail_after(300):
            await done.wait()
        elapsed = time.perf_counter() - (first or time.perf_counter())
        await process.wait()
        nursery.cancel_scope.cancel()
    return received / elapsed


# -- end to end: a client agent process, a server agent here --


def client_config(port: int, data_dir: Path, points: int, args: argparse.Namespace) -> str:
    return f"""
[agent]
data_dir = "{data_dir}"
self_metrics_interval = "0s"
grace_period = "30s"
log_level = "warning"

[plugins.synthetic]
series = {args.series}
points_per_batch = {args.points_per_batch}
total_points = {points}

[plugins.relay-client]
client_name = "bench-client"
relay_server = "127.0.0.1:{port}"
buffer_max_length = {args.buffer_max_length}
buffer_timeout = "100ms"
disk_buffer = {"true" if not args.memory_buffer else "false"}
overflow = "block"
"""


async def measure_end_to_end(
    points: int,
    args: argparse.Namespace,
    workdir: Path,
    control: bool = False,
    cpu: list[float] | None = None,
) -> tuple[float, int]:
    pm = build_plugin_manager()
    plugins = collect_plugins(pm)
    for old in ("server-data", "client-data"):
        shutil.rmtree(workdir / old, ignore_errors=True)
    document = {
        "agent": {
            "data_dir": str(workdir / "server-data"),
            "self_metrics_interval": "0s",
            "log_level": "warning",
            "http": "127.0.0.1:0" if control else "",
        },
        "plugins": {
            "relay-server": {"address": "127.0.0.1:0"},
            "discard": {"queue_max_points": 4_000_000, "overflow": "block"},
        },
    }
    config = config_mod.resolve(document, plugins, path=None)
    agent = Agent(config, plugins, pm, control=control)
    agent.start_plugins()
    server = next(e.obj for e in agent.elements if e.plugin == "relay-server")
    discard = next(e.obj for e in agent.elements if e.plugin == "discard")
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: agent.run(handle_signals=False, task_status=task_status))
        port = int(server.bound_addresses[0].rsplit(":", 1)[1])
        poller = None
        if control:
            poller = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    str(Path(__file__).with_name("status_poller.py")),
                    f"http://{agent.http_address}",
                ],
                stdout=subprocess.PIPE,
            )
            assert poller.stdout is not None
            await poller.stdout.receive_some(100)  # "ready": the page is open
        config_path = workdir / "client.toml"
        config_path.write_text(client_config(port, workdir / "client-data", points, args))
        command = [sys.executable, "-m", "agent.cli", "--config", str(config_path)]
        process = await trio.lowlevel.open_process(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        first: float | None = None
        first_cpu = 0.0
        with trio.fail_after(600):
            while discard.points < points:
                if first is None and discard.points:
                    first = time.perf_counter()
                    first_cpu = time.process_time()
                await trio.sleep(0.002)
        elapsed = time.perf_counter() - (first or time.perf_counter())
        # The server's CPU time (this process): less sensitive to the neighbours' load than wall time.
        server_cpu = time.process_time() - first_cpu
        received = discard.points
        process.terminate()
        await process.wait()
        if poller is not None:
            poller.terminate()
            await poller.wait()
        agent.stop()
    if cpu is not None:
        cpu.append(server_cpu)
    return received / elapsed, received


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", type=int, default=20_000_000)
    parser.add_argument("--series", type=int, default=10)
    parser.add_argument("--points-per-batch", type=int, default=10_000)
    parser.add_argument("--buffer-max-length", type=int, default=100_000)
    parser.add_argument("--memory-buffer", action="store_true", help="disk_buffer = false on the client")
    parser.add_argument(
        "--control-rounds", type=int, default=0, help="then N rounds with the control API off and on"
    )
    parser.add_argument("--raw-sender", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_sender:
        raw_sender(args.raw_sender, args.batches, args.series, args.points_per_batch, args.buffer_max_length)
        return
    batch = record_batch(args.series, args.points_per_batch, args.buffer_max_length)
    print(
        f"batches of {len(batch.series)} series x {len(batch) // len(batch.series)} points;"
        f" {args.points} points; client and server in two processes over loopback"
    )
    raw = trio.run(measure_raw, args.points, args)
    print(f"raw trio/msgspec transfer (encode, send, receive, decode): {raw / 1e6:.2f} M points/s")
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        rate, received = trio.run(measure_end_to_end, args.points, args, Path(tmp))
    buffer = "memory" if args.memory_buffer else "disk"
    print(
        f"end to end (synthetic -> relay-client, {buffer} buffer -> relay-server -> discard, acks on):"
        f" {rate / 1e6:.2f} M points/s ({received} points)"
    )
    print(f"ratio raw / end to end: {raw / rate:.2f}")
    figures: dict[str, Any] = {"points_per_s": round(rate), "raw_points_per_s": round(raw)}
    if args.control_rounds:
        rounds: dict[str, list[float]] = {"off": [], "on": []}
        per_cpu: dict[str, list[float]] = {"off": [], "on": []}
        with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
            for number in range(args.control_rounds):
                for mode in ("off", "on") if number % 2 == 0 else ("on", "off"):
                    cpu: list[float] = []
                    rate, received = trio.run(
                        measure_end_to_end, args.points, args, Path(tmp), mode == "on", cpu
                    )
                    rounds[mode].append(rate)
                    per_cpu[mode].append(received / cpu[0])
                    print(
                        f"round {number + 1}, control API {mode}: {rate / 1e6:.2f} M points/s,"
                        f" {received / cpu[0] / 1e6:.2f} M points per server CPU-second",
                        flush=True,
                    )
        for label, values, unit in (
            ("wall clock", rounds, "points/s"),
            ("server CPU", per_cpu, "points/CPU-s"),
        ):
            off, on = statistics.median(values["off"]), statistics.median(values["on"])
            spread = (max(values["off"]) - min(values["off"])) / off
            print(
                f"{label}: control API off: median {off / 1e6:.2f} M {unit} (spread {spread:.0%} of it);"
                f" on, with a status page open: median {on / 1e6:.2f} M {unit}; ratio on / off: {on / off:.3f}"
            )
        figures |= {
            "control_off_points_per_s": round(statistics.median(rounds["off"])),
            "control_on_points_per_s": round(statistics.median(rounds["on"])),
            "control_off_points_per_cpu_s": round(statistics.median(per_cpu["off"])),
            "control_on_points_per_cpu_s": round(statistics.median(per_cpu["on"])),
            "control_off_rounds": [round(r) for r in rounds["off"]],
            "control_on_rounds": [round(r) for r in rounds["on"]],
        }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
