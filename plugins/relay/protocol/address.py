"""Relay addresses: `agent.net`'s HOST:PORT with the relay's default port.

Shared by the relay-client (`relay_server = "collector.example:50051"`) and the relay-server
(`address = "[::]:50051"`); a missing port means 50051.
"""

from __future__ import annotations

from agent.net import WILDCARD_HOSTS, AddressError, format_address
from agent.net import parse_address as parse_host_port

DEFAULT_PORT = 50051


def parse_address(text: str, *, default_port: int | None = DEFAULT_PORT) -> tuple[str, int]:
    """`agent.net.parse_address` with the relay's default port."""
    return parse_host_port(text, default_port=default_port)


__all__ = ["DEFAULT_PORT", "WILDCARD_HOSTS", "AddressError", "format_address", "parse_address"]
