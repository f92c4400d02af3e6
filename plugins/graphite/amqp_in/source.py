"""The amqp-in source: Graphite plaintext lines from a RabbitMQ queue, acknowledged once written.

    RabbitMQ queue ──deliveries (prefetch_count at most unacked)──> parse_chunk ──sink.send(on_done)──> outputs
          ^                                                                          │
          └──────────── basic.ack (written) / basic.nack + requeue (failed) ─────────┘

As carbon's and carbon-relay-ng's AMQP inputs do, each message body holds plaintext lines
(`path value timestamp`). The lines go through the same parser as graphite-in's (graphite.protocol.
plaintext, the same validation levels), bad lines are counted by the same reasons and the last few kept
in `recent_bad_lines` (graphite-out serves them at GET /badlines), with one rate-limited warning.

A message is acknowledged only once every output wrote its points; one that an output could not write
is rejected with requeue, so RabbitMQ delivers it again. `prefetch_count` bounds the messages delivered
and not yet acknowledged: the backpressure. A message with no good line is acknowledged at once (there
is nothing to write, and redelivering it cannot help).

aio-pika is an asyncio library: it runs on the core's asyncio bridge (agent.asyncio_bridge). The
source reconnects itself (with agent.Reconnector), not with aio-pika's robust connection, so that an
outage is logged like every other client's.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import trio

from agent import (
    AutonomousSource,
    Backoff,
    Batch,
    RateLimitedLog,
    Reconnector,
    SourceSink,
    StartupError,
    now_ns,
)
from agent.asyncio_bridge import AsyncioLoop, open_asyncio_loop
from agent_plugins.graphite.graphite_in.series import graphite_series
from agent_plugins.graphite.protocol.badlines import RecentBadLines
from agent_plugins.graphite.protocol.plaintext import ValidationLevel, parse_chunk

log = logging.getLogger(__name__)

_PASSWORD_IN_URL = re.compile(r"(//[^:/@]*:)[^@/]*@")


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    return _PASSWORD_IN_URL.sub(r"\1***@", url)


@dataclass(frozen=True)
class AmqpSettings:
    url: str
    exchange: str = "metrics"
    queue: str = "agent"
    routing_key: str = "#"
    durable: bool = True
    prefetch_count: int = 100
    validation: ValidationLevel = "medium"
    max_line_length: int = 16384


@dataclass
class AmqpCounters:
    messages: int = 0
    points: int = 0
    acked: int = 0
    requeued: int = 0
    #: Dropped lines by reason (graphite-in's reasons: field_count, bad_value...).
    bad: dict[str, int] = field(default_factory=dict)


class DeclarationMismatch(StartupError):
    """The exchange or the queue exists with other settings than the config's."""


class AmqpInput(AutonomousSource):
    """The source (see the module docstring)."""

    def __init__(self, settings: AmqpSettings, recent_bad_lines: int = 100) -> None:
        self.settings = settings
        self.counters = AmqpCounters()
        #: Found by graphite-out (badlines.find_recent_bad_lines) and served at GET /badlines.
        self.recent_bad_lines = RecentBadLines("amqp-in", max_entries=recent_bad_lines)
        self._warnings = RateLimitedLog(log)
        self._arrived: list[Any] = []
        self._arrival = trio.Event()
        self._verdicts: list[tuple[Any, bool]] = []
        self._verdict_added = trio.Event()
        #: Set while consuming (tests wait on it).
        self.consuming = trio.Event()
        self._where = f"amqp-in {redact(settings.url)} queue {settings.queue!r}"

    async def run(
        self, sink: SourceSink, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with open_asyncio_loop("amqp-in") as aio:
            reconnector = Reconnector(self._where, log, Backoff(0.5, 10.0))
            ready = False
            while True:
                connection = None
                up = False
                try:
                    connection = await aio.run(self._connect)
                    declared = await self._declare(aio, connection)
                    if not ready:
                        ready = True
                        task_status.started()
                    reconnector.connected()
                    up = True
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._acker, aio)
                        await aio.run(self._start_consuming, declared, aio)
                        self.consuming.set()
                        await self._consume(sink, connection)
                except trio.Cancelled:
                    raise
                except DeclarationMismatch:
                    if not ready:
                        raise
                    # Someone redeclared the queue while we ran: log, and keep trying.
                    delay = reconnector.failed("the exchange or queue changed settings")
                    await trio.sleep(delay)
                except Exception as exc:
                    self.consuming = trio.Event()
                    if not ready:
                        # Unreachable at start: not a start failure, the broker may come later.
                        ready = True
                        task_status.started()
                    reason = _describe(exc)
                    delay = reconnector.ended(reason) if up else reconnector.failed(reason)
                    await trio.sleep(delay)
                finally:
                    if connection is not None:
                        with trio.CancelScope(shield=True):
                            try:
                                await aio.run(connection.close)
                            except Exception:
                                pass

    async def _connect(self) -> Any:
        import aio_pika

        return await aio_pika.connect(self.settings.url, timeout=10)

    async def _declare(self, aio: AsyncioLoop, connection: Any) -> Any:
        """Opens the channel and declares the exchange, the queue and the binding. A declaration that
        RabbitMQ refuses because the object exists with other settings raises DeclarationMismatch,
        naming the object and the difference as RabbitMQ states it."""
        import aio_pika
        import aiormq.exceptions

        s = self.settings

        async def declare() -> Any:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=s.prefetch_count)
            what = f"exchange {s.exchange!r}"
            try:
                exchange = await channel.declare_exchange(
                    s.exchange, aio_pika.ExchangeType.TOPIC, durable=s.durable
                )
                what = f"queue {s.queue!r}"
                queue = await channel.declare_queue(s.queue, durable=s.durable, exclusive=False)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise DeclarationMismatch(
                    f"{what} exists in RabbitMQ with other settings than the config's: {_precondition_text(exc)}"
                ) from None
            await queue.bind(exchange, routing_key=s.routing_key)
            return channel, queue

        return await aio.run(declare)

    async def _start_consuming(self, declared: Any, aio: AsyncioLoop) -> None:
        _, queue = declared

        async def on_message(message: Any) -> None:
            aio.to_trio(self._on_arrival, message)

        await queue.consume(on_message, no_ack=False)

    def _on_arrival(self, message: Any) -> None:
        self._arrived.append(message)
        self._arrival.set()

    async def _consume(self, sink: SourceSink, connection: Any) -> None:
        while True:
            if not self._arrived:
                if connection.is_closed:
                    raise ConnectionError("the connection to RabbitMQ closed")
                self._arrival = trio.Event()
                with trio.move_on_after(1.0):
                    await self._arrival.wait()
                continue
            messages, self._arrived = self._arrived, []
            for message in messages:
                await self._take(message, sink)

    async def _take(self, message: Any, sink: SourceSink) -> None:
        self.counters.messages += 1
        body: bytes = message.body
        if not body.endswith(b"\n"):
            body += b"\n"
        chunk = parse_chunk(
            body,
            now_ns=now_ns(),
            validation=self.settings.validation,
            max_line_length=self.settings.max_line_length,
        )
        if chunk.bad_counts:
            self._report_bad(message, chunk.bad_counts, chunk.bad_samples)
        if not chunk.paths:
            self._post(message, True)
            return
        self.counters.points += len(chunk.paths)
        batch = Batch(graphite_series(chunk.paths, chunk.timestamps, chunk.values, chunk.tagged))
        await sink.send(batch, lambda ok, m=message: self._post(m, ok))

    def _report_bad(self, message: Any, counts: dict[str, int], samples: list[Any]) -> None:
        bad = self.counters.bad
        for reason, count in counts.items():
            bad[reason] = bad.get(reason, 0) + count
        where = f"message {message.delivery_tag} (routing key {message.routing_key!r})"
        self.recent_bad_lines.record_many(where, ((f"{s.reason}: {s.message}", s.line) for s in samples))
        if samples:
            first = samples[0]
            total = sum(counts.values())
            self._warnings.warn(
                "bad",
                total,
                "%s: dropped %d bad lines of %s: %s: %s: %r",
                self._where,
                total,
                where,
                first.reason,
                first.message,
                first.line,
            )

    def _post(self, message: Any, ok: bool) -> None:
        self._verdicts.append((message, ok))
        self._verdict_added.set()

    async def _acker(self, aio: AsyncioLoop) -> None:
        while True:
            await self._verdict_added.wait()
            self._verdict_added = trio.Event()
            verdicts, self._verdicts = self._verdicts, []

            async def send(items: list[tuple[Any, bool]] = verdicts) -> int:
                failed = 0
                for message, ok in items:
                    try:
                        if ok:
                            await message.ack()
                        else:
                            await message.nack(requeue=True)
                    except Exception:
                        # The channel it came on is gone: RabbitMQ requeues unacknowledged messages.
                        failed += 1
                return failed

            failed = await aio.run(send)
            for _, ok in verdicts:
                if ok:
                    self.counters.acked += 1
                else:
                    self.counters.requeued += 1
            if failed:
                log.warning(
                    "%s: %d acknowledgements could not be sent (channel closed); RabbitMQ redelivers those messages",
                    self._where,
                    failed,
                )


def _precondition_text(exc: BaseException) -> str:
    """RabbitMQ's own words ("inequivalent arg 'durable' for exchange 'metrics' in vhost '/': received
    'false' but current is 'true'"), without the reply code."""
    text = " ".join(str(a) for a in exc.args if isinstance(a, str)) or str(exc)
    match = re.search(r"PRECONDITION_FAILED - (.*?)(?:'\)|$)", text)
    return (match.group(1) if match else text).strip()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = ["AmqpCounters", "AmqpInput", "AmqpSettings", "DeclarationMismatch", "redact"]
