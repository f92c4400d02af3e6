"""The `relay-client` output plugin: sends measurements to a relay-server agent, losing none.

`agent --relay-out HOST:PORT` enables it (agent/config.py). At start the plugin checks its config and
TLS files (a bad one is a startup error naming it) and adds one `RelayClient` output (`client.py`),
whose buffer lives under `[agent] data_dir` (`store.py`). The protocol is docs/relay-protocol.md.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Literal

import msgspec

from agent import Duration, OutputConfig, Plugin, Size, StartContext, hookimpl
from agent.units import format_size
from agent_plugins.relay_protocol.address import parse_address
from agent_plugins.relay_protocol.framing import FRAME_SIZE_LIMIT

from .client import ClientSettings, RelayClient
from .store import BufferSpec, DiskBuffer, MemoryBuffer


class RetryConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The `[plugins.relay-client.retry]` table."""

    max_times: int = 8
    initial_delay: Duration = Duration(0.5)
    max_delay: Duration = Duration(4.0)

    def __post_init__(self) -> None:
        if self.max_times < 1:
            raise ValueError(f"max_times must be at least 1, got {self.max_times}")
        if self.initial_delay < 0 or self.max_delay < self.initial_delay:
            raise ValueError(
                f"expected 0 <= initial_delay ({self.initial_delay!r}) <= max_delay ({self.max_delay!r})"
            )
        if self.max_delay <= 0:
            raise ValueError(f"max_delay must be positive, got {self.max_delay!r}")


class RelayClientConfig(OutputConfig, kw_only=True):
    """The `[plugins.relay-client]` table."""

    client_name: str = ""
    relay_server: str = "127.0.0.1:50051"
    buffer_max_length: int = 4096
    buffer_timeout: Duration = Duration(30.0)
    disk_buffer: bool = True
    disk_buffer_path: str = ""
    disk_buffer_max_size: Size = Size(1024 * 1024 * 1024)
    disk_buffer_fsync: Literal["always", "interval", "never"] = "interval"
    memory_buffer_max_size: Size = Size(64 * 1024 * 1024)
    max_in_flight: int = 64
    max_frame_size: Size = Size(16 * 1024 * 1024)
    handshake_timeout: Duration = Duration(10.0)
    token: str = ""
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)

    def __post_init__(self) -> None:
        try:
            parse_address(self.relay_server)
        except ValueError as exc:
            raise ValueError(f"relay_server: {exc}") from None
        if self.buffer_max_length < 1:
            raise ValueError(f"buffer_max_length must be at least 1, got {self.buffer_max_length}")
        if self.buffer_timeout < 0:
            raise ValueError(f"buffer_timeout must not be negative, got {self.buffer_timeout!r}")
        if self.handshake_timeout <= 0:
            raise ValueError(f"handshake_timeout must be positive, got {self.handshake_timeout!r}")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {self.max_in_flight}")
        if not 1024 <= self.max_frame_size <= FRAME_SIZE_LIMIT:
            raise ValueError(
                f"max_frame_size must be between 1KiB and 4GiB, got {int(self.max_frame_size)} bytes"
            )
        for key in ("disk_buffer_max_size", "memory_buffer_max_size"):
            if getattr(self, key) < self.max_frame_size:
                raise ValueError(
                    f"{key} ({int(getattr(self, key))} bytes) must be at least max_frame_size"
                    f" ({int(self.max_frame_size)} bytes):"
                    " the buffer holds whole batches"
                )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError(
                "tls_cert and tls_key go together: set both for a client certificate, or neither"
            )


def build_client_ssl_context(config: RelayClientConfig) -> ssl.SSLContext | None:
    """The client's TLS context (None for plain TCP); errors name the key and the file."""
    if not config.tls:
        if config.tls_ca or config.tls_cert:
            raise ValueError("tls_ca and tls_cert need tls = true")
        return None
    for key in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(config, key)
        if path and not Path(path).is_file():
            raise ValueError(f"{key} {path!r}: no such file")
    try:
        context = ssl.create_default_context(cafile=config.tls_ca or None)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"tls_ca {config.tls_ca!r}: cannot load the CA certificates: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.tls_cert:
        try:
            context.load_cert_chain(config.tls_cert, config.tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"tls_cert {config.tls_cert!r} / tls_key {config.tls_key!r}: cannot load the certificate and key: {exc}"
            ) from None
    return context


def resolve_client_name(config: RelayClientConfig) -> str:
    """The configured name; empty (also from an unset ${NODE_NAME}) means the hostname, except with a
    client certificate, whose common name then stands for it (the server takes it)."""
    if config.client_name.strip():
        return config.client_name.strip()
    if config.tls and config.tls_cert:
        return ""
    return socket.gethostname()


def settings_from_config(config: RelayClientConfig) -> ClientSettings:
    return ClientSettings(
        client_name=resolve_client_name(config),
        relay_server=config.relay_server,
        buffer_max_length=config.buffer_max_length,
        buffer_timeout=float(config.buffer_timeout),
        max_times=config.retry.max_times,
        initial_delay=float(config.retry.initial_delay),
        max_delay=float(config.retry.max_delay),
        max_in_flight=config.max_in_flight,
        max_frame_size=int(config.max_frame_size),
        handshake_timeout=float(config.handshake_timeout),
        token=config.token,
        tls_server_name=config.tls_server_name,
    )


class RelayClientPlugin(Plugin):
    name = "relay-client"
    version = "0.1.0"
    description = (
        "Sends measurements to a relay-server agent over TCP or TLS, buffered on disk until acknowledged."
    )
    Config = RelayClientConfig
    enabled_by_default = False
    provides = ("output",)

    def start(self, ctx: StartContext, config: RelayClientConfig) -> None:
        ssl_context = build_client_ssl_context(config)
        buffer: BufferSpec
        if config.disk_buffer:
            directory = (
                Path(config.disk_buffer_path).expanduser()
                if config.disk_buffer_path
                else ctx.plugin_data_dir()
            )
            buffer = DiskBuffer(directory, int(config.disk_buffer_max_size), config.disk_buffer_fsync)
            ctx.logger.info(
                "disk buffer in %s (at most %s)", directory, format_size(int(config.disk_buffer_max_size))
            )
        else:
            buffer = MemoryBuffer(int(config.memory_buffer_max_size))
        client = RelayClient(
            settings_from_config(config), buffer, registry=ctx.registry, ssl_context=ssl_context
        )
        ctx.add_output(client, config)


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [RelayClientPlugin]
