"""What `[audit] path` names: standard output, a syslog collector, or a file."""

from __future__ import annotations

from urllib.parse import urlsplit

SYSLOG_TCP = "syslog+tcp://"
SYSLOG_FACILITIES = {"auth": 4, "authpriv": 10, "local0": 16, "local1": 17, "local2": 18,
                     "local3": 19, "local4": 20, "local5": 21, "local6": 22, "local7": 23}


def is_syslog(path: str) -> bool:
    return "://" in path


def parse_syslog_url(url: str) -> tuple[str, int]:
    """(host, port) of "syslog+tcp://host:port"; ValueError saying what is wrong."""
    if not url.startswith(SYSLOG_TCP):
        scheme = url.split("://", 1)[0]
        raise ValueError(f'"{scheme}://" is not supported; use "{SYSLOG_TCP}host:port" '
                         "(RFC 5424 over TCP, octet counting) or a file path")
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise ValueError(f"is not host:port ({e}); e.g. {SYSLOG_TCP}127.0.0.1:6514") from None
    if parts.username is not None or parts.password is not None:
        # Secrets are never inline in the configuration (and this one would be sent
        # nowhere: the sink does not authenticate). Never echo it back.
        raise ValueError("must not carry a user or password (user:password@); the syslog "
                         f"sink sends none; e.g. {SYSLOG_TCP}127.0.0.1:6514")
    if not host or port is None or port == 0 or parts.path not in ("", "/") or parts.query \
            or parts.fragment or "%" in parts.netloc:
        raise ValueError(f"needs a host and a port and nothing else; e.g. "
                         f"{SYSLOG_TCP}127.0.0.1:6514")
    return host, port
