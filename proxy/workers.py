"""`phiproxy run --workers N`: N processes sharing the listening port (SO_REUSEPORT).

Each worker is a whole proxy with its own event loop, backend pool, lockout, metrics
endpoint (port + index) and its own audit chain: `audit.jsonl` becomes `audit.w1.jsonl`,
`audit.w2.jsonl`, ... (each verified on its own by `phiproxy audit verify`), and the
`instance` field gets `-w1`, `-w2`, ... so records from a shared sink stay apart. The parent
forwards SIGTERM/SIGINT/SIGHUP to the workers and exits 0 once all of them have.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from proxy.config import Config

MAX_WORKERS = 64


def worker_config(config: Config, index: int) -> Config:
    """The configuration of worker `index` (1-based): its own audit trail and metrics port."""
    audit = config.audit
    path = audit.path
    if path != "-" and "://" not in path:
        p = Path(path)
        path = str(p.with_name(f"{p.stem}.w{index}{p.suffix}"))
    head = audit.head_file
    if head is not None:
        h = Path(head)
        head = h.with_name(f"{h.stem}.w{index}{h.suffix}")
    audit = dataclasses.replace(audit, path=path, head_file=head,
                                instance=f"{audit.instance}-w{index}")
    metrics = config.metrics
    if metrics.port:
        metrics = dataclasses.replace(metrics, port=metrics.port + index - 1)
    return dataclasses.replace(config, audit=audit, metrics=metrics)


def run_workers(count: int, serve_one: Callable[[int], int]) -> int:
    """Fork `count` workers running `serve_one(index)`; forward signals; 0 if all exit 0."""
    children: dict[int, int] = {}
    for index in range(1, count + 1):
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            code = 1
            try:
                code = serve_one(index)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    worst = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            print(f"phiproxy: worker {index} (pid {pid}) exited with {code}; stopping the "
                  "others", file=sys.stderr)
            forward(signal.SIGTERM, None)
            worst = worst or (code if code > 0 else 1)
    return worst
