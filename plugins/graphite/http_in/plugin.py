"""The `http-in` source plugin: an HTTP ingest gateway for relay batches, JSON points and Graphite
lines (see server.py for the protocol, bodies.py for the formats).

Why in the graphite family: of its three formats, Graphite lines need the family's parser
(graphite.protocol.plaintext, the same validation and bad-line reasons as graphite-in); the relay batch
format is the core's standalone batch encoding (agent.batch_codec), and JSON points are its own.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from agent import Duration, Plugin, PluginConfig, Size, StartContext, StartupError, hookimpl
from agent.net import AddressError, parse_address
from agent_plugins.graphite.protocol.plaintext import DEFAULT_MAX_LINE_LENGTH, ValidationLevel

from .server import HttpIngest, IngestSettings


class HttpInConfig(PluginConfig, kw_only=True):
    """The `[plugins.http-in]` table."""

    address: str = "127.0.0.1:8095"
    max_body: Size = Size(16 * 1024 * 1024)
    api_keys: list[str] = []
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    queue_timeout: Duration = Duration(5.0)
    write_timeout: Duration = Duration(30.0)
    retry_after: Annotated[int, Meta(ge=1)] = 5
    validation: ValidationLevel = "medium"
    max_line_length: Annotated[int, Meta(ge=64)] = DEFAULT_MAX_LINE_LENGTH

    def __post_init__(self) -> None:
        try:
            parse_address(self.address, default_port=None)
        except AddressError as exc:
            raise ValueError(f"address: {exc}") from None
        if self.max_body < 1024:
            raise ValueError(f"max_body: must be at least 1KiB, got {int(self.max_body)} bytes")
        for key in ("queue_timeout", "write_timeout"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be positive, got {float(getattr(self, key)):g}s")
        for entry in self.api_keys:
            if not parse_api_key(entry)[1]:
                raise ValueError(f"api_keys: {entry!r}: an empty key (expected KEY or NAME:KEY)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert: tls_cert and tls_key go together: set both for TLS, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca: client certificates need TLS: set tls_cert and tls_key too")


def parse_api_key(entry: str) -> tuple[str, str]:
    """ "NAME:KEY" names the client that uses KEY; a plain "KEY" names none."""
    name, sep, key = entry.partition(":")
    return (name.strip(), key.strip()) if sep else ("", entry.strip())


def check_readable(key: str, path: str) -> None:
    if not path:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise StartupError(f"{key} {path!r}: {exc.strerror or exc}") from None


class HttpInPlugin(Plugin):
    name = "http-in"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "An HTTP ingest gateway: relay batches, JSON points and Graphite lines by POST, answered once written."
    Config = HttpInConfig
    enabled_by_default = False
    provides = ("source",)

    def start(self, ctx: StartContext, config: HttpInConfig) -> None:
        for key in ("tls_cert", "tls_key", "tls_client_ca"):
            check_readable(key, getattr(config, key))
        if config.api_keys and not config.tls_cert:
            ctx.logger.warning(
                "API keys without TLS: keys cross the network in clear text (set tls_cert and tls_key)"
            )
        settings = IngestSettings(
            address=config.address,
            max_body=int(config.max_body),
            api_keys=tuple(parse_api_key(k) for k in config.api_keys),
            queue_timeout=float(config.queue_timeout),
            write_timeout=float(config.write_timeout),
            retry_after=config.retry_after,
            shutdown_timeout=max(0.1, ctx.grace_period / 2),
            validation=config.validation,
            max_line_length=config.max_line_length,
        )
        ctx.add_source(
            HttpIngest(settings, ctx.registry, (config.tls_cert, config.tls_key, config.tls_client_ca))
        )


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [HttpInPlugin]
