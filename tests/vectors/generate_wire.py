"""Write tests/vectors/wire.json: golden vectors of the wire codec.

Every expected value comes from the pure-Python reference codec
(``plexichat.wire._reference``, the executable form of docs/protocol.md).
Payloads are computed from fixed formulas, so the output is deterministic.

    python tests/vectors/generate_wire.py           # rewrite wire.json
    python tests/vectors/generate_wire.py --check   # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

from plexichat.wire import _reference as wire  # noqa: E402
from plexichat.wire._types import MAX_PAYLOAD, WireError  # noqa: E402

OUTPUT = HERE / "wire.json"
# Lengths around XXH3's internal boundaries (0-3, 4-8, 9-16, 17-128, 129-240,
# the long-input path, its 64-byte stripes and 1024-byte blocks).
CHECKSUM_SIZES = [0, 1, 3, 4, 8, 9, 16, 17, 64, 128, 129, 240, 241, 255, 256, 1023,
                  1024, 1025, 1040, 2048, 2049, 3000]  # fmt: skip
PAYLOAD_SIZES = [0, 0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 64, 100, 127, 128, 200,
                 224, 225, 228, 500, 1008, 1024, 1024, 1025, 2000]  # fmt: skip


def pattern(size: int, salt: int) -> bytes:
    """Deterministic payload bytes."""
    return bytes(
        (index * 31 + salt * 17 + (index >> 8)) & 0xFF for index in range(size)
    )


def frames() -> list[tuple[int, int, bytes]]:
    request_ids = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x12345678]
    return [
        (
            1 + index % 18,
            request_ids[index % len(request_ids)] ^ index,
            pattern(size, index),
        )
        for index, size in enumerate(PAYLOAD_SIZES)
    ]


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    changed = bytearray(data)
    changed[index] ^= mask
    return bytes(changed)


def bad_inputs() -> list[dict[str, Any]]:
    """Inputs every backend must reject, with the reference's reason and offset."""
    one = wire.encode_frame(3, 42, pattern(40, 1))  # 56 bytes
    two = wire.encode_frame(8, 7, pattern(300, 2))  # 316 bytes
    good = one + two
    header = struct.Struct(">2sBBII")
    cases: list[tuple[str, bytes, int]] = [
        ("truncated-header", good + one[:5], MAX_PAYLOAD),
        ("truncated-payload", good + one[:30], MAX_PAYLOAD),
        ("truncated-trailer", good + one[:-1], MAX_PAYLOAD),
        ("truncated-only-header", one[:12], MAX_PAYLOAD),
        ("trailing-garbage-short", good + b"\x00\x01", MAX_PAYLOAD),
        ("trailing-garbage-long", good + b"garbage after the frames", MAX_PAYLOAD),
        ("bad-magic", flip(good, len(one)), MAX_PAYLOAD),
        ("bad-magic-second-byte", flip(good, len(one) + 1, 0x80), MAX_PAYLOAD),
        ("bad-version-0", one + header.pack(b"PX", 0, 1, 0, 0) + bytes(4), MAX_PAYLOAD),
        ("bad-version-2", flip(good, 2, 0x03), MAX_PAYLOAD),
        ("unknown-type-0", header.pack(b"PX", 1, 0, 0, 0) + bytes(4), MAX_PAYLOAD),
        ("unknown-type-19", one + header.pack(b"PX", 1, 19, 5, 0), MAX_PAYLOAD),
        ("unknown-type-255", good + header.pack(b"PX", 1, 255, 5, 9), MAX_PAYLOAD),
        ("oversized-limit", good, 299),
        ("oversized-header-only", one + header.pack(b"PX", 1, 4, 1, 301), 300),
        (
            "oversized-default",
            header.pack(b"PX", 1, 4, 1, MAX_PAYLOAD + 1),
            MAX_PAYLOAD,
        ),
        ("oversized-max-u32", header.pack(b"PX", 1, 4, 1, 0xFFFFFFFF), MAX_PAYLOAD),
        ("oversized-zero-limit", good, 0),
        ("bad-checksum-payload", flip(good, len(one) + 100), MAX_PAYLOAD),
        ("bad-checksum-request-id", flip(good, 5), MAX_PAYLOAD),
        ("bad-checksum-trailer", flip(good, len(good) - 1, 0x80), MAX_PAYLOAD),
        ("bad-checksum-length", flip(one, 11, 0x04) + bytes(8), MAX_PAYLOAD),
        ("bad-checksum-late", good * 3 + one + flip(one, 20), MAX_PAYLOAD),
    ]
    out = []
    for name, data, limit in cases:
        try:
            wire.decode_frames(data, limit)
        except WireError as exc:
            out.append(
                {
                    "name": name,
                    "data": data.hex(),
                    "max_payload": limit,
                    "reason": exc.reason,
                    "offset": exc.offset,
                    "message": str(exc),
                }
            )
        else:  # pragma: no cover - a generator bug
            raise AssertionError(f"{name}: the reference accepted it")
    return out


def build() -> dict[str, Any]:
    items = frames()
    return {
        "description": "Golden vectors of docs/protocol.md, from the reference codec",
        "generator": "tests/vectors/generate_wire.py",
        "checksums": [
            {
                "data": pattern(size, 99).hex(),
                "checksum": wire.checksum(pattern(size, 99)),
            }
            for size in CHECKSUM_SIZES
        ],
        "frames": [
            {
                "type": type,
                "request_id": request_id,
                "payload": payload.hex(),
                "encoded": wire.encode_frame(type, request_id, payload).hex(),
            }
            for type, request_id, payload in items
        ],
        "bad": bad_inputs(),
    }


def render() -> str:
    return json.dumps(build(), indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check wire.json")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        print(f"{OUTPUT} is up to date")
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
