"""Smoke test of the benchmark: a quick run on two layers writes a well-formed report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import layers as bench

pytestmark = pytest.mark.slow  # starts servers / times real runs

ROW_KEYS = {
    "layer",
    "shape",
    "mode",
    "normport_ms",
    "twin_ms",
    "ratio",
    "ok",
    "max_abs_diff",
    "device",
    "valid",
}


def test_quick_run_writes_a_valid_report(tmp_path: Path, keep_threads: None) -> None:
    out = tmp_path / "reports" / "layers.json"
    argv = ["--quick", "--threads", "1", "--out", str(out), "--no-cuda"]
    bench.main([*argv, "--layers", "LayerNorm,BatchNorm2d"])

    report = json.loads(out.read_text())
    meta = report["metadata"]
    assert meta["torch"] == torch.__version__
    assert meta["threads"] == 1
    assert meta["timestamp"] and meta["platform"]
    assert report["cuda"] is None and report["cuda_skipped"]

    rows = report["rows"]
    assert {(r["layer"], r["mode"]) for r in rows} == {
        (layer, mode) for layer in ("LayerNorm", "BatchNorm2d") for mode in ("eval", "train")
    }
    for row in rows:
        assert row.keys() >= ROW_KEYS
        assert row["device"] == "cpu"
        assert row["valid"] is True
        assert 0.0 <= row["max_abs_diff"] < 1e-4
        assert row["normport_ms"] > 0 and row["twin_ms"] > 0
        assert row["ratio"] == pytest.approx(row["normport_ms"] / row["twin_ms"], rel=1e-2)
        assert row["ok"] == (row["ratio"] <= bench.RATIO_TARGET)


def test_unknown_layer_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(tmp_path / "x.json"), "--layers", "NoSuchNorm"])
