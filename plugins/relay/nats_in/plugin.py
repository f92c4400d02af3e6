"""The `nats-in` source plugin: takes batches from a NATS JetStream stream through a durable consumer
shared by every agent that names it (see source.py)."""

from __future__ import annotations

import socket
from typing import Annotated

import msgspec

from agent import Duration, Plugin, PluginConfig, StartContext, hookimpl
from agent_plugins.relay.jetstream import NatsConnectionSettings, check_subject_token, check_url

from .source import ConsumerSettings, NatsIn, parse_time

AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]


class NatsInConfig(PluginConfig, kw_only=True):
    """The `[plugins.nats-in]` table."""

    url: str = "nats://127.0.0.1:4222"
    stream: str = "AGENT"
    consumer: str = "collectors"
    deliver: str | int = "all"
    ack_wait: Duration = Duration(30.0)
    max_ack_pending: AtLeastOne = 1000
    fetch_batch: AtLeastOne = 64
    nak_delay: Duration = Duration(5.0)
    credentials: str = ""
    nkey_seed: str = ""
    user: str = ""
    password: str = ""
    token: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def __post_init__(self) -> None:
        check_url(self.url)
        check_subject_token("stream", self.stream)
        check_subject_token("consumer", self.consumer)
        if isinstance(self.deliver, int):
            if self.deliver < 1:
                raise ValueError(f"deliver: a stream sequence number starts at 1, got {self.deliver}")
        elif self.deliver not in ("all", "new"):
            try:
                parse_time(self.deliver)
            except ValueError as exc:
                raise ValueError(
                    f'deliver: expected "all", "new", a stream sequence number or a time such as'
                    f' "2026-12-01T00:00:00Z": {exc}'
                ) from None
        if self.ack_wait <= 0:
            raise ValueError(f"ack_wait: must be positive, got {float(self.ack_wait):g}s")
        if self.nak_delay < 0:
            raise ValueError(f"nak_delay: must not be negative, got {float(self.nak_delay):g}s")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert: tls_cert and tls_key go together: set both, or neither")


class NatsInPlugin(Plugin):
    name = "nats-in"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = (
        "Takes batches from a NATS JetStream stream through a shared durable consumer, acknowledging"
        " each once the outputs wrote it."
    )
    Config = NatsInConfig
    enabled_by_default = False
    provides = ("source",)

    def start(self, ctx: StartContext, config: NatsInConfig) -> None:
        connection = NatsConnectionSettings.from_config(config, f"agent nats-in {socket.gethostname()}")
        settings = ConsumerSettings(
            stream=config.stream,
            consumer=config.consumer,
            deliver=config.deliver,
            ack_wait=float(config.ack_wait),
            max_ack_pending=config.max_ack_pending,
            fetch_batch=config.fetch_batch,
            nak_delay=float(config.nak_delay),
        )
        ctx.add_source(NatsIn(connection, settings, ctx.registry))


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [NatsInPlugin]
