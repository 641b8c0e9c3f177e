"""phiproxy: a Redis proxy for Protected Health Information."""

__version__ = "0.1.0"
