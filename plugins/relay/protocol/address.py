"""`HOST:PORT` addresses of the relay, as written in configs and on the command line.

Shared by the relay-client (`relay_server = "collector.example:50051"`) and the relay-server
(`address = "[::]:50051"`). IPv6 literals go in brackets, as in URLs. Pure code: nothing is resolved
or bound here; the plugins do that.
"""

from __future__ import annotations

import ipaddress
import re

from .messages import ProtocolError

DEFAULT_PORT = 50051

_BRACKETED = re.compile(r"^\[([^\]]*)\](?::(.*))?$")
#: Hosts that mean "every local address": the server then listens on IPv4 and IPv6 alike.
WILDCARD_HOSTS = frozenset({"", "*", "::", "0.0.0.0"})


class AddressError(ProtocolError, ValueError):
    """An address that is not HOST:PORT; the message names the text and what is wrong with it."""


def parse_address(text: str, *, default_port: int | None = DEFAULT_PORT) -> tuple[str, int]:
    """Splits "host:port", "[v6addr]:port", "v6addr" (no port) or "host" into (host, port).

    The host comes back without brackets. A missing port takes `default_port` (an error if None).
    """
    stripped = text.strip()
    if not stripped:
        raise AddressError('expected an address like "127.0.0.1:50051" or "[::]:50051", got ""')
    bracketed = _BRACKETED.match(stripped)
    if bracketed:
        host, port_text = bracketed.group(1), bracketed.group(2)
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise AddressError(f"{text!r}: {host!r} in brackets is not an IPv6 address") from None
    elif stripped.count(":") > 1:
        # An IPv6 literal without brackets cannot carry a port: all of it is the host.
        try:
            ipaddress.IPv6Address(stripped.split("%", 1)[0])
        except ValueError:
            raise AddressError(f'{text!r}: put an IPv6 address in brackets, like "[::1]:50051"') from None
        host, port_text = stripped, None
    elif ":" in stripped:
        host, port_text = stripped.split(":", 1)
    else:
        host, port_text = stripped, None
    if any(c.isspace() for c in host) or "/" in host:
        raise AddressError(f"{text!r}: {host!r} is not a host name or address")
    if port_text is None or port_text == "":
        if port_text == "" or default_port is None:
            raise AddressError(f"{text!r}: missing port (expected HOST:PORT)")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise AddressError(f"{text!r}: port {port_text!r} is not a number from 0 to 65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """The inverse of parse_address: brackets around IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = ["DEFAULT_PORT", "WILDCARD_HOSTS", "AddressError", "format_address", "parse_address"]
