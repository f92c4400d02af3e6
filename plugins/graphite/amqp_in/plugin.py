"""The `amqp-in` source plugin: Graphite plaintext lines from a RabbitMQ queue (see source.py)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from agent import Plugin, PluginConfig, StartContext, hookimpl
from agent_plugins.graphite.protocol.plaintext import DEFAULT_MAX_LINE_LENGTH, ValidationLevel

from .source import AmqpInput, AmqpSettings


class AmqpInConfig(PluginConfig, kw_only=True):
    """The `[plugins.amqp-in]` table."""

    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    exchange: str = "metrics"
    queue: str = "agent"
    routing_key: str = "#"
    durable: bool = True
    prefetch_count: Annotated[int, Meta(ge=1, le=65535)] = 100
    validation: ValidationLevel = "medium"
    max_line_length: Annotated[int, Meta(ge=64)] = DEFAULT_MAX_LINE_LENGTH
    recent_bad_lines: Annotated[int, Meta(ge=1)] = 100

    def __post_init__(self) -> None:
        if not self.url.startswith(("amqp://", "amqps://")):
            raise ValueError(
                f"url: {self.url!r}: expected amqp://USER:PASSWORD@HOST:PORT/VHOST (or amqps://)"
            )
        if not self.exchange:
            raise ValueError('exchange: must not be empty (the default exchange "" cannot be bound)')
        if not self.queue:
            raise ValueError("queue: must not be empty (a named queue is what agents share)")


class AmqpInPlugin(Plugin):
    name = "amqp-in"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = (
        "Graphite plaintext lines from a RabbitMQ queue bound to an exchange, acknowledged once written."
    )
    Config = AmqpInConfig
    enabled_by_default = False
    provides = ("source",)

    def start(self, ctx: StartContext, config: AmqpInConfig) -> None:
        settings = AmqpSettings(
            url=config.url,
            exchange=config.exchange,
            queue=config.queue,
            routing_key=config.routing_key,
            durable=config.durable,
            prefetch_count=config.prefetch_count,
            validation=config.validation,
            max_line_length=config.max_line_length,
        )
        ctx.add_source(AmqpInput(settings, config.recent_bad_lines))


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [AmqpInPlugin]
