"""The `influxdb` output: points as line protocol, gzipped, POSTed to InfluxDB's `/write` endpoint.

`/write?db=DATABASE&precision=ns` is what InfluxDB 1.x serves and what 2.x and 3.x keep for
compatibility (with a token: `Authorization: Token ...`). The core's write loop gathers up to
`batch_max_points` points every `flush_interval`, calls `write`, and retries with backoff when it
raises; this output raises for what waiting can fix (connection errors, timeouts, 5xx, 429, an unknown
database, refused credentials), and settles for what it cannot: a 400 or 413 (bad data, too large) is
logged with InfluxDB's own reason and its points are counted as rejected, never retried for ever.

At least once: a write whose reply was lost is sent again. InfluxDB stores a point once per
measurement, tag set and timestamp (a repeat overwrites the fields with the same values), so a resent
batch does not add points.

httpx runs on trio (through anyio), so the HTTP client lives on the event loop: no thread.
"""

from __future__ import annotations

import gzip
import logging
import re
from typing import Any

import httpx
import trio

from agent import (
    Batch,
    Duration,
    MetricRegistry,
    Output,
    OutputConfig,
    Plugin,
    PositiveDuration,
    RateLimitedLog,
    StartContext,
    hookimpl,
)

from .line_protocol import encode

log = logging.getLogger(__name__)

#: Statuses that say "this batch will never be accepted": bad line protocol or field types, too large.
REJECTED_STATUSES = (400, 413, 422)


class InfluxdbConfig(OutputConfig, kw_only=True):
    """The `[plugins.influxdb]` table."""

    url: str = "http://127.0.0.1:8086"
    database: str = "agent"
    retention_policy: str = ""
    token: str = ""
    username: str = ""
    password: str = ""
    flush_interval: Duration = Duration(1.0)
    batch_max_points: int = 5000
    timeout: PositiveDuration = PositiveDuration(10.0)

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^/]+", self.url):
            raise ValueError(f'url: expected "http://HOST:PORT" or "https://HOST:PORT", got {self.url!r}')
        if not self.database:
            raise ValueError("database must not be empty")
        if self.token and (self.username or self.password):
            raise ValueError("token: give either a token (InfluxDB 2.x, 3.x) or username/password (1.x), not both")
        if self.flush_interval < 0:
            raise ValueError(f"flush_interval must not be negative, got {self.flush_interval}")
        if self.batch_max_points < 1:
            raise ValueError(f"batch_max_points must be positive, got {self.batch_max_points}")


class WriteRetry(OSError):
    """A write that may succeed later; str() is one line with InfluxDB's reason."""


def reason_of(response: httpx.Response) -> str:
    """InfluxDB's own words: the `error` of its JSON body, else the body, else the status."""
    try:
        payload: Any = response.json()
        text = payload.get("error") or payload.get("message") or response.text
    except ValueError:
        text = response.text
    text = " ".join(str(text).split())
    return text[:500] if text else f"HTTP {response.status_code}"


_DROPPED = re.compile(r"dropped=(\d+)")


class InfluxdbOutput(Output):
    """Writes batches to one InfluxDB through one httpx client (keep-alive)."""

    def __init__(self, config: InfluxdbConfig, registry: MetricRegistry) -> None:
        self.config = config
        self.registry = registry
        self.flush_interval = float(config.flush_interval)
        self.batch_max_points = config.batch_max_points
        self.client: httpx.AsyncClient | None = None
        self.points_written = 0
        self.rejected_points = 0
        self.skipped_values = 0
        self.retried_writes = 0
        self._skip_log = RateLimitedLog(log)

    def _params(self) -> dict[str, str]:
        params = {"db": self.config.database, "precision": "ns"}
        if self.config.retention_policy:
            params["rp"] = self.config.retention_policy
        return params

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "text/plain; charset=utf-8", "Content-Encoding": "gzip"}
        if self.config.token:
            headers["Authorization"] = f"Token {self.config.token}"
        return headers

    async def open(self) -> None:
        auth = (self.config.username, self.config.password) if self.config.username else None
        self.client = httpx.AsyncClient(
            base_url=self.config.url.rstrip("/"), timeout=float(self.config.timeout), auth=auth
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def _value_type(self, name: str) -> Any:
        definition = self.registry.get(name)
        return definition.value_type if definition else None

    async def write(self, batches: list[Batch]) -> None:
        assert self.client is not None
        encoded = encode(batches, self._value_type)
        if encoded.skipped:
            self.skipped_values += encoded.skipped
            self._skip_log.log(
                "skipped", encoded.skipped, "influxdb: left out %d NaN or infinite values (line protocol has no literal for them)", encoded.skipped
            )
        if not encoded.points:
            return
        body = await trio.to_thread.run_sync(gzip.compress, encoded.body, 1) if len(encoded.body) > 65536 else gzip.compress(encoded.body, 1)
        try:
            response = await self.client.post("/write", params=self._params(), headers=self._headers(), content=body)
        except httpx.HTTPError as exc:
            self.retried_writes += 1
            raise WriteRetry(f"influxdb {self.config.url}: {type(exc).__name__}: {exc or 'no reply'}") from None
        status = response.status_code
        if status == 204 or status == 200:
            self.points_written += encoded.points
            return
        reason = reason_of(response)
        if status in REJECTED_STATUSES:
            dropped = _DROPPED.search(reason)
            rejected = int(dropped.group(1)) if dropped else encoded.points
            self.rejected_points += rejected
            self.points_written += encoded.points - rejected
            log.error(
                "influxdb %s: %d of %d points rejected (HTTP %d, not retried): %s",
                self.config.url,
                rejected,
                encoded.points,
                status,
                reason,
            )
            return
        self.retried_writes += 1
        raise WriteRetry(f"influxdb {self.config.url}: HTTP {status}: {reason}")


class InfluxdbPlugin(Plugin):
    name = "influxdb"
    version = "0.1.0"
    description = "Writes points to InfluxDB as gzipped line protocol (/write: 1.x, and 2.x/3.x compatibility)."
    Config = InfluxdbConfig
    agent_api = ">=1,<2"
    provides = ("output",)

    def start(self, ctx: StartContext, config: InfluxdbConfig) -> None:
        output = InfluxdbOutput(config, ctx.registry)
        ctx.add_output(output, config)
        ctx.logger.info("writing points to %s database %s", config.url, config.database)


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [InfluxdbPlugin]
