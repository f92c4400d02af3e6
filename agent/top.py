"""`agent top`: a live terminal view of a running agent's status, drawn with rich.

`render(status)` is pure (a status dict, as the control API answers it, to a rich renderable), so it is
tested without a terminal; `run_top` refreshes it every interval on the alternate screen and reads keys
in cbreak mode: `q` quits with exit 0.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from contextlib import contextmanager
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from agent.control_client import ControlClient, NoAgent, RequestFailed

STATE_STYLES = {"running": "green", "paused": "yellow", "disabled": "yellow", "stopped": "dim"}


def _rate(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}/s" if value >= 100 else f"{value:.1f}/s"


def render(status: dict[str, Any], note: str = "") -> Group:
    """The elements table, then one table per plugin section."""
    header = Text(
        f"agent pid {status.get('pid')}  up {status.get('uptime', 0):.0f} s"
        + ("  stopping" if status.get("stopping") else "")
        + "   q: quit",
        style="bold",
    )
    table = Table(expand=True, header_style="bold")
    for column, justify in (
        ("ELEMENT", "left"),
        ("KIND", "left"),
        ("STATE", "left"),
        ("IN", "right"),
        ("OUT", "right"),
        ("QUEUED", "right"),
        ("DROPPED", "right"),
        ("ERRORS", "right"),
        ("LAST ERROR", "left"),
    ):
        table.add_column(column, justify=justify, no_wrap=column != "LAST ERROR")  # type: ignore[arg-type]
    for e in status.get("elements", []):
        counters = e.get("counters", {})
        rates = e.get("rates") or {}
        table.add_row(
            e["name"],
            e["kind"],
            Text(e["state"], style=STATE_STYLES.get(e["state"], "")),
            _rate(rates.get("in")),
            _rate(rates.get("out")),
            str(counters.get("queued", "")),
            str(counters.get("dropped", "")),
            str(counters.get("errors", "")),
            Text(e.get("last_error", ""), style="red"),
        )
    parts: list[Any] = [header, table]
    for section in status.get("sections", []):
        rows = section.get("rows") or []
        sub = Table(title=section["name"], title_justify="left", expand=True, header_style="bold")
        keys = list(rows[0]) if rows else ["(none)"]
        for key in keys:
            sub.add_column(str(key))
        for row in rows:
            sub.add_row(*(str(row.get(key, "")) for key in keys))
        parts.append(sub)
    if note:
        parts.append(Text(note, style="red"))
    return Group(*parts)


@contextmanager
def _cbreak(fd: int) -> Any:
    """Keys arrive one by one, unechoed; the terminal is restored on the way out."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_top(client: ControlClient, interval: float = 1.0) -> int:
    """Refreshes the view every `interval` until `q` (exit 0) or Ctrl-C (exit 0)."""
    console = Console()
    fd = sys.stdin.fileno()
    last: dict[str, Any] = {"elements": []}
    try:
        with _cbreak(fd), Live(render(last), console=console, screen=True, auto_refresh=False) as live:
            while True:
                note = ""
                try:
                    last = client.request("status")
                except (NoAgent, RequestFailed) as exc:
                    note = f"{exc} (retrying)"
                live.update(render(last, note), refresh=True)
                deadline = time.monotonic() + interval
                while (remaining := deadline - time.monotonic()) > 0:
                    readable, _, _ = select.select([fd], [], [], remaining)
                    if readable:
                        key = os.read(fd, 32)
                        if not key or b"q" in key.lower():
                            return 0
    except KeyboardInterrupt:
        return 0
