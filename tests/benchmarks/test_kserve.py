"""``python -m benchmarks.kserve``: skipped with its reason when KServe's environment cannot be
built; a quick side by side on one small model when it can (slow: the first run installs
kserve, about 70 packages, into ``reports/kserve-venv``, or ``$NORMPORT_KSERVE_VENV``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from benchmarks import kserve as bench

ROOT = Path(__file__).resolve().parents[2]


def test_without_its_environment_the_side_by_side_is_skipped_not_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(bench, "ensure_venv", lambda venv: "pip could not install kserve (offline)")
    out = tmp_path / "kserve.json"
    report = bench.main(["--quick", "--venv", str(tmp_path / "venv"), "--out", str(out)])
    assert report["skipped"] == "pip could not install kserve (offline)"
    assert report["rows"] == []
    assert json.loads(out.read_text()) == report
    assert "KServe side by side skipped: pip could not install kserve" in capsys.readouterr().out


@pytest.mark.slow  # builds KServe's environment once, starts four servers
def test_quick_side_by_side(repo_root: Path, tmp_path: Path) -> None:
    venv = Path(os.environ.get("NORMPORT_KSERVE_VENV", ROOT / "reports" / "kserve-venv"))
    reason = bench.ensure_venv(venv)
    if reason is not None:
        pytest.skip(f"KServe's environment cannot be built here: {reason}")
    shutil.copytree(repo_root / "seq_bn", tmp_path / "repo" / "seq_bn")
    out = tmp_path / "kserve.json"
    argv = ["--quick", "--venv", str(venv), "--repository", str(tmp_path / "repo")]
    report = bench.main([*argv, "--models", "seq_bn", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    rows = {row["row"]: row for row in report["rows"]}
    assert set(rows) == {
        *(f"seq_bn {p} c=1 {m}" for p in ("json", "binary") for m in ("throughput", "p50", "p99")),
        "RSS after the load",
        "start, first (normport probes)",
    }
    for row in rows.values():
        assert row["normport"] > 0 and row["kserve"] > 0 and row["ratio"] > 0, row
        assert row["target"] == f">= {bench.TARGET}"
