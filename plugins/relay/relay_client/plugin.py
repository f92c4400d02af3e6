"""The `relay-client` output plugin: sends measurements to a relay-server agent, losing none.

`agent --relay-out HOST:PORT` enables it (agent/config.py). At start the plugin checks its config and
TLS files (a bad one is a startup error naming it) and adds one `RelayClient` output (`client.py`),
whose buffer lives under `[agent] data_dir` (`store.py`). The protocol is docs/relay-protocol.md.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from agent import CommandLineFlag, Duration, OutputConfig, Plugin, Size, StartContext, StartupError, hookimpl
from agent.units import format_size
from agent_plugins.relay.protocol.address import parse_address
from agent_plugins.relay.protocol.framing import FRAME_SIZE_LIMIT

from .client import ClientSettings, RelayClient
from .store import BatchStore, BufferSpec, DiskBuffer, MemoryBuffer

#: Integer keys checked by msgspec itself, so that an error names the key's full path
#: (`config error: plugins.relay-client.max_in_flight: expected int >= 1`).
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]


class RetryConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The `[plugins.relay-client.retry]` table.

    Checks that msgspec cannot declare raise "KEY: problem" (the form the other plugins use)."""

    max_times: AtLeastOne = 8
    initial_delay: Duration = Duration(0.5)
    max_delay: Duration = Duration(4.0)

    def __post_init__(self) -> None:
        if self.initial_delay < 0:
            raise ValueError(f"initial_delay: must not be negative, got {_seconds(self.initial_delay)}")
        if self.max_delay <= 0:
            raise ValueError(f"max_delay: must be positive, got {_seconds(self.max_delay)}")
        if self.max_delay < self.initial_delay:
            raise ValueError(
                f"max_delay: must be at least initial_delay ({self.initial_delay}), got {self.max_delay}"
            )


def _seconds(duration: float) -> str:
    """A duration as typed, negative ones included (format_duration assumes >= 0)."""
    return f"{float(duration):g}s"


class RelayClientConfig(OutputConfig, kw_only=True):
    """The `[plugins.relay-client]` table."""

    client_name: str = ""
    relay_server: str = "127.0.0.1:50051"
    buffer_max_length: AtLeastOne = 4096
    buffer_timeout: Duration = Duration(30.0)
    disk_buffer: bool = True
    disk_buffer_path: str = ""
    disk_buffer_max_size: Size = Size(1024 * 1024 * 1024)
    disk_buffer_fsync: Literal["always", "interval", "never"] = "interval"
    memory_buffer_max_size: Size = Size(64 * 1024 * 1024)
    max_in_flight: AtLeastOne = 64
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
        # Each message starts with the key it is about (the key's path when the core's config loader
        # moves it there; graphite-in does the same).
        try:
            parse_address(self.relay_server)
        except ValueError as exc:
            raise ValueError(f"relay_server: {exc}") from None
        if self.buffer_timeout < 0:
            raise ValueError(f"buffer_timeout: must not be negative, got {_seconds(self.buffer_timeout)}")
        if self.handshake_timeout <= 0:
            raise ValueError(f"handshake_timeout: must be positive, got {_seconds(self.handshake_timeout)}")
        if not 1024 <= self.max_frame_size <= FRAME_SIZE_LIMIT:
            raise ValueError(
                f"max_frame_size: must be between 1KiB and 4GiB, got {int(self.max_frame_size)} bytes"
            )
        for key in ("disk_buffer_max_size", "memory_buffer_max_size"):
            if getattr(self, key) < self.max_frame_size:
                raise ValueError(
                    f"{key}: must be at least max_frame_size ({int(self.max_frame_size)} bytes): the buffer"
                    f" holds whole batches; got {int(getattr(self, key))} bytes"
                )
        if bool(self.tls_cert) != bool(self.tls_key):
            key = "tls_key" if self.tls_cert else "tls_cert"
            raise ValueError(
                f"{key}: tls_cert and tls_key go together: set both for a client certificate, or neither"
            )
        if not self.tls:
            for key in ("tls_ca", "tls_cert", "tls_server_name"):
                if getattr(self, key):
                    raise ValueError(f"{key}: needs tls = true")


def build_client_ssl_context(config: RelayClientConfig) -> ssl.SSLContext | None:
    """The client's TLS context (None for plain TCP). A file that cannot be read or loaded is a
    StartupError naming the key and the file."""
    if not config.tls:
        return None
    for key in ("tls_ca", "tls_cert", "tls_key"):
        check_readable_file(key, getattr(config, key))
    try:
        context = ssl.create_default_context(cafile=config.tls_ca or None)
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"tls_ca {config.tls_ca!r}: cannot load the CA certificates: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.tls_cert:
        try:
            context.load_cert_chain(config.tls_cert, config.tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise StartupError(
                f"tls_cert {config.tls_cert!r} / tls_key {config.tls_key!r}: cannot load the certificate and key: {exc}"
            ) from None
    return context


def check_readable_file(key: str, path: str) -> None:
    """A configured file ("" means none) must be a file this process can read: else a StartupError
    naming the key, the file and the reason (the ssl module's own errors do not name the file)."""
    if not path:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise StartupError(f"{key} {path!r}: {exc.strerror or exc}") from None


def open_disk_buffer(spec: DiskBuffer) -> BatchStore:
    """Opens the disk buffer at start, so that a directory that cannot be used (not writable, or held
    by another agent) is a startup error, not an output that fails and restarts for ever."""
    try:
        return spec.open()
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(spec.directory) else ""
        raise StartupError(
            f"disk buffer {spec.directory}: {exc.strerror or exc}{where}; check [agent] data_dir or disk_buffer_path"
        ) from None
    except RuntimeError as exc:
        # The durable log's lock: another agent (or another relay-client) uses this directory.
        raise StartupError(
            f"disk buffer {spec.directory}: {exc}; give each agent its own [agent] data_dir (or disk_buffer_path)"
        ) from None


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
    agent_api = ">=1,<2"
    description = (
        "Sends measurements to a relay-server agent over TCP or TLS, buffered on disk until acknowledged."
    )
    Config = RelayClientConfig
    enabled_by_default = False
    provides = ("output",)

    def __init__(self) -> None:
        self._client: RelayClient | None = None

    def start(self, ctx: StartContext, config: RelayClientConfig) -> None:
        ssl_context = build_client_ssl_context(config)
        buffer: BufferSpec
        store: BatchStore | None = None
        if config.disk_buffer:
            directory = (
                Path(config.disk_buffer_path).expanduser()
                if config.disk_buffer_path
                else ctx.data_dir / ctx.plugin_name
            )
            buffer = DiskBuffer(directory, int(config.disk_buffer_max_size), config.disk_buffer_fsync)
            store = open_disk_buffer(buffer)
            ctx.logger.info(
                "disk buffer in %s (at most %s)", directory, format_size(int(config.disk_buffer_max_size))
            )
        else:
            buffer = MemoryBuffer(int(config.memory_buffer_max_size))
        self._client = RelayClient(
            settings_from_config(config), buffer, registry=ctx.registry, ssl_context=ssl_context, store=store
        )
        ctx.add_output(self._client, config)

    def stop(self) -> None:
        # The disk buffer opened at start, if the output never ran (another plugin failed to start).
        if self._client is not None:
            self._client.close_unused_store()


#: `agent --relay-out collector:50051` on a monitored node: everything goes to that relay server.
RELAY_OUT_FLAG = CommandLineFlag(
    "--relay-out",
    plugin="relay-client",
    key="relay_server",
    metavar="HOST:PORT",
    help="Send measurements to this relay server (HOST:PORT).",
)


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [RelayClientPlugin]


@hookimpl
def agent_command_line_flags() -> list[CommandLineFlag]:
    return [RELAY_OUT_FLAG]
