"""Backend Redis: connections, the per-node link (shared pipelines and a dedicated pool),
and the router sessions talk to."""

from proxy.backend.connection import (
    BackendConnection,
    BackendUnavailable,
    auth_command,
    open_connection,
)
from proxy.backend.router import Router, StandaloneRouter, make_router

__all__ = ["BackendConnection", "BackendUnavailable", "Router", "StandaloneRouter",
           "auth_command", "make_router", "open_connection"]
