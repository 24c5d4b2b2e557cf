"""Guest clocks, lab side: start the clock server in a guest, sync, measure drift.

The server is :mod:`plexilab.guest.clock` (a stand-alone stdlib script shipped
with ``importlib.resources``); the lab reaches it on a forwarded port.  Each
guest's clock is set from the host's before the nodes start (offset at the
fastest of several round trips, NTP-style) and measured again after the P2P
scenario (the residual offset goes into the per-node rows).
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files

from plexilab.host import Endpoint, Host
from plexilab.proc import Deadline

log = logging.getLogger("plexilab.providers.clock")

_I64 = struct.Struct(">q")


def server_source() -> str:
    """The source of the guest clock server (:mod:`plexilab.guest.clock`)."""
    return files("plexilab.guest").joinpath("clock.py").read_text()


@dataclass(frozen=True)
class ClockReading:
    """Guest clock minus host clock (at the fastest of several round trips)."""

    offset_ns: int
    rtt_ns: int


def _exchange(sock: socket.socket, request: bytes) -> int:
    sock.sendall(request)
    buf = b""
    while len(buf) < 8:
        part = sock.recv(8 - len(buf))
        if not part:
            raise ConnectionError("clock server closed the connection")
        buf += part
    return int(_I64.unpack(buf)[0])


def read_clock(sock: socket.socket, rounds: int = 12) -> ClockReading:
    """NTP-style: offset at the round trip with the smallest RTT."""
    best: ClockReading | None = None
    for _ in range(rounds):
        t0 = time.time_ns()
        guest = _exchange(sock, b"t" + bytes(8))
        t1 = time.time_ns()
        reading = ClockReading(guest - (t0 + t1) // 2, t1 - t0)
        if best is None or reading.rtt_ns < best.rtt_ns:
            best = reading
    assert best is not None
    return best


def connect_clock(endpoint: Endpoint, timeout: float = 60.0) -> socket.socket:
    """Connect to a guest clock server (slirp accepts before it listens: retry)."""
    deadline = Deadline(timeout)
    while True:
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((endpoint.host, endpoint.port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _exchange(sock, b"t" + bytes(8))
            return sock
        except OSError:
            if sock is not None:
                sock.close()
            if deadline.expired():
                raise
            deadline.sleep(0.2)


def sync_clock(endpoint: Endpoint) -> dict[str, float]:
    """Set the guest clock behind *endpoint* to the host's; report before/after."""
    with connect_clock(endpoint) as sock:
        before = read_clock(sock)
        after = before
        for _ in range(3):
            _exchange(sock, b"s" + _I64.pack(-after.offset_ns))
            after = read_clock(sock)
            if abs(after.offset_ns) <= max(after.rtt_ns, 200_000):
                break
    return {
        "offset_before_ms": round(before.offset_ns / 1e6, 3),
        "offset_ms": round(after.offset_ns / 1e6, 3),
        "rtt_ms": round(after.rtt_ns / 1e6, 3),
    }


def measure_clock(endpoint: Endpoint) -> dict[str, float]:
    """Current guest-host clock offset (drift check after the run)."""
    with connect_clock(endpoint, timeout=20) as sock:
        reading = read_clock(sock, rounds=8)
    return {
        "offset_ms": round(reading.offset_ns / 1e6, 3),
        "rtt_ms": round(reading.rtt_ns / 1e6, 3),
    }


def start_clock_server(host: Host, port: int) -> None:
    """Start the clock server in *host* (system python3, runs until poweroff)."""
    host.spawn(
        ["python3", "-c", server_source(), str(port)],
        log_path=f"{host.workdir()}/clock.log",
    )


@dataclass
class GuestClocks:
    """Clock sync of a set of guests: a sampler that measures the drift after
    the P2P scenario."""

    endpoints: Mapping[str, Endpoint]
    synced: dict[str, dict[str, float]] = field(default_factory=dict)
    after: dict[str, dict[str, float]] = field(default_factory=dict)

    def sync(self) -> None:
        """Set every guest's clock (in parallel)."""
        names = list(self.endpoints)
        if not names:
            return
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            reports = list(pool.map(lambda n: sync_clock(self.endpoints[n]), names))
        self.synced.update(zip(names, reports, strict=True))

    def on_step(self, step: str) -> None:
        if step != "p2p":
            return
        for name, ep in self.endpoints.items():
            try:
                self.after[name] = measure_clock(ep)
            except OSError as exc:
                log.warning("clock check of %s failed: %r", name, exc)

    def stop(self) -> None:
        pass

    def report(self, name: str) -> dict[str, float] | None:
        """The clock of guest *name*: the sync, and the offset after the run."""
        if name not in self.synced:
            return None
        out = dict(self.synced[name])
        if name in self.after:
            out["offset_after_ms"] = self.after[name]["offset_ms"]
        return out
