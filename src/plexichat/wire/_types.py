"""Types shared by every wire backend (the frame tuple, errors, constants)."""

from __future__ import annotations

from enum import IntEnum
from typing import Final, NamedTuple

MAGIC: Final = b"PX"
VERSION: Final = 1
HEADER_SIZE: Final = 12
TRAILER_SIZE: Final = 4
OVERHEAD: Final = HEADER_SIZE + TRAILER_SIZE
MAX_PAYLOAD: Final = 1 << 20
HARD_MAX_PAYLOAD: Final = 1 << 24


class MessageType(IntEnum):
    """Frame types of protocol version 1 (docs/protocol.md)."""

    HELLO = 1
    WELCOME = 2
    SEND = 3
    ACK = 4
    FETCH = 5
    MESSAGES = 6
    SUBSCRIBE = 7
    DELIVER = 8
    RELAY = 9
    STATS = 10
    STATS_REPLY = 11
    ERROR = 12
    GOSSIP = 13
    REPLICATE = 14
    REPLICATE_ACK = 15
    HANDOFF = 16
    PING = 17
    PONG = 18


MIN_TYPE: Final = int(min(MessageType))
MAX_TYPE: Final = int(max(MessageType))


class Frame(NamedTuple):
    """One decoded frame."""

    type: int
    request_id: int
    payload: bytes


class WireError(ValueError):
    """Bad input on the wire: *reason* (see docs/protocol.md) at byte *offset*."""

    def __init__(self, reason: str, offset: int, detail: str = "") -> None:
        self.reason = reason
        self.offset = offset
        self.detail = detail
        message = f"{reason} at offset {offset}"
        super().__init__(f"{message}: {detail}" if detail else message)

    def __reduce__(self) -> tuple[type[WireError], tuple[str, int, str]]:
        return (type(self), (self.reason, self.offset, self.detail))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WireError) and (self.reason, self.offset) == (
            other.reason,
            other.offset,
        )

    def __hash__(self) -> int:
        return hash((self.reason, self.offset))
