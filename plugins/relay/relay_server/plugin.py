"""The `relay-server` source plugin: receives measurements from relay-client agents.

`agent --relay-in 0.0.0.0:50051` enables it (agent/config.py). The plugin checks its config and TLS
files at start (a bad file or address is a startup error naming it), then adds one `RelayServer`
autonomous source (`server.py`). The protocol is docs/relay-protocol.md.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from agent import CommandLineFlag, Duration, Plugin, PluginConfig, Size, StartContext, hookimpl
from agent.plugin import ControlSection
from agent_plugins.relay.protocol.address import parse_address
from agent_plugins.relay.protocol.framing import FRAME_SIZE_LIMIT

from .security import build_server_ssl_context
from .server import RelayServer, ServerSettings

#: Integer keys checked by msgspec itself, so that an error names the key's full path
#: (`config error: plugins.relay-server.max_connections: expected int >= 1`).
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]


class RelayServerConfig(PluginConfig, kw_only=True):
    """The `[plugins.relay-server]` table."""

    address: str = "[::]:50051"
    max_frame_size: Size = Size(16 * 1024 * 1024)
    handshake_timeout: Duration = Duration(10.0)
    heartbeat_interval: Duration = Duration(5.0)
    max_in_flight: AtLeastOne = 64
    max_connections: AtLeastOne = 10_000
    stream_retention: Duration = Duration(7 * 86400.0)
    max_streams: AtLeastOne = 100_000
    token: str = ""
    client_tokens: dict[str, str] = msgspec.field(default_factory=dict)
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tls_client_name_must_match: bool = True

    def __post_init__(self) -> None:
        # Each message starts with the key it is about (the key's path when the core's config loader
        # moves it there; graphite-in does the same).
        try:
            parse_address(self.address)
        except ValueError as exc:
            raise ValueError(f"address: {exc}") from None
        if not 1024 <= self.max_frame_size <= FRAME_SIZE_LIMIT:
            raise ValueError(
                f"max_frame_size: must be between 1KiB and 4GiB, got {int(self.max_frame_size)} bytes"
            )
        for key in ("handshake_timeout", "heartbeat_interval", "stream_retention"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be positive, got {float(getattr(self, key)):g}s")
        if bool(self.tls_cert) != bool(self.tls_key):
            key = "tls_key" if self.tls_cert else "tls_cert"
            raise ValueError(f"{key}: tls_cert and tls_key go together: set both for TLS, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca: client certificates need TLS: set tls_cert and tls_key too")


def settings_from_config(config: RelayServerConfig, grace_period: float = 10.0) -> ServerSettings:
    return ServerSettings(
        address=config.address,
        max_frame_size=int(config.max_frame_size),
        handshake_timeout=float(config.handshake_timeout),
        heartbeat_interval=float(config.heartbeat_interval),
        max_in_flight=config.max_in_flight,
        max_connections=config.max_connections,
        stream_retention=float(config.stream_retention),
        max_streams=config.max_streams,
        # At shutdown the server waits for its outputs to write what it took, to acknowledge it
        # before closing; half the grace period leaves the outputs the other half to drain.
        shutdown_timeout=max(0.1, grace_period / 2),
        token=config.token,
        client_tokens=tuple(sorted(config.client_tokens.items())),
        tls_client_name_must_match=config.tls_client_name_must_match,
    )


class RelayServerPlugin(Plugin):
    name = "relay-server"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "Receives measurements from relay-client agents over TCP or TLS (lossless, acknowledged)."
    Config = RelayServerConfig
    enabled_by_default = False
    provides = ("source",)

    def start(self, ctx: StartContext, config: RelayServerConfig) -> None:
        ssl_context = build_server_ssl_context(config.tls_cert, config.tls_key, config.tls_client_ca)
        if (config.token or config.client_tokens) and ssl_context is None:
            ctx.logger.warning(
                "token authentication without TLS: tokens cross the network in clear text (set tls_cert and tls_key)"
            )
        settings = settings_from_config(config, ctx.grace_period)
        self.server = RelayServer(settings, ctx.registry, ssl_context)
        ctx.add_source(self.server)


#: `agent --relay-in 0.0.0.0:50051` on a collector: receive from relay clients on that address.
RELAY_IN_FLAG = CommandLineFlag(
    "--relay-in",
    plugin="relay-server",
    key="address",
    metavar="ADDR:PORT",
    help="Receive measurements from relay clients on ADDR:PORT.",
)


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [RelayServerPlugin]


@hookimpl
def agent_command_line_flags() -> list[CommandLineFlag]:
    return [RELAY_IN_FLAG]


@hookimpl
def agent_control_sections(plugins: dict[str, Plugin]) -> list[ControlSection]:
    """The relay clients connected now, for the status page and `agent top`: name, address, the last
    batch acknowledged, and the lag (batches taken but not yet acknowledged)."""
    plugin = plugins.get(RelayServerPlugin.name)
    if not isinstance(plugin, RelayServerPlugin) or not hasattr(plugin, "server"):
        return []
    return [ControlSection("relay-server clients", plugin.server.client_rows)]
