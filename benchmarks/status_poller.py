"""An open status page, for the benchmarks' "control API on" rounds: fetches URL/api/status every second
(what the page does) until killed, in its own process so that it costs the agent only what it serves.
Prints "ready" after the first answer.

    python benchmarks/status_poller.py http://127.0.0.1:8090
"""

from __future__ import annotations

import sys
import time
import urllib.request


def main() -> None:
    url = sys.argv[1].rstrip("/") + "/api/status"
    first = True
    while True:
        started = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                response.read()
        except OSError as exc:
            print(f"status poller: {exc}", file=sys.stderr, flush=True)
        if first:
            # The benchmark starts measuring once the page is open: the poller's own start-up (an
            # interpreter, urllib) is not part of what the control API costs.
            print("ready", flush=True)
            first = False
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


if __name__ == "__main__":
    main()
