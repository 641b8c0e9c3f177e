"""AuditWriter: restart, rotation, fail-closed and recovery, torn tails, stdout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from proxy.audit import sinks
from proxy.audit.chain import AuditError
from proxy.audit.verify import Broken, verify
from proxy.audit.writer import AuditWriter
from proxy.config import AuditConfig

KEY = os.urandom(32)


def writer_for(path: Path | str, key: bytes = KEY, **config: object) -> AuditWriter:
    writer = AuditWriter(AuditConfig(path=str(path), **config), key=key,  # type: ignore[arg-type]
                         check_interval_s=0)
    writer.open()
    return writer


def batch(writer: AuditWriter, n: int = 3, tag: str = "k") -> list[bytes]:
    conn = writer.records.connection(5, "127.0.0.1:1", None, "writer")
    return [conn.command("get", [f"app:phi:{tag}:{i}".encode()], 0) for i in range(n)]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def test_restart_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"  # the directory is created
    first = writer_for(path)
    assert first.write(batch(first)) and first.write_one(first.records.stop(reason="x"))
    first.close()
    second = writer_for(path)
    assert second.seq == 4 and second.recovery is None
    assert second.write(batch(second))
    second.close()
    seqs = [r["seq"] for r in records(path)]
    assert seqs == list(range(1, 8))
    assert verify([str(path)], KEY).records == 7
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"


def test_rotation_keeps_the_chain_across_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writer = writer_for(path, max_bytes=2000, keep=3)
    for i in range(30):
        assert writer.write(batch(writer, 2, tag=str(i)))
    assert writer.stats.rotations >= 4
    writer.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3",
                     "audit.jsonl.head"]
    for p in tmp_path.glob("audit.jsonl*"):
        assert p.name.endswith(".head") or p.stat().st_size <= 2000
    newest_rotated, current = records(Path(f"{path}.1")), records(path)
    assert current[0]["prev"] == newest_rotated[-1]["mac"]
    assert current[0]["seq"] == newest_rotated[-1]["seq"] + 1
    report = verify([str(path)], KEY)
    assert report.last_seq == 60 and report.first_seq > 1  # the oldest files were dropped
    restarted = writer_for(path, max_bytes=2000, keep=3)
    assert restarted.seq == 60
    restarted.close()


def test_restart_with_an_empty_current_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writer = writer_for(path, max_bytes=100_000)
    for i in range(10):
        writer.write(batch(writer, 2, tag=str(i)))
    writer.close()
    os.replace(path, f"{path}.1")  # what a crash between a rotation and the next write leaves
    path.touch()
    again = writer_for(path, max_bytes=100_000)
    assert again.seq == 20
    assert again.write(batch(again))
    again.close()
    assert records(path)[0]["seq"] == 21
    assert verify([str(path)], KEY).last_seq == 23


def test_dev_full_fails_closed(tmp_path: Path) -> None:
    writer = writer_for("/dev/full")
    assert not writer.write(batch(writer))
    assert writer.seq == 0 and writer.stats.failures == 1 and writer.stats.records == 0
    assert not Path("/dev/full.head").exists()
    writer.close()


def test_failed_writes_do_not_move_the_chain_and_it_recovers(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writer = writer_for(path)
    assert writer.write(batch(writer, tag="a"))
    fd = writer.sink._fd
    assert fd is not None
    saved = os.dup(fd)
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, fd)  # the disk is full
    seq, mac = writer.seq, writer.mac
    assert not writer.write(batch(writer, tag="lost"))
    assert not writer.write(batch(writer, tag="lost"))
    assert (writer.seq, writer.mac) == (seq, mac) and writer.stats.failures == 2
    os.dup2(saved, fd)  # space again: the very next write goes through
    os.close(saved)
    os.close(full)
    assert writer.write(batch(writer, tag="b"))
    writer.close()
    got = records(path)
    assert [r["seq"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert not any("lost" in key for r in got for key in r["keys"])
    assert verify([str(path)], KEY).records == 6


def test_short_write_is_cut_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    writer = writer_for(path)
    assert writer.write(batch(writer))
    size = path.stat().st_size
    monkeypatch.setattr(sinks, "_os_write", lambda fd, data: os.write(fd, data[:50]))
    assert not writer.write(batch(writer, tag="torn"))
    assert path.stat().st_size == size  # the torn half batch is gone again
    monkeypatch.setattr(sinks, "_os_write", os.write)
    assert writer.write(batch(writer))
    writer.close()
    assert verify([str(path)], KEY).records == 6


def test_directory_replaced_then_restored(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    path = directory / "audit.jsonl"
    writer = writer_for(path)
    assert writer.write(batch(writer))
    directory.rename(tmp_path / "moved")
    (tmp_path / "audit").write_text("not a directory")
    assert not writer.write(batch(writer, tag="lost"))
    (tmp_path / "audit").unlink()
    (tmp_path / "moved").rename(directory)
    assert writer.write(batch(writer))
    writer.close()
    assert verify([str(path)], KEY).records == 6


def test_deleted_trail_is_reopened_and_the_gap_shows(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writer = writer_for(path)
    assert writer.write(batch(writer))
    path.unlink()
    assert writer.write(batch(writer))  # a new file: the chain goes on
    writer.close()
    assert records(path)[0]["seq"] == 4
    with pytest.raises(Broken) as caught:
        verify([str(path)], KEY)
    assert "missing file in series" in caught.value.problem


def test_torn_tail_is_set_aside_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writer = writer_for(path)
    writer.write(batch(writer))
    writer.close()
    fragment = b'{"ts":"2026-11-29T10:00:00.000000Z","seq":4,"event":"comm'
    with open(path, "ab") as f:  # a crash in the middle of a write
        f.write(fragment)
    with pytest.raises(Broken) as caught:
        verify([str(path)], KEY)
    assert "torn last line" in caught.value.problem
    again = writer_for(path)
    assert again.recovery and "torn" in again.recovery
    again.write(batch(again))
    again.close()
    assert Path(f"{path}.torn-4").read_bytes() == fragment
    got = records(path)
    assert got[3]["event"] == "recovered" and got[3]["seq"] == 4
    assert got[3]["torn_bytes"] == len(fragment) and got[3]["torn_file"] == "audit.jsonl.torn-4"
    assert verify([str(path)], KEY).records == 7


@pytest.mark.parametrize("tamper", ["truncated", "cut_mid_record", "head_missing",
                                    "head_altered", "wrong_key"])
def test_open_refuses_what_a_crash_cannot_explain(tmp_path: Path, tamper: str) -> None:
    path = tmp_path / "audit.jsonl"
    head = Path(f"{path}.head")
    writer = writer_for(path)
    writer.write(batch(writer))
    writer.close()
    key = KEY
    if tamper == "truncated":
        path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:-1]))
    elif tamper == "cut_mid_record":  # looks like a torn write, but the head knows better
        path.write_bytes(path.read_bytes()[:-40])
    elif tamper == "head_missing":
        head.unlink()
    elif tamper == "head_altered":
        head.write_bytes(head.read_bytes().replace(b'"seq":3', b'"seq":2'))
    else:
        key = os.urandom(32)
    with pytest.raises(AuditError) as caught:
        writer_for(path, key=key)
    message = str(caught.value)
    assert "phiproxy audit verify" in message and str(path) in message


def test_head_behind_the_trail_is_a_crash_artifact(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    head = Path(f"{path}.head")
    writer = writer_for(path)
    writer.write(batch(writer))
    older = head.read_bytes()
    writer.write(batch(writer))
    writer.close()
    head.write_bytes(older)  # the process died between the write and the head update
    report = verify([str(path)], KEY)
    assert report.records == 6 and any("behind" in note for note in report.notes)
    again = writer_for(path)
    assert again.seq == 6
    again.close()


def test_stdout_with_head_file_continues_across_restarts(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    head = tmp_path / "stdout.head"
    for _ in range(2):
        writer = writer_for("-", head_file=str(head))
        assert writer.write(batch(writer))
        writer.close()
    out = capfd.readouterr().out
    copy = tmp_path / "collected.log"
    copy.write_text(out)
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [1, 2, 3, 4, 5, 6]
    assert verify([str(copy)], KEY, no_head=True).records == 6
    assert verify([str(copy)], KEY, head_file=str(head)).records == 6


def test_closed_writer_refuses(tmp_path: Path) -> None:
    writer = writer_for(tmp_path / "audit.jsonl")
    writer.close()
    assert not writer.write(batch(writer)) and writer.stats.failures == 1
    assert writer.write([])  # nothing to write is not a failure


def test_no_key_file_is_a_clear_error() -> None:
    with pytest.raises(AuditError) as caught:
        AuditWriter(AuditConfig(path="-"))
    assert "key_file" in str(caught.value)


def test_a_second_process_on_the_same_trail_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = writer_for(path)
    with pytest.raises(AuditError) as caught:
        writer_for(path)
    assert "another process" in str(caught.value) and f"{path}.head" in str(caught.value)
    assert first.write(batch(first))
    first.close()
    writer_for(path).close()  # free again once closed
