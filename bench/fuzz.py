"""The long fuzz runs: every tests/fuzz harness under atheris (coverage guided), one after
the other, each for --seconds; prints executions, coverage and crashes per target.

    python bench/fuzz.py                      # 4 targets x 120 s
    python bench/fuzz.py --seconds 30 request reply
    python bench/fuzz.py --markdown           # also a table row per target for bench/README

Each run starts from the seed corpus (tests/fuzz/corpus/<target>, copied: what libFuzzer
adds stays in --work). A crash (a broken property or an unexpected exception) is written
as a crash-* file under --work/<target>/ and reproduced with
`python -m tests.fuzz <target> <that file>`. Exit status 1 when any target crashed.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("request", "reply", "acl", "glob", "config")
_DONE = re.compile(r"#(\d+)\s+(?:DONE|NEW|REDUCE|pulse|INITED)\s+cov: (\d+) ft: (\d+)"
                   r"(?: corp: (\d+)/\S+)?.*?exec/s: (\d+)")


def run(target: str, seconds: int, work: Path, max_len: int) -> dict[str, object]:
    corpus = work / target / "corpus"
    artifacts = work / target / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    if not corpus.exists():
        shutil.copytree(ROOT / "tests" / "fuzz" / "corpus" / target, corpus)
    cmd = [sys.executable, "-m", "tests.fuzz", target, f"-max_total_time={seconds}",
           f"-max_len={max_len}", "-timeout=10", "-print_final_stats=1",
           f"-artifact_prefix={artifacts}/", str(corpus)]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, errors="replace")
    elapsed = time.monotonic() - started
    (work / target / "fuzz.log").write_text(proc.stderr + proc.stdout)
    last = None
    for line in proc.stderr.splitlines():
        if (m := _DONE.search(line)) is not None:
            last = m
    execs = re.search(r"stat::number_of_executed_units: (\d+)", proc.stderr)
    crashes = sorted(p.name for p in artifacts.iterdir())
    return {
        "target": target,
        "seconds": round(elapsed),
        "executions": int(execs.group(1)) if execs else (int(last.group(1)) if last else 0),
        "exec_per_s": int(last.group(5)) if last else 0,
        "cov": int(last.group(2)) if last else 0,
        "ft": int(last.group(3)) if last else 0,
        "corpus": len(list(corpus.iterdir())),
        "crashes": len(crashes),
        "crash_files": crashes,
        "exit": proc.returncode,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help=f"some of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--seconds", type=int, default=120, help="per target (default 120)")
    parser.add_argument("--max-len", type=int, default=4096, help="longest input (bytes)")
    parser.add_argument("--work", type=Path, default=None,
                        help="corpus and crash directory (default: a new temp dir)")
    parser.add_argument("--markdown", action="store_true", help="print README table rows")
    args = parser.parse_args()
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s) {', '.join(sorted(unknown))}; known: {TARGETS}")
    work = args.work or Path(tempfile.mkdtemp(prefix="phiproxy-fuzz-"))
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"fuzzing {', '.join(args.targets or TARGETS)} for {args.seconds} s each; "
          f"work dir {work}; started {started}", flush=True)
    results = []
    for target in args.targets or TARGETS:
        r = run(target, args.seconds, work, args.max_len)
        results.append(r)
        print(f"{target:8} {r['seconds']:4} s  executions {r['executions']:>9}  "
              f"({r['exec_per_s']}/s)  cov {r['cov']:>4}  ft {r['ft']:>5}  "
              f"corpus {r['corpus']:>4}  crashes {r['crashes']}"
              + (f"  {r['crash_files']} (log: {work / target / 'fuzz.log'})"
                 if r["crashes"] else ""), flush=True)
    if args.markdown:
        print("\n| date (UTC) | target | seconds | executions | exec/s | cov | ft | corpus "
              "| crashes |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            print(f"| {started} | {r['target']} | {r['seconds']} | {r['executions']} | "
                  f"{r['exec_per_s']} | {r['cov']} | {r['ft']} | {r['corpus']} | "
                  f"{r['crashes']} |")
    return 1 if any(r["crashes"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
