"""Smoke tests of ``benchmarks/`` (marked slow: they start real servers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import startup
from normport.export.repository import write_model
from tests.serve.repo import affine

pytestmark = pytest.mark.slow  # starts servers / times real runs


def test_startup_benchmark_measures_cold_and_warm_starts(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for i, name in enumerate(("a", "b", "c")):
        write_model(repo, name, affine(0.5 + i, ["batch", 4]), max_batch_size=8)
    out = tmp_path / "startup.json"
    assert startup.main(["--repository", str(repo), "--rounds", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {row["start"]: row for row in report["startup"]["rows"]}
    assert report["startup"]["models"] == ["a", "b", "c"]
    assert set(report["startup"]["met"]) == set(startup.TARGETS)
    # the warm start skips the probe children the cold one needs
    assert rows["warm"]["ready_s"] < rows["cold"]["ready_s"]
    assert 10 < rows["warm"]["idle_rss_mb"] < 1000
    assert report["metadata"]["onnxruntime"] and report["metadata"]["timestamp"]
