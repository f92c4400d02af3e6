"""What nats-out and nats-in share: connecting to NATS the way NATS clients take their settings.

nats-py is an asyncio library: every call goes through the core's asyncio bridge
(`agent.asyncio_bridge`). Connections are opened with nats-py's own reconnection switched off: the
plugins reconnect themselves through `agent.Reconnector`, so that an outage is logged the same way as
for every other client of the agent (first failures, then one reminder a minute, then its end).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Any

from agent import StartupError
from agent.asyncio_bridge import AsyncioLoop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NatsConnectionSettings:
    """The connection keys common to nats-out and nats-in, checked at start."""

    url: str
    name: str
    credentials: str = ""
    nkey_seed: str = ""
    user: str = ""
    password: str = ""
    token: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    connect_timeout: float = 5.0

    @classmethod
    def from_config(cls, config: Any, name: str) -> NatsConnectionSettings:
        """The connection keys of a nats-in or nats-out table (both spell them the same)."""
        keys = ("credentials", "nkey_seed", "user", "password", "token", "tls_ca", "tls_cert", "tls_key")
        return cls(url=config.url, name=name, **{key: getattr(config, key) for key in keys})

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]


def check_url(url: str) -> None:
    """Raises ValueError("url: ...") for a URL list that NATS clients would not take."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise ValueError("url: empty; give at least one server such as nats://127.0.0.1:4222")
    for server in servers:
        scheme = server.split("://", 1)[0] if "://" in server else ""
        if scheme not in ("nats", "tls", "ws", "wss"):
            raise ValueError(f"url: {server!r}: expected nats://HOST:PORT (or tls://, ws://, wss://)")


def check_subject_token(what: str, value: str) -> None:
    """A stream or consumer name: NATS forbids spaces, '.', '*', '>' and path separators in them."""
    bad = set(value) & set(" \t\r\n.*>/\\")
    if not value or bad:
        raise ValueError(
            f"{what}: {value!r} is not a valid name (no spaces, '.', '*', '>', '/' or '\\' allowed)"
        )


def _readable(key: str, path: str) -> None:
    if not path:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise StartupError(f"{key} {path!r}: {exc.strerror or exc}") from None


def connect_options(settings: NatsConnectionSettings) -> dict[str, Any]:
    """The keyword arguments of `nats.connect` for these settings. A credentials, key or certificate
    file that cannot be read is a StartupError naming the key and the file."""
    for key in ("credentials", "nkey_seed", "tls_ca", "tls_cert", "tls_key"):
        _readable(key, getattr(settings, key))
    options: dict[str, Any] = {
        "servers": settings.servers,
        "name": settings.name,
        "connect_timeout": settings.connect_timeout,
        "allow_reconnect": False,
        "max_reconnect_attempts": 0,
        "error_cb": _ignore,
        "disconnected_cb": _ignore_no_arg,
        "closed_cb": _ignore_no_arg,
    }
    if settings.credentials:
        options["user_credentials"] = settings.credentials
    if settings.nkey_seed:
        options["nkeys_seed"] = settings.nkey_seed
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password
    if settings.token:
        options["token"] = settings.token
    use_tls = bool(settings.tls_ca or settings.tls_cert) or any(
        s.startswith(("tls://", "wss://")) for s in settings.servers
    )
    if use_tls:
        try:
            context = ssl.create_default_context(cafile=settings.tls_ca or None)
            if settings.tls_cert:
                context.load_cert_chain(settings.tls_cert, settings.tls_key or None)
        except (ssl.SSLError, OSError) as exc:
            raise StartupError(f"tls_ca/tls_cert/tls_key: cannot load the certificates: {exc}") from None
        options["tls"] = context
    return options


async def _ignore(exc: Exception) -> None:
    # The plugins see failures through the calls that fail; nats-py's own report is for debugging.
    log.debug("nats client: %s", exc)


async def _ignore_no_arg() -> None:
    return None


async def connect(aio: AsyncioLoop, options: dict[str, Any]) -> Any:
    """Connects (on the asyncio loop); returns the nats-py client."""
    import nats

    return await aio.run(nats.connect, **options)


async def close_quietly(aio: AsyncioLoop, client: Any) -> None:
    """Closes a client, ignoring the errors of one that is already broken."""
    if client is None:
        return
    try:
        await aio.run(client.close)
    except Exception as exc:
        log.debug("closing the nats connection: %s", exc)


def describe_nats_error(exc: BaseException) -> str:
    """One line for a nats-py failure (its messages are often empty or start with 'nats: ')."""
    text = str(exc).strip()
    if text.startswith("nats: "):
        text = text[6:]
    name = type(exc).__name__
    if not text:
        return {"TimeoutError": "timed out", "NoServersError": "no server available"}.get(name, name)
    return text if name in ("Error", "OSError", "ConnectionRefusedError") else f"{text} ({name})"


__all__ = [
    "NatsConnectionSettings",
    "check_subject_token",
    "check_url",
    "close_quietly",
    "connect",
    "connect_options",
    "describe_nats_error",
]
