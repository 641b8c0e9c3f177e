"""What the Python benchmark scripts share about the processes they start."""

from __future__ import annotations

import signal
import subprocess


def stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process still running (last started first), then wait for each;
    one that does not exit within 15 s is killed."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
