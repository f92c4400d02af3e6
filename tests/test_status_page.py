"""The status page in a real browser: Debian's headless Chromium, driven in real time over the DevTools
protocol on a pipe (`--remote-debugging-pipe`: no port, no authentication problem), loads `GET /` from
a running agent while points flow, sees the rates (written with `/s`) and sees them change when the
source's period is halved; a screenshot is kept in the test's folder.

No virtual time (`--virtual-time-budget` fakes the page's clock and may never end on a page that keeps
fetching): the test waits for what the page shows, with a deadline."""

from __future__ import annotations

import base64
import json
import os
import re
import select
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from agent.testing import require_executable

from .test_control import http_address, running_agent, wait_for


class DevTools:
    """A minimal Chrome DevTools Protocol client over the pipe: fd 3 in, fd 4 out, NUL-separated JSON."""

    def __init__(self, executable: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire() -> None:  # in the child, before exec: the pipe ends become fds 3 and 4
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            [
                executable,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                "--window-size=1280,720",
                "about:blank",
            ],
            preexec_fn=wire,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, _, self._buffer = self._buffer.partition(b"\0")
                answer = json.loads(raw)
                if answer.get("id") == self._next_id:
                    if "error" in answer:
                        raise RuntimeError(f"{method}: {answer['error']}")
                    return answer["result"]
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"chromium did not answer {method} within {timeout} s"
            readable, _, _ = select.select([self._from_browser], [], [], remaining)
            if readable:
                data = os.read(self._from_browser, 1 << 20)
                assert data, "chromium exited"
                self._buffer += data

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (AssertionError, OSError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


ROWS = """Array.from(document.querySelectorAll('#elements tbody tr')).map(r =>
    Array.from(r.cells).map(c => c.textContent))"""


def rate_of(rows: list[list[str]], name: str, column: int = 3) -> float | None:
    for row in rows:
        if row[0] == name and row[column].endswith("/s"):
            return float(row[column][:-2].replace(",", ""))
    return None


def test_the_status_page_shows_live_rates_in_chromium(tmp_path: Path) -> None:
    chromium = require_executable("chromium", "apt-get install -y chromium")
    extra = 'http = "127.0.0.1:0"\nhttp_token = "page-token"'
    with running_agent(tmp_path, poll="200ms", agent_extra=extra) as agent:
        base = f"http://{http_address(agent)}"
        with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
            browser = DevTools(chromium, Path(profile))
            try:
                browser.open(f"{base}/?token=page-token")
                rows = wait_for(
                    lambda: (r := browser.evaluate(ROWS)) and rate_of(r, "system") and r,
                    what="the page shows the source's rate",
                )
                names = [row[0] for row in rows]
                assert names == ["system", "csv", "discard"]
                # Every rate on the page is written with /s.
                for row in rows:
                    assert row[3].endswith("/s") and row[4].endswith("/s"), row
                # The first rate sample covers the start; the ones after two seconds are steady.
                wait_for(lambda: agent.element("system")["uptime"] >= 3.0, what="a steady rate")
                before = wait_for(
                    lambda: (r := rate_of(browser.evaluate(ROWS), "system")) and r > 0 and r,
                    what="a steady rate",
                )
                # Halve the period through the API: the page's rate doubles without a reload.
                request = urllib.request.Request(
                    f"{base}/api/elements/system/set-period",
                    data=json.dumps({"poll_interval": "100ms"}).encode(),
                    method="POST",
                    headers={"Authorization": "Bearer page-token"},
                )
                with urllib.request.urlopen(request, timeout=10) as response:
                    assert response.status == 200
                wait_for(
                    lambda: (rate_of(browser.evaluate(ROWS), "system") or 0) > 1.5 * before,
                    what="the page's rate doubles",
                )
                page_text = browser.evaluate("document.body.innerText")
                assert "poll_interval: 200ms → 100ms" in page_text
                assert re.search(r"pid \d+, up \d+ s", page_text)
                # Nothing on the page comes from elsewhere: no script, style or image from another host.
                external = browser.evaluate(
                    "performance.getEntriesByType('resource').map(e => e.name)"
                    ".filter(n => !n.startsWith(location.origin))"
                )
                assert external == []
                browser.screenshot(tmp_path / "status-page.png")
                assert (tmp_path / "status-page.png").stat().st_size > 10_000
            finally:
                browser.close()
