"""JetStream throughput: nats-out -> NATS JetStream -> nats-in, beside nats-py doing the same without the agent.

    python benchmarks/nats_jetstream.py [--batches 2000] [--points-per-batch 1000] [--series 10]
                                        [--url nats://127.0.0.1:4222]

Two measurements of the same batches, in the same run, against the same NATS server (its own stream for
each, deleted after):

- **baseline**: nats-py alone, on one asyncio loop: publishes the pre-encoded messages (the standalone
  batch encoding, as nats-out sends them) with up to 256 publish acknowledgements outstanding, then
  fetches them through a durable pull consumer (256 per fetch) and acknowledges each. No agent, no
  decoding, no disk buffer: what the client library and the server cost.
- **agent**: a pipeline with a source that sends the batches into `nats-out` (disk buffer, the default),
  and a second pipeline with `nats-in` (a durable consumer, acked once written) into an output that
  counts points. Both in this process, each with its own asyncio bridge thread.

The rate is points over the time from the first batch sent to the last point received. The last line is
JSON: {"points_per_s": ..., "baseline_points_per_s": ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats
import trio
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from agent.batch_codec import encode_batch
from agent.config import convert_section
from agent.model import LOCAL_MACHINE_CONSUMER, Batch, MetricRegistry, Resource, Series
from agent.pipeline import Pipeline
from agent.plugin import Output, StartContext
from agent.testing import output_element, partial_run, source_element
from agent_plugins.relay.nats_in.plugin import NatsInPlugin
from agent_plugins.relay.nats_out.plugin import NatsOutPlugin

WINDOW = 256


def make_batches(count: int, points_per_batch: int, series: int) -> list[Batch]:
    per_series = max(1, points_per_batch // series)
    t0 = 1_764_547_200_000_000_000
    batches = []
    for b in range(count):
        batches.append(
            Batch(
                [
                    Series(
                        "bench_value",
                        Resource("cpu_core", str(s)),
                        LOCAL_MACHINE_CONSUMER,
                        {},
                        [t0 + (b * per_series + i) * 1_000_000 for i in range(per_series)],
                        [float(i) for i in range(per_series)],
                    )
                    for s in range(series)
                ]
            )
        )
    return batches


def baseline(url: str, bodies: list[bytes], points: int) -> float:
    """nats-py alone: publish every body (acks awaited in windows), then fetch and ack them all."""

    async def main() -> float:
        nc = await nats.connect(url)
        js = nc.jetstream()
        stream = f"BENCH_BASE_{uuid.uuid4().hex[:8]}"
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream.lower()}.>"]))
        try:
            start = time.perf_counter()
            for i in range(0, len(bodies), WINDOW):
                await asyncio.gather(
                    *(
                        js.publish(f"{stream.lower()}.n", body, headers={"Nats-Msg-Id": f"b/{i + j}"})
                        for j, body in enumerate(bodies[i : i + WINDOW])
                    )
                )
            sub = await js.pull_subscribe(
                "", durable="bench", stream=stream, config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT)
            )
            received = 0
            while received < len(bodies):
                for message in await sub.fetch(WINDOW, timeout=5):
                    await message.ack()
                    received += 1
            await nc.flush()
            return points / (time.perf_counter() - start)
        finally:
            await js.delete_stream(stream)
            await nc.close()

    return asyncio.run(main())


class CountingOutput(Output):
    def __init__(self, target: int) -> None:
        self.points = 0
        self.target = target
        self.finished = trio.Event()
        self.finished_at = 0.0

    async def write(self, batches: list[Batch]) -> None:
        self.points += sum(len(b) for b in batches)
        if self.points >= self.target and not self.finished.is_set():
            self.finished_at = time.perf_counter()
            self.finished.set()


async def through_the_agent(url: str, batches: list[Batch], points: int, data_dir: Path) -> float:
    stream = f"BENCH_AGENT_{uuid.uuid4().hex[:8]}"
    registry = MetricRegistry()
    out_ctx = StartContext("nats-out", registry, data_dir)
    out_plugin = NatsOutPlugin()
    out_plugin.start(
        out_ctx,
        convert_section(
            {
                "url": url,
                "stream": stream,
                "subject": f"{stream.lower()}.{{client}}",
                "agent_name": "bench",
                "overflow": "block",
            },
            NatsOutPlugin.Config,
            "plugins.nats-out",
        ),
    )
    in_ctx = StartContext("nats-in", registry, data_dir)
    NatsInPlugin().start(
        in_ctx,
        convert_section(
            {
                "url": url,
                "stream": stream,
                "consumer": "bench",
                "fetch_batch": WINDOW,
                "max_ack_pending": 4 * WINDOW,
            },
            NatsInPlugin.Config,
            "plugins.nats-in",
        ),
    )
    counting = CountingOutput(points)
    publisher = Pipeline([output_element(out_ctx.elements[0].obj, "nats-out", out_ctx.elements[0].config)])
    consumer = Pipeline(
        [source_element(in_ctx.elements[0].obj, "nats-in"), output_element(counting, "count")]
    )
    nats_out, nats_in = out_ctx.elements[0].obj, in_ctx.elements[0].obj
    try:
        async with trio.open_nursery() as nursery:
            # Both ends connected (the stream created, the consumer subscribed) before the clock starts.
            await nursery.start(partial_run(publisher, 10.0))
            with trio.fail_after(30):
                await nats_out.connected.wait()
            await nursery.start(partial_run(consumer, 10.0))
            with trio.fail_after(30):
                await nats_in.subscribed.wait()
            sink = publisher.sink()
            start = time.perf_counter()
            for batch in batches:
                await sink.send(batch)
            with trio.fail_after(600):
                await counting.finished.wait()
            rate = points / (counting.finished_at - start)
            publisher.stop()
            consumer.stop()
    finally:
        out_plugin.stop()
        admin = await trio.to_thread.run_sync(lambda: asyncio.run(_delete_stream(url, stream)))
        del admin
    return rate


async def _delete_stream(url: str, stream: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--points-per-batch", type=int, default=1000)
    parser.add_argument("--series", type=int, default=10)
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    args = parser.parse_args(argv)
    batches = make_batches(args.batches, args.points_per_batch, args.series)
    points = sum(len(b) for b in batches)
    bodies = [encode_batch(b, {}) for b in batches]
    print(
        f"{args.batches} batches of {points // args.batches} points ({len(bodies[0])} bytes each),"
        f" {points} points, NATS at {args.url}",
        file=sys.stderr,
    )
    base = baseline(args.url, bodies, points)
    print(f"baseline, nats-py publish + fetch + ack: {base / 1e6:.3f} M points/s")
    with tempfile.TemporaryDirectory() as tmp:
        rate = trio.run(through_the_agent, args.url, batches, points, Path(tmp))
    print(f"agent, nats-out -> JetStream -> nats-in: {rate / 1e6:.3f} M points/s")
    print(f"ratio agent / baseline: {rate / base:.2f}")
    print(json.dumps({"points_per_s": round(rate), "baseline_points_per_s": round(base)}))


if __name__ == "__main__":
    main()
