"""``python -m benchmarks.soak``: a short soak on two zoo models (a float and a token model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks import soak
from benchmarks.loadgen import Body

pytestmark = pytest.mark.slow  # starts servers / times real runs

MODELS = ("seq_bn", "transformer_ln")


def test_soak_short(repo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name in MODELS:
        shutil.copytree(repo_root / name, tmp_path / "repo" / name)
    out = tmp_path / "soak.json"
    argv = ["--duration", "3", "--clients", "8", "--repository", str(tmp_path / "repo")]
    assert soak.main([*argv, "--out", str(out)]) == 0, capsys.readouterr().out
    report = json.loads(out.read_text())

    assert report["passed"] is True
    assert report["wrong_answers"] == {"count": 0, "first": None}
    assert report["status_5xx"] == 0
    assert report["errors"]["by_status"] == {} and report["errors"]["transport"] == {}
    assert report["metadata"]["models"] == list(MODELS)
    assert report["requests"] > 0 and report["samples"] >= report["requests"]
    assert report["throughput"]["requests_per_s"] > 0
    for fmt in ("json", "binary"):  # alternating formats: within one request of half each
        assert abs(report["latency_ms"][fmt]["requests"] - report["requests"] / 2) <= 1
        assert 0 < report["latency_ms"][fmt]["p50"] <= report["latency_ms"][fmt]["p99"]
    assert set(report["models"]) == set(MODELS)
    for m in report["models"].values():
        assert m["requests"] > 0 and m["samples_per_s"] >= m["requests_per_s"] > 0
        assert m["server_runs"] > 0 and m["max_error_ulps"] == m["tolerance_ulps"] == 0

    rss = report["rss"]
    assert 0 < rss["idle_baseline_mib"] <= rss["peak_mib"]
    assert rss["early_s"] == 1.5 and rss["end_s"] >= 2.5
    assert rss["growth_mib"] == pytest.approx(rss["end_mib"] - rss["early_mib"], abs=0.11)
    times = [t for t, _ in rss["samples"]]
    assert times == sorted(times) and times[0] < 0 <= times[-1]  # idle, then under load


def test_check_tolerance() -> None:
    """Bit-exact models reject a 1-ulp difference; cnn_sn takes up to its tolerance."""
    want = np.array([[0.5, -0.25, 0.125]], np.float32)
    up = np.nextafter(want, np.float32(1))
    body = Body(b"", {})
    exact = soak.Case("seq_bn", 1, (1, 3), body, body, want)
    loose = soak.Case("cnn_sn", 1, (1, 3), body, body, want)
    assert soak.check(exact, want.copy()) == (0.0, None)
    ulps, problem = soak.check(exact, up)
    assert ulps > 0 and "tolerance 0" in problem
    assert soak.check(loose, up)[1] is None
    far = want + np.float32(soak.TOLERANCE_ULPS["cnn_sn"] + 1) * np.spacing(np.float32(0.5))
    assert "ulps > tolerance 4" in soak.check(loose, far)[1]
    assert "expected float32[1, 3]" in soak.check(exact, want[:, :2])[1]
