"""The `graphite-in` source plugin: receives carbon plaintext (TCP and UDP) and pickle (TCP).

The plugin checks its table (addresses, limits) at start and adds one `GraphiteInput` autonomous source
(`listeners.py`) that runs every enabled listener. Points keep their Graphite path as their metric
(`series.py`), so `graphite-out` forwards them verbatim and the other outputs show the path.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from agent import Duration, Plugin, PluginConfig, Size, StartContext, hookimpl
from agent.net import AddressError, parse_address
from agent_plugins.graphite.protocol.pickle_codec import DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_POINTS_PER_FRAME
from agent_plugins.graphite.protocol.plaintext import DEFAULT_MAX_LINE_LENGTH, ValidationLevel

from .listeners import LISTENERS, READ_SIZE, GraphiteInput, ListenerSettings


class GraphiteInConfig(PluginConfig, kw_only=True):
    """The `[plugins.graphite-in]` table. sample.toml comments every key."""

    plaintext: str = "0.0.0.0:2003"
    udp: str = ""
    pickle: str = "0.0.0.0:2004"
    validation: ValidationLevel = "medium"
    max_line_length: Annotated[int, Meta(ge=64)] = DEFAULT_MAX_LINE_LENGTH
    max_pickle_frame_size: Size = Size(DEFAULT_MAX_FRAME_BYTES)
    max_pickle_points: Annotated[int, Meta(ge=1)] = DEFAULT_MAX_POINTS_PER_FRAME
    max_connections: Annotated[int, Meta(ge=1)] = 10_000
    idle_timeout: Duration = Duration(0.0)
    recent_bad_lines: Annotated[int, Meta(ge=1)] = 100
    read_size: Size = Size(READ_SIZE)
    reuse_port: bool = False

    def __post_init__(self) -> None:
        for name in LISTENERS:
            address = getattr(self, name)
            if address.strip():
                try:
                    parse_address(address, default_port=None)
                except AddressError as error:
                    raise ValueError(f"{name}: {error}") from None
        if not any(getattr(self, name).strip() for name in LISTENERS):
            raise ValueError('plaintext, udp and pickle are all "": graphite-in would listen on nothing')
        if self.max_pickle_frame_size < 1024:
            raise ValueError(
                f"max_pickle_frame_size: must be at least 1KiB, got {int(self.max_pickle_frame_size)} bytes"
            )
        if not 4096 <= self.read_size <= 16 << 20:
            raise ValueError(f"read_size: must be between 4KiB and 16MiB, got {int(self.read_size)} bytes")
        if self.idle_timeout < 0:
            raise ValueError(f"idle_timeout: must not be negative, got {self.idle_timeout!r}")


def settings_from_config(config: GraphiteInConfig) -> ListenerSettings:
    return ListenerSettings(
        plaintext=config.plaintext.strip(),
        udp=config.udp.strip(),
        pickle=config.pickle.strip(),
        validation=config.validation,
        max_line_length=config.max_line_length,
        max_pickle_frame_size=int(config.max_pickle_frame_size),
        max_pickle_points=config.max_pickle_points,
        max_connections=config.max_connections,
        idle_timeout=float(config.idle_timeout),
        recent_bad_lines=config.recent_bad_lines,
        read_size=int(config.read_size),
        reuse_port=config.reuse_port,
    )


class GraphiteInPlugin(Plugin):
    name = "graphite-in"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "Graphite input: carbon plaintext over TCP and UDP, pickle over TCP, with validation."
    Config = GraphiteInConfig
    enabled_by_default = False
    provides = ("source",)

    def start(self, ctx: StartContext, config: GraphiteInConfig) -> None:
        ctx.add_source(GraphiteInput(settings_from_config(config)))


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [GraphiteInPlugin]
