"""SIGHUP: re-read certificates, CA, CRL, roles and identity rules without dropping valid
connections.

Everything is validated first (exactly as `run` loads it); on any error the proxy keeps
serving on the old configuration and the failure is audited. On success new connections use
the new material at once, and every live session is re-evaluated: revoked, no longer issued
by a trusted CA, no longer mapped to a role, or over its role's max_cert_validity_h -> closed
(audited with the reason); role changed -> the new rules apply from its next command.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from proxy import heap
from proxy.clientcert import ClientCertChecks
from proxy.config import Config, ConfigError
from proxy.identity import map_role
from proxy.metrics import identity_label
from proxy.startup import load_everything
from proxy.tls import TLSConfigError, backend_context, listener_context

if TYPE_CHECKING:
    from proxy.commands.table import CommandTable
    from proxy.server import ServerState
    from proxy.session import Session

log = logging.getLogger("phiproxy.reload")

EXPIRY_WARNING = timedelta(days=14)


def expiry_warnings(config: Config, now: datetime | None = None) -> list[str]:
    """Certificates of the configuration that expire within 14 days (or already have)."""
    now = now or datetime.now(UTC)
    warnings = []
    for label, path in (("[listener] cert", config.listener.cert),
                        ("[listener] client_ca", config.listener.client_ca),
                        ("[backend] cert", config.backend.cert),
                        ("[backend] ca", config.backend.ca)):
        if path is None:  # a unix-socket backend has no TLS material
            continue
        try:
            certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
        except (OSError, ValueError):
            continue  # load_everything reports unreadable material
        for cert in certs:
            left = cert.not_valid_after_utc - now
            if left < EXPIRY_WARNING:
                state = "expired" if left.total_seconds() < 0 else f"expires in {left.days} days"
                warnings.append(f"{label} {path}: certificate {cert.subject.rfc4514_string()} "
                                f"{state} ({cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)")
    return warnings


def _revoked_serials(checks: ClientCertChecks) -> set[int]:
    """Serials revoked by any CRL of the file (new connections are checked per issuer)."""
    return {entry.serial_number for crl in checks.crls or () for entry in crl}


def _trusted_issuers(config: Config) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(Path(config.listener.client_ca).read_bytes())


def _issued_by_any(der: bytes, cas: list[x509.Certificate]) -> bool:
    cert = x509.load_der_x509_certificate(der)
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            return True
        except (ValueError, TypeError, x509.InvalidSignature):
            continue
    return False


def _keep_fixed(old: Config, new: Config) -> tuple[Config, list[str]]:
    """Sockets and the audit trail are bound at start: changes there need a restart."""
    notes = []
    if (old.listener.address, old.listener.port) != (new.listener.address, new.listener.port):
        notes.append("[listener] address/port change needs a restart; kept "
                     f"{old.listener.address}:{old.listener.port}")
    if old.audit != new.audit:
        notes.append("[audit] changes need a restart; kept the running audit settings")
    if old.metrics != new.metrics:
        notes.append("[metrics] changes need a restart; kept the running endpoint")
    listener = dataclasses.replace(new.listener, address=old.listener.address,
                                   port=old.listener.port)
    return dataclasses.replace(new, listener=listener, audit=old.audit,
                               metrics=old.metrics), notes


def reload(state: ServerState) -> bool:
    """Reload from the configuration file; True when the new configuration is in force."""
    old = state.config
    try:
        new, decide, roles = load_everything(old.path, running_table(state))
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused, still serving the previous configuration: %s", problem)
        state.audit.write_one(state.audit.records.reload(
            ok=False, reason="; ".join(exc.problems)[:2000]))
        state.metrics.reloaded(ok=False)
        return False
    new, notes = _keep_fixed(old, new)
    try:
        cert_checks = ClientCertChecks.load(new.listener.crl)
        revoked = _revoked_serials(cert_checks)
        issuers = _trusted_issuers(new)
        listener_ssl = listener_context(new.listener)
    except (OSError, ValueError, TLSConfigError) as exc:  # validated above; a file changed
        log.error("reload refused: %s", exc)
        state.audit.write_one(state.audit.records.reload(ok=False, reason=str(exc)))
        return False

    changes = list(notes)
    added = sorted(set(roles) - set(state.roles))
    removed = sorted(set(state.roles) - set(roles))
    if added:
        changes.append(f"roles added: {', '.join(added)}")
    if removed:
        changes.append(f"roles removed: {', '.join(removed)}")
    for label, before, after in (("server certificate", old.listener.cert, new.listener.cert),
                                 ("client CA", old.listener.client_ca, new.listener.client_ca),
                                 ("CRL", old.listener.crl, new.listener.crl)):
        changes.append(f"{label} reloaded from {after}" if before == after
                       else f"{label} replaced: {before} -> {after}")
    if new.listener.x509_strict != old.listener.x509_strict:
        changes.append(f"[listener] x509_strict = {str(new.listener.x509_strict).lower()}: "
                       "new connections use it, live sessions are kept")
    changes.extend(_protection_changes(old, new))
    if new.backend != old.backend:
        _reconfigure_backend(state, new)
        changes.append("backend settings changed: new connections use them")

    state.config = new
    state.decide = decide
    state.roles = roles
    state.cipher = new.encryption.cipher  # with state.config: rules and keyring together
    state.listener_ssl = listener_ssl  # x509_strict too: new handshakes use it
    state.cert_checks = cert_checks
    state.networks = new.listener.allow_networks
    state.apply_to_sessions(new)
    state.metrics.set_server_cert(new.listener.cert)
    state.metrics.set_client_ca(new.listener.client_ca)

    closed = 0
    for session in list(state.sessions):
        reason = _reevaluate(state, session, revoked, issuers)
        if reason is not None:
            closed += 1
            log.warning("reload: closing %s (%s): %s", session.src,
                        session.identity.subject, reason)
            session.close_for(reason)
    changes.append(f"sessions re-evaluated: {len(state.sessions)} kept, {closed} closed")
    warnings = expiry_warnings(new)
    for warning in warnings:
        log.warning("%s", warning)
    summary = "; ".join(changes + warnings)
    log.info("reload done: %s", summary)
    state.audit.write_one(state.audit.records.reload(ok=True, reason=summary[:4000]))
    state.metrics.reloaded(ok=True, sessions_closed=closed)
    # The old roles and table are garbage now; the new ones live until the next reload.
    log.debug("heap settled in %.1f ms", heap.settle() * 1000)
    return True


def _protection_changes(old: Config, new: Config) -> list[str]:
    """What the reload record says about [[protect]] and the keyring (never key material)."""
    changes = []
    before, after = old.protection.rules, new.protection.rules
    if before != after:
        changes.append(f"[[protect]] rules: {len(before)} -> {len(after)}")
    cipher = new.encryption.cipher
    if cipher is not None:
        previous = old.encryption.cipher
        note = "" if previous is None or previous.primary == cipher.primary else \
            f" (was {previous.primary})"
        changes.append(f"keyring reloaded from {new.encryption.keyring}: primary "
                       f"{cipher.primary}{note}, {len(cipher.key_ids)} keys")
    return changes


def running_table(state: ServerState) -> CommandTable | None:
    """The command table the live roles were compiled against (None: no roles yet).

    With learn_commands it is a copy of the shipped table extended with the backend's
    commands; the shipped `default_table()` never gets them, so a reload that compiled
    against it would turn every learned command back into an unknown (refused) one.
    """
    role = next(iter(state.roles.values()), None)
    return None if role is None else role.table


def _reconfigure_backend(state: ServerState, new: Config) -> None:
    """New backend settings: every new connection uses them; shared ones are replaced
    once they have answered what is in flight."""
    state.router.reconfigure(new.backend, backend_context(new.backend))


def _reevaluate(state: ServerState, session: Session, revoked: set[int],
                issuers: list[x509.Certificate]) -> str | None:
    """Why this live session may not go on under the new configuration, or None."""
    identity = session.identity
    if identity.serial in revoked:
        return "certificate revoked (new CRL)"
    if session.peer_der is not None and not _issued_by_any(session.peer_der, issuers):
        return "certificate no longer issued by a trusted client CA"
    mapped = map_role(state.config.identities, identity)
    if mapped is None or mapped[0] not in state.roles:
        return "identity no longer maps to a role"
    role_name, rule_index = mapped
    problem = state.certificate_problem(identity, role_name)
    if problem is not None:
        return problem
    audit_conn = session.audit_conn if role_name == session.role_name else \
        state.audit.records.connection(session.conn_id, session.src, identity, role_name)
    session.set_role(role_name, state.roles[role_name], state.decide,
                     state.metrics.command_counter(
                         role_name, identity_label(state.config.identities[rule_index])),
                     audit_conn)
    return None
