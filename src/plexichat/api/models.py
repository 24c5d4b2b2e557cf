"""Request and response bodies of the HTTP API (docs/http-api.md)."""

from __future__ import annotations

import base64
import binascii

from pydantic import BaseModel, ConfigDict, Field, model_validator

from plexichat.node import protocol as p

MAX_SENDER = (1 << 64) - 1


class NewMessage(BaseModel):
    """``POST /channels/{channel}/messages``: exactly one of ``text`` (stored
    as its UTF-8 bytes) or ``data`` (base64 of the payload bytes)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, description="the message as UTF-8 text")
    data: str | None = Field(
        default=None, description="the message payload as standard base64"
    )
    sender: int | None = Field(
        default=None,
        ge=1,
        le=MAX_SENDER,
        description="send as this sender (service and admin tokens, or an "
        "--insecure node, only); default: the token's own",
    )

    @model_validator(mode="after")
    def _one_payload(self) -> NewMessage:
        if (self.text is None) == (self.data is None):
            raise ValueError("give exactly one of text or data")
        return self

    def payload(self) -> bytes:
        """The payload bytes (ValueError: data is not base64)."""
        if self.text is not None:
            return self.text.encode("utf-8")
        assert self.data is not None
        try:
            return base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("data is not base64") from exc


class Accepted(BaseModel):
    """``201``: the message is committed (stored on every replica) at ``seq``."""

    channel: str
    seq: int
    msg_id: str = Field(description="the binary msg_id, 32 hex digits")
    sender: int


class Message(BaseModel):
    """One committed message: ``text`` when its payload is UTF-8, else ``data``."""

    seq: int
    msg_id: str
    sender: int
    ts_us: int
    text: str | None = None
    data: str | None = None

    @classmethod
    def of(cls, record: p.Record) -> Message:
        try:
            return cls(
                seq=record.seq,
                msg_id=record.msg_id.hex(),
                sender=record.sender,
                ts_us=record.ts_us,
                text=record.payload.decode("utf-8"),
            )
        except UnicodeDecodeError:
            return cls(
                seq=record.seq,
                msg_id=record.msg_id.hex(),
                sender=record.sender,
                ts_us=record.ts_us,
                data=base64.b64encode(record.payload).decode("ascii"),
            )


class Page(BaseModel):
    """``GET /channels/{channel}/messages``: messages by seq; ``next`` is the
    ``after`` of the next page, null when no committed message follows."""

    channel: str
    messages: list[Message]
    next: int | None


class Problem(BaseModel):
    """Every error answer: ``{"detail": "..."}`` (and, for 422, a list)."""

    detail: str


class Health(BaseModel):
    status: str
    node_id: str
