"""ServerState.flush_reads: one audit write for every read queued in a loop iteration, and
one broken session never stalls the others."""

from __future__ import annotations

from pathlib import Path

from proxy.config import load_config
from proxy.policy.loader import compile_policy
from proxy.server import ServerState
from tests.helpers import PKI, free_port, write_proxy_config


class FakeBatch:
    def __init__(self, records: list[bytes]) -> None:
        self.records = records


class FakeSession:
    """Stands in for Session's side of the protocol (run_queued / finish_queued / abort)."""

    def __init__(self, name: str, records: list[bytes], fail_in: str = "") -> None:
        self.src = name
        self.records = records
        self.fail_in = fail_in
        self.finished: list[tuple[int, bool]] = []
        self.aborted = False

    def run_queued(self) -> list[FakeBatch]:
        if self.fail_in == "run":
            raise RuntimeError("bug while deciding")
        return [FakeBatch(self.records)]

    def finish_queued(self, batches: list[FakeBatch], ok: bool) -> None:
        if self.fail_in == "finish":
            raise RuntimeError("bug while forwarding")
        self.finished.append((len(batches), ok))

    def abort(self) -> None:
        self.aborted = True


def make_state(pki: PKI, tmp_path: Path) -> ServerState:
    config = load_config(write_proxy_config(pki, tmp_path, free_port(), free_port()))
    decide, roles = compile_policy(config)
    state = ServerState(config, decide, roles)
    state.audit.open()  # no running loop: writes go straight to the file
    return state


def body(n: int) -> bytes:
    return b'"event":"command","n":%d' % n


def test_every_queued_read_shares_one_write(pki: PKI, tmp_path: Path) -> None:
    state = make_state(pki, tmp_path)
    sessions = [FakeSession(f"s{i}", [body(i), body(i + 10)]) for i in range(3)]
    state._reads_due = list(sessions)
    before = state.audit.stats.batches
    state.flush_reads()
    assert state.audit.stats.batches == before + 1  # one write for all six records
    assert all(s.finished == [(1, True)] for s in sessions)
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [line.split('"n":')[1].split(",")[0] for line in lines[-6:]] == \
        ["0", "10", "1", "11", "2", "12"]  # in queue order
    assert state._reads_due is None
    state.audit.close()


def test_a_broken_session_is_closed_and_the_others_still_forward(pki: PKI,
                                                                 tmp_path: Path) -> None:
    state = make_state(pki, tmp_path)
    good1, bad_run, bad_finish, good2 = (FakeSession("a", [body(1)]),
                                         FakeSession("b", [body(2)], fail_in="run"),
                                         FakeSession("c", [body(3)], fail_in="finish"),
                                         FakeSession("d", [body(4)]))
    state._reads_due = [good1, bad_run, bad_finish, good2]
    state.flush_reads()
    assert good1.finished == [(1, True)] and good2.finished == [(1, True)]
    assert bad_run.aborted and bad_finish.aborted and not good1.aborted
    text = (tmp_path / "audit.jsonl").read_text()
    assert '"n":2' not in text  # the session that failed to decide wrote nothing
    assert '"n":1' in text and '"n":3' in text and '"n":4' in text
    state.audit.close()


def test_a_failed_write_is_reported_to_every_session(pki: PKI, tmp_path: Path) -> None:
    state = make_state(pki, tmp_path)
    state.audit.close()  # a closed writer refuses every write
    sessions = [FakeSession("a", [body(1)]), FakeSession("b", [body(2)])]
    state._reads_due = list(sessions)
    state.flush_reads()
    assert [s.finished for s in sessions] == [[(1, False)], [(1, False)]]


# --- a real Session, batched by a running loop (null transports stand in for the sockets)


class RecordingTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class RecordingBackend:
    closed = False

    def __init__(self) -> None:
        self.transport = RecordingTransport()

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True


def make_session(state: ServerState):
    from datetime import UTC, datetime, timedelta

    from proxy.identity import Identity
    from proxy.session import Session

    now = datetime.now(UTC)
    identity = Identity(subject="CN=app-writer", cn="app-writer", ous=(), san_dns=(),
                        san_uris=(), san_emails=(), fingerprint="ab" * 32, serial=1,
                        not_after=now + timedelta(days=1), not_before=now)
    session = Session(state, "127.0.0.1:5000", identity, "writer", state.roles["writer"],
                      state.metrics.command_counter("writer"))
    session.transport = RecordingTransport()  # type: ignore[assignment]
    session.backend = RecordingBackend()  # type: ignore[assignment]
    return session


async def test_reads_wait_for_the_iteration_end_and_keep_their_order(pki: PKI,
                                                                     tmp_path: Path) -> None:
    """A read is decided after the loop iteration's I/O; a protocol error in a later read
    of the same iteration is answered after the replies owed to the earlier one."""
    import asyncio

    config = load_config(write_proxy_config(pki, tmp_path, free_port(), free_port()))
    decide, roles = compile_policy(config)
    state = ServerState(config, decide, roles)
    state.audit.open()  # inside the running loop: reads are batched per iteration
    session = make_session(state)
    get = b"*2\r\n$3\r\nGET\r\n$9\r\napp:phi:a\r\n"
    session.data_received(get)
    session.data_received(b"*1\r\n*1\r\n")  # malformed (nested array), same iteration
    assert session.backend.transport.written == b""  # nothing before the audit write
    assert session.transport.written == b""
    await asyncio.sleep(0)  # the iteration ends: flush_reads runs
    assert session.backend.transport.written == get  # forwarded as read (verbatim)
    assert session.transport.written == b""  # the error waits behind GET's reply
    assert not session.transport.closed
    session.backend_data(b"$1\r\nx\r\n")
    assert session.transport.written == \
        b"$1\r\nx\r\n-ERR Protocol error: expected '$', got '*'\r\n"
    assert session.transport.closed
    trail = (tmp_path / "audit.jsonl").read_text()
    assert '"event":"command"' in trail and '"keys":["app:phi:a"]' in trail
    state.audit.close()
