"""Smoke test of the export benchmark: quick runs write a well-formed report."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

from benchmarks import export as bench

pytestmark = pytest.mark.slow  # starts servers / times real runs

SIDE_KEYS = {"opset", "ops", "functions", "ort_ops", "max_abs_diff", "valid", "ms", "iqr_ms"}


def test_quick_layer_run_writes_a_valid_report(tmp_path: Path, keep_threads: None) -> None:
    out = tmp_path / "reports" / "export.json"
    argv = ["--quick", "--threads", "1", "--layers", "LayerNorm", "--opsets", "17"]
    report = bench.main([*argv, "--no-zoo", "--out", str(out)])

    assert json.loads(out.read_text()) == report
    meta = report["metadata"]
    assert meta["torch"] == torch.__version__
    assert meta["onnx"] == onnx.__version__
    assert meta["onnxruntime"] == onnxruntime.__version__
    assert meta["threads"] == 1
    assert meta["timestamp"] and meta["platform"]
    assert report["zoo"] == []

    (row,) = report["layers"]
    assert (row["layer"], row["opset"], row["shape"]) == ("LayerNorm", 17, [32, 128, 768])
    for side in ("normport_ort", "twin_ort"):
        assert row[side].keys() >= SIDE_KEYS
        assert row[side]["valid"] is True
        assert 0.0 <= row[side]["max_abs_diff"] < 1e-4
        assert row[side]["ms"] > 0
    assert row["normport_ort"]["opset"] == 17
    assert row["normport_ort"]["ops"] == ["LayerNormalization"]
    assert row["twin_ort"]["opset"] in (17, 18)  # what torch.onnx's file really imports
    assert row["eager"]["ms"] > 0
    assert row["ratio"] > 0 and row["ratio_vs_eager"] > 0
    assert row["ok"] == (row["ratio"] <= bench.RATIO_TARGET)


def test_quick_sequence_batchnorm_and_zoo(tmp_path: Path, keep_threads: None) -> None:
    out = tmp_path / "export.json"
    argv = ["--quick", "--layers", "SequenceBatchNorm", "--opsets", "23", "--zoo", "seq_bn"]
    report = bench.main([*argv, "--out", str(out)])

    (row,) = report["layers"]
    assert row["normport_ort"]["ops"] == ["Mul", "Add"]
    assert row["alt_ort"]["ops"] == ["Transpose", "BatchNormalization", "Transpose"]
    assert row["alt_ort"]["max_abs_diff"] < 1e-4
    assert row["fold_ratio"] > 0

    (net,) = report["zoo"]
    assert net["network"] == "seq_bn" and net["export_s"] > 0
    assert [b["batch"] for b in net["batches"]] == [1, 32]
    for batch in net["batches"]:
        ours = batch["normport_ort"]
        assert ours["valid"] is True and ours["max_abs_diff"] < 1e-4
        assert ours["ms"] > 0 and batch["eager"]["ms"] > 0


def test_unknown_layer_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(tmp_path / "x.json"), "--layers", "NoSuchNorm"])
