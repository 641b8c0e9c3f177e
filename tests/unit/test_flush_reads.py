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
