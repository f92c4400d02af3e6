"""Routing: which destination gets which point, what the blocklist drops, how rewriters change paths, and
the errors a user sees for a bad route config."""

from __future__ import annotations

import re
import tomllib
from collections import Counter

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.units import Duration, Size, decode_config_value
from agent_plugins.graphite.protocol.hashing import ConsistentHashRing
from agent_plugins.graphite.protocol.routing import (
    Blocklist,
    BroadcastRoute,
    ConsistentHashingRoute,
    DestinationConfig,
    HashRoute,
    Matcher,
    Rewriter,
    RewriterConfig,
    RouteConfig,
    RoutingTable,
    build_route,
)

PATHS = [
    "servers.web1.cpu.user",
    "servers.web2.cpu.system",
    "servers.db1.mem.used",
    "apps.shop.requests.count",
    "apps.shop.errors.count;env=prod",
    "tmp.debug.value",
    "collectd.web1.load",
] + [f"servers.host{n}.disk.sda{n % 4}.reads" for n in range(200)]


def convert_routes(routes: list[dict]) -> list[RouteConfig]:
    return msgspec.convert(routes, list[RouteConfig], dec_hook=decode_config_value)


def config_error(route: dict) -> str:
    with pytest.raises(msgspec.ValidationError) as caught:
        convert_routes([route])
    return str(caught.value)


# Matchers.


def test_each_matcher_field_filters_as_documented():
    cases = {
        "prefix": ("servers.web", {0, 1}),
        "not_prefix": ("servers.", {3, 4, 5, 6}),
        "substr": ("web1", {0, 6}),
        "not_substr": (".", set()),
        "regex": (r"\.count(;|$)", {3, 4}),
        "not_regex": ("^(servers|apps)", {5, 6}),
    }
    paths = PATHS[:7]
    for field, (expression, expected) in cases.items():
        matcher = Matcher(**{field: expression})
        assert set(matcher.select(paths)) == expected, field
        assert {i for i, path in enumerate(paths) if matcher.matches(path)} == expected, field


def test_conditions_are_and_ed_and_an_empty_matcher_takes_everything():
    matcher = Matcher(prefix="servers.", substr="cpu", not_regex="web2")
    assert matcher.select(PATHS) == [0]
    assert Matcher().select(PATHS) == list(range(len(PATHS)))
    assert Matcher().matches_all
    assert Matcher(prefix="servers.").select(PATHS, candidates=[6, 2, 0]) == [2, 0]


def test_regex_is_an_unanchored_search():
    assert Matcher(regex=r"cpu\.").select(PATHS[:7]) == [0, 1]


path_text = st.text(alphabet="abc.;=", max_size=12)


@given(
    paths=st.lists(path_text, max_size=30),
    prefix=st.text(alphabet="ab.", max_size=2),
    not_substr=st.text(alphabet="bc", max_size=2),
    regex=st.sampled_from(["", "a.b", "^c", r"\.$", "b+"]),
)
def test_batch_selection_equals_the_definition(paths, prefix, not_substr, regex):
    matcher = Matcher(prefix=prefix, not_substr=not_substr, regex=regex)
    expected = [
        i
        for i, path in enumerate(paths)
        if path.startswith(prefix)
        and (not not_substr or not_substr not in path)
        and (not regex or re.search(regex, path))
    ]
    assert matcher.select(paths) == expected


# Blocklist.


def test_blocklist_drops_what_any_entry_matches_in_both_spellings():
    blocklist = Blocklist(["prefix tmp.", "sub ;env=prod", "regex ^collectd\\.", "substr db1"])
    assert [PATHS[i] for i in blocklist.allowed(PATHS[:7])] == [
        "servers.web1.cpu.user",
        "servers.web2.cpu.system",
        "apps.shop.requests.count",
    ]
    assert blocklist.blocks("tmp.x") and not blocklist.blocks("servers.x")


def test_a_not_entry_blocks_everything_else():
    assert Blocklist(["notPrefix servers."]).allowed(PATHS[:7]) == [0, 1, 2]
    assert Blocklist(["not_prefix servers.", "not_substr cpu"]).allowed(PATHS[:7]) == [0, 1]
    assert Blocklist(["not_regex ^apps", "notSub shop"]).allowed(PATHS[:7]) == [3, 4]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("glob tmp.*", r"blocklist\[0\]: 'glob tmp.\*': expected '<kind> <expression>'"),
        ("prefix", r"blocklist\[0\]: 'prefix': the prefix has no expression"),
        ("regex (unclosed", r"blocklist\[0\]: invalid regular expression '\(unclosed'"),
    ],
)
def test_bad_blocklist_entries_are_named(entry, message):
    with pytest.raises(ValueError, match=message):
        Blocklist([entry])


# Rewriters.


def rewrite_all(config: RewriterConfig, paths: list[str]) -> list[str]:
    rewritten = list(paths)
    Rewriter(config).rewrite_paths(rewritten)
    assert rewritten == [Rewriter(config).rewrite(path) for path in paths]
    return rewritten


def test_plain_rewrites_replace_up_to_max():
    paths = ["a.a.a", "b.b", "x.a"]
    assert rewrite_all(RewriterConfig(old="a", new="z"), paths) == ["z.z.z", "b.b", "x.z"]
    assert rewrite_all(RewriterConfig(old="a", new="z", max=2), paths) == ["z.z.a", "b.b", "x.z"]


def test_regex_rewrites_use_groups_in_every_spelling():
    paths = ["servers.web1.cpu", "servers.db.mem", "apps.x"]
    for template in ("hosts.$1.$2", "hosts.${1}.${2}", "hosts.\\1.\\2", "hosts.${host}.$what"):
        config = RewriterConfig(old=r"/^servers\.(?P<host>\w+)\.(?P<what>\w+)/", new=template)
        assert rewrite_all(config, paths) == ["hosts.web1.cpu", "hosts.db.mem", "apps.x"], template
    # "$1x" is group 1 then "x"; "$$" is a dollar sign.
    config = RewriterConfig(old=r"/^(\w+)\./", new="$1x$$.")
    assert rewrite_all(config, ["ab.c"]) == ["abx$.c"]


def test_not_skips_the_rewrite():
    paths = ["servers.web1.cpu", "servers.keep.cpu", "servers.db9.cpu"]
    assert rewrite_all(RewriterConfig(old="servers.", new="s.", not_="keep"), paths) == [
        "s.web1.cpu",
        "servers.keep.cpu",
        "s.db9.cpu",
    ]
    assert rewrite_all(RewriterConfig(old="servers.", new="s.", not_=r"/\d\./"), paths) == [
        "servers.web1.cpu",
        "s.keep.cpu",
        "servers.db9.cpu",
    ]


def test_rewriter_config_reads_the_not_key():
    config = msgspec.convert({"old": "a", "new": "b", "not": "c", "max": 1}, RewriterConfig)
    assert config.not_ == "c"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (RewriterConfig(old=""), "old: must not be empty"),
        (RewriterConfig(old="a", max=0), "max: use -1 for every occurrence"),
        (RewriterConfig(old="/(a/"), "old: invalid regular expression"),
        (
            RewriterConfig(old="/(a)/", new="$2"),
            r"uses group 2 but the regular expression '\(a\)' has 1 group",
        ),
        (RewriterConfig(old="/(a)/", new="${name}"), "uses group 'name'"),
        (RewriterConfig(old="/(a)/", new="cost $"), r"'\$' must be followed by a group"),
    ],
)
def test_bad_rewriters_say_what_is_wrong(config, message):
    with pytest.raises(ValueError, match=message):
        Rewriter(config, "rewriters[3]")


# Route config.

CONTRACT = """
[[plugins.graphite-out.routes]]
key = "carbon"
type = "consistent_hashing"    # send_all_match | send_first_match | consistent_hashing | broadcast | hash_route
hash = "carbon_ch"             # or fnv1a_ch
replication_factor = 1
prefix = ""                    # and not_prefix, substr, not_substr, regex, not_regex
format = "plaintext"           # or pickle
destinations = ["10.0.0.1:2003:a", "10.0.0.2:2003:b"]

[[plugins.graphite-out.routes]]
key = "split"
type = "send_first_match"
destinations = [
    { address = "10.0.0.3:2003", prefix = "apps.", spool = false, queue_max_points = 5000 },
    { address = "[::1]:2004", replay_rate = 1000, flush_interval = "250ms", spool_max_size = "64MiB" },
]
"""


def test_the_documented_toml_contract_decodes():
    raw = tomllib.loads(CONTRACT)["plugins"]["graphite-out"]["routes"]
    carbon, split = convert_routes(raw)
    assert carbon.type == "consistent_hashing" and carbon.hash == "carbon_ch"
    assert [d.address for d in carbon.destination_configs] == ["10.0.0.1:2003:a", "10.0.0.2:2003:b"]
    assert all(isinstance(d, DestinationConfig) and d.spool for d in carbon.destination_configs)
    first, second = split.destination_configs
    assert (first.prefix, first.spool, first.queue_max_points) == ("apps.", False, 5000)
    assert second.replay_rate == 1000 and second.flush_interval == Duration(0.25)
    assert second.spool_max_size == Size(64 << 20)
    assert second.parsed_address.host == "::1"


def test_a_route_with_only_key_type_and_destinations_works():
    (route,) = convert_routes([{"key": "all", "type": "send_all_match", "destinations": ["127.0.0.1:2003"]}])
    selection = build_route(route).select(PATHS)
    assert selection.per_destination == [list(range(len(PATHS)))]
    assert route.format == "plaintext" and route.replication_factor == 1


def test_a_single_destination_consistent_hashing_route_is_allowed():
    (route,) = convert_routes([{"key": "ch", "type": "consistent_hashing", "destinations": ["c:2003"]}])
    assert build_route(route).select(PATHS).per_destination == [list(range(len(PATHS)))]


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            {"key": "carbon", "type": "send_all_match", "regex": "(", "destinations": ["h:1"]},
            "route 'carbon': regex: invalid regular expression '\\('",
        ),
        (
            {
                "key": "carbon",
                "type": "send_all_match",
                "destinations": ["h:1", {"address": "h:2", "not_regex": "[a"}],
            },
            r"route 'carbon': destinations\[1\]: not_regex: invalid regular expression '\[a'",
        ),
        (
            {"key": "carbon", "type": "broadcast", "destinations": ["h:1", "nope"]},
            r"route 'carbon': destinations\[1\].address: destination 'nope': expected \"host:port\"",
        ),
        (
            {"key": "c", "type": "consistent_hashing", "destinations": ["h:2003", "h:2004"]},
            r"destinations\[1\]: host 'h' with instance None is already destinations\[0\]",
        ),
        (
            {"key": "c", "type": "send_all_match", "destinations": ["h:2003", "h:2003"]},
            r"destinations\[1\]: 'h:2003' is already destinations\[0\]",
        ),
        (
            {
                "key": "c",
                "type": "consistent_hashing",
                "replication_factor": 2,
                "destinations": ["h:1:a", "h:2:b"],
            },
            "replication_factor: 2 copies need as many different hosts, there are 1",
        ),
        (
            {"key": "c", "type": "send_all_match", "replication_factor": 2, "destinations": ["h:1", "i:1"]},
            "replication_factor: only consistent_hashing and hash_route replicate",
        ),
        (
            {
                "key": "c",
                "type": "consistent_hashing",
                "destinations": [{"address": "h:1", "prefix": "a"}, "i:1"],
            },
            r"destinations\[0\]: destination matchers only apply to send_all_match and send_first_match",
        ),
        ({"key": "c", "type": "broadcast", "destinations": []}, "at least one destination"),
        ({"key": "a b", "type": "broadcast", "destinations": ["h:1"]}, "key: use letters, digits"),
        ({"key": "c", "type": "round_robin", "destinations": ["h:1"]}, "Invalid enum value 'round_robin'"),
        ({"key": "c", "type": "broadcast", "destinations": ["h:1"], "hosts": 1}, "unknown field `hosts`"),
        (
            {"key": "c", "type": "broadcast", "destinations": [{"address": "h:1", "connect_timeout": "0s"}]},
            r"destinations\[0\].connect_timeout: must be longer than 0s",
        ),
    ],
)
def test_bad_route_configs_name_the_route_and_field(route, message):
    assert re.search(message, config_error(route)), config_error(route)


# Destination choice.


def route_from(**fields) -> object:
    return build_route(msgspec.convert(fields, RouteConfig, dec_hook=decode_config_value))


def test_send_all_match_gives_each_destination_what_its_matchers_match():
    route = route_from(
        key="r",
        type="send_all_match",
        prefix="servers.",
        destinations=[
            {"address": "a:1", "substr": "cpu"},
            {"address": "b:1", "regex": r"web\d"},
            {"address": "c:1", "prefix": "servers.nothing"},
        ],
    )
    selection = route.select(PATHS[:7])
    assert selection.accepted == [0, 1, 2]
    assert selection.per_destination == [[0, 1], [0, 1], []]
    assert selection.unrouted == [2]


def test_send_first_match_gives_each_point_to_the_first_matching_destination():
    route = route_from(
        key="r",
        type="send_first_match",
        destinations=[
            {"address": "a:1", "prefix": "apps."},
            {"address": "b:1", "substr": "web"},
            {"address": "c:1", "substr": "."},
        ],
    )
    selection = route.select(PATHS[:7])
    assert selection.per_destination == [[3, 4], [0, 1, 6], [2, 5]]
    assert selection.unrouted == []
    assert route_from(
        key="r", type="send_first_match", destinations=[{"address": "a:1", "prefix": "x"}]
    ).select(PATHS[:3]).unrouted == [0, 1, 2]


def test_broadcast_sends_every_accepted_point_everywhere():
    route = route_from(key="r", type="broadcast", not_prefix="tmp.", destinations=["a:1", "b:1", "c:1"])
    assert isinstance(route, BroadcastRoute)
    selection = route.select(PATHS[:7])
    assert selection.per_destination == [[0, 1, 2, 3, 4, 6]] * 3


@pytest.mark.parametrize("hash_type", ["carbon_ch", "fnv1a_ch"])
def test_consistent_hashing_groups_points_by_ring_destination(hash_type):
    addresses = ["10.0.0.1:2003:a", "10.0.0.2:2003:b", "10.0.0.3:2003:c"]
    route = route_from(
        key="ch", type="consistent_hashing", hash=hash_type, prefix="servers.", destinations=addresses
    )
    assert isinstance(route, ConsistentHashingRoute)
    selection = route.select(PATHS)
    ring = ConsistentHashRing([("10.0.0.1", "a"), ("10.0.0.2", "b"), ("10.0.0.3", "c")], hash_type=hash_type)
    accepted = [i for i, path in enumerate(PATHS) if path.startswith("servers.")]
    assert selection.accepted == accepted
    for destination, indexes in enumerate(selection.per_destination):
        assert indexes == [i for i in accepted if ring.node_for_path(PATHS[i]) == destination]
    assert all(selection.per_destination)


def test_replicated_points_go_to_distinct_hosts():
    route = route_from(
        key="ch",
        type="consistent_hashing",
        replication_factor=2,
        destinations=["10.0.0.1:2003:a", "10.0.0.1:2004:b", "10.0.0.2:2003:c"],
    )
    selection = route.select(PATHS)
    copies = Counter(i for indexes in selection.per_destination for i in indexes)
    assert set(copies.values()) == {2} and len(copies) == len(PATHS)
    on_host_1 = set(selection.per_destination[0]) | set(selection.per_destination[1])
    assert set(selection.per_destination[0]) & set(selection.per_destination[1]) == set()
    assert on_host_1 | set(selection.per_destination[2]) == set(range(len(PATHS)))
    assert set(selection.per_destination[2]) == set(range(len(PATHS)))


def test_hash_route_fails_over_and_comes_back():
    route = route_from(key="hr", type="hash_route", destinations=["a:2003", "b:2003", "c:2003"])
    assert isinstance(route, HashRoute)
    before = route.select(PATHS).per_destination
    assert all(before)

    assert route.mark_destination_down(1)
    during = route.select(PATHS)
    assert during.per_destination[1] == [] and during.unrouted == []
    assert sorted(during.per_destination[0] + during.per_destination[2]) == list(range(len(PATHS)))
    assert set(before[0]) <= set(during.per_destination[0])
    assert set(before[2]) <= set(during.per_destination[2])

    route.mark_destination_down(0)
    route.mark_destination_down(2)
    nothing = route.select(PATHS)
    assert nothing.unrouted == list(range(len(PATHS))) and not any(nothing.per_destination)

    for destination in range(3):
        route.mark_destination_up(destination)
    assert route.select(PATHS).per_destination == before


def test_a_hash_route_of_one_destination_that_is_down_routes_nothing():
    route = route_from(key="hr", type="hash_route", destinations=["a:2003"])
    assert isinstance(route, HashRoute)
    assert route.mark_destination_down(0)
    nothing = route.select(PATHS)
    assert nothing.per_destination == [[]] and nothing.unrouted == list(range(len(PATHS)))
    route.mark_destination_up(0)
    assert route.select(PATHS).per_destination == [list(range(len(PATHS)))]


# The whole table.


def test_table_blocks_rewrites_then_routes_on_the_rewritten_paths():
    routes = convert_routes(
        [
            {"key": "hosts", "type": "send_all_match", "prefix": "hosts.", "destinations": ["a:2003"]},
            {"key": "apps", "type": "broadcast", "prefix": "apps.", "destinations": ["b:2003", "c:2003"]},
        ]
    )
    table = RoutingTable(
        routes,
        blocklist=["prefix tmp.", "sub ;env=prod"],
        rewriters=[RewriterConfig(old=r"/^servers\.(\w+)\./", new="hosts.${1}.")],
    )
    paths = PATHS[:7]
    dispatch = table.dispatch(paths)
    assert dispatch.blocked == 2
    assert dispatch.paths[:3] == ["hosts.web1.cpu.user", "hosts.web2.cpu.system", "hosts.db1.mem.used"]
    assert dispatch.paths[5] == "tmp.debug.value"  # blocked paths are left as they were
    assert dispatch.routes["hosts"].per_destination == [[0, 1, 2]]
    assert dispatch.routes["apps"].per_destination == [[3], [3]]
    assert dispatch.unroutable == [6]


def test_duplicate_route_keys_are_refused():
    routes = convert_routes([{"key": "x", "type": "broadcast", "destinations": ["a:1"]}] * 2)
    with pytest.raises(ValueError, match="route 'x': key: another route already uses this key"):
        RoutingTable(routes)
