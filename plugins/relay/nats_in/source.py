"""The nats-in source: pulls batches from a JetStream durable consumer, acknowledging them once written.

    JetStream ──fetch──> decode ──SourceSink.send(batch, on_done)──> outputs
        ^                                                   │
        └────────── ack (written) / nak with delay (failed) ┘  (the acker task)

Agents that use the same `consumer` name share one durable pull consumer: JetStream hands each message
to one of them, and hands it again (to any of them) if it is not acknowledged within `ack_wait`, for
instance because the agent that had it was killed. `max_ack_pending` bounds the messages out and
unacknowledged: the backpressure of the whole group. Each batch gets the identity ("nats", stream,
stream sequence), so an output that deduplicates (postgres) stores a redelivered batch once.

A message that is not a batch in the standalone encoding (agent.batch_codec) is logged (one line: subject, stream sequence, reason)
and terminated, so that JetStream does not redeliver it for ever; the source goes on.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

import trio

from agent import AutonomousSource, Backoff, RateLimitedLog, Reconnector, SourceSink
from agent.asyncio_bridge import AsyncioLoop, open_asyncio_loop
from agent.batch_codec import InvalidBatch, decode_batch
from agent.decoding import MalformedData
from agent.model import BatchIdentity, MetricConflictError, MetricDef, MetricRegistry
from agent_plugins.relay.jetstream import (
    NatsConnectionSettings,
    close_quietly,
    connect,
    connect_options,
    describe_nats_error,
)

log = logging.getLogger(__name__)

#: How long one fetch waits for messages before asking again (also how fast a stop is noticed).
FETCH_WAIT = 1.0
#: While the stream does not exist yet, how often to look again.
STREAM_WAIT = 2.0


@dataclass(frozen=True)
class ConsumerSettings:
    stream: str
    consumer: str
    deliver: str | int = "all"
    ack_wait: float = 30.0
    max_ack_pending: int = 1000
    fetch_batch: int = 64
    nak_delay: float = 5.0


@dataclass
class NatsInCounters:
    messages: int = 0
    points: int = 0
    acked: int = 0
    naked: int = 0
    malformed: int = 0
    redelivered: int = 0


def deliver_options(deliver: str | int) -> dict[str, Any]:
    """The ConsumerConfig keys for `deliver`: "all", "new", a stream sequence number or a time."""
    from nats.js.api import DeliverPolicy

    if isinstance(deliver, int):
        return {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": deliver}
    if deliver == "all":
        return {"deliver_policy": DeliverPolicy.ALL}
    if deliver == "new":
        return {"deliver_policy": DeliverPolicy.NEW}
    return {"deliver_policy": DeliverPolicy.BY_START_TIME, "opt_start_time": parse_time(deliver)}


def parse_time(text: str) -> datetime.datetime:
    """An RFC 3339 time such as 2026-12-01T00:00:00Z; ValueError otherwise."""
    value = datetime.datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone (add Z for UTC)")
    return value.astimezone(datetime.UTC)


class NatsIn(AutonomousSource):
    """The source (see the module docstring)."""

    def __init__(
        self, connection: NatsConnectionSettings, settings: ConsumerSettings, registry: MetricRegistry
    ) -> None:
        self.connection = connection
        self.settings = settings
        self.registry = registry
        self._options = connect_options(connection)
        self.counters = NatsInCounters()
        self._bad_log = RateLimitedLog(log)
        self._names: dict[MetricDef, str] = {}
        self._verdicts: list[tuple[Any, bool]] = []
        self._verdict_added = trio.Event()
        #: Set while subscribed (tests wait on it).
        self.subscribed = trio.Event()

    async def run(
        self, sink: SourceSink, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with open_asyncio_loop("nats-in") as aio:
            # Ready at once: a NATS that is down or a stream that does not exist yet is waited for
            # (logged), not a startup failure, so that consumers can start before the publishers.
            task_status.started()
            reconnector = Reconnector(f"nats-in {self.connection.url}", log, Backoff(0.5, 10.0))
            while True:
                client = None
                up = False
                try:
                    client = await connect(aio, self._options)
                    js = client.jetstream()
                    await self._wait_for_stream(aio, js)
                    subscription = await self._subscribe(aio, js)
                    reconnector.connected()
                    up = True
                    self.subscribed.set()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._acker, aio)
                        await self._consume(aio, subscription, sink)
                except trio.Cancelled:
                    raise
                except Exception as exc:
                    reason = describe_nats_error(exc)
                    self.subscribed = trio.Event()
                    delay = reconnector.ended(reason) if up else reconnector.failed(reason)
                    await trio.sleep(delay)
                finally:
                    with trio.CancelScope(shield=True):
                        await close_quietly(aio, client)

    async def _wait_for_stream(self, aio: AsyncioLoop, js: Any) -> None:
        from nats.js.errors import NotFoundError

        logged = False
        while True:
            try:
                await aio.run(js.stream_info, self.settings.stream)
            except NotFoundError:
                if not logged:
                    log.warning(
                        "nats-in: the stream %s does not exist (yet); waiting for it (nats-out creates it)",
                        self.settings.stream,
                    )
                    logged = True
                await trio.sleep(STREAM_WAIT)
                continue
            if logged:
                log.info("nats-in: the stream %s is there now", self.settings.stream)
            return

    async def _subscribe(self, aio: AsyncioLoop, js: Any) -> Any:
        from nats.js.api import AckPolicy, ConsumerConfig
        from nats.js.errors import NotFoundError

        s = self.settings
        try:
            await aio.run(js.consumer_info, s.stream, s.consumer)
        except NotFoundError:
            config = ConsumerConfig(
                durable_name=s.consumer,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=s.ack_wait,
                max_ack_pending=s.max_ack_pending,
                **deliver_options(s.deliver),
            )
            await aio.run(js.add_consumer, s.stream, config)
            log.info("nats-in: created the durable consumer %s on the stream %s", s.consumer, s.stream)
        return await aio.run(js.pull_subscribe_bind, s.consumer, s.stream)

    async def _consume(self, aio: AsyncioLoop, subscription: Any, sink: SourceSink) -> None:
        import nats.errors

        while True:
            try:
                messages = await aio.run(subscription.fetch, self.settings.fetch_batch, FETCH_WAIT)
            except nats.errors.TimeoutError:
                continue
            for message in messages:
                await self._take(message, sink)

    async def _take(self, message: Any, sink: SourceSink) -> None:
        metadata = message.metadata
        stream_seq = metadata.sequence.stream
        self.counters.messages += 1
        if metadata.num_delivered > 1:
            self.counters.redelivered += 1
        try:
            published, batch = decode_batch(message.data)
        except (MalformedData, InvalidBatch) as exc:
            self.counters.malformed += 1
            self._bad_log.warn(
                "malformed",
                1,
                "nats-in: message %d of stream %s (subject %s) is not a relay batch: %s; dropped",
                stream_seq,
                self.settings.stream,
                message.subject,
                exc,
            )
            self._post(message, None)
            return
        for definition in published.metrics:
            name = self._register(definition)
            if name != definition.name:
                for series in batch.series:
                    if series.metric == definition.name:
                        series.metric = name
        batch.identity = BatchIdentity("nats", self.settings.stream, stream_seq)
        self.counters.points += len(batch)
        await sink.send(batch, lambda ok, m=message: self._post(m, ok))

    def _register(self, definition: MetricDef) -> str:
        """The name this agent keeps the metric under (renamed if it conflicts with a known one)."""
        name = self._names.get(definition)
        if name is None:
            try:
                _, name = self.registry.register_or_rename(definition, "nats")
            except MetricConflictError as exc:
                log.error("nats-in: metric %s (kept unregistered)", exc)
                name = f"{definition.name}_nats"
            self._names[definition] = name
        return name

    def _post(self, message: Any, ok: bool | None) -> None:
        """The verdict on a message, for the acker: True ack, False nak with delay, None term."""
        self._verdicts.append((message, ok))
        self._verdict_added.set()

    async def _acker(self, aio: AsyncioLoop) -> None:
        """Sends acks, naks and terms, as many as are waiting in one hop to the asyncio loop."""
        delay = self.settings.nak_delay
        while True:
            await self._verdict_added.wait()
            self._verdict_added = trio.Event()
            verdicts, self._verdicts = self._verdicts, []

            async def send(items: list[tuple[Any, bool | None]] = verdicts) -> int:
                failed = 0
                for message, ok in items:
                    try:
                        if ok is True:
                            await message.ack()
                        elif ok is False:
                            await message.nak(delay=delay)
                        else:
                            await message.term()
                    except Exception:
                        # The connection it came on is gone: JetStream redelivers the message after
                        # ack_wait, and the batch identity keeps the second write from counting twice.
                        failed += 1
                return failed

            failed = await aio.run(send)
            if failed:
                log.warning(
                    "nats-in: %d acknowledgements could not be sent (connection lost); JetStream will"
                    " redeliver those messages after ack_wait",
                    failed,
                )
            for _, ok in verdicts:
                if ok is True:
                    self.counters.acked += 1
                elif ok is False:
                    self.counters.naked += 1


__all__ = ["ConsumerSettings", "NatsIn", "NatsInCounters", "deliver_options", "parse_time"]
