"""Unit tests of the P2P relay (:mod:`plexichat.node.relay`) without a cluster:
the tree shape, and one :class:`Relayer` fed RELAY frames by hand with its
forwarding captured."""

from __future__ import annotations

import time
from typing import Any

import pytest

from plexichat import wire
from plexichat.node import protocol as p
from plexichat.node.relay import Relayer, children
from plexichat.stats import Histogram

T = wire.MessageType
MEMBERS = ["n0", "n1", "n2", "n3", "n4", "n5", "n6"]


class FakeConn:
    """Stands in for a FrameConnection: records what is sent."""

    def __init__(self, role: str = "peer") -> None:
        self.sent: list[tuple[int, int, bytes]] = []
        self.role = role  # relayed copies arrive on peer links

    def send_error(self, request_id: int, code: int, message: str) -> None:
        self.sent.append((12, request_id, p.encode_error(code, message)))

    def send(self, type: int, request_id: int, payload: bytes) -> None:
        self.sent.append((type, request_id, payload))


class Harness:
    def __init__(self, node_id: str = "n0", members: list[str] | None = None):
        self.members = list(MEMBERS if members is None else members)
        self.addresses = {m: ("127.0.0.1", 7000 + i) for i, m in enumerate(MEMBERS)}
        self.posts: list[tuple[tuple[str, int], int, bytes, str]] = []
        self.counters = dict.fromkeys(("relays", "relay_dups", "relay_forwarded"), 0)
        self.hist = {"relay": Histogram()}
        self.relayer = Relayer(
            node_id,
            members=lambda: self.members,
            resolve=self.addresses.get,
            post=lambda *args: self.posts.append(args),
            counters=self.counters,
            hist=self.hist,
            capacity=16,
        )
        self.conn = FakeConn()

    def relay(self, rid: int = 9, **fields: Any) -> None:
        relay = p.Relay(
            **{
                "relay_id": 1,
                "sent_ns": time.time_ns(),
                "ttl": 3,
                "fanout": 2,
                "root": "",
                "payload": b"hi",
                **fields,
            }
        )
        self.relayer.on_relay(self.conn, rid, p.encode_relay(relay))  # type: ignore[arg-type]

    def forwarded(self) -> list[tuple[tuple[str, int], p.Relay]]:
        assert all(t == T.RELAY and name == "relay" for _, t, _, name in self.posts)
        return [(a, p.decode_relay(body)) for a, _, body, _ in self.posts]


# -- tree shape -------------------------------------------------------------------


def test_children_form_a_tree_rooted_anywhere():
    assert children(MEMBERS, "n0", "n0", 2) == ["n1", "n2"]
    assert children(MEMBERS, "n1", "n0", 2) == ["n3", "n4"]
    assert children(MEMBERS, "n2", "n0", 2) == ["n5", "n6"]
    assert children(MEMBERS, "n3", "n0", 2) == []
    # rooted at n5: the order is rotated, n5 n6 n0 n1 ...
    assert children(MEMBERS, "n5", "n5", 2) == ["n6", "n0"]
    assert children(MEMBERS, "n6", "n5", 2) == ["n1", "n2"]
    # members in any order: the tree is over their sorted ids
    assert children(reversed(MEMBERS), "n0", "n0", 3) == ["n1", "n2", "n3"]


@pytest.mark.parametrize("root", ["n0", "n3", "n6"])
@pytest.mark.parametrize("fanout", [1, 2, 3, 6, 10])
def test_every_member_but_the_root_has_exactly_one_parent(root, fanout):
    reached = [c for m in MEMBERS for c in children(MEMBERS, m, root, fanout)]
    assert sorted(reached) == sorted(m for m in MEMBERS if m != root)


def test_no_children_for_unknown_root_or_node_or_bad_fanout():
    assert children(MEMBERS, "n0", "nX", 2) == []
    assert children(MEMBERS, "nX", "n0", 2) == []
    assert children(MEMBERS, "n0", "n0", 0) == []
    assert children([], "n0", "n0", 2) == []


def test_relayer_children_follow_the_current_members():
    h = Harness("n1")
    assert h.relayer.children("n0", 2) == ["n3", "n4"]
    h.members.remove("n3")
    assert h.relayer.children("n0", 2) == ["n4", "n5"]


# -- handling RELAY frames ----------------------------------------------------------


def test_an_injected_relay_is_acked_and_forwarded_with_this_node_as_root():
    h = Harness("n0")
    h.relay(rid=9, relay_id=77, ttl=3, fanout=2)
    assert h.conn.sent == [(T.ACK, 9, p.encode_ack(0, 77))]
    sent = h.forwarded()
    assert [a for a, _ in sent] == [h.addresses["n1"], h.addresses["n2"]]
    for _, relay in sent:
        assert (relay.relay_id, relay.ttl, relay.fanout, relay.root) == (
            77,
            2,
            2,
            "n0",
        )
        assert relay.payload == b"hi"
    assert h.counters == {"relays": 1, "relay_dups": 0, "relay_forwarded": 2}
    assert h.hist["relay"].count == 0  # the injected copy has no hop latency


def test_a_relayed_copy_is_not_acked_and_records_its_latency():
    h = Harness("n1")
    h.relay(relay_id=5, root="n0", ttl=1, sent_ns=time.time_ns() - 2_000_000)
    assert h.conn.sent == []
    assert [a for a, _ in h.forwarded()] == [h.addresses["n3"], h.addresses["n4"]]
    assert all(r.root == "n0" and r.ttl == 0 for _, r in h.forwarded())
    assert h.hist["relay"].count == 1
    assert h.hist["relay"].max >= 1900  # microseconds


def test_a_duplicate_is_counted_and_dropped():
    h = Harness("n1")
    h.relay(relay_id=5, root="n0")
    h.posts.clear()
    h.relay(relay_id=5, root="n0")
    h.relay(relay_id=5, root="")  # injected again: ACKed, still a duplicate
    assert h.posts == []
    assert h.counters == {"relays": 1, "relay_dups": 2, "relay_forwarded": 2}
    assert len(h.conn.sent) == 1


def test_ttl_zero_stops_the_fanout():
    h = Harness("n0")
    h.relay(ttl=0)
    assert h.posts == []
    assert h.counters["relays"] == 1
    assert h.counters["relay_forwarded"] == 0


def test_a_child_without_an_address_is_skipped():
    h = Harness("n0")
    del h.addresses["n1"]
    h.relay()
    assert [a for a, _ in h.forwarded()] == [h.addresses["n2"]]
    assert h.counters["relay_forwarded"] == 1


def test_the_histogram_is_read_from_the_shared_dict_each_time():
    h = Harness("n1")
    h.relay(relay_id=1, root="n0")
    h.hist["relay"] = fresh = Histogram()  # a STATS reset replaces it
    h.relay(relay_id=2, root="n0")
    assert fresh.count == 1


def test_seen_ids_are_bounded_by_the_cache():
    h = Harness("n0")
    for rid in range(40):
        h.relay(relay_id=rid, ttl=0)
    h.relay(relay_id=0, ttl=0)  # evicted long ago: handled again
    assert h.counters["relays"] == 41
    assert h.counters["relay_dups"] == 0


def test_a_malformed_relay_raises_protocol_error():
    h = Harness("n0")
    with pytest.raises(p.ProtocolError):
        h.relayer.on_relay(h.conn, 1, b"\x00")  # type: ignore[arg-type]
    assert h.counters["relays"] == 0
