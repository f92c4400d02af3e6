"""Network addresses and listening sockets, as configs and command lines give them.

`HOST:PORT` with IPv6 literals in brackets, as in URLs ("127.0.0.1:2003", "[::1]:50051", "*:2003");
a wildcard host ("", "*", "::", "0.0.0.0") means every local address, IPv4 and IPv6 alike. Parsing is pure
code; `bind_sockets` binds at start, so that a port in use is a startup error that names it.
"""

from __future__ import annotations

import ipaddress
import re
import socket

import trio

_BRACKETED = re.compile(r"^\[([^\]]*)\](?::(.*))?$")
#: Hosts that mean "every local address": the server then listens on IPv4 and IPv6 alike.
WILDCARD_HOSTS = frozenset({"", "*", "::", "0.0.0.0"})


class AddressError(ValueError):
    """An address that is not HOST:PORT; the message names the text and what is wrong with it."""


def parse_address(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Splits "host:port", "[v6addr]:port", "v6addr" (no port) or "host" into (host, port).

    The host comes back without brackets. A missing port takes `default_port` (an error if None).
    """
    # Examples in errors use the caller's port, so that they read as its own (the relay's 50051).
    example = default_port or 2003
    stripped = text.strip()
    if not stripped:
        raise AddressError(f'expected an address like "127.0.0.1:{example}" or "[::]:{example}", got ""')
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
            raise AddressError(f'{text!r}: put an IPv6 address in brackets, like "[::1]:{example}"') from None
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


def socket_address(sockaddr: tuple) -> str:  # type: ignore[type-arg]
    """ "host:port" of a bound or peer socket address (IPv4 or IPv6)."""
    return format_address(str(sockaddr[0]), int(sockaddr[1]))


async def bind_sockets(
    address: str, kind: int = socket.SOCK_STREAM, *, reuse_port: bool = False, what: str = "listener"
) -> list[socket.socket]:
    """Bound, non-blocking sockets for `address` ("HOST:PORT"): one per address family for a wildcard
    host (the IPv6 one with IPV6_V6ONLY, so both families are served), one otherwise. Port 0 picks a free
    port, the same for every family. TCP sockets are not yet listening (`trio.SocketListener` or
    `sock.listen` does that). Raises OSError whose message names `what` and the address."""
    host, port = parse_address(address, default_port=None)
    wildcard = host in WILDCARD_HOSTS
    sockets: list[socket.socket] = []
    try:
        infos = await trio.socket.getaddrinfo(
            None if wildcard else host, port, type=kind, flags=socket.AI_PASSIVE
        )
        if not wildcard:
            infos = infos[:1]
        families: set[int] = set()
        for family, _, proto, _, sockaddr in infos:
            if family in families:
                continue
            families.add(family)
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if kind == socket.SOCK_STREAM:
                # A restarted agent must not wait for the old connections' TIME_WAIT to end.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                # Several agents on one port: the kernel spreads connections (datagrams) over them.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and wildcard:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                sockaddr = (sockaddr[0], sockets[0].getsockname()[1], *sockaddr[2:])
            sock.bind(sockaddr)
            sock.setblocking(False)
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise OSError(error.errno, f"{what}: cannot listen on {address}: {error.strerror or error}") from None
    return sockets


async def open_tcp_listeners(
    address: str, *, reuse_port: bool = False, what: str = "listener", backlog: int = 4096
) -> list[trio.SocketListener]:
    """Listening trio listeners for `address` (see `bind_sockets`)."""
    listeners = []
    for sock in await bind_sockets(address, socket.SOCK_STREAM, reuse_port=reuse_port, what=what):
        sock.listen(backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    return listeners


__all__ = [
    "WILDCARD_HOSTS",
    "AddressError",
    "bind_sockets",
    "format_address",
    "open_tcp_listeners",
    "parse_address",
    "socket_address",
]
