"""graphite-out benchmark: points/s through route + render + write to local carbon sinks.

    python benchmarks/graphite_out.py [--points 2000000] [--batch 10000] [--paths 100000]

The output runs in a real pipeline (queues, acknowledgements); the sinks run in a separate process
(so they do not share the output's core) and count newlines (plaintext) or unpickle frames (pickle).
Each scenario's clock runs from the first batch sent until the sinks got every point. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import struct
import tempfile
import time
from pathlib import Path

import trio

from agent.model import Batch, Consumer, Resource, Series
from agent.pipeline import Pipeline
from agent.testing import output_element, partial_run
from agent_plugins.graphite.graphite_out.output import GraphiteOutput
from agent_plugins.graphite.graphite_out.testing import make_config

NS = 1_000_000_000


def sink_process(
    ports: multiprocessing.Queue, counts: multiprocessing.Queue, sinks: int, pickle: bool
) -> None:
    """Counts points received on `sinks` listening sockets; reports the total every 50 ms."""
    import pickle as pickle_module
    import selectors

    selector = selectors.DefaultSelector()
    listeners = []
    for _ in range(sinks):
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, None)
        listeners.append(listener)
    ports.put([listener.getsockname()[1] for listener in listeners])
    total = 0
    pending: dict[socket.socket, bytes] = {}
    last_report = time.monotonic()
    while True:
        for key, _ in selector.select(timeout=0.05):
            if key.data is None:
                connection, _ = key.fileobj.accept()
                connection.setblocking(False)
                selector.register(connection, selectors.EVENT_READ, "conn")
                pending[connection] = b""
                continue
            connection = key.fileobj
            data = connection.recv(1 << 20)
            if not data:
                selector.unregister(connection)
                connection.close()
                continue
            if pickle:
                buffer = pending[connection] + data
                offset = 0
                while len(buffer) - offset >= 4:
                    (length,) = struct.unpack_from("!L", buffer, offset)
                    if len(buffer) - offset - 4 < length:
                        break
                    total += len(pickle_module.loads(buffer[offset + 4 : offset + 4 + length]))
                    offset += 4 + length
                pending[connection] = buffer[offset:]
            else:
                total += data.count(b"\n")
        now = time.monotonic()
        if now - last_report >= 0.05:
            counts.put(total)
            last_report = now


def graphite_batches(points: int, batch: int, paths: int) -> list[Batch]:
    names = [f"servers.host{i % 997}.app{i % 13}.metric{i}" for i in range(paths)]
    out = []
    start = 1_700_000_000
    for b in range(points // batch):
        first = (b * batch) % paths
        chunk = (names * 2)[first : first + batch]
        out.append(
            Batch(
                [
                    Series(
                        chunk,
                        Resource("local_machine"),
                        Consumer("local_machine"),
                        {},
                        [(start + b) * NS] * batch,
                        [float(i) * 1.5 for i in range(batch)],
                    )
                ]
            )
        )
    return out


def system_batches(points: int, batch: int) -> list[Batch]:
    """Single-name series as the system source makes them: 100 series of batch/100 points."""
    out = []
    per_series = max(1, batch // 100)
    for b in range(points // batch):
        series = [
            Series(
                f"cpu_percent_{s % 10}",
                Resource("cpu_core", str(s)),
                Consumer("local_machine"),
                {"relay_client": "web1"},
                [(1_700_000_000 + b) * NS + i for i in range(per_series)],
                [12.5] * per_series,
            )
            for s in range(100)
        ]
        out.append(Batch(series))
    return out


async def run_scenario(
    name: str, route: dict, batches: list[Batch], ports: list[int], counts: multiprocessing.Queue, queue: int
) -> float:
    total = sum(len(b) for b in batches)
    route = dict(route)
    route["destinations"] = [
        {"address": f"127.0.0.1:{port}:{i}", "flush_interval": "1ms", "queue_max_points": queue}
        for i, port in enumerate(ports)
    ][: route.pop("destination_count")]
    expected = total * (len(route["destinations"]) if route["type"] == "broadcast" else 1)
    with tempfile.TemporaryDirectory() as spool:
        output = GraphiteOutput(make_config({"routes": [route]}), spool_dir=Path(spool))
        pipeline = Pipeline([output_element(output, "graphite-out")])
        while not counts.empty():
            counts.get_nowait()
        baseline = 0
        async with trio.open_nursery() as nursery:
            await nursery.start(partial_run(pipeline, 30.0))
            await trio.sleep(0.3)  # connections up
            baseline_seen = await trio.to_thread.run_sync(counts.get)
            baseline = baseline_seen
            sink = pipeline.sink()
            started = time.perf_counter()
            for batch in batches:
                await sink.send(batch)
            seen = baseline
            while seen - baseline < expected:
                seen = await trio.to_thread.run_sync(counts.get)
            elapsed = time.perf_counter() - started
            pipeline.stop()
        dropped = sum(d["dropped_total"] for d in output.stats()["destinations"])
        spooled = sum(d["spooled"] for d in output.stats()["destinations"])
    rate = total / elapsed
    print(
        f"{name:60s} {total:>9d} points in {elapsed:6.2f}s = {rate / 1e6:5.2f} M points/s "
        f"(spooled {spooled}, dropped {dropped})"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=2_000_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--paths", type=int, default=100_000)
    parser.add_argument(
        "--queue",
        type=int,
        default=1_000_000,
        help="queue_max_points per destination; smaller makes bursts spill to the spool (measures that path)",
    )
    args = parser.parse_args()
    results = {}
    for pickle in (False, True):
        ports_queue: multiprocessing.Queue = multiprocessing.Queue()
        counts: multiprocessing.Queue = multiprocessing.Queue()
        process = multiprocessing.Process(
            target=sink_process, args=(ports_queue, counts, 3, pickle), daemon=True
        )
        process.start()
        ports = ports_queue.get()
        try:
            graphite = graphite_batches(args.points, args.batch, args.paths)
            fmt = "pickle" if pickle else "plaintext"
            scenarios = [
                (
                    f"graphite paths, send_all_match, 1 destination, {fmt}",
                    {"key": "r", "type": "send_all_match", "format": fmt, "destination_count": 1},
                    graphite,
                ),
                (
                    f"graphite paths, consistent_hashing, 3 destinations, {fmt}",
                    {"key": "r", "type": "consistent_hashing", "format": fmt, "destination_count": 3},
                    graphite,
                ),
            ]
            if not pickle:
                scenarios += [
                    (
                        "graphite paths, prefix + regex route, 1 destination, plaintext",
                        {
                            "key": "r",
                            "type": "send_all_match",
                            "prefix": "servers.",
                            "regex": "app[0-9]+",
                            "destination_count": 1,
                        },
                        graphite,
                    ),
                    (
                        "single-name series through the path template, 1 destination",
                        {"key": "r", "type": "send_all_match", "destination_count": 1},
                        system_batches(args.points, args.batch),
                    ),
                ]
            for name, route, batches in scenarios:
                results[name] = round(trio.run(run_scenario, name, route, batches, ports, counts, args.queue))
        finally:
            process.kill()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
