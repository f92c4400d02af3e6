"""Consistent hash rings that place metric paths exactly where graphite carbon 1.x places them.

Where it sits: the `graphite-out` plugin's `consistent_hashing` and `hash_route` routes ask a ring which
destination(s) each metric path goes to (see `routing.py`). carbon-relay, carbon-aggregator and
graphite-web (CARBONLINK_HOSTS) all place a path with carbon's `ConsistentHashRing`; a relay that puts
points anywhere else makes graphite-web look for them on the wrong carbon-cache. So this ring follows
carbon 1.x (lib/carbon/hashing.py, routers.py, util.py) to the byte:

- A node is `(server, instance)`: the host exactly as written in the destination (no port, no DNS) and the
  third `:` field, or None. Destinations are "host:port[:instance]" or "[v6]:port[:instance]".
- Each node gets 100 replicas. `carbon_ch` hashes the replica key `"%s:%d" % (node, i)`, i.e. Python's
  `str()` of the tuple: "('127.0.0.1', None):0"; the position is the first two bytes of its MD5 digest
  (big-endian, 0..65535). `fnv1a_ch` hashes `"%d-%s" % (i, instance)` (the server is ignored) with
  FNV-1a-32 folded to 16 bits as `(h >> 16) ^ (h & 0xffff)`.
- Collision fix of carbon >= 1.0: while a replica's position is already taken (by any node added earlier,
  or by the node's own earlier replicas), the position is incremented; there is no wraparound, so 65536
  and above can occur.
- Lookup: a path is hashed the same way (its full text, tags included); the first ring entry at or after
  that position, wrapping to the start, is the primary node.
- Replication factor: walk the ring clockwise from there collecting distinct nodes (at most len(ring) - 1
  entries, as carbon does); with `diverse_replicas` (carbon's default) a node whose server already holds a
  copy is skipped.

Two deliberate differences, both only where carbon misbehaves: with a single node and a replication factor
above 1, carbon yields that node twice (two copies to one destination); we yield it once. And nodes taken
out with `mark_down` keep their positions reserved, so adding a brand-new node while another is down gives
the ring carbon would build from the full destination list, not the one it would build from the survivors.

Speed: routing runs per metric path, up to ~1M paths/s. Lookups therefore go through a 65536-entry table
from hash position to destination (rebuilt when membership changes) and a bounded two-generation cache of
path -> destination, because the same paths come back every interval in real traffic.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import msgspec

logger = logging.getLogger(__name__)

HashType = Literal["carbon_ch", "fnv1a_ch"]
HASH_TYPES: tuple[str, ...] = ("carbon_ch", "fnv1a_ch")

#: Replicas per node: carbon's default, which graphite-web assumes too.
REPLICA_COUNT = 100
#: Metric paths hash to 16-bit positions, so a 65536-entry table answers every lookup.
POSITION_COUNT = 1 << 16
#: Default bound of the path -> destination cache (both generations together).
DEFAULT_CACHE_SIZE = 500_000

#: A ring node as carbon names it: (server as written, instance or None).
Node = tuple[str, str | None]

_FNV32_OFFSET_BASIS = 0x811C9DC5
_FNV32_PRIME = 0x01000193


class DestinationAddress(msgspec.Struct, frozen=True):
    """A parsed "host:port[:instance]" destination. `host` is kept as written: carbon hashes that text."""

    host: str
    port: int
    instance: str | None = None

    @property
    def node(self) -> Node:
        return (self.host, self.instance)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.instance is None:
            return f"{host}:{self.port}"
        return f"{host}:{self.port}:{self.instance}"


def parse_destination(text: str) -> DestinationAddress:
    """Parses "host:port[:instance]" or "[v6]:port[:instance]" as carbon does. Raises ValueError."""
    stripped = text.strip()
    if stripped.startswith("["):
        # carbon looks for the last "]:" so that the IPv6 address itself may contain colons.
        close = stripped.rfind("]:")
        if close < 0:
            raise ValueError(f'destination {text!r}: expected "[ipv6]:port" or "[ipv6]:port:instance"')
        host, rest = stripped[1:close], stripped[close + 2 :]
    else:
        host, colon, rest = stripped.partition(":")
        if not colon:
            raise ValueError(f'destination {text!r}: expected "host:port" or "host:port:instance"')
    port_text, colon, instance_text = rest.partition(":")
    if not host:
        raise ValueError(f'destination {text!r}: empty host (write IPv6 addresses in brackets: "[::1]:2003")')
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"destination {text!r}: port must be a number from 1 to 65535, got {port_text!r}")
    return DestinationAddress(host, int(port_text), instance_text if colon else None)


def carbon_ch_position(key: str) -> int:
    """carbon_ch: int(md5(key).hexdigest()[:4], 16), i.e. the first two digest bytes, big-endian."""
    digest = hashlib.md5(key.encode("utf-8")).digest()
    return (digest[0] << 8) | digest[1]


def fnv1a_32(data: bytes) -> int:
    """FNV-1a, 32 bits (offset basis 0x811c9dc5, prime 0x01000193)."""
    value = _FNV32_OFFSET_BASIS
    for byte in data:
        value = ((value ^ byte) * _FNV32_PRIME) & 0xFFFFFFFF
    return value


def fnv1a_ch_position(key: str) -> int:
    """fnv1a_ch: FNV-1a-32 of the UTF-8 key folded to 16 bits as (h >> 16) ^ (h & 0xffff)."""
    value = fnv1a_32(key.encode("utf-8"))
    return (value >> 16) ^ (value & 0xFFFF)


def replica_key(node: Node, index: int, hash_type: HashType) -> str:
    """The text carbon hashes for replica `index` of `node`."""
    if hash_type == "fnv1a_ch":
        return f"{index}-{node[1]}"
    return f"{str(node)}:{index}"


def _carbon_ch_positions(paths: Sequence[str]) -> list[int]:
    md5 = hashlib.md5
    positions = []
    append = positions.append
    for path in paths:
        digest = md5(path.encode("utf-8")).digest()
        append((digest[0] << 8) | digest[1])
    return positions


def _fnv1a_ch_positions(paths: Sequence[str]) -> list[int]:
    return [fnv1a_ch_position(path) for path in paths]


_POSITION_OF_KEY: dict[str, Callable[[str], int]] = {
    "carbon_ch": carbon_ch_position,
    "fnv1a_ch": fnv1a_ch_position,
}
_POSITIONS_OF_PATHS: dict[str, Callable[[Sequence[str]], list[int]]] = {
    "carbon_ch": _carbon_ch_positions,
    "fnv1a_ch": _fnv1a_ch_positions,
}


class EmptyRingError(LookupError):
    """Raised by lookups when no node of the ring is up."""


class _PathCache:
    """Path -> lookup result, bounded: two generations, the older dropped whole when the newer fills.

    Cheaper than an LRU (no per-hit bookkeeping) and as good for relay traffic, where the set of live paths
    comes back every interval: a path used in the last generation is promoted, a path gone for two
    generations is forgotten.
    """

    __slots__ = ("current", "previous", "generation_size")

    def __init__(self, size: int) -> None:
        self.generation_size = max(1, size // 2)
        self.current: dict[str, object] = {}
        self.previous: dict[str, object] = {}

    def clear(self) -> None:
        self.current = {}
        self.previous = {}

    def __len__(self) -> int:
        return len(self.current) + len(self.previous)


class ConsistentHashRing:
    """carbon 1.x's ConsistentHashRing plus its router's replica walk, with slot numbers and batch lookups.

    Nodes are identified by a slot number: the order in which they were added (the position in the
    destination list for a ring built from a config). Slots never change, also when nodes go down,
    come back or are removed, so callers can index their destination lists with lookup results.

    `mark_down(slot)` takes a node out of the ring (its points spread over the others, as carbon's
    `remove_node` does) and `mark_up(slot)` puts it back at exactly its old positions. `remove_node(slot)`
    forgets the node for good. Any change clears the lookup cache.
    """

    def __init__(
        self,
        nodes: Iterable[Node] = (),
        *,
        hash_type: HashType = "carbon_ch",
        replication_factor: int = 1,
        diverse_replicas: bool = True,
        replica_count: int = REPLICA_COUNT,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if hash_type not in _POSITION_OF_KEY:
            raise ValueError(f"hash: expected one of {', '.join(HASH_TYPES)}, got {hash_type!r}")
        if replication_factor < 1:
            raise ValueError(f"replication_factor: must be at least 1, got {replication_factor}")
        if replica_count < 1:
            raise ValueError(f"replica_count: must be at least 1, got {replica_count}")
        if cache_size < 0:
            raise ValueError(f"cache_size: must be 0 (no cache) or more, got {cache_size}")
        self.hash_type: HashType = hash_type
        self.replication_factor = replication_factor
        self.diverse_replicas = diverse_replicas
        self.replica_count = replica_count
        self._position_of_key = _POSITION_OF_KEY[hash_type]
        self._positions_of_paths = _POSITIONS_OF_PATHS[hash_type]
        self._nodes: list[Node | None] = []
        self._replica_positions: list[list[int]] = []
        self._up: list[bool] = []
        self._slot_of_node: dict[Node, int] = {}
        self._taken_positions: set[int] = set()
        self._primary_cache = _PathCache(cache_size) if cache_size else None
        self._replicas_cache = _PathCache(cache_size) if cache_size else None
        self._stale = True
        self._primary_by_position: list[int] = []
        self._replicas_by_position: list[tuple[int, ...]] = []
        #: Lookups answered from the cache and lookups that had to hash the path, for self-metrics.
        self.cached_lookups = 0
        self.hashed_lookups = 0
        for node in nodes:
            self.add_node(node)

    # Membership.

    @property
    def nodes(self) -> list[Node | None]:
        """The node of each slot; None for a removed slot."""
        return list(self._nodes)

    @property
    def up_slots(self) -> list[int]:
        return [slot for slot, up in enumerate(self._up) if up]

    def is_up(self, slot: int) -> bool:
        return self._up[slot]

    def add_node(self, node: Node) -> int:
        """Adds a node (after every node added so far, as carbon's add_node) and returns its slot."""
        server, instance = node
        node = (server, instance)
        if node in self._slot_of_node:
            raise ValueError(f"destination instance {node} is already in the ring")
        position_of_key = self._position_of_key
        taken = self._taken_positions
        positions = []
        for index in range(self.replica_count):
            position = position_of_key(replica_key(node, index, self.hash_type))
            while position in taken:
                position += 1
            taken.add(position)
            positions.append(position)
        slot = len(self._nodes)
        self._nodes.append(node)
        self._replica_positions.append(positions)
        self._up.append(True)
        self._slot_of_node[node] = slot
        self._changed()
        return slot

    def remove_node(self, slot: int) -> None:
        """Forgets a node for good; its positions become free for nodes added later."""
        node = self._nodes[slot]
        if node is None:
            raise ValueError(f"slot {slot} was already removed")
        self._taken_positions.difference_update(self._replica_positions[slot])
        del self._slot_of_node[node]
        self._nodes[slot] = None
        self._replica_positions[slot] = []
        self._up[slot] = False
        self._changed()

    def mark_down(self, slot: int) -> bool:
        """Takes a node out of the lookups (failover). Returns whether anything changed."""
        if self._nodes[slot] is None or not self._up[slot]:
            return False
        self._up[slot] = False
        self._changed()
        return True

    def mark_up(self, slot: int) -> bool:
        """Puts a node that was marked down back at its positions. Returns whether anything changed."""
        if self._nodes[slot] is None or self._up[slot]:
            return False
        self._up[slot] = True
        self._changed()
        return True

    def clear_cache(self) -> None:
        if self._primary_cache is not None:
            self._primary_cache.clear()
        if self._replicas_cache is not None:
            self._replicas_cache.clear()

    def _changed(self) -> None:
        self._stale = True
        self.clear_cache()

    # Ring contents and the walk, as carbon computes them.

    def ring_entries(self) -> list[tuple[int, Node]]:
        """The ring of the nodes that are up, sorted: carbon's `ConsistentHashRing.ring`."""
        entries = []
        for slot, up in enumerate(self._up):
            if up:
                node = self._nodes[slot]
                assert node is not None
                entries.extend((position, node) for position in self._replica_positions[slot])
        entries.sort()
        return entries

    def _rebuild(self) -> None:
        entries = sorted(
            (position, slot)
            for slot, up in enumerate(self._up)
            if up
            for position in self._replica_positions[slot]
        )
        self._stale = False
        if not entries:
            self._primary_by_position = []
            self._replicas_by_position = []
            return
        ring_positions = [position for position, _ in entries]
        ring_slots = [slot for _, slot in entries]
        walks = self._walks(ring_slots)
        ring_length = len(entries)
        # For each 16-bit hash, the first entry at or after it, wrapping past the end (bisect_left % len).
        starts = [
            bisect.bisect_left(ring_positions, position) % ring_length for position in range(POSITION_COUNT)
        ]
        self._primary_by_position = [ring_slots[start] for start in starts]
        self._replicas_by_position = [walks[start] for start in starts]
        logger.debug(
            "hash ring rebuilt: %d nodes up, %d entries, hash %s",
            len(self.up_slots),
            ring_length,
            self.hash_type,
        )

    def _walks(self, ring_slots: list[int]) -> list[tuple[int, ...]]:
        """For each ring index, the replica set a lookup landing there gets (carbon's get_nodes walk)."""
        up_slots = sorted(set(ring_slots))
        if len(up_slots) == 1:
            # carbon short-circuits the single-node ring before walking.
            return [(up_slots[0],)] * len(ring_slots)
        nodes = self._nodes
        diverse = self.diverse_replicas
        if diverse:
            reachable = len({nodes[slot][0] for slot in up_slots})  # type: ignore[index]
        else:
            reachable = len(up_slots)
        wanted = min(self.replication_factor, reachable)
        ring_length = len(ring_slots)
        walks = []
        for start in range(ring_length):
            chosen: list[int] = []
            seen_slots: set[int] = set()
            used_servers: set[str] = set()
            # carbon stops one entry short of a full turn (index != last_index).
            for step in range(ring_length - 1):
                slot = ring_slots[(start + step) % ring_length]
                if slot in seen_slots:
                    continue
                seen_slots.add(slot)
                if diverse:
                    server = nodes[slot][0]  # type: ignore[index]
                    if server in used_servers:
                        continue
                    used_servers.add(server)
                chosen.append(slot)
                if len(chosen) == wanted:
                    break
            walks.append(tuple(chosen))
        return walks

    # Lookups.

    def _tables(self) -> tuple[list[int], list[tuple[int, ...]]]:
        if self._stale:
            self._rebuild()
        if not self._primary_by_position:
            raise EmptyRingError("no destination of the hash ring is up")
        return self._primary_by_position, self._replicas_by_position

    def position_of_path(self, path: str) -> int:
        """The ring position of a metric path (its full text, tags included)."""
        return self._position_of_key(path)

    def node_for_path(self, path: str) -> int:
        """The slot of the primary destination of one path."""
        return self.nodes_for_paths((path,))[0]

    def replicas_for_path(self, path: str) -> tuple[int, ...]:
        """The slots of the `replication_factor` destinations of one path, primary first."""
        return self.replicas_for_paths((path,))[0]

    def nodes_for_paths(self, paths: Sequence[str]) -> list[int]:
        """The slot of the primary destination of each path. Raises EmptyRingError if no node is up."""
        primary, _ = self._tables()
        return self._lookup(paths, primary, self._primary_cache)  # type: ignore[return-value]

    def replicas_for_paths(self, paths: Sequence[str]) -> list[tuple[int, ...]]:
        """The destination slots of each path (primary first). Raises EmptyRingError if no node is up."""
        _, replicas = self._tables()
        return self._lookup(paths, replicas, self._replicas_cache)  # type: ignore[return-value]

    def _lookup(self, paths: Sequence[str], table: list, cache: _PathCache | None) -> list:
        if cache is None:
            self.hashed_lookups += len(paths)
            return [table[position] for position in self._positions_of_paths(paths)]
        current = cache.current
        found = list(map(current.get, paths))
        if None not in found:
            self.cached_lookups += len(found)
            return found
        missing_indexes = [index for index, value in enumerate(found) if value is None]
        all_missing = len(missing_indexes) == len(found)
        missing_paths = paths if all_missing else [paths[index] for index in missing_indexes]
        if cache.previous:
            results = list(map(cache.previous.get, missing_paths))
            to_hash = [k for k, value in enumerate(results) if value is None]
            if to_hash:
                positions = self._positions_of_paths([missing_paths[k] for k in to_hash])
                for k, position in zip(to_hash, positions, strict=True):
                    results[k] = table[position]
            hashed = len(to_hash)
        else:
            results = [table[position] for position in self._positions_of_paths(missing_paths)]
            hashed = len(results)
        current.update(zip(missing_paths, results, strict=True))
        if all_missing:
            found = results
        else:
            for index, value in zip(missing_indexes, results, strict=True):
                found[index] = value
        self.hashed_lookups += hashed
        self.cached_lookups += len(found) - hashed
        if len(current) > cache.generation_size:
            cache.previous = current
            cache.current = {}
        return found

    @property
    def cache_length(self) -> int:
        """Paths currently cached (primary and replica caches together)."""
        return sum(len(cache) for cache in (self._primary_cache, self._replicas_cache) if cache is not None)
