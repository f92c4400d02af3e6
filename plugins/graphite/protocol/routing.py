"""Routing for the `graphite-out` plugin: matchers, blocklist, rewriters, route configs and destination choice.

Where it sits: a batch of Graphite points arrives at `graphite-out` as parallel lists (paths, timestamps,
values). `RoutingTable.prepare` drops blocklisted paths and applies the rewriters; aggregators
(`aggregation.py`) may then consume points; `RoutingTable.route` asks every route which of its destinations
gets which point. The answer is a list of point indexes per destination, so the trio layer does one queue
operation per destination per batch and never looks at single points. Nothing here does I/O.

The pipeline follows carbon-relay-ng's table (validate, blocklist, rewriters, aggregators, routes) with
snake_case names. Differences from carbon-relay-ng, on purpose:
- Regexes are Python `re` patterns (carbon-relay-ng uses Go RE2; the common syntax is the same), searched
  unanchored like carbon-relay-ng's.
- Destination matchers see the metric path only (carbon-relay-ng hands them the whole "path value ts"
  line, so a regex could match the value).
- In rewrite templates `$1x` means group 1 followed by "x" (Go would read a group named "1x" and insert
  nothing); a reference to a group that does not exist is a config error instead of an empty string.
- consistent_hashing works with a single destination (carbon does; carbon-relay-ng insists on two), so a
  setup can start with one carbon-cache and grow. Its ring is carbon 1.x's (`hashing.py`), including the
  collision fix that carbon-relay-ng's consistentHashing lacks, and it supports fnv1a_ch and a
  replication factor.
- hash_route is Polymur's mode: the same carbon ring, but a destination that stays down leaves the ring
  and its share of paths goes to the others until it is back. (Polymur itself hashes
  "('host', 'instance'):0:i" with '' for no instance, which matches neither carbon nor graphite-web; we use
  carbon's keys, which is what Polymur set out to do.)
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from agent.units import Duration, Size

from .hashing import (
    DEFAULT_CACHE_SIZE,
    ConsistentHashRing,
    DestinationAddress,
    EmptyRingError,
    HashType,
    parse_destination,
)

logger = logging.getLogger(__name__)

RouteType = Literal["send_all_match", "send_first_match", "consistent_hashing", "broadcast", "hash_route"]
OutputFormat = Literal["plaintext", "pickle"]

#: Matcher fields, cheapest test first (the order conditions are evaluated in).
MATCH_KINDS: tuple[str, ...] = ("prefix", "not_prefix", "substr", "not_substr", "regex", "not_regex")
_OPPOSITE_KIND = {
    "prefix": "not_prefix",
    "not_prefix": "prefix",
    "substr": "not_substr",
    "not_substr": "substr",
    "regex": "not_regex",
    "not_regex": "regex",
}
#: Blocklist entry kinds: ours plus carbon-relay-ng's camelCase spellings.
_BLOCKLIST_KINDS = {kind: kind for kind in MATCH_KINDS} | {
    "notPrefix": "not_prefix",
    "sub": "substr",
    "notSub": "not_substr",
    "notRegex": "not_regex",
}
_ROUTE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_HASHING_TYPES = ("consistent_hashing", "hash_route")


def compile_regex(expression: str, where: str) -> re.Pattern[str]:
    """Compiles a user regex; the error names where it came from: "route 'x': regex: invalid ..."."""
    try:
        return re.compile(expression)
    except re.error as error:
        raise ValueError(f"{where}: invalid regular expression {expression!r}: {error}") from None


def _filter(paths: Sequence[str], indexes: Sequence[int], kind: str, value: object) -> list[int]:
    """The indexes whose path satisfies one condition. One list comprehension per kind keeps it at C speed."""
    if kind == "prefix":
        return [i for i in indexes if paths[i].startswith(value)]  # type: ignore[arg-type]
    if kind == "not_prefix":
        return [i for i in indexes if not paths[i].startswith(value)]  # type: ignore[arg-type]
    if kind == "substr":
        return [i for i in indexes if value in paths[i]]  # type: ignore[operator]
    if kind == "not_substr":
        return [i for i in indexes if value not in paths[i]]  # type: ignore[operator]
    search = value.search  # type: ignore[attr-defined]
    if kind == "regex":
        return [i for i in indexes if search(paths[i])]
    return [i for i in indexes if not search(paths[i])]


def _holds(kind: str, value: object, path: str) -> bool:
    if kind == "prefix":
        return path.startswith(value)  # type: ignore[arg-type]
    if kind == "not_prefix":
        return not path.startswith(value)  # type: ignore[arg-type]
    if kind == "substr":
        return value in path  # type: ignore[operator]
    if kind == "not_substr":
        return value not in path  # type: ignore[operator]
    found = value.search(path) is not None  # type: ignore[attr-defined]
    return found if kind == "regex" else not found


class MatchFields(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The six matcher fields shared by routes and destinations. All that are set must hold."""

    prefix: str = ""
    not_prefix: str = ""
    substr: str = ""
    not_substr: str = ""
    regex: str = ""
    not_regex: str = ""


class Matcher:
    """prefix / not_prefix / substr / not_substr / regex / not_regex, AND-ed; none set matches everything.

    Regexes are searched unanchored (anchor with ^ yourself).
    """

    __slots__ = ("_conditions", "description")

    def __init__(
        self,
        *,
        prefix: str = "",
        not_prefix: str = "",
        substr: str = "",
        not_substr: str = "",
        regex: str = "",
        not_regex: str = "",
        where: str = "matcher",
    ) -> None:
        given = {
            "prefix": prefix,
            "not_prefix": not_prefix,
            "substr": substr,
            "not_substr": not_substr,
            "regex": regex,
            "not_regex": not_regex,
        }
        conditions: list[tuple[str, object]] = []
        for kind in MATCH_KINDS:
            value = given[kind]
            if not value:
                continue
            if kind.endswith("regex"):
                conditions.append((kind, compile_regex(value, f"{where}: {kind}")))
            else:
                conditions.append((kind, value))
        self._conditions = tuple(conditions)
        self.description = " and ".join(f"{kind} {given[kind]!r}" for kind, _ in conditions) or "everything"

    @classmethod
    def from_fields(cls, fields: MatchFields, where: str) -> Matcher:
        return cls(
            prefix=fields.prefix,
            not_prefix=fields.not_prefix,
            substr=fields.substr,
            not_substr=fields.not_substr,
            regex=fields.regex,
            not_regex=fields.not_regex,
            where=where,
        )

    @property
    def matches_all(self) -> bool:
        return not self._conditions

    def matches(self, path: str) -> bool:
        return all(_holds(kind, value, path) for kind, value in self._conditions)

    def select(self, paths: Sequence[str], candidates: Sequence[int] | None = None) -> list[int]:
        """The indexes (among `candidates`, default all) whose path matches, in order."""
        indexes: Sequence[int] = range(len(paths)) if candidates is None else candidates
        if not self._conditions:
            return list(indexes)
        for kind, value in self._conditions:
            indexes = _filter(paths, indexes, kind, value)
            if not indexes:
                break
        return list(indexes)

    def __repr__(self) -> str:
        return f"Matcher({self.description})"


def _parse_blocklist_entry(entry: str, where: str) -> tuple[str, str]:
    kind_text, _, expression = entry.strip().partition(" ")
    expression = expression.strip()
    kind = _BLOCKLIST_KINDS.get(kind_text)
    if kind is None:
        raise ValueError(
            f"{where}: {entry!r}: expected '<kind> <expression>' with kind one of "
            f"{', '.join(MATCH_KINDS)} (or notPrefix, sub, notSub, notRegex)"
        )
    if not expression:
        raise ValueError(f"{where}: {entry!r}: the {kind} has no expression")
    return kind, expression


class Blocklist:
    """Drops every path that any entry matches. Entries read "<kind> <expression>", e.g. "prefix tmp.".

    Kinds are the matcher fields (prefix, not_prefix, substr, not_substr, regex, not_regex) or
    carbon-relay-ng's names (prefix, notPrefix, sub, notSub, regex, notRegex). "not_prefix a." blocks every
    path that does not start with "a.".
    """

    def __init__(self, entries: Sequence[str], where: str = "blocklist") -> None:
        self.entries = list(entries)
        prefixes: list[str] = []
        # Each entry becomes the condition a path must meet to stay (the opposite of the entry).
        keep_conditions: list[tuple[str, object]] = []
        for number, entry in enumerate(entries):
            entry_where = f"{where}[{number}]"
            kind, expression = _parse_blocklist_entry(entry, entry_where)
            if kind == "prefix":
                prefixes.append(expression)
            elif kind.endswith("regex"):
                keep_conditions.append((_OPPOSITE_KIND[kind], compile_regex(expression, entry_where)))
            else:
                keep_conditions.append((_OPPOSITE_KIND[kind], expression))
        if prefixes:
            # str.startswith takes a tuple: all blocked prefixes cost one call per path.
            keep_conditions.insert(0, ("not_prefix", tuple(prefixes)))
        self._keep_conditions = tuple(keep_conditions)

    def __bool__(self) -> bool:
        return bool(self._keep_conditions)

    def blocks(self, path: str) -> bool:
        return not all(_holds(kind, value, path) for kind, value in self._keep_conditions)

    def allowed(self, paths: Sequence[str], candidates: Sequence[int] | None = None) -> list[int]:
        """The indexes (among `candidates`, default all) whose path no entry blocks."""
        indexes: Sequence[int] = range(len(paths)) if candidates is None else candidates
        for kind, value in self._keep_conditions:
            indexes = _filter(paths, indexes, kind, value)
            if not indexes:
                break
        return list(indexes)


_GROUP_REFERENCE = re.compile(
    r"\$(?:\$|\{([^}]*)\}|([0-9]+|[A-Za-z_][A-Za-z0-9_]*))?|\\(?:([0-9]+)|g<([^>]*)>)"
)


class GroupTemplate:
    """A replacement or output-name template with regex group references.

    `$1`, `${1}`, `$name`, `${name}` (carbon-relay-ng), `\\1` and `\\g<name>` (Python) insert a group; `$$` is
    a literal `$`. Every reference is checked against the pattern, so a typo fails at config time.
    """

    __slots__ = ("template", "python_template")

    def __init__(self, template: str, pattern: re.Pattern[str], where: str) -> None:
        self.template = template
        pieces: list[str] = []
        position = 0
        for found in _GROUP_REFERENCE.finditer(template):
            pieces.append(template[position : found.start()].replace("\\", "\\\\"))
            position = found.end()
            text = found.group(0)
            if text == "$$":
                pieces.append("$")
                continue
            reference = next((group for group in found.groups() if group is not None), None)
            if reference is None:
                if text == "$":
                    raise ValueError(
                        f"{where}: template {template!r}: '$' must be followed by a group number or name "
                        f"(write $$ for a literal $)"
                    )
                pieces.append(text.replace("\\", "\\\\"))
                continue
            pieces.append(self._reference(reference, pattern, template, where))
        pieces.append(template[position:].replace("\\", "\\\\"))
        self.python_template = "".join(pieces)

    @staticmethod
    def _reference(reference: str, pattern: re.Pattern[str], template: str, where: str) -> str:
        if reference.isdigit():
            number = int(reference)
            if number > pattern.groups:
                raise ValueError(
                    f"{where}: template {template!r} uses group {number} but the regular expression "
                    f"{pattern.pattern!r} has {pattern.groups} group(s)"
                )
            return f"\\g<{number}>"
        if reference not in pattern.groupindex:
            raise ValueError(
                f"{where}: template {template!r} uses group {reference!r}, which the regular expression "
                f"{pattern.pattern!r} does not define"
            )
        return f"\\g<{reference}>"

    def expand(self, match: re.Match[str]) -> str:
        return match.expand(self.python_template)


class RewriterConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """carbon-relay-ng's rewriter: replace `old` by `new` in metric paths.

    `old` wrapped in slashes ("/^servers\\.(\\w+)/") is a regex and `new` may use its groups ($1, ${1}, \\1).
    `max` bounds the replacements per path (-1: all). `not` (substring, or /regex/) skips the rewrite for
    paths it matches.
    """

    old: str
    new: str = ""
    not_: str = msgspec.field(default="", name="not")
    max: int = -1


def _slashed(text: str) -> bool:
    return len(text) >= 2 and text.startswith("/") and text.endswith("/")


class Rewriter:
    """A compiled `RewriterConfig`."""

    def __init__(self, config: RewriterConfig, where: str = "rewriter") -> None:
        self.config = config
        if not config.old:
            raise ValueError(f"{where}: old: must not be empty")
        if config.max == 0 or config.max < -1:
            raise ValueError(
                f"{where}: max: use -1 for every occurrence or a count of 1 or more, got {config.max}"
            )
        self._regex: re.Pattern[str] | None = None
        self._template = ""
        if _slashed(config.old):
            if len(config.old) == 2:
                raise ValueError(f"{where}: old: the regular expression between the slashes is empty")
            self._regex = compile_regex(config.old[1:-1], f"{where}: old")
            self._template = GroupTemplate(config.new, self._regex, f"{where}: new").python_template
        self._skip_kind = ""
        self._skip_value: object = None
        if config.not_:
            if _slashed(config.not_) and len(config.not_) > 2:
                self._skip_kind, self._skip_value = "regex", compile_regex(config.not_[1:-1], f"{where}: not")
            else:
                self._skip_kind, self._skip_value = "substr", config.not_

    def rewrite(self, path: str) -> str:
        if self._skip_kind and _holds(self._skip_kind, self._skip_value, path):
            return path
        if self._regex is not None:
            return self._regex.sub(self._template, path, count=max(self.config.max, 0))
        return path.replace(self.config.old, self.config.new, self.config.max)

    def rewrite_paths(self, paths: list[str], indexes: Sequence[int] | None = None) -> None:
        """Rewrites `paths[i]` in place for each index (default all)."""
        candidates: Sequence[int] = range(len(paths)) if indexes is None else indexes
        if self._skip_kind:
            candidates = _filter(paths, candidates, _OPPOSITE_KIND[self._skip_kind], self._skip_value)
        if self._regex is not None:
            sub, template, count = self._regex.sub, self._template, max(self.config.max, 0)
            for i in candidates:
                paths[i] = sub(template, paths[i], count)
        else:
            old, new, count = self.config.old, self.config.new, self.config.max
            for i in candidates:
                path = paths[i]
                if old in path:
                    paths[i] = path.replace(old, new, count)


class DestinationConfig(MatchFields, forbid_unknown_fields=True, kw_only=True):
    """One destination of a route: the address, matchers (send_all_match / send_first_match only) and the
    options of its connection, queue and disk spool."""

    #: "host:port" or "host:port:instance" ("[v6]:port[:instance]"); the instance names the carbon-cache
    #: in the hash ring, exactly as in carbon's DESTINATIONS.
    address: str
    #: While the destination is down, points go to a disk spool instead of being dropped.
    spool: bool = True
    #: Points held in memory for this destination; beyond that, new points are spooled (or dropped and
    #: counted when spool = false). This is what keeps one slow destination from stalling the others.
    queue_max_points: Annotated[int, Meta(ge=1)] = 100_000
    #: Disk the spool may use; when full, the oldest spooled points are dropped and counted.
    spool_max_size: Size = Size(1 << 30)
    #: Points per second replayed from the spool once the destination is back from an outage, on top of
    #: live traffic: unthrottled replay overloads carbon-caches (carbon-relay-ng #156). A spill of a
    #: destination that stayed up (a burst filled its queue) is replayed at full speed.
    replay_rate: Annotated[float, Meta(gt=0)] = 50_000.0
    #: Small writes are gathered: after a write, a write of fewer than 1000 points waits until this long
    #: after the previous one (points after an idle spell go at once).
    flush_interval: Duration = Duration(0.1)
    connect_timeout: Duration = Duration(5.0)
    #: Pause between reconnection attempts (carbon-relay-ng: 10 s).
    reconnect_interval: Duration = Duration(10.0)
    #: A write that makes no progress for this long counts as a dead connection.
    write_timeout: Duration = Duration(30.0)
    #: Points per pickle frame; carbon's relay sends at most 500, and receivers reject frames over 1 MiB.
    pickle_points_per_frame: Annotated[int, Meta(ge=1, le=10_000)] = 500

    @property
    def parsed_address(self) -> DestinationAddress:
        return parse_destination(self.address)

    def has_matchers(self) -> bool:
        return any(getattr(self, kind) for kind in MATCH_KINDS)


class RouteConfig(MatchFields, forbid_unknown_fields=True, kw_only=True):
    """One `[[plugins.graphite-out.routes]]` table.

    The route's own matchers pick the paths it takes; `type` decides which destinations get them:
    send_all_match (every destination whose matchers match), send_first_match (the first one that matches),
    consistent_hashing (carbon's ring: `hash`, `replication_factor`, `diverse_replicas`), broadcast (all
    destinations) and hash_route (the ring, but destinations down for `failover_after` leave it until they
    are back). `destinations` are address strings or tables (`DestinationConfig`); after decoding they are
    always `DestinationConfig`.
    """

    key: str
    type: RouteType
    destinations: list[str | DestinationConfig]
    hash: HashType = "carbon_ch"
    replication_factor: Annotated[int, Meta(ge=1)] = 1
    #: carbon's DIVERSE_REPLICAS (default True there too): replicas go to different hosts.
    diverse_replicas: bool = True
    format: OutputFormat = "plaintext"
    #: hash_route: how long a destination must stay unreachable before its paths move to the others.
    failover_after: Duration = Duration(30.0)
    #: Bound of the path -> destination cache of a hashing route (0 disables it).
    hash_cache_size: Annotated[int, Meta(ge=0)] = DEFAULT_CACHE_SIZE

    def __post_init__(self) -> None:
        where = f"route {self.key!r}"
        if not _ROUTE_KEY.fullmatch(self.key):
            raise ValueError(f"{where}: key: use letters, digits, '_' and '-' only")
        if not self.destinations:
            raise ValueError(f"{where}: destinations: at least one destination is needed")
        self.destinations = [
            DestinationConfig(address=entry) if isinstance(entry, str) else entry
            for entry in self.destinations
        ]
        Matcher.from_fields(self, where)
        seen_addresses: dict[DestinationAddress, int] = {}
        seen_nodes: dict[tuple[str, str | None], int] = {}
        hashing = self.type in _HASHING_TYPES
        for number, destination in enumerate(self.destination_configs):
            destination_where = f"{where}: destinations[{number}]"
            try:
                address = destination.parsed_address
            except ValueError as error:
                raise ValueError(f"{destination_where}.address: {error}") from None
            if address in seen_addresses:
                raise ValueError(
                    f"{destination_where}: {destination.address!r} is already destinations[{seen_addresses[address]}]"
                )
            seen_addresses[address] = number
            if hashing and address.node in seen_nodes:
                raise ValueError(
                    f"{destination_where}: host {address.host!r} with instance {address.instance!r} is already "
                    f"destinations[{seen_nodes[address.node]}]; give each carbon-cache on a host its own "
                    f'instance ("host:port:instance")'
                )
            seen_nodes[address.node] = number
            if destination.has_matchers() and self.type not in ("send_all_match", "send_first_match"):
                raise ValueError(
                    f"{destination_where}: destination matchers only apply to send_all_match and "
                    f"send_first_match routes; put them on the route"
                )
            Matcher.from_fields(destination, destination_where)
            for name in ("flush_interval", "connect_timeout", "reconnect_interval", "write_timeout"):
                if getattr(destination, name) <= 0:
                    raise ValueError(f"{destination_where}.{name}: must be longer than 0s")
        if hashing:
            hosts = {address.host for address in seen_addresses}
            limit = len(hosts) if self.diverse_replicas else len(seen_addresses)
            if self.replication_factor > limit:
                what = "different hosts" if self.diverse_replicas else "destinations"
                raise ValueError(
                    f"{where}: replication_factor: {self.replication_factor} copies need as many {what}, "
                    f"there are {limit}"
                )
        elif self.replication_factor != 1:
            raise ValueError(f"{where}: replication_factor: only consistent_hashing and hash_route replicate")
        if self.failover_after < 0:
            raise ValueError(f"{where}: failover_after: must not be negative")

    @property
    def destination_configs(self) -> list[DestinationConfig]:
        return self.destinations  # type: ignore[return-value]  # normalized in __post_init__


class RouteSelection(msgspec.Struct):
    """Which points of a batch each destination of one route gets.

    `accepted`: indexes the route's matchers took. `per_destination[d]`: indexes destination d gets, in
    batch order. `unrouted`: accepted indexes that no destination got (no destination matcher matched, or
    every destination of a hash_route is down); the caller counts them as dropped.
    """

    accepted: list[int]
    per_destination: list[list[int]]
    unrouted: list[int]


class Route(ABC):
    """A compiled route. Build with `build_route(config)`; `select` is the per-batch call."""

    def __init__(self, config: RouteConfig) -> None:
        self.config = config
        self.key = config.key
        self.matcher = Matcher.from_fields(config, f"route {config.key!r}")
        self.destinations = config.destination_configs
        self.addresses = [destination.parsed_address for destination in self.destinations]

    def select(self, paths: Sequence[str], candidates: Sequence[int] | None = None) -> RouteSelection:
        accepted = self.matcher.select(paths, candidates)
        if not accepted:
            return RouteSelection(accepted, [[] for _ in self.destinations], [])
        per_destination, unrouted = self._distribute(paths, accepted)
        return RouteSelection(accepted, per_destination, unrouted)

    @abstractmethod
    def _distribute(self, paths: Sequence[str], accepted: list[int]) -> tuple[list[list[int]], list[int]]:
        """Per-destination indexes among `accepted` (non-empty), and the accepted indexes nobody got."""


class SendAllMatchRoute(Route):
    """Every destination whose matchers match gets the point."""

    def __init__(self, config: RouteConfig) -> None:
        super().__init__(config)
        self.destination_matchers = [
            Matcher.from_fields(destination, f"route {config.key!r}: destinations[{number}]")
            for number, destination in enumerate(self.destinations)
        ]

    def _distribute(self, paths: Sequence[str], accepted: list[int]) -> tuple[list[list[int]], list[int]]:
        per_destination = [matcher.select(paths, accepted) for matcher in self.destination_matchers]
        if any(matcher.matches_all for matcher in self.destination_matchers):
            return per_destination, []
        reached = bytearray(len(paths))
        for indexes in per_destination:
            for i in indexes:
                reached[i] = 1
        return per_destination, [i for i in accepted if not reached[i]]


class SendFirstMatchRoute(SendAllMatchRoute):
    """The first destination whose matchers match gets the point."""

    def _distribute(self, paths: Sequence[str], accepted: list[int]) -> tuple[list[list[int]], list[int]]:
        remaining = accepted
        per_destination: list[list[int]] = []
        for matcher in self.destination_matchers:
            if not remaining:
                per_destination.append([])
                continue
            taken = matcher.select(paths, remaining)
            per_destination.append(taken)
            if len(taken) == len(remaining):
                remaining = []
            elif taken:
                taken_set = set(taken)
                remaining = [i for i in remaining if i not in taken_set]
        return per_destination, remaining


class BroadcastRoute(Route):
    """Every destination gets every point the route accepts."""

    def _distribute(self, paths: Sequence[str], accepted: list[int]) -> tuple[list[list[int]], list[int]]:
        return [list(accepted) for _ in self.destinations], []


class ConsistentHashingRoute(Route):
    """carbon's consistent hashing: each path goes to `replication_factor` destinations of the ring.

    Destinations stay in the ring while down (their points wait in their queue or spool), so a path
    always lands on the carbon-cache graphite-web will ask for it.
    """

    def __init__(self, config: RouteConfig) -> None:
        super().__init__(config)
        self.ring = ConsistentHashRing(
            [address.node for address in self.addresses],
            hash_type=config.hash,
            replication_factor=config.replication_factor,
            diverse_replicas=config.diverse_replicas,
            cache_size=config.hash_cache_size,
        )

    def _distribute(self, paths: Sequence[str], accepted: list[int]) -> tuple[list[list[int]], list[int]]:
        every_path = len(accepted) == len(paths)
        keys = paths if every_path else [paths[i] for i in accepted]
        per_destination: list[list[int]] = [[] for _ in self.destinations]
        appends = [indexes.append for indexes in per_destination]
        try:
            if self.ring.replication_factor == 1:
                if len(per_destination) == 1:
                    if not self.ring.up_slots:
                        raise EmptyRingError
                    return [list(accepted)], []
                slots = self.ring.nodes_for_paths(keys)
                # The one Python loop per point of the relay: faster than any C-level alternative tried
                # (one compress or translate per destination, sorting by slot).
                if every_path:
                    for i, slot in enumerate(slots):
                        appends[slot](i)
                else:
                    for i, slot in zip(accepted, slots, strict=True):
                        appends[slot](i)
            else:
                for i, slots in zip(accepted, self.ring.replicas_for_paths(keys), strict=True):
                    for slot in slots:
                        appends[slot](i)
        except EmptyRingError:
            return per_destination, list(accepted)
        return per_destination, []


class HashRoute(ConsistentHashingRoute):
    """Polymur's hash-route: the carbon ring with failover.

    The caller reports destinations that stayed unreachable for `failover_after` with
    `mark_destination_down`; their paths spread over the others until `mark_destination_up`, when the
    ring is exactly the original again.
    """

    def mark_destination_down(self, destination: int) -> bool:
        changed = self.ring.mark_down(destination)
        if changed:
            logger.warning(
                "route %r: destination %s leaves the hash ring; its paths go to the others",
                self.key,
                self.destinations[destination].address,
            )
        return changed

    def mark_destination_up(self, destination: int) -> bool:
        changed = self.ring.mark_up(destination)
        if changed:
            logger.info(
                "route %r: destination %s is back in the hash ring",
                self.key,
                self.destinations[destination].address,
            )
        return changed

    def destination_is_up(self, destination: int) -> bool:
        return self.ring.is_up(destination)


_ROUTE_CLASSES: dict[str, type[Route]] = {
    "send_all_match": SendAllMatchRoute,
    "send_first_match": SendFirstMatchRoute,
    "broadcast": BroadcastRoute,
    "consistent_hashing": ConsistentHashingRoute,
    "hash_route": HashRoute,
}


def build_route(config: RouteConfig) -> Route:
    return _ROUTE_CLASSES[config.type](config)


class TableDispatch(msgspec.Struct):
    """The routing of one batch: rewritten `paths` (same length and order as the input), how many points the
    blocklist dropped, each route's selection (by key, in config order) and the indexes no route took."""

    paths: list[str]
    blocked: int
    routes: dict[str, RouteSelection]
    unroutable: list[int]


class RoutingTable:
    """Blocklist, rewriters and routes, in carbon-relay-ng's order.

    `dispatch` does it all; `prepare` and `route` are its two halves, for callers that run aggregators in
    between (carbon-relay-ng feeds aggregators with the rewritten paths, before routing).
    """

    def __init__(
        self,
        routes: Sequence[RouteConfig],
        blocklist: Sequence[str] = (),
        rewriters: Sequence[RewriterConfig] = (),
    ) -> None:
        self.blocklist = Blocklist(blocklist)
        self.rewriters = [Rewriter(config, f"rewriters[{number}]") for number, config in enumerate(rewriters)]
        self.routes: dict[str, Route] = {}
        for config in routes:
            if config.key in self.routes:
                raise ValueError(f"route {config.key!r}: key: another route already uses this key")
            self.routes[config.key] = build_route(config)

    def prepare(self, paths: list[str]) -> tuple[list[str], Sequence[int]]:
        """Blocklist then rewriters: the rewritten paths (same length) and the indexes not blocked.

        Without rewriters the paths are `paths` itself (not a copy), and without a blocklist the indexes
        are a `range`: the common table costs nothing per point here.
        """
        allowed: Sequence[int] = self.blocklist.allowed(paths) if self.blocklist else range(len(paths))
        if not self.rewriters:
            return paths, allowed
        rewritten = list(paths)
        for rewriter in self.rewriters:
            rewriter.rewrite_paths(rewritten, allowed)
        return rewritten, allowed

    def route(
        self, paths: Sequence[str], candidates: Sequence[int]
    ) -> tuple[dict[str, RouteSelection], list[int]]:
        """Each route's selection among `candidates`, and the candidates that no route accepted."""
        selections = {key: route.select(paths, candidates) for key, route in self.routes.items()}
        if any(route.matcher.matches_all for route in self.routes.values()):
            return selections, []
        reached = bytearray(len(paths))
        for selection in selections.values():
            for i in selection.accepted:
                reached[i] = 1
        return selections, [i for i in candidates if not reached[i]]

    def dispatch(self, paths: Sequence[str]) -> TableDispatch:
        rewritten, allowed = self.prepare(list(paths))
        selections, unroutable = self.route(rewritten, allowed)
        return TableDispatch(rewritten, len(paths) - len(allowed), selections, unroutable)
