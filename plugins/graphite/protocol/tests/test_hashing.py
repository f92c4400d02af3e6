"""The hash ring must send every path where carbon 1.x and graphite-web would look for it.

The fast ring is checked against published vectors (the relay notes, graphite-web's own tests) and against
`ReferenceRing` below: a small, slow model written straight from the published algorithm (carbon 1.x
hashing.py and routers.py), with none of the fast ring's tables or caches.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_plugins.graphite.protocol.hashing import (
    ConsistentHashRing,
    DestinationAddress,
    EmptyRingError,
    carbon_ch_position,
    fnv1a_ch_position,
    parse_destination,
    replica_key,
)

# Reference model.


def reference_position(key: str, hash_type: str) -> int:
    if hash_type == "fnv1a_ch":
        value = 0x811C9DC5
        for byte in key.encode("utf-8"):
            value ^= byte
            value = (value * 0x01000193) % 2**32
        return (value >> 16) ^ (value & 0xFFFF)
    return int(hashlib.md5(key.encode("utf-8")).hexdigest()[:4], 16)


class ReferenceRing:
    """carbon 1.x ConsistentHashRing + ConsistentHashingRouter.getDestinations, as published."""

    def __init__(self, nodes, hash_type="carbon_ch"):
        self.hash_type = hash_type
        self.ring = []
        self.nodes = set()
        for node in nodes:
            self.add_node(node)

    def add_node(self, node):
        self.nodes.add(node)
        for i in range(100):
            if self.hash_type == "fnv1a_ch":
                key = "%d-%s" % (i, node[1])  # noqa: UP031  (carbon's own format string)
            else:
                key = "%s:%d" % (node, i)  # noqa: UP031
            position = reference_position(key, self.hash_type)
            while position in [entry[0] for entry in self.ring]:
                position += 1
            bisect.insort(self.ring, (position, node))

    def remove_node(self, node):
        self.nodes.discard(node)
        self.ring = [entry for entry in self.ring if entry[1] != node]

    def get_nodes(self, key):
        if len(self.nodes) == 1:
            yield next(iter(self.nodes))
            return
        index = bisect.bisect_left(self.ring, (reference_position(key, self.hash_type), ())) % len(self.ring)
        last_index = (index - 1) % len(self.ring)
        seen = set()
        while len(seen) < len(self.nodes) and index != last_index:
            node = self.ring[index][1]
            if node not in seen:
                seen.add(node)
                yield node
            index = (index + 1) % len(self.ring)

    def destinations(self, key, replication_factor, diverse):
        chosen = []
        used_servers = set()
        for node in self.get_nodes(key):
            if len(chosen) == replication_factor:
                break
            if diverse:
                if node[0] in used_servers:
                    continue
                used_servers.add(node[0])
            chosen.append(node)
        return chosen


NODE_LISTS = [
    [("127.0.0.1", None), ("127.0.0.2", None)],
    [("127.0.0.1", "a"), ("127.0.0.1", "b"), ("127.0.0.1", "c")],
    [("10.0.0.1", "a"), ("10.0.0.2", "b"), ("10.0.0.3", "c"), ("10.0.0.1", "d")],
    [(f"carbon{n}.example.net", str(n)) for n in range(10)],
    [("cache", None)],
]
PATHS = [
    f"servers.host{n % 251}.{random.Random(n).choice(['cpu', 'mem', 'disk'])}.{n}.value;dc=eu{n % 3}"
    for n in range(3000)
] + ["foo.bar.baz", "a", "ünïcode.päth"]


# Published vectors.


def test_positions_match_the_published_vectors():
    assert carbon_ch_position("('127.0.0.1', None):0") == 52941
    assert carbon_ch_position("('127.0.0.1', 'a'):0") == 24043
    assert carbon_ch_position("foo.bar.baz") == 63458
    assert fnv1a_ch_position("foo.bar.baz") == 20430
    # graphite-web webapp/tests: test_chr_compute_ring_position(_fnv1a).
    assert carbon_ch_position("hosts.worker1.cpu") == 64833
    assert carbon_ch_position("hosts.worker2.cpu") == 38509
    fnv_vectors = {
        "hosts.worker1.cpu": 59573,
        "hosts.worker1.load": 57163,
        "hosts.worker2.cpu": 35749,
        "hosts.worker2.network": 43584,
        "hosts.worker3.cpu": 12600,
        "hosts.worker3.irq": 10052,
        "a\xac\u1234\u20ac\U00008000": 38658,
    }
    for key, position in fnv_vectors.items():
        assert fnv1a_ch_position(key) == position, key


def test_replica_keys_are_python_str_of_the_node_tuple():
    assert replica_key(("127.0.0.1", None), 0, "carbon_ch") == "('127.0.0.1', None):0"
    assert replica_key(("10.0.0.1", "a"), 17, "carbon_ch") == "('10.0.0.1', 'a'):17"
    assert replica_key(("10.0.0.1", "a"), 17, "fnv1a_ch") == "17-a"
    assert replica_key(("10.0.0.1", None), 3, "fnv1a_ch") == "3-None"


def test_lookups_match_graphite_webs_published_placements():
    caches = [("127.0.0.1", "cache0"), ("127.0.0.1", "cache1"), ("127.0.0.1", "cache2")]
    ring = ConsistentHashRing(caches, replication_factor=3, diverse_replicas=False)
    assert caches[ring.node_for_path("hosts.worker1.cpu")] == ("127.0.0.1", "cache2")
    assert [caches[slot] for slot in ring.replicas_for_path("hosts.worker1.cpu")] == [
        ("127.0.0.1", "cache2"),
        ("127.0.0.1", "cache0"),
        ("127.0.0.1", "cache1"),
    ]
    hosts = [
        ("127.0.0.1", "ba603c36342304ed77953f84ac4d357b"),
        ("127.0.0.2", "5dd63865534f84899c6e5594dba6749a"),
        ("127.0.0.3", "866a18b81f2dc4649517a1df13e26f28"),
    ]
    fnv_ring = ConsistentHashRing(hosts, hash_type="fnv1a_ch")
    assert fnv_ring.node_for_path("hosts.worker1.cpu") == 0
    assert fnv_ring.node_for_path("hosts.worker2.cpu") == 2
    assert fnv_ring.node_for_path("stats.checkout.cluster.padamski-wro.api.v1.payment-initialize.count") == 2


# The fast ring against the reference model.


@pytest.mark.parametrize("hash_type", ["carbon_ch", "fnv1a_ch"])
@pytest.mark.parametrize("nodes", NODE_LISTS, ids=lambda nodes: f"{len(nodes)}nodes")
def test_ring_entries_equal_the_reference_ring(nodes, hash_type):
    ring = ConsistentHashRing(nodes, hash_type=hash_type)
    assert ring.ring_entries() == ReferenceRing(nodes, hash_type).ring


def test_collision_fix_is_exercised_and_matches():
    # Without instances every fnv1a_ch node hashes the same keys ("0-None", ...): all but the first node's
    # replicas collide and move up, past 65535 for some.
    nodes = [("10.0.0.1", None), ("10.0.0.2", None), ("10.0.0.3", None)]
    entries = ConsistentHashRing(nodes, hash_type="fnv1a_ch").ring_entries()
    raw = {reference_position(f"{i}-None", "fnv1a_ch") for i in range(100)}
    assert len({position for position, _ in entries} - raw) >= 200
    assert entries == ReferenceRing(nodes, "fnv1a_ch").ring
    # Ten md5 nodes: 1000 replicas on 65536 positions collide a few times.
    ten = NODE_LISTS[3]
    ten_entries = ConsistentHashRing(ten).ring_entries()
    raw_md5 = {
        reference_position(replica_key(node, i, "carbon_ch"), "carbon_ch") for node in ten for i in range(100)
    }
    assert len(raw_md5) < 1000 == len(ten_entries)


@pytest.mark.parametrize("replication_factor", [1, 2, 3])
@pytest.mark.parametrize("diverse", [True, False])
@pytest.mark.parametrize("hash_type", ["carbon_ch", "fnv1a_ch"])
@pytest.mark.parametrize("nodes", NODE_LISTS, ids=lambda nodes: f"{len(nodes)}nodes")
def test_destinations_equal_the_reference(nodes, hash_type, diverse, replication_factor):
    ring = ConsistentHashRing(
        nodes, hash_type=hash_type, replication_factor=replication_factor, diverse_replicas=diverse
    )
    reference = ReferenceRing(nodes, hash_type)
    paths = PATHS if hash_type == "carbon_ch" else PATHS[:600]
    expected = [reference.destinations(path, replication_factor, diverse) for path in paths]
    replicas = ring.replicas_for_paths(paths)
    assert [[nodes[slot] for slot in slots] for slots in replicas] == expected
    assert [nodes[slot] for slot in ring.nodes_for_paths(paths)] == [chosen[0] for chosen in expected]
    # Second pass answers from the cache; the answers must not change.
    assert ring.replicas_for_paths(paths) == replicas
    assert ring.cached_lookups >= len(paths)


@functools.cache
def four_node_rings() -> tuple[ConsistentHashRing, ReferenceRing]:
    return ConsistentHashRing(NODE_LISTS[2], replication_factor=2), ReferenceRing(NODE_LISTS[2])


@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=50))
def test_any_path_goes_where_the_reference_sends_it(paths):
    nodes = NODE_LISTS[2]
    ring, reference = four_node_rings()
    assert [[nodes[s] for s in slots] for slots in ring.replicas_for_paths(paths)] == [
        reference.destinations(path, 2, True) for path in paths
    ]


def test_a_single_node_gets_every_path_once_whatever_the_replication_factor():
    ring = ConsistentHashRing([("cache", None)], replication_factor=3, diverse_replicas=False)
    assert set(ring.replicas_for_paths(PATHS)) == {(0,)}


# Run-time membership changes (hash_route failover).


def test_a_node_marked_down_leaves_the_ring_and_comes_back_at_the_same_places():
    nodes = NODE_LISTS[2]
    ring = ConsistentHashRing(nodes, replication_factor=2)
    before = ring.replicas_for_paths(PATHS)
    assert any(2 in slots for slots in before)

    assert ring.mark_down(2) is True
    assert ring.mark_down(2) is False
    reference = ReferenceRing(nodes)
    reference.remove_node(nodes[2])
    assert ring.ring_entries() == reference.ring
    during = ring.replicas_for_paths(PATHS)
    assert not any(2 in slots for slots in during)
    assert [[nodes[s] for s in slots] for slots in during] == [
        reference.destinations(p, 2, True) for p in PATHS
    ]
    # Paths that did not involve the down node keep their destinations.
    for old, new in zip(before, during, strict=True):
        if 2 not in old:
            assert old == new

    assert ring.mark_up(2) is True
    assert ring.ring_entries() == ReferenceRing(nodes).ring
    assert ring.replicas_for_paths(PATHS) == before


def test_nodes_added_and_removed_at_run_time_behave_as_in_carbon():
    nodes = NODE_LISTS[2]
    ring = ConsistentHashRing(nodes[:2])
    reference = ReferenceRing(nodes[:2])
    for node in nodes[2:]:
        assert ring.add_node(node) == nodes.index(node)
        reference.add_node(node)
    assert ring.ring_entries() == reference.ring
    ring.remove_node(1)
    reference.remove_node(nodes[1])
    assert ring.ring_entries() == reference.ring
    assert 1 not in ring.nodes_for_paths(PATHS)
    assert ring.nodes[1] is None
    added = ring.add_node(("10.0.0.9", "z"))
    reference.add_node(("10.0.0.9", "z"))
    assert added == 4
    assert ring.ring_entries() == reference.ring
    assert [ring.nodes[s] for s in ring.nodes_for_paths(PATHS)] == [
        next(reference.get_nodes(path)) for path in PATHS
    ]


def test_all_nodes_down_is_an_empty_ring():
    ring = ConsistentHashRing(NODE_LISTS[0])
    ring.mark_down(0)
    ring.mark_down(1)
    with pytest.raises(EmptyRingError):
        ring.nodes_for_paths(["a.b"])
    ring.mark_up(1)
    assert ring.nodes_for_paths(["a.b", "c.d"]) == [1, 1]


def test_the_same_node_twice_is_refused():
    with pytest.raises(ValueError, match=r"\('h', 'a'\) is already in the ring"):
        ConsistentHashRing([("h", "a"), ("h", "a")])


# Cache.


def test_cache_stays_bounded_and_keeps_answers_right():
    nodes = NODE_LISTS[3]
    cached = ConsistentHashRing(nodes, cache_size=1000)
    uncached = ConsistentHashRing(nodes, cache_size=0)
    for start in range(0, 3000, 250):
        batch = PATHS[start : start + 250] + PATHS[:100]
        assert cached.nodes_for_paths(batch) == uncached.nodes_for_paths(batch)
        assert cached.cache_length <= 1000 + len(batch)
    assert cached.cached_lookups > 0
    assert uncached.cached_lookups == 0


def test_cache_is_invalidated_by_membership_changes():
    nodes = NODE_LISTS[1]
    ring = ConsistentHashRing(nodes)
    first = ring.nodes_for_paths(PATHS)
    ring.mark_down(first[0])
    assert first[0] not in ring.nodes_for_paths(PATHS)


# Destination strings.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:2003", DestinationAddress("127.0.0.1", 2003, None)),
        ("10.0.0.1:2004:a", DestinationAddress("10.0.0.1", 2004, "a")),
        (" carbon.example:2003:cache-1 ", DestinationAddress("carbon.example", 2003, "cache-1")),
        ("[::1]:2003", DestinationAddress("::1", 2003, None)),
        ("[2001:db8::5]:2004:b", DestinationAddress("2001:db8::5", 2004, "b")),
        ("host:2003:", DestinationAddress("host", 2003, "")),
    ],
)
def test_destinations_parse_as_in_carbon(text, expected):
    parsed = parse_destination(text)
    assert parsed == expected
    assert parse_destination(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("localhost", 'expected "host:port"'),
        ("host:port", "port must be a number"),
        ("host:0", "port must be a number"),
        ("host:70000", "port must be a number"),
        (":2003", "empty host"),
        ("::1:2003", "empty host"),
        ("[::1]2003", 'expected "\\[ipv6\\]:port"'),
    ],
)
def test_bad_destinations_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_destination(text)
