"""The client's stream file (stream id and metric table beside the disk buffer) when it is damaged."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from agent_plugins.relay.relay_client.store import _read_stream_file


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00\x01garbage",
        msgspec.msgpack.encode([1, "\udcff".encode("utf-8", "surrogatepass").decode("latin-1")]),
        b"\x93\x01\xa2\xff\xfe\x90",  # version, a stream id that is not UTF-8, no metrics
    ],
)
def test_a_damaged_stream_file_means_a_new_stream(tmp_path: Path, content: bytes, caplog) -> None:
    path = tmp_path / "stream.msgpack"
    path.write_bytes(content)
    assert _read_stream_file(path) is None
    assert "is damaged" in caplog.text or "unknown format" in caplog.text
