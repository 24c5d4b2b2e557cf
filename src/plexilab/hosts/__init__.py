"""Host providers: local processes now; QEMU guests, SSH inventories and containers plug in."""

from plexilab.hosts.base import CommandResult, Endpoint, Host, HostError, Process

__all__ = ["CommandResult", "Endpoint", "Host", "HostError", "Process"]
