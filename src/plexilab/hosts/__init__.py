"""Host providers: local processes, QEMU guests, SSH inventories, containers."""

from plexilab.hosts.base import CommandResult, Endpoint, Host, HostError, Process

__all__ = ["CommandResult", "Endpoint", "Host", "HostError", "Process"]
