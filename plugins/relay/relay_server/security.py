"""Who may send to the relay server: its TLS context, the names in a client certificate, shared tokens.

Used by `server.py` while a connection is in its handshake. The checks are plain functions of their
inputs (a Hello, the peer's certificate as `ssl` reports it, the configured secrets), so that they
are tested without sockets. docs/relay-protocol.md ("Security") is the specification.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import StartupError


class SecurityConfigError(StartupError):
    """A TLS file that cannot be used; the message names the key and the file (the agent reports it
    as the plugin's startup error)."""


def build_server_ssl_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext | None:
    """The server's TLS context, or None for plain TCP (no `tls_cert`).

    With `client_ca`, clients must present a certificate signed by that CA (mutual TLS).
    """
    if not cert and not key and not client_ca:
        return None
    if not cert or not key:
        # The config checks this already (RelayServerConfig); callers that build a context directly too.
        raise SecurityConfigError("tls_cert and tls_key go together: set both for TLS, or neither")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _check_file("tls_cert", cert)
    _check_file("tls_key", key)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise SecurityConfigError(
            f"tls_cert {cert!r} / tls_key {key!r}: cannot load the certificate and key: {exc}"
        ) from None
    if client_ca:
        _check_file("tls_client_ca", client_ca)
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise SecurityConfigError(
                f"tls_client_ca {client_ca!r}: cannot load the CA certificates: {exc}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _check_file(key: str, path: str) -> None:
    """The file must be readable by this process: else an error naming the key, the file and why (the
    ssl module's own errors do not name the file)."""
    try:
        with Path(path).open("rb"):
            pass
    except OSError as exc:
        raise SecurityConfigError(f"{key} {path!r}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class CertificateNames:
    """The names a client certificate vouches for: its subject's common name and its DNS names."""

    common_name: str
    dns_names: tuple[str, ...]

    def covers(self, name: str) -> bool:
        return name == self.common_name or name in self.dns_names


def certificate_names(peercert: Mapping[str, Any] | None) -> CertificateNames | None:
    """The names in a certificate as `SSLSocket.getpeercert()` returns it (None: no certificate)."""
    if not peercert:
        return None
    common_name = ""
    for rdn in peercert.get("subject", ()):
        for attribute, value in rdn:
            if attribute == "commonName":
                common_name = value
    dns_names = tuple(value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS")
    return CertificateNames(common_name, dns_names)


class AuthError(Exception):
    """Authentication failed. `str()` is the server's log text; clients are told less."""


def resolve_client_name(hello_name: str, names: CertificateNames | None, *, name_must_match: bool) -> str:
    """The name the server knows the client by: the Hello's, or with a client certificate and an
    empty Hello name, the certificate's common name. Raises AuthError if the certificate does not
    name the client (when `name_must_match`), ValueError for a missing name."""
    if names is not None:
        if not hello_name:
            if not names.common_name:
                raise AuthError("empty client name, and the client certificate has no common name")
            return names.common_name
        if name_must_match and not names.covers(hello_name):
            shown = ", ".join(dict.fromkeys(n for n in (names.common_name, *names.dns_names) if n))
            raise AuthError(
                f"client name {hello_name!r} is not in its certificate (names: {shown or 'none'})"
            )
        return hello_name
    if not hello_name:
        raise ValueError(
            "empty client name (only allowed with a client certificate, whose common name stands for it)"
        )
    return hello_name


def check_token(
    client_name: str, token: str | None, shared_token: str, client_tokens: Mapping[str, str]
) -> None:
    """Checks the Hello's token against the client's own token, else the shared one. No configured
    token: anything goes. Compared in constant time. Raises AuthError."""
    expected = client_tokens.get(client_name) or shared_token
    if not expected:
        return
    if not token:
        raise AuthError("missing token")
    if not hmac.compare_digest(token.encode("utf-8"), expected.encode("utf-8")):
        raise AuthError("wrong token")


__all__ = [
    "AuthError",
    "CertificateNames",
    "SecurityConfigError",
    "build_server_ssl_context",
    "certificate_names",
    "check_token",
    "resolve_client_name",
]
