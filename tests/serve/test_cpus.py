"""Whether the process may use one CPU (runtime.serve.cpus): its affinity, or its cgroup's CPU
quota read from cgroup files written here the way Linux lays them out (v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from normport.runtime.serve import cpus


@pytest.fixture
def fake_cgroups(tmp_path: Path, monkeypatch) -> Path:
    """An empty cgroup tree and ``/proc/self/cgroup``; the affinity shows two CPUs."""
    root = tmp_path / "sys_fs_cgroup"
    root.mkdir()
    monkeypatch.setattr(cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpus, "PROC_CGROUP", tmp_path / "proc_self_cgroup")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    return root


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("cpu_max", "quota", "one"),
    [
        ("50000 100000\n", 0.5, True),
        ("100000 100000\n", 1.0, True),
        ("101000 100000\n", 1.01, False),  # just over one CPU
        ("200000 100000\n", 2.0, False),
        ("max 100000\n", None, False),
        ("garbage\n", None, False),
        ("0 100000\n", None, False),
    ],
)
def test_cgroup_v2_quota(fake_cgroups: Path, cpu_max: str, quota, one: bool) -> None:
    write(cpus.PROC_CGROUP, "0::/kubepods/pod1/c1\n")
    write(fake_cgroups / "kubepods/pod1/c1/cpu.max", cpu_max)
    assert cpus.cpu_quota() == quota
    assert cpus.one_cpu() is one


def test_cgroup_v2_quota_at_the_root_of_a_container(fake_cgroups: Path) -> None:
    """A container sees its own cgroup as the root, whatever /proc/self/cgroup names."""
    write(cpus.PROC_CGROUP, "0::/\n")
    write(fake_cgroups / "cpu.max", "75000 100000\n")
    assert cpus.cpu_quota() == 0.75 and cpus.one_cpu()


@pytest.mark.parametrize(
    ("quota_us", "period_us", "quota"),
    [("100000", "100000", 1.0), ("150000", "100000", 1.5), ("-1", "100000", None)],
)
def test_cgroup_v1_quota(fake_cgroups: Path, quota_us: str, period_us: str, quota) -> None:
    write(cpus.PROC_CGROUP, "5:memory:/x\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    folder = fake_cgroups / "cpu,cpuacct/docker/abc"
    write(folder / "cpu.cfs_quota_us", quota_us + "\n")
    write(folder / "cpu.cfs_period_us", period_us + "\n")
    assert cpus.cpu_quota() == quota
    assert cpus.one_cpu() is (quota is not None and quota <= 1)


def test_no_cgroup_files_and_two_cpus_is_not_one_cpu(fake_cgroups: Path) -> None:
    assert cpus.cpu_quota() is None and not cpus.one_cpu()


def test_an_affinity_of_one_cpu_is_one_cpu(fake_cgroups: Path, monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert cpus.one_cpu()


def test_this_machine_answers_without_error() -> None:
    """The real files (whatever this machine has) read without raising."""
    quota = cpus.cpu_quota()
    assert quota is None or quota > 0
    assert isinstance(cpus.one_cpu(), bool)
