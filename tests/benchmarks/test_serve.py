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
        assert row["repeats"] == 1
    assert set(report["batching_ratios"]) == {
        f"seq_bn/{p}/{c}" for p in ("json", "binary") for c in bench.QUICK_CONCURRENCY
    }
    # the HTTP floor: answered without errors, and cheaper than the served rows
    assert set(report["http_floor"]) == {str(c) for c in bench.QUICK_CONCURRENCY}
    for concurrency, floor in report["http_floor"].items():
        assert floor["errors"] == 0 and floor["throughput_rps"] > 0 and floor["p50_ms"] > 0
        served = [r for r in report["rows"] if str(r["concurrency"]) == concurrency]
        assert floor["throughput_rps"] > min(r["throughput_rps"] for r in served)
    baseline = report["inprocess_batch1"]["seq_bn"]
    assert baseline["p50_ms"] > 0 and baseline["gain_at_16"] > 0
    assert set(report["targets"]) == {
        *(f"seq_bn_{p}_c16_batched_vs_unbatched" for p in ("json", "binary")),
        *(f"seq_bn_binary_c1_batching_{mode}_p50_overhead_ms" for mode in ("on", "off")),
    }
    for target in report["targets"].values():
        assert set(target) == {"value", "target", "met"}
    text = bench.format_report(report)
    assert "batched / unbatched throughput" in text and "targets:" in text
    assert "HTTP floor" in text
