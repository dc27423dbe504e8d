"""The server processes the service benchmarks start."""

from __future__ import annotations

import signal
import subprocess

__all__ = ["stop"]


def stop(process: subprocess.Popen) -> None:
    """SIGINT (a graceful shutdown), then kill after 30 s."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
