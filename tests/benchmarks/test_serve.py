"""``python -m benchmarks.serve --quick``: a smoke test on one small model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import serve as bench

pytestmark = pytest.mark.slow  # starts servers / times real runs


def test_bench_quick(repo_root: Path, tmp_path: Path) -> None:
    shutil.copytree(repo_root / "seq_bn", tmp_path / "repo" / "seq_bn")
    out = tmp_path / "serve.json"
    argv = [
        "--quick",
        "--repository",
        str(tmp_path / "repo"),
        "--models",
        "seq_bn",
        "--out",
        str(out),
    ]
    report = bench.main(argv)
    assert json.loads(out.read_text()) == report
    cells = {(r["protocol"], r["batching"], r["concurrency"]) for r in report["rows"]}
    assert cells == {
        (p, b, c)
        for p in ("json", "binary")
        for b in (True, False)
        for c in bench.QUICK_CONCURRENCY
    }
    for row in report["rows"]:
        assert row["errors"] == 0 and row["requests"] > 0, row
        assert row["p50_ms"] <= row["p99_ms"]
    assert report["inprocess_batch1"]["seq_bn"]["p50_ms"] > 0
    assert set(report["targets"]) == {
        "seq_bn_binary_c1_overhead_p50_ms_batching_on",
        "seq_bn_binary_c1_overhead_p50_ms_batching_off",
    }
