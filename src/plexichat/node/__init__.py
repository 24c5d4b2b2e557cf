"""The PlexiChat node: asyncio server, SWIM membership, replicated SQLite storage.

``plexichat-node --help`` runs one; :class:`Node` embeds one in a program.
"""

from plexichat.node.membership import GossipConfig
from plexichat.node.server import Node, NodeConfig, parse_address

__all__ = ["GossipConfig", "Node", "NodeConfig", "parse_address"]
