"""How much CPU this process may use: whether the batcher's loop mode applies
(:mod:`runtime.serve.batcher`).

A process is held to one CPU in two ways:

- its CPU *affinity* (``taskset``, a cpuset): :func:`os.sched_getaffinity` lists one CPU;
- its cgroup's CPU *quota* (Kubernetes' ``limits.cpu``, Docker's ``--cpus``): at most
  ``quota / period`` CPUs' worth of time per period, however many cores it sees.  cgroup v2:
  ``cpu.max`` in the process's cgroup, ``"<quota> <period>"`` or ``"max <period>"`` (none);
  cgroup v1: ``cpu.cfs_quota_us`` (``-1``: none) and ``cpu.cfs_period_us`` in its ``cpu``
  controller's cgroup.

The cgroup is the one ``/proc/self/cgroup`` names, looked up under :data:`CGROUP_ROOT`, then at
the root itself (a container sees its own cgroup as the root).  Anything unreadable or
malformed counts as no quota: the worker thread, which is right on any machine.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CGROUP_ROOT", "PROC_CGROUP", "cpu_quota", "one_cpu"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def one_cpu() -> bool:
    """Whether this process may use one CPU's worth of time at most: its affinity holds one CPU
    (else, where affinity is unknown, the machine has one), or its cgroup quota allows at most
    one (:func:`cpu_quota`)."""
    if hasattr(os, "sched_getaffinity"):
        if len(os.sched_getaffinity(0)) == 1:
            return True
    elif os.cpu_count() == 1:
        return True
    quota = cpu_quota()
    return quota is not None and quota <= 1.0


def cpu_quota() -> float | None:
    """The CPUs' worth of time per period the process's cgroup allows, ``quota / period``
    (None: no quota, or none readable)."""
    for version, folder in _cgroups():
        quota = _v2_quota(folder) if version == 2 else _v1_quota(folder)
        if quota is not None:
            return quota
    return None


def _cgroups() -> list[tuple[int, Path]]:
    """Where the process's CPU quota may be, in order: (cgroup version, folder)."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        lines = []
    found: list[tuple[int, Path]] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.lstrip("/")
        if hierarchy == "0" and controllers == "":
            found += [(2, CGROUP_ROOT / relative), (2, CGROUP_ROOT)]
        elif "cpu" in controllers.split(","):
            for mount in dict.fromkeys((controllers, "cpu")):
                found += [(1, CGROUP_ROOT / mount / relative), (1, CGROUP_ROOT / mount)]
    return found


def _v2_quota(folder: Path) -> float | None:
    fields = _read(folder / "cpu.max").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _v1_quota(folder: Path) -> float | None:
    return _ratio(_read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us"))


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
