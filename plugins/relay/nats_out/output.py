"""The nats-out output: publishes batches to a JetStream stream, completing them on the publish ack.

    inbox ──intake──> durable log (disk, or memory) ──publisher──> JetStream ──PubAck──> commit, done(True)

The intake encodes each batch once (`agent.batch_codec`: the relay's series encoding with its
metric definitions) and appends it to the log with its subject and message id. The publisher reads
the log in order, publishes up to `max_in_flight` messages at a time, and on JetStream's
acknowledgements commits the log and completes the envelopes: a relay server in front of this output
acknowledges its clients only once their points are in the stream. While NATS is unreachable, the
publisher reconnects with backoff and batches wait in the log; with the disk buffer they also outlive
a restart of the agent and go out, in order, after it.

Every message carries `Nats-Msg-Id`: the batch's identity (relay client, stream, sequence number) when
it has one, else this agent's name, an id drawn at each start and a counter. JetStream drops a
message whose id it has seen within the stream's duplicate window, so a batch published twice (a
relay client resending after its relay server died, the log replaying after a lost ack) is stored once.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from agent import Backoff, Output, OutputInbox, Reconnector
from agent.asyncio_bridge import AsyncioLoop, open_asyncio_loop
from agent.batch_codec import encode_batch
from agent.durable_log import RecordLog
from agent.inbox import Envelope
from agent.model import Batch, BatchIdentity, MetricRegistry
from agent_plugins.relay.jetstream import (
    NatsConnectionSettings,
    close_quietly,
    connect,
    connect_options,
    describe_nats_error,
)

log = logging.getLogger(__name__)

#: The attribute that relay-server puts on every relayed point (the relay client's name).
RELAY_CLIENT_ATTRIBUTE = "relay_client"
#: The Content-Type header of every message (informational: readers decode by the version field).
CONTENT_TYPE = "application/msgpack"
_SUBJECT_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
#: How often the disk buffer is synced while idle (its fsync policy is "interval").
IDLE_SYNC_INTERVAL = 1.0


class OutRecord(msgspec.Struct, array_like=True):
    """A buffered message: what the log stores per batch."""

    subject: str
    msg_id: str
    body: bytes


_RECORD_ENCODER = msgspec.msgpack.Encoder()
_RECORD_DECODER = msgspec.msgpack.Decoder(OutRecord)


@dataclass(frozen=True)
class PublisherSettings:
    stream: str
    subject: str
    agent_name: str
    duplicate_window: float = 120.0
    max_in_flight: int = 256
    publish_timeout: float = 10.0

    @property
    def stream_subjects(self) -> list[str]:
        """The subjects of the stream that nats-out creates: `PREFIX.>`, PREFIX being `subject` up to
        its first `{`; the subject itself when it has no placeholder."""
        if "{" not in self.subject:
            return [self.subject]
        prefix = self.subject.split("{", 1)[0].rstrip(".")
        return [f"{prefix}.>"]


def subject_token(name: str) -> str:
    """A name made safe as one subject token ('.', '*', '>' and spaces would change its meaning)."""
    return _SUBJECT_UNSAFE.sub("_", name) or "_"


class NatsOut(Output):
    """The output (see the module docstring). `buffer` is the durable or memory log of OutRecords."""

    def __init__(
        self,
        connection: NatsConnectionSettings,
        settings: PublisherSettings,
        record_log: RecordLog,
        registry: MetricRegistry,
    ) -> None:
        self.connection = connection
        self.settings = settings
        self.buffer = record_log
        self.registry = registry
        self._options = connect_options(connection)
        #: Drawn at each start: ids of batches without an identity are (agent, start id, counter).
        self.start_id = uuid.uuid4().hex[:12]
        self._counter = 0
        self._waiting: dict[int, Envelope] = {}
        self._appended = trio.Event()
        self._settled = trio.Event()
        self.published = 0
        self.duplicates = 0
        self.connected = trio.Event()

    # -- encoding --

    def _record_for(self, batch: Batch) -> bytes:
        identity = batch.identity
        if identity is not None:
            origin, stream, seq = identity.origin, identity.stream, identity.seq
            client = identity.origin
        else:
            self._counter += 1
            origin, stream, seq = self.settings.agent_name, self.start_id, self._counter
            client = next(
                (
                    str(s.attributes[RELAY_CLIENT_ATTRIBUTE])
                    for s in batch.series
                    if RELAY_CLIENT_ATTRIBUTE in s.attributes
                ),
                self.settings.agent_name,
            )
        defs = {d.name: d for d in self.registry}
        body = encode_batch(batch, defs, BatchIdentity(origin, stream, seq))
        subject = self.settings.subject.replace("{client}", subject_token(client))
        msg_id = f"{origin}/{stream}/{seq}"
        return _RECORD_ENCODER.encode(OutRecord(subject, msg_id, body))

    # -- the output --

    async def run(
        self, inbox: OutputInbox, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        pending = self.buffer.pending_records
        if pending:
            log.info("nats-out: %d batches from before the restart are waiting in the buffer", pending)
        async with open_asyncio_loop("nats-out") as aio, trio.open_nursery() as nursery:
            nursery.start_soon(self._publisher, aio)
            nursery.start_soon(self._idle_sync)
            task_status.started()
            await self._intake(inbox)
            # Shutdown: the inbox is exhausted; wait for what was taken to be published. If NATS stays
            # away, the core cancels us after its grace period; the batches stay in the log.
            while self._waiting:
                await self._settled_wait()
            nursery.cancel_scope.cancel()

    async def _intake(self, inbox: OutputInbox) -> None:
        while True:
            envs = await inbox.receive_batch(self.batch_max_points)
            if not envs:
                return
            live = [e for e in envs if not e.settled]
            records = [self._record_for(e.batch) for e in live]
            if not records:
                continue
            last = await trio.to_thread.run_sync(self.buffer.append_many, records)
            first = last - len(records) + 1
            for offset, env in enumerate(live):
                self._waiting[first + offset] = env
            self._appended.set()

    async def _settled_wait(self) -> None:
        self._settled = trio.Event()
        await self._settled.wait()

    async def _idle_sync(self) -> None:
        while True:
            await trio.sleep(IDLE_SYNC_INTERVAL)
            await trio.to_thread.run_sync(self.buffer.sync)

    def _summary(self) -> str:
        return f"{self.buffer.pending_records} batches wait in the buffer"

    async def _publisher(self, aio: AsyncioLoop) -> None:
        reconnector = Reconnector(
            f"nats-out {self.connection.url}", log, Backoff(0.5, 10.0), summary=self._summary
        )
        while True:
            client = None
            try:
                client = await connect(aio, self._options)
                js = client.jetstream(timeout=self.settings.publish_timeout)
                await self._ensure_stream(aio, js)
                reconnector.connected()
                self.connected.set()
                await self._publish_loop(aio, js)
            except trio.Cancelled:
                raise
            except Exception as exc:
                reason = describe_nats_error(exc)
                if self.connected.is_set():
                    self.connected = trio.Event()
                    delay = reconnector.ended(reason)
                    reconnector.failures = 0
                else:
                    delay = reconnector.failed(reason)
                await trio.sleep(delay)
            finally:
                with trio.CancelScope(shield=True):
                    await close_quietly(aio, client)

    async def _ensure_stream(self, aio: AsyncioLoop, js: Any) -> None:
        from nats.js.api import StreamConfig
        from nats.js.errors import NotFoundError

        try:
            await aio.run(js.stream_info, self.settings.stream)
            return
        except NotFoundError:
            pass
        config = StreamConfig(
            name=self.settings.stream,
            subjects=self.settings.stream_subjects,
            duplicate_window=self.settings.duplicate_window,
        )
        await aio.run(js.add_stream, config)
        log.info(
            "nats-out: created the stream %s with subjects %s",
            self.settings.stream,
            ", ".join(self.settings.stream_subjects),
        )

    async def _publish_loop(self, aio: AsyncioLoop, js: Any) -> None:
        """Publishes what the log holds, in windows of `max_in_flight`; commits on the acks."""
        position = self.buffer.committed_seq
        timeout = self.settings.publish_timeout
        while True:
            records = await trio.to_thread.run_sync(self.buffer.read, position, self.settings.max_in_flight)
            if not records:
                self._appended = trio.Event()
                # Re-check after arming the event: an append may have happened in between.
                if self.buffer.last_seq > position:
                    continue
                await self._appended.wait()
                continue
            messages = []
            for seq, payload in records:
                try:
                    record = _RECORD_DECODER.decode(payload)
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                    log.error("nats-out: buffered batch %d is unreadable (%s): dropped", seq, exc)
                    messages.append((seq, None))
                    continue
                messages.append((seq, record))

            async def publish_all(batch: list[tuple[int, OutRecord | None]] = messages) -> list[Any]:
                import asyncio

                return await asyncio.gather(
                    *(
                        js.publish(
                            r.subject,
                            r.body,
                            timeout=timeout,
                            stream=self.settings.stream,
                            headers={"Nats-Msg-Id": r.msg_id, "Content-Type": CONTENT_TYPE},
                        )
                        for _, r in batch
                        if r is not None
                    ),
                    return_exceptions=True,
                )

            results = iter(await aio.run(publish_all))
            done_through = position
            failure: BaseException | None = None
            for seq, record in messages:
                if record is not None:
                    result = next(results)
                    if isinstance(result, BaseException):
                        failure = result
                        break
                    self.published += 1
                    if getattr(result, "duplicate", False):
                        self.duplicates += 1
                done_through = seq
            if done_through > position:
                await trio.to_thread.run_sync(self.buffer.commit, done_through)
                self._complete(position, done_through, {seq for seq, r in messages if r is not None})
                position = done_through
            if failure is not None:
                raise failure

    def _complete(self, after: int, through: int, read: set[int]) -> None:
        """Completes the envelopes of (after, through]: written if their record was published, failed
        if the buffer dropped it (full: its size cap drops the oldest batches)."""
        for seq in range(after + 1, through + 1):
            env = self._waiting.pop(seq, None)
            if env is not None:
                env.done(seq in read)
        self._settled.set()

    def close_buffer(self) -> None:
        self.buffer.close()


__all__ = ["NatsOut", "OutRecord", "PublisherSettings", "subject_token"]
