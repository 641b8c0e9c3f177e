"""The audit trail (SPEC §6): record bodies, HMAC chain, writer and sinks, verify.

Import from the modules (proxy.audit.writer.AuditWriter ...); the names below are loaded
lazily so that importing proxy.audit.target from the configuration stays cheap.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "AuditWriter": "proxy.audit.writer",
    "AuditStats": "proxy.audit.writer",
    "AuditRecords": "proxy.audit.record",
    "ConnectionRecords": "proxy.audit.record",
    "AuditError": "proxy.audit.chain",
    "load_key": "proxy.audit.chain",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(module), name)
