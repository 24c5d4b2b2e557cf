"""PlexiChat's HTTP and WebSocket API (FastAPI, served by uvicorn): docs/http-api.md.

An ASGI app that translates HTTP requests into the node's own binary
operations (docs/protocol.md): a POST is one SEND to the node it runs
next to (which forwards it to the channel's owner), a GET one FETCH and
a WebSocket one SUBSCRIBE at the channel's owner.  Forwarding, ownership,
replication and ordering stay in the node.

Needs the ``api`` extra (``pip install plexichat[api]``); the node imports
this package only when it runs with ``--http-listen``.

* :mod:`plexichat.api.app`: :func:`create_app`, the routes;
* :mod:`plexichat.api.gateway`: pooled links to the nodes, routing reads;
* :mod:`plexichat.api.models`: request and response bodies;
* :mod:`plexichat.api.metrics`: the Prometheus metrics;
* :mod:`plexichat.api.server`: uvicorn inside the node's event loop.
"""

from __future__ import annotations

from plexichat.api.app import ApiSettings, create_app
from plexichat.api.gateway import Gateway, NodeRoutes, StaticRoutes

__all__ = ["ApiSettings", "Gateway", "NodeRoutes", "StaticRoutes", "create_app"]
