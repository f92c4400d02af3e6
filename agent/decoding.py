"""Decoding untrusted bytes with msgspec: one error class and one wording, whatever msgspec's release.

Every network input and every file the agent reads back (relay frames, spool records, admin requests,
stream files) decodes through `decode_untrusted`. msgspec's failures differ between releases: 0.22
raises `UnicodeDecodeError` for a string that is not UTF-8, 0.23 raises `DecodeError("Invalid UTF-8
encoded string")`, and deep nesting can end in `RecursionError`. Callers see one exception,
`MalformedData`, whose message is one line that says what is wrong, so that log lines and error replies
read the same on every release.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

#: What msgspec may raise for bytes that are not a valid document (ValidationError is a DecodeError).
DECODE_ERRORS: tuple[type[BaseException], ...] = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)

INVALID_UTF8 = "a string is not valid UTF-8"


class MalformedData(ValueError):
    """Bytes that are not a valid document of the expected type. The message is one line.

    `validation` is True when the bytes were well-formed but a value had the wrong type or range (msgspec's
    `ValidationError`, kept as `__cause__`), False when the bytes could not be parsed at all.
    """

    def __init__(self, message: str, validation: bool = False) -> None:
        super().__init__(message)
        self.validation = validation


class _Decoder(Protocol):
    def decode(self, data: Any, /) -> Any: ...


def describe_decode_error(error: BaseException) -> str:
    """One line for a failure in `DECODE_ERRORS`, worded the same on every msgspec release."""
    if isinstance(error, UnicodeDecodeError) or (
        isinstance(error, msgspec.DecodeError)
        and not isinstance(error, msgspec.ValidationError)
        and "utf-8" in str(error).lower()
    ):
        return INVALID_UTF8
    if isinstance(error, RecursionError):
        return "nested too deeply"
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def decode_untrusted(decoder: _Decoder, data: Any) -> Any:
    """`decoder.decode(data)`, raising `MalformedData` (and only that) for bytes it cannot take."""
    try:
        return decoder.decode(data)
    except DECODE_ERRORS as error:
        raise MalformedData(
            describe_decode_error(error), validation=isinstance(error, msgspec.ValidationError)
        ) from error


__all__ = ["DECODE_ERRORS", "INVALID_UTF8", "MalformedData", "decode_untrusted", "describe_decode_error"]
