"""The `nats-out` output plugin: publishes batches to a NATS JetStream stream (see output.py).

At start the plugin checks its config and files (credentials, keys, certificates: a bad one is a
startup error naming it) and opens its buffer (a durable log under `[agent] data_dir`, or memory).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import msgspec

from agent import Duration, OutputConfig, Plugin, Size, StartContext, StartupError, hookimpl
from agent.durable_log import DurableLog, MemoryLog, RecordLog
from agent_plugins.relay.jetstream import NatsConnectionSettings, check_subject_token, check_url

from .output import NatsOut, PublisherSettings

AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]


class NatsOutConfig(OutputConfig, kw_only=True):
    """The `[plugins.nats-out]` table."""

    url: str = "nats://127.0.0.1:4222"
    stream: str = "AGENT"
    subject: str = "agent.points.{client}"
    agent_name: str = ""
    duplicate_window: Duration = Duration(120.0)
    max_in_flight: AtLeastOne = 256
    publish_timeout: Duration = Duration(10.0)
    disk_buffer: bool = True
    disk_buffer_path: str = ""
    disk_buffer_max_size: Size = Size(1024 * 1024 * 1024)
    memory_buffer_max_size: Size = Size(64 * 1024 * 1024)
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
        rest = self.subject.replace("{client}", "x")
        if "{" in rest or "}" in rest:
            raise ValueError(f"subject: {self.subject!r}: the only placeholder is {{client}}")
        if (
            not rest
            or any(c in rest for c in " \t*>")
            or ".." in rest
            or rest.startswith(".")
            or rest.endswith(".")
        ):
            raise ValueError(f"subject: {self.subject!r} is not a valid NATS subject to publish to")
        if "{" in self.subject and not self.subject.split("{", 1)[0].rstrip("."):
            raise ValueError(
                f"subject: {self.subject!r}: needs a prefix before {{client}} (agent.points.{{client}})"
            )
        for key in ("duplicate_window", "publish_timeout"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be positive, got {float(getattr(self, key)):g}s")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert: tls_cert and tls_key go together: set both, or neither")


def open_buffer(ctx: StartContext, config: NatsOutConfig) -> RecordLog:
    """The durable log (a directory that cannot be used is a startup error), or the memory log."""
    if not config.disk_buffer:
        return MemoryLog(max_bytes=int(config.memory_buffer_max_size))
    directory = (
        Path(config.disk_buffer_path).expanduser()
        if config.disk_buffer_path
        else ctx.data_dir / ctx.plugin_name
    )
    try:
        return DurableLog(directory, max_bytes=int(config.disk_buffer_max_size), fsync="interval")
    except OSError as exc:
        raise StartupError(f"disk buffer {directory}: {exc.strerror or exc}") from None
    except RuntimeError as exc:
        raise StartupError(
            f"disk buffer {directory}: {exc}; give each agent its own [agent] data_dir"
        ) from None


class NatsOutPlugin(Plugin):
    name = "nats-out"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = (
        "Publishes batches to a NATS JetStream stream, completing them on JetStream's acknowledgement."
    )
    Config = NatsOutConfig
    enabled_by_default = False
    provides = ("output",)

    def __init__(self) -> None:
        self._output: NatsOut | None = None
        self._ran = False

    def start(self, ctx: StartContext, config: NatsOutConfig) -> None:
        agent_name = config.agent_name.strip() or socket.gethostname()
        connection = NatsConnectionSettings.from_config(config, f"agent nats-out {agent_name}")
        settings = PublisherSettings(
            stream=config.stream,
            subject=config.subject,
            agent_name=agent_name,
            duplicate_window=float(config.duplicate_window),
            max_in_flight=config.max_in_flight,
            publish_timeout=float(config.publish_timeout),
        )
        buffer = open_buffer(ctx, config)
        try:
            self._output = NatsOut(connection, settings, buffer, ctx.registry)
        except BaseException:
            buffer.close()
            raise
        ctx.add_output(self._output, config)

    def stop(self) -> None:
        if self._output is not None:
            self._output.close_buffer()
            self._output = None


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [NatsOutPlugin]
