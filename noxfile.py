"""Developer sessions.

- `nox -s tests`: the whole suite on the locked versions (`requirements.lock`), as CI runs it.
- `nox -s newest`: the whole suite on the newest release of every dependency, as a user's plain
  `pip install` gets them. Run it before pushing to main: a new release must not break us unseen.
- `nox -s lowest`: the whole suite on the lowest versions that pyproject.toml allows, so that its lower
  bounds are versions that were tested.
- `nox -s docs`: the documentation site, built into site/ in strict mode (a broken link fails).
- `nox -s lock`: refreshes `requirements.lock` from pyproject.toml (the README's development section).
- `nox -s lint`, `nox -s benchmarks`.
"""

from __future__ import annotations

import glob

import nox

nox.options.sessions = ["tests", "lint"]

LOCK_FILE = "requirements.lock"
EDITABLE = ("-e", ".[test]", "-e", "./plugins-contrib/rapl")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite on the locked versions, as CI runs it."""
    session.install("-r", LOCK_FILE)
    session.install(*EDITABLE)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def newest(session: nox.Session) -> None:
    """The whole test suite on the newest release of every dependency (no lock file)."""
    session.install("--upgrade", "--upgrade-strategy", "eager", *EDITABLE)
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lowest(session: nox.Session) -> None:
    """The whole test suite on the lowest versions pyproject.toml allows (its lower bounds)."""
    session.install("uv")
    session.run(
        "uv", "pip", "compile", "pyproject.toml", "--extra", "test", "--resolution", "lowest-direct",
        "--python-version", "3.11", "--no-header", "--quiet", "-o", f"{session.create_tmp()}/lowest.txt",
    )
    session.install("-r", f"{session.create_tmp()}/lowest.txt")
    session.install("--no-deps", *EDITABLE)
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lock(session: nox.Session) -> None:
    """Refreshes requirements.lock: exact versions of every runtime and test dependency."""
    session.install("uv")
    session.run(
        "uv", "pip", "compile", "pyproject.toml", "--extra", "test", "--extra", "docs", "--upgrade",
        "--python-version", "3.11", "--no-header", "--quiet", "-o", LOCK_FILE,
    )


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs.yml), built into site/ in strict mode: a broken link, a missing page
    or a docstring that cannot be read fails. It reads everything from the checkout (no network at build
    time): plugin pages come from each plugin's README.md and sample.toml (docs/hooks.py)."""
    session.install("-r", LOCK_FILE)
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff's checks on every Python folder, and its formatting on the core."""
    session.install("ruff")
    session.run("ruff", "check", "agent", "plugins", "plugins-contrib", "tests", "benchmarks")
    session.run("ruff", "format", "--check", "--diff", "agent")


@nox.session
def benchmarks(session: nox.Session) -> None:
    """Every benchmark in benchmarks/, each printing its figures and a JSON line."""
    session.install("-r", LOCK_FILE)
    session.install("-e", ".")
    # graphite's own relay (Twisted), for benchmarks/graphite.py's comparison; whisper because carbon
    # refuses to start without a database plugin, even as a relay. Not part of the test suite.
    session.install("carbon", "whisper")
    for script in sorted(glob.glob("benchmarks/*.py")):
        session.run("python", script, *session.posargs)
