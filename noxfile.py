"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s benchmarks`."""

from __future__ import annotations

import glob

import nox

nox.options.sessions = ["tests", "lint"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, as CI runs it."""
    session.install("-e", ".[test]", "-e", "./plugins-contrib/rapl")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff's checks on every Python folder, and its formatting on the core."""
    session.install("ruff")
    session.run("ruff", "check", "agent", "plugins", "plugins-contrib", "tests", "benchmarks")
    session.run("ruff", "format", "--check", "--diff", "agent")


@nox.session
def benchmarks(session: nox.Session) -> None:
    """Every benchmark in benchmarks/, each printing its figures and a JSON line."""
    session.install("-e", ".")
    # graphite's own relay (Twisted), for benchmarks/graphite.py's comparison; whisper because carbon
    # refuses to start without a database plugin, even as a relay. Not part of the test suite.
    session.install("carbon", "whisper")
    for script in sorted(glob.glob("benchmarks/*.py")):
        session.run("python", script, *session.posargs)
