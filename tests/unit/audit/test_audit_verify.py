"""The HMAC chain and `phiproxy audit verify`: every kind of tampering names its record."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from proxy.audit.chain import GENESIS, AuditError, Mac, load_key, split_line
from proxy.audit.verify import Broken, UsageError, verify
from proxy.audit.writer import AuditWriter
from proxy.cli import main as cli_main
from proxy.config import AuditConfig

KEY = b"k" * 16 + os.urandom(16)


def make_trail(directory: Path, batches: int = 4, per_batch: int = 3, max_bytes: int = 0,
               keep: int = 10) -> Path:
    path = directory / "audit.jsonl"
    writer = AuditWriter(AuditConfig(path=str(path), max_bytes=max_bytes, keep=keep), key=KEY)
    writer.open()
    conn = writer.records.connection(1, "127.0.0.1:4000", None, "writer")
    for b in range(batches):
        assert writer.write([conn.command("set", [b"app:phi:%d:%d" % (b, i)], 0)
                             for i in range(per_batch)])
    writer.close()
    return path


def subdir(parent: Path, name: str) -> Path:
    (parent / name).mkdir()
    return parent / name


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def broken(*files: Path, **kw: object) -> Broken:
    with pytest.raises(Broken) as caught:
        verify([str(f) for f in files], KEY, **kw)  # type: ignore[arg-type]
    return caught.value


def test_untouched_trail_verifies(tmp_path: Path) -> None:
    path = make_trail(tmp_path)
    report = verify([str(path)], KEY)
    assert (report.records, report.first_seq, report.last_seq) == (12, 1, 12)


def test_mac_is_over_prev_and_exact_bytes(tmp_path: Path) -> None:
    first, second = lines(make_trail(tmp_path))[:2]
    before, mac = split_line(second)  # type: ignore[misc]
    prev = json.loads(second)["prev"].encode()
    assert prev == json.loads(first)["mac"].encode()
    assert Mac(KEY).record(prev, before) == mac
    assert json.loads(first)["prev"].encode() == GENESIS
    assert second.endswith(b',"mac":"' + mac + b'"}\n')


def rewrite(path: Path, new_lines: list[bytes]) -> None:
    path.write_bytes(b"".join(new_lines))


def test_edited_field(tmp_path: Path) -> None:
    path = make_trail(tmp_path)
    records = lines(path)
    records[4] = records[4].replace(b'"db":0', b'"db":1')
    rewrite(path, records)
    fault = broken(path)
    assert fault.where == f"{path}:5: seq 5" and "bad mac" in fault.problem


def test_deleted_record(tmp_path: Path) -> None:
    path = make_trail(tmp_path)
    records = lines(path)
    del records[4]
    rewrite(path, records)
    fault = broken(path)
    assert fault.where == f"{path}:5: seq 6" and "seq gap" in fault.problem


def test_reordered_records(tmp_path: Path) -> None:
    path = make_trail(tmp_path)
    records = lines(path)
    records[3], records[4] = records[4], records[3]
    rewrite(path, records)
    fault = broken(path)
    assert fault.where == f"{path}:4: seq 5" and "seq gap" in fault.problem


def test_inserted_forgery(tmp_path: Path) -> None:
    path = make_trail(tmp_path)
    records = lines(path)
    # a forger renumbers everything after it, but cannot compute MACs without the key
    doc = json.loads(records[2])
    doc.update(seq=4, prev=doc["mac"], keys=["app:phi:forged"], mac="0" * 64)
    forged = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
    rewrite(path, records[:3] + [forged] + records[3:])
    fault = broken(path)
    assert fault.where == f"{path}:4: seq 4" and "bad mac" in fault.problem


def test_duplicated_record(tmp_path: Path) -> None:
    path = make_trail(tmp_path)
    records = lines(path)
    rewrite(path, records[:6] + [records[5]] + records[6:])
    fault = broken(path)
    assert fault.where == f"{path}:7: seq 6" and "seq gap" in fault.problem


def test_truncated_tail_is_caught_by_the_head_file(tmp_path: Path) -> None:
    path = make_trail(tmp_path)
    rewrite(path, lines(path)[:-2])
    fault = broken(path)
    assert "truncated tail" in fault.problem and "ends at seq 10" in fault.problem
    assert "seq 12" in fault.problem and str(path) in fault.where


def test_torn_last_line(tmp_path: Path) -> None:
    path = make_trail(tmp_path)
    records = lines(path)
    rewrite(path, records[:-1] + [records[-1][:40]])
    fault = broken(path)
    assert fault.where == f"{path}:12" and "torn last line" in fault.problem


def test_head_file_missing_altered_or_replaced(tmp_path: Path) -> None:
    path = make_trail(tmp_path)
    head = Path(str(path) + ".head")
    saved = head.read_bytes()
    head.write_bytes(saved.replace(b'"seq":12', b'"seq":11'))
    assert "bad hmac" in broken(path).problem
    head.unlink()
    assert "head file missing" in broken(path).problem and "--no-head" in broken(path).problem
    assert verify([str(path)], KEY, no_head=True).records == 12
    head.write_bytes(saved)
    # the last record replaced by another valid one cannot happen without the key; a head
    # from another trail is caught by its mac
    other = make_trail(subdir(tmp_path, "other"))
    fault = broken(path, head_file=str(other) + ".head")
    assert "not the one the head file names" in fault.problem


def test_wrong_key(tmp_path: Path) -> None:
    path = make_trail(tmp_path)
    with pytest.raises(Broken) as caught:
        verify([str(path)], os.urandom(32))
    assert "bad hmac" in caught.value.problem  # the head is checked first


def rotated_trail(tmp_path: Path) -> Path:
    path = make_trail(tmp_path, batches=12, per_batch=2, max_bytes=1500, keep=20)
    assert Path(str(path) + ".4").exists()
    return path


def test_rotated_series_verifies_in_any_argument_order(tmp_path: Path) -> None:
    path = rotated_trail(tmp_path)
    everything = sorted(str(p) for p in tmp_path.glob("audit.jsonl*"))  # like a shell glob
    report = verify(everything, KEY)
    assert report.records == 24 and report.first_seq == 1 and report.last_seq == 24
    assert verify([str(path)], KEY).records == 24  # the siblings are discovered


def test_missing_middle_file(tmp_path: Path) -> None:
    path = rotated_trail(tmp_path)
    Path(str(path) + ".2").unlink()
    fault = broken(path)
    assert "missing file in series" in fault.problem and fault.where == str(path) + ".2"


def test_missing_oldest_file(tmp_path: Path) -> None:
    path = rotated_trail(tmp_path)
    oldest = max(int(p.suffix[1:]) for p in tmp_path.glob("audit.jsonl.[0-9]*"))
    Path(f"{path}.{oldest}").unlink()
    fault = broken(path)
    assert "missing file in series" in fault.problem and "oldest" in fault.problem


def test_rotated_files_alone_skip_the_head(tmp_path: Path) -> None:
    path = rotated_trail(tmp_path)
    report = verify([f"{path}.3", f"{path}.2"], KEY)
    assert report.records > 0 and report.first_seq and report.first_seq > 1


def test_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        verify([str(tmp_path / "nothing.jsonl")], KEY)
    a = make_trail(subdir(tmp_path, "a"))
    b = make_trail(subdir(tmp_path, "b"))
    with pytest.raises(UsageError):
        verify([str(a), str(b)], KEY)


def test_load_key(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    assert load_key(key) == b"0123456789abcdef0123456789abcdef"
    key.write_bytes(b"\x00" * 31 + b"\n")  # binary: used as is, trailing byte included
    assert load_key(key) == b"\x00" * 31 + b"\n"
    for content, words in ((b"", "empty"), (b"short\n", "fewer than 32")):
        key.write_bytes(content)
        with pytest.raises(AuditError) as caught:
            load_key(key)
        assert words in str(caught.value) and str(key) in str(caught.value)


# --- the command line -------------------------------------------------------------------

def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli_main(["audit", "verify", *argv])
    except SystemExit as e:  # argparse usage errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_trail(tmp_path)
    key = tmp_path / "audit.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    code, out, _ = run_cli(capsys, str(path), "--key-file", str(key))
    assert code == 0 and "OK: 12 records (seq 1..12) in 1 file(s)" in out

    records = lines(path)
    records[6] = records[6].replace(b"app:phi:2:0", b"app:phi:2:9")
    rewrite(path, records)
    code, out, _ = run_cli(capsys, str(path), "--key-file", str(key))
    assert code == 1 and f"FAILED {path}:7: seq 7: bad mac" in out

    code, _, err = run_cli(capsys, str(path), "--key-file", str(tmp_path / "missing.key"))
    assert code == 2 and "missing.key" in err
    code, _, err = run_cli(capsys, str(tmp_path / "nope.jsonl"), "--key-file", str(key))
    assert code == 2 and "nope.jsonl" in err
    code, _, _ = run_cli(capsys, str(path))  # no --key-file
    assert code == 2


def test_cli_on_a_copy_without_head(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_trail(tmp_path)
    copy = tmp_path / "collected.log"
    shutil.copy(path, copy)
    key = tmp_path / "audit.key"
    key.write_bytes(KEY)
    code, out, _ = run_cli(capsys, str(copy), "--key-file", str(key))
    assert code == 1 and "head file missing" in out
    code, out, _ = run_cli(capsys, str(copy), "--key-file", str(key), "--no-head")
    assert code == 0 and "OK: 12 records" in out


def make_worker_trails(directory: Path, count: int) -> list[Path]:
    """What `run --workers N` leaves: audit.wN.jsonl (+ .head) beside the configured path."""
    trails = []
    for index in range(1, count + 1):
        made = make_trail(subdir(directory, f"w{index}"), batches=2 + index)
        for suffix in ("", ".head"):
            target = directory / f"audit.w{index}.jsonl{suffix}"
            shutil.move(str(made) + suffix, target)
        trails.append(directory / f"audit.w{index}.jsonl")
    return trails


def test_configured_path_finds_every_worker_trail(tmp_path: Path, capsys) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    make_worker_trails(tmp_path, 3)
    code = cli_main(["audit", "verify", str(tmp_path / "audit.jsonl"), "--key-file",
                     str(key_file)])
    out = capsys.readouterr().out
    assert code == 0, out
    for index in (1, 2, 3):  # each checked as its own chain, with its own record count
        assert f"audit.w{index}.jsonl: OK: {(2 + index) * 3} records" in out
    assert "OK: all 3 trails verify" in out


def test_one_broken_worker_trail_fails_the_set(tmp_path: Path, capsys) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    first, second = make_worker_trails(tmp_path, 2)
    data = lines(second)
    data[1] = data[1].replace(b"app:phi:", b"app:phx:")
    second.write_bytes(b"".join(data))
    code = cli_main(["audit", "verify", str(first), str(second), "--key-file", str(key_file)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"{first}: OK" in out
    assert f"{second}: FAILED {second}:2" in out and "bad mac" in out
    assert "FAILED: 1 of 2 trails do not verify" in out


def test_head_option_is_for_one_trail_only(tmp_path: Path, capsys) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    first, second = make_worker_trails(tmp_path, 2)
    code = cli_main(["audit", "verify", str(first), str(second), "--key-file", str(key_file),
                     "--head", str(first) + ".head"])
    assert code == 2
    assert "one trail" in capsys.readouterr().err
