"""Errors that the core and plugins share, and the one way to put an exception on one log line."""

from __future__ import annotations


class StartupError(Exception):
    """An element could not start (a port taken, a server refusing us); the message names it and says
    why. Raised before readiness, it stops the agent with exit code 1 and that one line."""


def describe_exception(exc: BaseException) -> str:
    """One line for a log: the message of the exception, or of the exceptions inside a group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe_exception(e) for e in exc.exceptions)
    text = " ".join(str(exc).split())
    text = (
        f"{type(exc).__name__}: {text}"
        if text and not isinstance(exc, StartupError | OSError)
        else (text or type(exc).__name__)
    )
    return text if len(text) < 300 else text[:297] + "..."


class ReloadError(Exception):
    """The config file could not be reloaded (an error in it, a refused plugin); the running
    configuration is kept. The message is one line."""


__all__ = ["ReloadError", "StartupError", "describe_exception"]
