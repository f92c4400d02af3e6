"""The client side of the control socket, for `agent control`, `agent tap` and `agent top`: plain
blocking sockets (a CLI call is one short exchange), one JSON object per line each way."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from agent.decoding import MalformedData, decode_untrusted

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()

#: How long a request may take before the CLI gives up on the agent.
REQUEST_TIMEOUT = 15.0


class NoAgent(Exception):
    """Nothing answers at the socket; the message is the one line the CLI prints."""


class RequestFailed(Exception):
    """The agent refused the request; `code` and `known` as in `agent.control.ControlError`."""

    def __init__(self, message: str, code: str, known: list[str]) -> None:
        super().__init__(message)
        self.code = code
        self.known = known


class ControlClient:
    def __init__(self, path: Path, timeout: float | None = REQUEST_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except FileNotFoundError:
            sock.close()
            raise NoAgent(f"no agent running at {self.path} (the socket does not exist)") from None
        except ConnectionRefusedError:
            sock.close()
            raise NoAgent(f"no agent running at {self.path} (nothing listens on the socket)") from None
        except PermissionError:
            sock.close()
            raise NoAgent(
                f"cannot connect to {self.path}: permission denied (run as the agent's user)"
            ) from None
        except OSError as exc:
            sock.close()
            raise NoAgent(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
        return sock

    def request(self, action: str, **fields: Any) -> dict[str, Any]:
        """Sends one request and returns the answer; raises RequestFailed when the agent refuses it."""
        with self._connect() as sock:
            try:
                sock.sendall(_encoder.encode({"action": action, **fields}) + b"\n")
                answer = _read_line(sock.makefile("rb"))
            except TimeoutError:
                raise NoAgent(
                    f"the agent at {self.path} did not answer within {self.timeout:.0f} s"
                ) from None
            except OSError as exc:
                raise NoAgent(f"the agent at {self.path} hung up: {exc.strerror or exc}") from None
        if answer is None:
            raise NoAgent(f"the agent at {self.path} hung up without answering")
        if not answer.get("ok"):
            raise RequestFailed(
                str(answer.get("error")), str(answer.get("code")), list(answer.get("known") or [])
            )
        return answer

    def tap(self, metric: str = "*") -> Iterator[dict[str, Any]]:
        """Yields {"point": {...}} and {"dropped": N} messages until the agent hangs up."""
        sock = self._connect()
        sock.settimeout(None)
        try:
            sock.sendall(_encoder.encode({"action": "tap", "metric": metric}) + b"\n")
            reader = sock.makefile("rb")
            first = _read_line(reader)
            if first is None:
                raise NoAgent(f"the agent at {self.path} hung up without answering")
            if not first.get("ok"):
                raise RequestFailed(str(first.get("error")), str(first.get("code")), [])
            while True:
                message = _read_line(reader)
                if message is None:
                    return
                yield message
        finally:
            sock.close()


def _read_line(reader: Any) -> dict[str, Any] | None:
    line = reader.readline()
    if not line:
        return None
    try:
        message = decode_untrusted(_decoder, line)
    except MalformedData as exc:
        raise NoAgent(f"the agent's answer is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise NoAgent("the agent's answer is not a JSON object")
    return message
