"""Durations and sizes as they are written in config files: "500ms", "30s", "1m30s", "1h"; "64MiB".

`Duration` and `Size` are float/int subclasses, so plugin code uses them as plain numbers (seconds and
bytes), while config Structs that declare them accept the human-friendly strings. The parsing is done
by `decode_config_value`, the msgspec `dec_hook` used by `agent.config`.
"""

from __future__ import annotations

import re
from typing import Any

import humanfriendly

# One "<number><unit>" part of a Go-style duration ("1m30s" has two parts).
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Zµ]+)\s*")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "m": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}


class Duration(float):
    """A duration in seconds; written "500ms", "30s", "1m30s", "1h" or a number of seconds."""

    def __repr__(self) -> str:
        return f"Duration({format_duration(self)!r})"

    def __str__(self) -> str:
        return format_duration(self)


class PositiveDuration(Duration):
    """A `Duration` that must be more than zero (a poll interval, a timeout): checked when the config is
    read, so that the error names the key."""


class NonNegativeDuration(Duration):
    """A `Duration` that may be zero ("0s" usually means "off" or "at once") but not negative."""


class Size(int):
    """A size in bytes; written "64MiB", "10 MB", "512KiB" or a number of bytes."""

    def __repr__(self) -> str:
        return f"Size({format_size(self)!r})"

    def __str__(self) -> str:
        return format_size(self)


def parse_duration(text: str) -> Duration:
    """Parses "500ms", "30s", "1m30s", "2h", "1.5s" (parts add up). Raises ValueError."""
    stripped = text.strip()
    if not stripped:
        raise ValueError('expected a duration like "30s", got ""')
    pos = 0
    total = 0.0
    while pos < len(stripped):
        match = _DURATION_PART.match(stripped, pos)
        if not match or match.group(2).lower() not in _DURATION_UNITS:
            # Fall back to humanfriendly for the long forms ("5 minutes", "2 hours").
            try:
                return Duration(humanfriendly.parse_timespan(stripped))
            except humanfriendly.InvalidTimespan:
                raise ValueError(
                    f'expected a duration like "30s", "500ms" or "1m30s", got {text!r}'
                ) from None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
        pos = match.end()
    return Duration(total)


def parse_size(text: str) -> Size:
    """Parses "64MiB" (binary), "64MB" (decimal), "1024". Raises ValueError."""
    try:
        return Size(humanfriendly.parse_size(text.strip()))
    except (humanfriendly.InvalidSize, ValueError):
        raise ValueError(f'expected a size like "64MiB" or "500KB", got {text!r}') from None


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration, for generated configs: 0.5 -> "500ms", 90 -> "1m30s"."""
    if seconds == 0:
        return "0s"
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1:
        ms = seconds * 1000
        return f"{ms:g}ms"
    whole = int(seconds)
    if whole != seconds:
        return f"{seconds:g}s"
    parts = []
    for unit, length in (("h", 3600), ("m", 60), ("s", 1)):
        count, whole = divmod(whole, length)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def format_size(size: int) -> str:
    for unit, length in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= length and size % length == 0:
            return f"{size // length}{unit}"
    return str(int(size))


def decode_config_value(target: type, value: Any) -> Any:
    """msgspec dec_hook: turns config strings (or numbers) into Duration and Size."""
    if isinstance(target, type) and issubclass(target, Duration):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f'expected a duration like "30s", got {value!r}')
        seconds = parse_duration(value) if isinstance(value, str) else Duration(value)
        if target is PositiveDuration and seconds <= 0:
            raise ValueError(f"must be positive, got {value!r}")
        if target is NonNegativeDuration and seconds < 0:
            raise ValueError(f"must not be negative, got {value!r}")
        return target(seconds)
    if target is Size:
        if isinstance(value, bool):
            raise ValueError(f'expected a size like "64MiB", got {value!r}')
        if isinstance(value, int):
            return Size(value)
        if isinstance(value, str):
            return parse_size(value)
        raise ValueError(f'expected a size like "64MiB", got {value!r}')
    raise TypeError(f"no config decoder for {target!r}")


def encode_config_value(value: Any) -> Any:
    """msgspec enc_hook, the inverse of decode_config_value (used to write generated configs)."""
    if isinstance(value, Duration):
        return format_duration(value)
    if isinstance(value, Size):
        return format_size(value)
    raise TypeError(f"cannot write {type(value).__name__} to a config file")
