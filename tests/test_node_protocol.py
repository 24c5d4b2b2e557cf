"""Operation bodies: round trips and rejection of malformed bodies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from plexichat.node import protocol as p

REC = p.Record(
    channel=2**64 - 1,
    seq=7,
    msg_id=p.message_id(3, 9),
    sender=3,
    ts_us=123,
    payload=b"hi",
)


def test_send_layout_is_32_bytes_then_payload():
    body = p.encode_send(5, p.message_id(1, 2), 1, b"xyz")
    assert len(body) == 32 + 3
    assert body[:8] == (5).to_bytes(8, "big")
    assert p.decode_send(body) == (5, p.message_id(1, 2), 1, b"xyz")
    with pytest.raises(p.ProtocolError):
        p.decode_send(body[:31])


def test_message_id_convention():
    assert p.split_message_id(p.message_id(2**63, 5)) == (2**63, 5)


def test_ack_fetch_channel_round_trip():
    assert p.decode_ack(p.encode_ack(1, 2)) == (1, 2)
    assert p.decode_fetch(p.encode_fetch(1, 2, 3)) == (1, 2, 3)
    assert p.decode_channel(p.encode_channel(9)) == 9
    for bad in (p.decode_ack, p.decode_fetch, p.decode_channel):
        with pytest.raises(p.ProtocolError):
            bad(b"\x00")


def test_messages_round_trip_and_truncation():
    body = p.encode_messages(REC.channel, [REC, REC._replace(seq=8, payload=b"")], True)
    channel, records, more = p.decode_messages(body)
    assert channel == REC.channel
    assert more is True
    assert records == [REC, REC._replace(seq=8, payload=b"")]
    for cut in (5, len(body) - 1, 13 + 10):
        with pytest.raises(p.ProtocolError):
            p.decode_messages(body[:cut])
    with pytest.raises(p.ProtocolError):
        p.decode_messages(body + b"x")


def test_deliver_round_trip():
    assert p.decode_deliver(p.encode_deliver(REC)) == REC
    with pytest.raises(p.ProtocolError):
        p.decode_deliver(p.encode_deliver(REC)[:-1])
    with pytest.raises(p.ProtocolError):
        p.decode_deliver(b"abc")


def test_records_and_handoff_round_trip():
    recs = [REC, REC._replace(channel=1, seq=1, payload=b"a" * 100)]
    assert p.decode_records(p.encode_records(recs)) == recs
    kind, channel, last, got = p.decode_handoff(p.encode_handoff_data(recs))
    assert (kind, channel, last, got) == (p.HandoffKind.DATA, 0, 0, recs)
    assert p.decode_handoff(p.encode_handoff_pull(4))[:3] == (p.HandoffKind.PULL, 4, 0)
    assert p.decode_handoff(p.encode_handoff_seq(4, 99))[:3] == (
        p.HandoffKind.SEQ,
        4,
        99,
    )
    body = p.encode_records(recs)
    for bad in (b"", b"\x00\x00", body[:-1], body + b"!", body[:20]):
        with pytest.raises(p.ProtocolError):
            p.decode_records(bad)
    for bad in (b"", b"\x09", b"\x02\x00"):
        with pytest.raises(p.ProtocolError):
            p.decode_handoff(bad)
    assert p.decode_replicate_ack(p.encode_replicate_ack(3, 2)) == (3, 2)
    with pytest.raises(p.ProtocolError):
        p.decode_replicate_ack(b"")


def test_relay_round_trip():
    relay = p.Relay(1, 2, 3, 4, "node-é", b"payload")
    assert p.decode_relay(p.encode_relay(relay)) == relay
    with pytest.raises(ValueError, match="longer than 255"):
        p.encode_relay(p.Relay(1, 2, 3, 4, "x" * 256, b""))
    with pytest.raises(p.ProtocolError):
        p.decode_relay(b"\x00" * 18)
    with pytest.raises(p.ProtocolError):
        p.decode_relay(b"\x00" * 18 + b"\x05ab")
    with pytest.raises(p.ProtocolError):
        p.decode_relay(b"\x00" * 18 + b"\x01\xff")


def test_error_and_json_bodies():
    assert p.decode_error(p.encode_error(5, "nope")) == (5, "nope")
    with pytest.raises(p.ProtocolError):
        p.decode_error(b"\x01")
    assert p.decode_json(p.encode_json({"a": [1]})) == {"a": [1]}
    assert p.decode_json(b"") == {}
    for bad in (b"[1]", b"{", b"\xff"):
        with pytest.raises(p.ProtocolError):
            p.decode_json(bad)


def test_stats_reply_round_trip():
    body = p.encode_stats_reply({"x": 1}, {"send": b"\x01\x02", "relay": b""})
    assert p.decode_stats_reply(body) == ({"x": 1}, {"send": b"\x01\x02", "relay": b""})
    with pytest.raises(p.ProtocolError):
        p.decode_stats_reply(b"\x00")
    with pytest.raises(p.ProtocolError):
        p.decode_stats_reply(body[:6])
    for cut in (1, 3, 8):
        with pytest.raises(p.ProtocolError):
            p.decode_stats_reply(body[: len(body) - cut])


def test_node_vectors_are_what_the_spec_generator_writes():
    """tests/vectors/node.json is fresh (the golden tests check the codec)."""
    script = Path(__file__).parent / "vectors" / "generate_node.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
