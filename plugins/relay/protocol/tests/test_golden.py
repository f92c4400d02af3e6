"""Golden bytes of every relay message: an accidental change of the wire format fails here.

A deliberate change needs a new protocol version (docs/relay-protocol.md, "Versioning") and new
fixtures; a new trailing field with a default needs a new fixture next to the old one, and the old
bytes must still decode (as test_messages.py checks for `Hello.token`).
"""

import msgspec
import pytest

from agent.model import Consumer, MetricDef, Resource
from agent_plugins.relay.protocol import (
    Accept,
    Ack,
    AnyMessage,
    BatchMessage,
    FrameDecoder,
    FrameEncoder,
    Goodbye,
    Heartbeat,
    Hello,
    MetricDefs,
    Refused,
    Reject,
    WireSeries,
)

T0 = 1_700_000_000_000_000_000

GOLDEN = {
    "hello": (
        Hello(1, "node-7", "3f2a9c1e5b7d4e08", "0.1.0", "s3cret"),
        "0000002d96a568656c6c6f01a66e6f64652d37b033663261396331653562376434653038a5302e312e30a6733363726574",
    ),
    "hello_without_token": (
        Hello(1, "node-7", "3f2a9c1e5b7d4e08", "0.1.0"),
        "0000002796a568656c6c6f01a66e6f64652d37b033663261396331653562376434653038a5302e312e30c0",
    ),
    "accept": (
        Accept(1, "0.1.0", "a1b2c3", 41, 43, 16777216, 64, 5000),
        "0000002199a661636365707401a5302e312e30a6613162326333292bce0100000040cd1388",
    ),
    "reject": (
        Reject("version", "server speaks protocol 3, client speaks 2", 3, "0.4.0"),
        "0000004295a672656a656374a776657273696f6ed92973657276657220737065616b732070726f746f636f6c20332c"
        "20636c69656e7420737065616b73203203a5302e342e30",
    ),
    "defs": (
        MetricDefs(
            {
                0: MetricDef("rapl_energy", "J", "float", "RAPL energy counter"),
                7: MetricDef("cpu_time", "s", "int"),
            }
        ),
        "0000004392a464656673820094ab7261706c5f656e65726779a14aa5666c6f6174b35241504c20656e6572677920636f"
        "756e7465720794a86370755f74696d65a173a3696e74a0",
    ),
    "batch": (
        BatchMessage(
            42,
            [
                WireSeries(
                    0,
                    Resource("cpu_package", "0"),
                    Consumer("local_machine"),
                    {"domain": "pkg", "socket": 0, "turbo": True, "ratio": 0.5},
                    [T0, T0 + 1_000_000_000],
                    [12.5, 13],
                ),
                WireSeries(
                    ["carbon.agents.a.cpu", "carbon.agents.a.mem"],
                    Resource("local_machine"),
                    Consumer("process", "1234"),
                    {},
                    [T0, T0],
                    [1, -2],
                ),
            ],
        ),
        "000000d193a562617463682a92960092ab6370755f7061636b616765a13092ad6c6f63616c5f6d616368696e65a084a6"
        "646f6d61696ea3706b67a6736f636b657400a5747572626fc3a5726174696fcb3fe000000000000092cf17979cfe362a"
        "0000cf17979cfe71c4ca0092cb40290000000000000d9692b3636172626f6e2e6167656e74732e612e637075b3636172"
        "626f6e2e6167656e74732e612e6d656d92ad6c6f63616c5f6d616368696e65a092a770726f63657373a4313233348092"
        "cf17979cfe362a0000cf17979cfe362a00009201fe",
    ),
    "ack": (Ack(42), "0000000692a361636b2a"),
    "refused": (
        Refused(42, "series 0: 2 values for 3 timestamps"),
        "0000002f93a7726566757365642ad92373657269657320303a20322076616c75657320666f7220332074696d657374616d"
        "7073",
    ),
    "heartbeat": (Heartbeat(), "0000000491a26862"),
    "goodbye": (
        Goodbye("shutdown", "server stopping"),
        "0000001e93a3627965a873687574646f776eaf7365727665722073746f7070696e67",
    ),
}


def test_every_message_type_has_a_golden_frame():
    covered = {type(message) for message, _ in GOLDEN.values()}
    assert covered == set(AnyMessage.__args__)


@pytest.mark.parametrize("name", GOLDEN)
def test_encoding_gives_the_golden_bytes(name):
    message, frame_hex = GOLDEN[name]
    assert FrameEncoder().encode(message).hex() == frame_hex


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_bytes_decode_to_the_message(name):
    message, frame_hex = GOLDEN[name]
    decoded = list(FrameDecoder(AnyMessage).feed(bytes.fromhex(frame_hex)))
    assert decoded == [message]
    # Equality would accept 13.0 for 13: the value types must survive too.
    if isinstance(message, BatchMessage):
        assert [type(v) for v in decoded[0].series[0].values] == [float, int]


def test_batch_body_layout_is_the_documented_one():
    """docs/relay-protocol.md shows a batch as this array: check the doc's shape, field by field."""
    _, frame_hex = GOLDEN["batch"]
    body = msgspec.msgpack.decode(bytes.fromhex(frame_hex)[4:])
    tag, seq, series = body
    assert (tag, seq) == ("batch", 42)
    metric, resource, consumer, attributes, timestamps, values = series[0]
    assert (metric, resource, consumer) == (0, ["cpu_package", "0"], ["local_machine", ""])
    assert attributes == {"domain": "pkg", "socket": 0, "turbo": True, "ratio": 0.5}
    assert (timestamps, values) == ([T0, T0 + 1_000_000_000], [12.5, 13])
    assert series[1][0] == ["carbon.agents.a.cpu", "carbon.agents.a.mem"]


def test_a_batch_framed_from_stored_series_is_the_golden_batch():
    """The client stores encoded series in its durable log and frames them at each send."""
    message, frame_hex = GOLDEN["batch"]
    encoder = FrameEncoder()
    stored = encoder.encode_series(message.series)
    assert encoder.encode_batch(message.seq, stored).hex() == frame_hex
