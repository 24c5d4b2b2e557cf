"""Guest clock server: the lab reads and sets a guest's wall clock through it.

Usage: ``python3 clock.py PORT`` (or ``python3 -c "<this file>" PORT``).

A guest's clock comes from its RTC (1 s granularity), and P2P latency is
measured against the sender's wall clock, so before the nodes start the lab
sets every guest's clock from its own (an NTP-style exchange on a forwarded
port, :mod:`plexilab.providers.clock`).  The protocol is 9-byte requests,
8-byte answers, all integers big-endian:

* ``b"t" + 8 bytes`` (ignored): answer the guest's ``time.time_ns()``;
* ``b"s" + int64 delta``: add *delta* ns to ``CLOCK_REALTIME``, then answer
  the new ``time.time_ns()``.

It runs with the standard library only and imports nothing from plexilab
(the lab ships this file's source with ``importlib.resources``); it serves
one connection at a time until the guest powers off.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import Sequence

REQUEST = 9
I64 = struct.Struct(">q")


def exact(conn: socket.socket, n: int) -> bytes | None:
    """*n* bytes from *conn* (None when it closes first)."""
    buf = b""
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            return None
        buf += part
    return buf


def answer(request: bytes) -> bytes:
    """Apply one request (a set moves the clock) and return the answer."""
    if request[:1] == b"s":
        (delta,) = I64.unpack(request[1:])
        now = time.clock_gettime_ns(time.CLOCK_REALTIME)
        time.clock_settime_ns(time.CLOCK_REALTIME, now + delta)
    return I64.pack(time.time_ns())


def serve_connection(conn: socket.socket) -> None:
    """Answer requests on *conn* until the lab closes it."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while True:
            request = exact(conn, REQUEST)
            if request is None:
                return
            conn.sendall(answer(request))


def listener(port: int, host: str = "0.0.0.0") -> socket.socket:
    """The listening socket of the server."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(4)
    return srv


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: clock.py PORT")
    srv = listener(int(args[0]))
    while True:
        conn, _ = srv.accept()
        try:
            serve_connection(conn)
        except OSError:  # the lab went away mid-request: serve the next one
            continue


if __name__ == "__main__":
    main()
