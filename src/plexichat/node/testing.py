"""In-process clusters for tests and experiments (all nodes in one event loop).

The nodes of one cluster share a :class:`ManualClock` by default: leases,
fences and suspicion timeouts move only when the test advances that clock
(:meth:`InProcessCluster.wait_dead` does it for a failure to be detected), so
a stall of the shared event loop on a busy machine cannot change a verdict.
Probes, timeouts of calls and handoff delays still run on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plexichat.load.client import NodeClient
from plexichat.node.auth import Credentials, write_secret
from plexichat.node.membership import Clock, GossipConfig, ManualClock
from plexichat.node.server import Node, NodeConfig

FAST_GOSSIP = GossipConfig(interval=0.05, ping_timeout=0.1, suspect_timeout=0.6)
FAST_HANDOFF = 0.1


async def wait_for(
    predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> float:
    """Poll *predicate* every few ms; return the seconds taken or raise TimeoutError."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


class InProcessCluster:
    """N nodes on 127.0.0.1 ports chosen by the OS, seeded through each other."""

    def __init__(
        self,
        base_dir: Path,
        size: int = 3,
        *,
        replicas: int = 2,
        gossip: GossipConfig | None = None,
        clock: Clock | None = None,
        secret: bytes | None = None,
        **node_options: Any,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.secret = secret or Credentials.generate()[1]
        self.credentials = Credentials(self.secret)
        self.clock: Clock = ManualClock() if clock is None else clock
        self.size = size
        self.replicas = replicas
        self.gossip = gossip or FAST_GOSSIP
        self.node_options = node_options
        self.nodes: list[Node] = []
        self._next = 0

    def config(self, node_id: str, port: int = 0) -> NodeConfig:
        seeds = [("127.0.0.1", n.listen_port) for n in self.nodes if not n._stopping]
        options = {
            "handoff_delay": FAST_HANDOFF,
            "credentials": self.credentials,
            **self.node_options,
        }
        return NodeConfig(
            node_id=node_id,
            data_dir=self.base_dir / node_id,
            listen_port=port,
            seeds=seeds,
            replicas=self.replicas,
            gossip=self.gossip,
            **options,
        )

    async def add_node(self, node_id: str | None = None, port: int = 0) -> Node:
        """Start one more node (seeded with every running node)."""
        if node_id is None:
            node_id = f"n{self._next}"
            self._next += 1
        node = Node(self.config(node_id, port), clock=self.clock)
        await node.start()
        self.nodes.append(node)
        return node

    async def start(self) -> InProcessCluster:
        for _ in range(self.size):
            await self.add_node()
        await self.wait_converged()
        return self

    def running(self) -> list[Node]:
        return [n for n in self.nodes if not n._stopping]

    async def wait_converged(self, timeout: float = 10.0) -> float:
        """Wait until every running node's ring is the running nodes, handoffs done."""
        ids = {n.id for n in self.running()}
        return await wait_for(
            lambda: all(
                set(n.ring_members) == ids and n.settled for n in self.running()
            ),
            timeout,
            f"convergence on {sorted(ids)}",
        )

    def advance(self, seconds: float) -> None:
        """Move the shared clock (only a :class:`ManualClock` can be moved)."""
        if not isinstance(self.clock, ManualClock):
            raise TypeError("this cluster runs on a real clock")
        self.clock.advance(seconds)

    async def wait_dead(self, node_id: str, timeout: float = 10.0) -> float:
        """Wait until every running node holds *node_id* dead.

        On a manual clock the suspicion timeout passes once every running
        node suspects it (the probes on the event loop find that out).
        """
        start = time.monotonic()

        def status(node: Node) -> str | None:
            member = node.membership.members.get(node_id) if node.membership else None
            return None if member is None else member.status

        def statuses() -> set[str | None]:
            return {status(n) for n in self.running()}

        if isinstance(self.clock, ManualClock):
            await wait_for(
                lambda: statuses() <= {"suspect", "dead"},
                timeout,
                f"suspicion of {node_id}",
            )
            self.clock.advance(self.gossip.suspect_timeout)
        await wait_for(lambda: statuses() == {"dead"}, timeout, f"{node_id} dead")
        await self.wait_leases(timeout)
        return time.monotonic() - start

    async def wait_leases(self, timeout: float = 10.0) -> float:
        """Wait until every running node with peers holds its lease: after the
        clock was moved past the lease, the keepers renew it with fresh
        answers (until then a write would be refused as "lease lapsed")."""
        return await wait_for(
            lambda: all(
                n.lease_valid() for n in self.running() if len(n.ring_members) > 1
            ),
            timeout,
            "leases renewed",
        )

    def secret_file(self) -> Path:
        """The cluster secret in a file (as the lab's tools take it)."""
        path = self.base_dir / "cluster.secret"
        if not path.exists():
            write_secret(path, self.secret)
        return path

    def token(self, sender: int = 1, *, admin: bool = False) -> str:
        """A client token of this cluster for *sender*."""
        return self.credentials.token(sender, admin=admin)

    def client(
        self, node: Node | str, sender: int = 1, *, admin: bool = False
    ) -> NodeClient:
        """A (not yet connected) client of *node*, authenticated as *sender*."""
        target = self.node(node) if isinstance(node, str) else node
        return NodeClient(
            "127.0.0.1", target.listen_port, token=self.token(sender, admin=admin)
        )

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id and not n._stopping)

    def owners(self, channel: int) -> tuple[str, ...]:
        owners = self.running()[0].owners(channel)
        assert owners is not None
        return owners

    async def stop_node(self, node_id: str, *, leave: bool = True) -> None:
        await self.node(node_id).stop(leave=leave)

    async def close(self) -> None:
        for node in self.running():
            await node.stop(leave=False)

    async def __aenter__(self) -> InProcessCluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def admin_client(node: Node, *, timeout: float = 5.0) -> NodeClient:
    """A (not yet connected) admin client of in-process *node* (may send as
    any sender)."""
    creds = node.credentials
    token = None if creds is None else creds.token(1, admin=True)
    return NodeClient("127.0.0.1", node.listen_port, timeout=timeout, token=token)
