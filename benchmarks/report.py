"""What every benchmark report starts with, and how it is written.

>>> write_report(Path("reports/bench/startup.json"), {**environment(), "startup": rows})
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["environment", "verdict", "write_report"]

_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxscript", "numpy", "uvicorn", "starlette")


def environment() -> dict[str, Any]:
    """Where and when: each package's version (from the installed metadata: nothing is
    imported), Python, platform, machine, CPUs, a UTC timestamp.  Every benchmark's
    ``metadata`` starts with these keys."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        **versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def verdict(met: bool | None) -> str:
    """How every benchmark prints a target's outcome: ``met``, ``NOT met`` or ``n/a``."""
    return "n/a" if met is None else ("met" if met else "NOT met")


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write ``report`` as indented JSON, creating parent folders, atomically (temp, rename);
    every benchmark writes its file through here."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp")
    temp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(temp, out)
