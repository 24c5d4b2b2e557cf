"""PlexiChat: an async chat node with compiled hot paths."""

__version__ = "0.1.0"
