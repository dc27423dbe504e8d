"""Kept probe results: a restart loads unchanged models without a probe child and with the
memory profile the probe measured; any change to the bytes, config or settings probes again;
a bad entry or an unwritable folder costs a probe, never the model."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from normport.export.repository import write_model
from normport.runtime.serve import repository as repository_module
from normport.runtime.serve.probe import probe_all
from normport.runtime.serve.repository import READY, Repository
from tests.serve.repo import affine


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    write_model(root, "a", affine(1.5, ["batch", 4]), max_batch_size=8)
    write_model(root, "b", affine(-0.25, ["batch", 4]), max_batch_size=8)
    return root


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The model files each probe_all call was given (the real probe runs)."""
    calls: list[list[str]] = []

    def counting(jobs, **kwargs):
        calls.append(sorted(Path(job.path).parts[-3] for job in jobs))
        return probe_all(jobs, **kwargs)

    monkeypatch.setattr(repository_module, "probe_all", counting)
    return calls


def _profiles(repo: Repository) -> dict[str, object]:
    assert all(v.state == READY for m in repo.models.values() for v in m.values()), repo.index()
    return {name: versions["1"].profile for name, versions in repo.models.items()}


def test_a_restart_reuses_the_measured_profiles(root, tmp_path, probes) -> None:
    cache = tmp_path / "cache"
    first = _profiles(Repository(root, threads=1, probe_cache=cache))
    assert probes == [["a", "b"]]
    assert len(list(cache.glob("*.json"))) == 2
    second = _profiles(Repository(root, threads=1, probe_cache=cache))
    assert probes == [["a", "b"]]  # no second probe
    assert second == first  # the measured curves, points and resident size, exactly


def test_changes_are_probed_again(root, tmp_path, probes) -> None:
    cache = tmp_path / "cache"
    Repository(root, threads=1, probe_cache=cache)
    write_model(root, "b", affine(0.75, ["batch", 4]), max_batch_size=8)  # new bytes
    Repository(root, threads=1, probe_cache=cache)
    assert probes[-1] == ["b"]
    Repository(root, threads=2, probe_cache=cache)  # another setting: both again
    assert probes[-1] == ["a", "b"]
    config = root / "a" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_queue_delay_microseconds: 100",
                                                 "max_queue_delay_microseconds: 200"))  # fmt: skip
    Repository(root, threads=1, probe_cache=cache)
    assert probes[-1] == ["a"]


def test_without_a_cache_every_start_probes(root, probes) -> None:
    Repository(root, threads=1)
    Repository(root, threads=1)
    assert probes == [["a", "b"], ["a", "b"]]


def test_a_bad_entry_is_probed_again(root, tmp_path, probes, caplog) -> None:
    cache = tmp_path / "cache"
    Repository(root, threads=1, probe_cache=cache)
    for entry in cache.glob("*.json"):
        entry.write_text('{"providers": ["CPUExecutionProvider"], "profile": {"work": 3}}')
    with caplog.at_level(logging.WARNING):
        _profiles(Repository(root, threads=1, probe_cache=cache))
    assert probes[-1] == ["a", "b"]
    assert "is unreadable" in caplog.text


def test_an_unwritable_cache_only_warns(root, tmp_path, probes, caplog) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING):
        _profiles(Repository(root, threads=1, probe_cache=blocked / "cache"))
    assert "is not writable" in caplog.text


def test_external_data_is_part_of_the_key(root, tmp_path, probes) -> None:
    """A file beside model.onnx (Triton's external data lives there) changes the key."""
    cache = tmp_path / "cache"
    Repository(root, threads=1, probe_cache=cache)
    (root / "a" / "1" / "weights.bin").write_bytes(b"\0" * 16)
    Repository(root, threads=1, probe_cache=cache)
    assert probes[-1] == ["a"]


def test_an_unreadable_model_is_probed_and_not_kept(root, tmp_path, probes, monkeypatch) -> None:
    """Near miss of a hit: a key that cannot be computed never hits nor stores."""
    from normport.runtime.serve import probe_cache

    cache = tmp_path / "cache"
    monkeypatch.setattr(probe_cache.ProbeCache, "key", lambda self, job: None)
    _profiles(Repository(root, threads=1, probe_cache=cache))
    _profiles(Repository(root, threads=1, probe_cache=cache))
    assert probes == [["a", "b"], ["a", "b"]]
    assert not list(cache.glob("*.json"))
