"""QMP resource samples of QEMU guests during a run (a provider sampler).

Every guest is sampled when the sampler starts, every *interval* seconds,
after the run's steps ("converged", "loaded", "p2p") and at the end;
:meth:`VmSampler.summary` turns one guest's samples into the per-node ``vm``
figures of the result (vCPU and QEMU process CPU seconds, CPU use during the
load, RSS).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from plexilab.infra.machine import ResourceSample

log = logging.getLogger("plexilab.providers.vmsampler")

STEPS = ("converged", "loaded", "p2p", "end")


class Sampled(Protocol):
    """A machine the sampler can ask (:class:`plexilab.infra.machine.Machine`)."""

    @property
    def name(self) -> str: ...

    def resources(self) -> ResourceSample: ...


@dataclass(frozen=True)
class VmSample:
    tag: str
    time: float
    vcpu_s: float
    cpu_s: float
    rss_bytes: int


class VmSampler:
    """QMP resource samples of every guest: at named steps and every *interval* s."""

    def __init__(self, machines: Sequence[Sampled], interval: float = 2.0) -> None:
        self.machines = list(machines)
        self.interval = interval
        self.samples: dict[str, list[VmSample]] = {m.name: [] for m in machines}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self, tag: str) -> None:
        for m in self.machines:
            try:
                res = m.resources()
            except Exception as exc:  # a guest going away must not stop the run
                log.debug("resource sample of %s failed: %r", m.name, exc)
                continue
            with self._lock:
                self.samples[m.name].append(
                    VmSample(
                        tag,
                        res.time,
                        sum(res.vcpu_seconds),
                        res.process_cpu_seconds,
                        res.rss_bytes,
                    )
                )

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample("tick")

    def start(self) -> VmSampler:
        self.sample("start")
        self._thread = threading.Thread(target=self._loop, name="vm-sampler")
        self._thread.daemon = True
        self._thread.start()
        return self

    def on_step(self, step: str) -> None:
        if step in STEPS:
            self.sample(step)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def summary(self, name: str) -> dict[str, Any]:
        """Figures of one guest (MiB, CPU seconds).

        ``load_*`` cover the workload: from convergence to the end of the chat
        load, or (P2P scenario alone) to the end of the relays.
        """
        with self._lock:
            samples = list(self.samples.get(name, []))
        if not samples:
            return {}
        tagged = {s.tag: s for s in samples}
        last = samples[-1]
        out: dict[str, Any] = {
            "samples": len(samples),
            "vcpu_s": round(last.vcpu_s, 2),
            "qemu_cpu_s": round(last.cpu_s, 2),
            "rss_mib_max": round(max(s.rss_bytes for s in samples) / 2**20, 1),
        }
        a, b = tagged.get("converged"), tagged.get("loaded", tagged.get("p2p"))
        if a is not None and b is not None and b.time > a.time:
            wall = b.time - a.time
            out.update(
                rss_mib_before_load=round(a.rss_bytes / 2**20, 1),
                rss_mib_after_load=round(b.rss_bytes / 2**20, 1),
                load_vcpu_s=round(b.vcpu_s - a.vcpu_s, 2),
                load_qemu_cpu_s=round(b.cpu_s - a.cpu_s, 2),
                load_vcpu_util=round((b.vcpu_s - a.vcpu_s) / wall, 3),
            )
        return out
