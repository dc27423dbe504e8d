"""``python -m runtime verify``: a fast-subset run, its JSON recomputed independently, a broken
lowering that must fail by name, skipped cells, a user module, and usage errors."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented
from torch import nn

from normport import export, models
from normport.export.lowerings import _stats as stats_lowering
from normport.runtime import __main__ as runtime_main
from normport.runtime.verify import cli, matrix, parity, subjects

FAST = ["--model", "BatchNorm2d-momentum", "--model", "LayerNorm", "--opset", "17", "23"]


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory) -> tuple[int, Path]:
    """The CI subset through the real dispatcher: two layers, two opsets, both dtypes."""
    out = tmp_path_factory.mktemp("verify")
    code = runtime_main.main(["verify", *FAST, "--out", str(out)])
    return code, out


@pytest.fixture(scope="module")
def results(fast_run) -> dict:
    return json.loads((fast_run[1] / "results.json").read_text())


def _cell(results: dict, cell_id: str) -> dict:
    return next(c for c in results["parity"] if c["id"] == cell_id)


def test_fast_subset_writes_report_json_and_plots(fast_run, results):
    code, out = fast_run
    assert code == 0
    report = (out / "report.md").read_text()
    assert "**PASS:" in report
    assert "BatchNorm2d-momentum" in report and "| opset 17 | opset 23 |" in report
    for plot in results["plots"]:
        assert (out / plot).stat().st_size > 1000
    assert {Path(p).name for p in results["plots"]} >= {
        "parity_float32.png",
        "parity_float16.png",
        "divergence_batch_size.png",
        "divergence_steps.png",
        "batch_mates.png",
    }
    summary = results["summary"]
    # BatchNorm: eval x 2 runtimes + train + recalibrate; LayerNorm: eval x 2 (a stateless
    # layer has no train graph: export.to_onnx(mode="train") needs running statistics).
    assert summary["cells"] == (4 + 2) * 2 * 2
    assert summary["passed"] == summary["cells"] and summary["failed"] == 0


def test_every_parity_value_is_below_its_tolerance(results):
    tolerances = {(t["dtype"], t["scope"]): t for t in results["tolerances"]}
    for cell in results["parity"]:
        tol = tolerances[(cell["dtype"], "layer")]
        assert (cell["atol"], cell["rtol"]) == (tol["atol"], tol["rtol"])
        assert cell["checks"], cell["id"]
        for check in cell["checks"]:
            assert check["ok"] and check["ratio"] <= 1.0, (cell["id"], check)
        assert cell["max_abs"] == max(c["max_abs"] for c in cell["checks"] if c["ok"])
    train = _cell(results, "BatchNorm2d-momentum/train/onnxruntime/float32/opset23")
    quantities = {c["quantity"] for c in train["checks"]}
    assert quantities == {"output", "running_mean", "running_var", "num_batches_tracked"}
    assert {c["step"] for c in train["checks"]} == {0, 1, 2}


def _session(model) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_parity_values_recomputed_independently(results):
    """Same inputs (from the recorded seeds), a fresh export, and torch.nn as the oracle."""
    subject = subjects.get("BatchNorm2d-momentum")
    layer = subject.factory()
    twin = models.convert(layer, to="torch")  # torch.nn.BatchNorm2d with the same state
    example = subject.inputs(*parity.EXPORT_BATCH)
    evals = export.to_onnx(layer, example, mode="eval", opset=23, dynamic=subject.dynamic)
    trains = export.to_onnx(
        copy.deepcopy(layer).train(), example, mode="train", opset=23, dynamic=subject.dynamic
    )

    cell = _cell(results, "BatchNorm2d-momentum/eval/onnxruntime/float32/opset23")
    worst = 0.0
    for spec in cell["batches"]:
        (x,) = subject.inputs(spec["batch_size"], spec["seed"], spec["alt"])
        with torch.no_grad():
            expected = twin(x).numpy()
        got = _session(evals).run(None, {"input": x.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    assert worst <= 1e-5
    assert cell["max_abs"] == pytest.approx(worst, abs=1e-6)

    cell = _cell(results, "BatchNorm2d-momentum/train/onnxruntime/float32/opset23")
    torch_twin = copy.deepcopy(twin).train()
    sess, state = _session(trains), {}
    for step, spec in enumerate(cell["batches"]):
        (x,) = subject.inputs(spec["batch_size"], spec["seed"], spec["alt"])
        y, mean, var, count = sess.run(None, {"input": x.numpy(), **state})
        with torch.no_grad():
            expected = torch_twin(x).numpy()
        state = {"running_mean": mean, "running_var": var, "num_batches_tracked": count}
        recorded = {(c["quantity"], c["step"]): c["max_abs"] for c in cell["checks"]}
        for quantity, value, reference in (
            ("output", y, expected),
            ("running_var", var, torch_twin.running_var.numpy()),
            ("running_mean", mean, torch_twin.running_mean.numpy()),
        ):
            error = float(np.abs(value - reference).max())
            assert error <= 1e-5
            assert recorded[(quantity, step)] == pytest.approx(error, abs=1e-6)
        assert int(count) == int(torch_twin.num_batches_tracked)


def test_divergence_in_results(results):
    by_subject = {d["subject"]: d for d in results["divergence"]}
    bn, ln = by_subject["BatchNorm2d-momentum"], by_subject["LayerNorm"]
    assert bn["depends_on_batch"] and bn["mates_train"] > 1e-2
    assert not ln["depends_on_batch"] and ln["mates_train"] == 0.0
    assert all(p["mean_abs"] == 0.0 for p in ln["batch_curve"])
    assert [c["momentum"] for c in bn["steps"]] == [0.1, None]
    reading = " ".join(results["reading"]["layers"])
    assert "BatchNorm2d-momentum by" in reading and "LayerNorm" in reading


def _biased_running_update(original):
    """The classic bug: running_var blended with the biased batch variance."""

    def patched(f, mean_c, var_c, n, running, *, momentum, counts):
        biased = f.Mul(var_c, f.Div(f.Sub(n, f.scalar(1.0)), n))  # undone by n / (n - 1) inside
        return original(f, mean_c, biased, n, running, momentum=momentum, counts=counts)

    return patched


BROKEN = {
    "biased_running_var": (
        "running_update",
        _biased_running_update(stats_lowering.running_update),
        "running_var",
    ),
    "unconverted_momentum": (
        "momentum_attr",
        lambda m: {} if m is None else {"momentum": 1.0 - m},
        "running_mean",
    ),
}


@pytest.mark.parametrize("bug", list(BROKEN))
def test_broken_lowering_fails_and_names_the_cell(bug, monkeypatch, tmp_path, capsys):
    name, replacement, quantity = BROKEN[bug]
    monkeypatch.setattr(stats_lowering, name, replacement)
    argv = ["--model", "BatchNorm2d-momentum", "--opset", "23", "--dtype", "float32"]
    argv += ["--mode", "train", "--no-divergence", "--out", str(tmp_path)]
    assert cli.main(argv) == 1
    failing = "BatchNorm2d-momentum/train/onnxruntime/float32/opset23"
    assert failing in capsys.readouterr().err
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["summary"]["failed_cells"] == [failing]
    cell = _cell(data, failing)
    assert cell["reason"].startswith(f"{quantity} at step 0")
    assert not next(c for c in cell["checks"] if c["quantity"] == quantity)["ok"]
    report = (tmp_path / "report.md").read_text()
    assert "**FAIL:" in report and f"`{failing}`" in report


def test_runtime_that_cannot_run_a_cell_is_skipped_not_passed(monkeypatch):
    def refuse(model, **_):
        raise OrtNotImplemented("Could not find an implementation for Foo(23) node")

    monkeypatch.setattr(parity, "cpu_session", refuse)
    subject = subjects.get("LayerNorm")
    cells = parity.run_subject(subject, [23], dtypes=["float16"], modes=["eval"])
    by_runtime = {c.runtime: c for c in cells}
    skipped = by_runtime["onnxruntime"]
    assert skipped.status == "skipped"
    assert skipped.reason == "skipped: Could not find an implementation for Foo(23) node"
    assert by_runtime["reference"].status == "pass"  # the other runtime still ran


def make_torch_module():
    """A user factory with torch.nn layers: verified through models.convert."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net, torch.randn(2, 3, 6, 6)


def test_user_module_from_a_factory(tmp_path):
    argv = ["--module", "tests.verify.test_cli:make_torch_module", "--opset", "23"]
    argv += ["--dtype", "float32", "--no-divergence", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    modes = {c["mode"] for c in data["parity"] if c["status"] == "pass"}
    assert modes == {"eval", "train", "recalibrate"}
    assert data["meta"]["subjects"][0]["kind"] == "module"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "NoSuchNet"], r"unknown model 'NoSuchNet'; known: BatchNorm2d-momentum"),
        (["--all", "--opset", "99"], r"--opset \[99\]: normport exports 13-28"),
        ([], r"nothing to verify: pass --all, --model NAME or --module"),
        (["--module", "nodots"], r"--module expects 'pkg.mod:factory', got 'nodots'"),
        (["--module", "tests.verify.nope:f"], r"--module 'tests.verify.nope:f': No module named"),
        (["--all", "--steps", "0"], r"--steps must be >= 1, got 0"),
    ],
)
def test_usage_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_failing_export_is_an_error_by_name_not_a_failure(monkeypatch):
    def broken(*_args, **_kwargs):
        raise ValueError("unsupported opset 23 for Foo\nmore detail")

    monkeypatch.setattr(matrix, "_export", broken)
    cells = parity.run_subject(subjects.get("LayerNorm"), [23], dtypes=["float32"])
    assert {c.id: c.status for c in cells} == {
        "LayerNorm/eval/onnxruntime/float32/opset23": "error",
        "LayerNorm/eval/reference/float32/opset23": "error",
    }
    assert all(
        c.reason == "export failed: ValueError: unsupported opset 23 for Foo more detail"
        for c in cells
    )
