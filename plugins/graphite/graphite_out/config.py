"""The `[plugins.graphite-out]` table: routes, blocklist, rewriters, aggregators, path template, admin ports.

Routes and destinations are `graphite.protocol.routing.RouteConfig` / `DestinationConfig` (the same
Structs the admin API accepts), so a route written in the config file and one POSTed to the admin API
are checked by the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from agent import Duration, OutputConfig
from agent.net import AddressError, format_address, parse_address
from agent_plugins.graphite.protocol.aggregation import AggregatorConfig, parse_aggregation_rules
from agent_plugins.graphite.protocol.routing import RewriterConfig, RouteConfig

from .render import DEFAULT_TEMPLATE, ExtraFields, PathTemplate


def parse_listen_address(text: str, where: str) -> str | None:
    """An admin port's "host:port" (or "[v6]:port") as `agent.net` writes it; "" -> None (switched off).
    Port 0 picks a free port. Raises ValueError naming `where`."""
    stripped = text.strip()
    if not stripped:
        return None
    try:
        return format_address(*parse_address(stripped))
    except AddressError as error:
        raise ValueError(f'{where}: {error} (or "" to switch it off)') from None


class GraphiteOutConfig(OutputConfig, kw_only=True):
    """The `[plugins.graphite-out]` table. See sample.toml for every key, commented."""

    #: The admin HTTP JSON API; "" switches it off.
    admin_http: str = "127.0.0.1:8081"
    #: The line-based admin port (carbon-relay-ng's telnet commands, Polymur's getdest/putdest); "" is off.
    admin_line: str = "127.0.0.1:2030"
    routes: list[RouteConfig] = msgspec.field(default_factory=list)
    #: "<kind> <expression>" entries: prefix, not_prefix, substr, not_substr, regex, not_regex.
    blocklist: list[str] = msgspec.field(default_factory=list)
    rewriters: list[RewriterConfig] = msgspec.field(default_factory=list)
    aggregators: list[AggregatorConfig] = msgspec.field(default_factory=list)
    #: carbon's aggregation-rules.conf; relative to the config file's folder. "" for none.
    aggregation_rules: str = ""
    #: Path of series that have one metric name (system metrics, relay clients' points).
    template: str = DEFAULT_TEMPLATE
    prefix: str = ""
    #: Attributes (and a consumer other than the machine) that the template does not use: "append" their
    #: values to the path (sorted by name), add them as "tags" (;name=value), or "drop" them.
    extra_fields: ExtraFields = "append"
    #: How long the output gathers points from the pipeline before routing them (0: at once).
    flush_interval: Duration = Duration(0.0)
    #: Upper bound of points routed in one go.
    batch_max_points: Annotated[int, Meta(ge=1)] = 100_000

    def __post_init__(self) -> None:
        parse_listen_address(self.admin_http, "admin_http")
        parse_listen_address(self.admin_line, "admin_line")
        PathTemplate(self.template, self.prefix, self.extra_fields)
        if self.flush_interval < 0:
            raise ValueError(f"flush_interval: must not be negative, got {self.flush_interval!r}")
        seen: set[str] = set()
        for route in self.routes:
            if route.key in seen:
                raise ValueError(f"routes: two routes have the key {route.key!r}")
            seen.add(route.key)


def load_aggregation_rules(path_text: str, config_dir: Path | None) -> list[AggregatorConfig]:
    """The aggregators of a carbon aggregation-rules.conf. Raises ValueError naming the file and line."""
    if not path_text:
        return []
    path = Path(path_text).expanduser()
    if not path.is_absolute() and config_dir is not None:
        path = config_dir / path
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"aggregation_rules: cannot read {str(path)!r}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"aggregation_rules: {str(path)!r} is not UTF-8 text: {error}") from None
    rules = parse_aggregation_rules(text, str(path))
    return [rule.to_aggregator_config() for rule in rules]
