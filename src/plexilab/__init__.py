"""PlexiChat lab: host-side tooling (hosts, guests, wheels, clusters, reports).

Never shipped into guests; nothing in ``plexichat`` imports it.
"""
