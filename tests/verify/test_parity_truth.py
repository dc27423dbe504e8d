"""Verify tells the truth on real models (issue 10): any output structure, dropout and other
random ops in training mode, "cannot export" apart from "exports wrong", onnxruntime crashes
isolated, batch dependence and the facts the report builds on.

The oracles are PyTorch itself (the modules below, random non-trivial weights) and
onnxruntime; the factories here are loaded by name through ``--module`` like a user's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail
from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException as OrtRuntimeException
from torch import nn

from normport import export
from normport.runtime.verify import cli, isolate, parity, subjects
from normport.runtime.verify.matrix import verify_subject

ROOT = Path(__file__).resolve().parents[2]
HERE = "tests.verify.test_parity_truth"


def _randomize_stats(net: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval()


# -- factories (loaded by name, as --module does) ---------------------------------------------


class _Heads(nn.Module):
    """A BatchNorm network returning ``{"logits": a, "aux": (b, c)}``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> dict:
        h = self.stem(x)
        pooled = h.mean((2, 3))
        return {"logits": self.head(pooled), "aux": (h, pooled.square())}


def make_dict_model():
    torch.manual_seed(1)
    return _randomize_stats(_Heads()), torch.randn(2, 3, 6, 6)


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> tuple:
        y = self.norm(x)
        return y, y.sum((2, 3))


def make_tuple_model():
    torch.manual_seed(2)
    return _randomize_stats(_Pair()), torch.randn(3, 3, 5, 5)


def make_bert():
    """A tiny random-init transformers BERT: forward returns a ``ModelOutput``.

    ``token_type_ids`` is passed: without it BERT gathers from an expanded buffer, which onnx
    1.23's reference GatherElements cannot run at batch 1 (the cell is then an honest
    ``error``, tested below)."""
    import tests.thirdparty._torchvision  # noqa: F401  (transformers imports torchvision)

    # isort: split
    import transformers

    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        vocab_size=99,
    )  # fmt: skip
    torch.manual_seed(3)
    ids = torch.randint(0, 99, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[0, 5:] = 0
    types = torch.tensor([[0] * 4 + [1] * 3, [0] * 7])
    return transformers.BertModel(config).eval(), (ids, mask, types)


def make_bert_without_types():
    module, (ids, _mask, _types) = make_bert()
    return module, ids


def make_dropout_model():
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout2d(0.3),
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 6 * 6, 3),
    )  # fmt: skip
    return _randomize_stats(net), torch.randn(2, 3, 6, 6)


class _Noisy(nn.Module):
    """Gaussian noise in training mode, outside any nn.Dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return y + 0.1 * torch.randn_like(y) if self.training else y


def make_noisy_model():
    torch.manual_seed(5)
    return _randomize_stats(_Noisy()), torch.randn(2, 3, 5, 5)


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.export rejects it."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if y.sum() > 0:
            return y * 2
        return y


def make_unexportable():
    torch.manual_seed(6)
    return _randomize_stats(_Branchy()), torch.randn(2, 3, 5, 5)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.attention(x, x, x, need_weights=False)[0])


def make_attention():
    """Its float16 export with a dynamic batch segfaults onnxruntime 1.32 creating the session."""
    torch.manual_seed(0)
    return _Attention().eval(), torch.randn(2, 5, 16)


def make_batch_stats():
    """BatchNorm without running statistics: eval outputs depend on the batch-mates."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False))
    return net.eval(), torch.randn(2, 3, 6, 6)


def _verify(factory: str, **kwargs):
    kwargs.setdefault("opsets", [23])
    kwargs.setdefault("dtypes", ["float32"])
    return verify_subject(subjects.from_factory(f"{HERE}:{factory}"), **kwargs)


def _by_id(cells) -> dict:
    return {c.id.split("/", 1)[1]: c for c in cells}


# -- 1. any output structure --------------------------------------------------------------------


def test_dict_outputs_are_compared_leaf_by_leaf_in_every_mode():
    result = _verify("make_dict_model")
    cells = _by_id(result.cells)
    assert {k: c.status for k, c in cells.items()} == {
        "eval/onnxruntime/float32/opset23": "pass",
        "eval/reference/float32/opset23": "pass",
        "train/onnxruntime/float32/opset23": "pass",
        "recalibrate/onnxruntime/float32/opset23": "pass",
    }
    for cell in result.cells:
        assert {"logits", "aux.0", "aux.1"} <= {c.quantity for c in cell.checks}, cell.id
    # the numbers really are compared: the eval graph against PyTorch, independently
    module, example = make_dict_model()
    model = export.to_onnx(module, example, mode="eval", opset=23)
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        want = module(x)
    got = dict(zip([o.name for o in model.graph.output], parity.cpu_session(model).run(None, {
        "x": x.numpy()}), strict=True))  # fmt: skip
    np.testing.assert_allclose(got["aux.0"], want["aux"][0].numpy(), atol=1e-5, rtol=1e-5)


def test_tuple_outputs_are_named_after_the_graph_outputs():
    result = _verify("make_tuple_model", modes=["eval", "train"])
    assert {c.status for c in result.cells} == {"pass"}
    train = next(c for c in result.cells if c.mode == "train")
    assert {c.quantity for c in train.checks} >= {"output_0", "output_1", "norm.running_var"}


def test_a_transformers_model_output_is_compared_per_field():
    result = _verify("make_bert", modes=["eval"])
    assert {c.runtime: c.status for c in result.cells} == {
        "onnxruntime": "pass",
        "reference": "pass",
    }, [c.reason for c in result.cells]
    quantities = {c.quantity for c in result.cells[0].checks}
    assert quantities == {"last_hidden_state", "pooler_output"}
    assert result.facts.modes_run == ["eval"] and not result.facts.recalibrated
    assert result.facts.stateful_layers == [] and not result.facts.errors


def test_a_runtime_that_raises_on_a_graph_is_an_error_not_a_failure():
    by_runtime = {c.runtime: c for c in _verify("make_bert_without_types", modes=["eval"]).cells}
    assert by_runtime["onnxruntime"].status == "pass"
    ref = by_runtime["reference"]
    assert ref.status == "error", ref.reason
    assert ref.reason.startswith("reference failed running the graph: ValueError: ")


# -- 2. dropout and other random ops in training mode --------------------------------------------


def test_dropout_is_set_to_eval_for_the_train_comparisons_and_recorded():
    result = _verify("make_dropout_model")
    assert {c.mode: c.status for c in result.cells} == {
        "eval": "pass",
        "train": "pass",
        "recalibrate": "pass",
    }, [c.reason for c in result.cells]
    assert result.facts.random_modules == ["3", "5"]
    assert result.facts.modes_run == ["eval", "train", "recalibrate"]
    assert result.facts.recalibrated and result.facts.stateful_layers == ["1"]


def test_a_forward_drawing_random_numbers_makes_train_cells_errors_not_failures():
    result = _verify("make_noisy_model")
    by_mode = {c.mode: c for c in result.cells}
    assert by_mode["eval"].status == "pass"
    for mode in ("train", "recalibrate"):
        assert by_mode[mode].status == "error", mode
        assert "draws random numbers in training mode outside nn.Dropout" in by_mode[mode].reason
    assert result.facts.modes_run == ["eval"] and not result.facts.recalibrated
    assert result.facts.random_modules == []
    assert any("draws random numbers" in e for e in result.facts.errors)


# -- 3. cannot export / cannot run vs exports wrong ------------------------------------------------


def test_an_export_torch_export_rejects_is_an_error_with_its_first_lines(tmp_path, capsys):
    result = _verify("make_unexportable", modes=["eval"])
    assert {c.status for c in result.cells} == {"error"}
    reason = result.cells[0].reason
    assert reason.startswith("export failed: ")
    assert "\n" not in reason and "Traceback" not in reason and len(reason) < 520
    assert result.facts.errors and result.facts.modes_run == []

    argv = ["--module", f"{HERE}:make_unexportable", "--opset", "23", "--dtype", "float32"]
    argv += ["--mode", "eval", "--no-divergence", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    out = capsys.readouterr().out
    assert "0 failed" in out and "2 errors, 0 crashes" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["summary"]["failed"] == 0 and data["summary"]["errors"] == 2


def test_a_session_that_cannot_be_created_is_an_error(monkeypatch):
    def refuse(model, **_):
        raise OrtFail("[ONNXRuntimeError] : 1 : FAIL : Load model failed\nmore detail")

    monkeypatch.setattr(parity, "cpu_session", refuse)
    cells = _by_id(_verify("make_tuple_model", modes=["eval", "train"]).cells)
    for key in ("eval/onnxruntime/float32/opset23", "train/onnxruntime/float32/opset23"):
        assert cells[key].status == "error"
        assert cells[key].reason.startswith("onnxruntime could not create a session: Fail: ")
    assert cells["eval/reference/float32/opset23"].status == "pass"


def test_a_graph_that_fails_to_run_is_an_error_and_a_wrong_number_still_fails(monkeypatch):
    real = parity.cpu_session

    class Broken:
        def __init__(self, model) -> None:
            self.inner = real(model)

        def run(self, names, feeds):
            raise OrtRuntimeException("Non-zero status code returned while running Add node")

    monkeypatch.setattr(parity, "cpu_session", lambda model, **_: Broken(model))
    (cell,) = [
        c for c in _verify("make_tuple_model", modes=["eval"]).cells if c.runtime == "onnxruntime"
    ]
    assert cell.status == "error"
    assert cell.reason.startswith("onnxruntime failed running the graph: RuntimeException")

    class Off:
        def __init__(self, model) -> None:
            self.inner = real(model)

        def run(self, names, feeds):
            return [o + 1.0 for o in self.inner.run(names, feeds)]

    monkeypatch.setattr(parity, "cpu_session", lambda model, **_: Off(model))
    (cell,) = [
        c for c in _verify("make_tuple_model", modes=["eval"]).cells if c.runtime == "onnxruntime"
    ]
    assert cell.status == "fail" and cell.reason.startswith("output_0 at step 0")


def test_a_failing_pytorch_side_is_an_error(monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("expected 4D input (got 3D input)\n  traceback line")

    monkeypatch.setattr(parity, "_eval_cells", broken)
    cells = _verify("make_tuple_model", modes=["eval"]).cells
    assert {c.status for c in cells} == {"error"}
    assert (
        cells[0].reason
        == "PyTorch reference failed: RuntimeError: expected 4D input (got 3D input) traceback line"
    )


# -- 4. crash isolation --------------------------------------------------------------------------


def test_a_graph_that_segfaults_onnxruntime_is_a_crash_cell_and_verify_still_reports(tmp_path):
    argv = [sys.executable, "-m", "runtime", "verify", "--module", f"{HERE}:make_attention"]
    argv += ["--dtype", "float16", "--opset", "23", "--no-divergence", "--out", str(tmp_path)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    cells = {c["id"].split("/", 1)[1]: c for c in data["parity"]}
    crashed = cells["eval/onnxruntime/float16/opset23"]
    assert crashed["status"] == "crash"
    assert crashed["reason"] == (
        "onnxruntime crashed (SIGSEGV) creating the session for opset 23 float16 eval"
    )
    assert cells["eval/reference/float16/opset23"]["status"] == "pass"
    assert "1 crashes" in done.stdout


def test_the_isolated_child_names_the_crashing_graph_and_goes_on_after_it():
    module, example = make_attention()
    crashing = export.to_onnx(module, example, mode="eval", opset=23, dtype=torch.float16)
    fine = export.to_onnx(module, example, mode="eval", opset=23)
    x16 = {"x": example.half().numpy()}
    probes = [
        isolate.Probe(fine.SerializeToString(), {"x": example.numpy()}),
        isolate.Probe(crashing.SerializeToString(), x16),
        isolate.Probe(fine.SerializeToString(), {"x": example.numpy()}),
        isolate.Probe(b"not a model", {}),  # a Python error: reported in-process, not here
    ]
    assert isolate.probe(probes) == [
        None,
        "onnxruntime crashed (SIGSEGV) creating the session",
        None,
        None,
    ]


# -- 5, 6, 9. batch-mates and the facts ---------------------------------------------------------


def test_batch_mates_are_measured_in_eval_mode():
    independent = _verify("make_tuple_model", modes=["eval"]).facts.batch_mates
    assert independent is not None and independent.independent
    dependent = _verify("make_batch_stats", modes=["eval"]).facts.batch_mates
    assert dependent is not None and dependent.dependent == ("output",)


def test_a_stateless_model_claims_no_train_or_recalibration_check():
    result = verify_subject(subjects.get("LayerNorm"), [23], ["float32"])
    assert {c.mode for c in result.cells} == {"eval"}
    facts = result.facts
    assert facts.modes_run == ["eval"] and not facts.recalibrated
    assert facts.stateful_layers == [] and facts.random_modules == [] and facts.errors == []


def test_cli_returns_the_facts_and_reports_progress(tmp_path, capsys):
    argv = ["--module", f"{HERE}:make_dropout_model", "--opset", "23", "--dtype", "float32"]
    argv += ["--no-divergence", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    name = f"{HERE}:make_dropout_model"
    assert f"[1/1] {name}: exporting eval float32 (opsets 23)..." in out
    assert f"[1/1] {name}: train float32: 1 cells: 1 pass" in out
    assert f"[1/1] {name}: PASS" in out or f"[1/1] {name}: WARN" in out
    (subject,) = json.loads((tmp_path / "results.json").read_text())["subjects"]
    assert subject["random_modules"] == ["3", "5"] and subject["recalibrated"] is True


# -- 8. the command line --------------------------------------------------------------------------


def test_model_and_module_take_several_names_in_either_form():
    args = cli._parser().parse_args(["--model", "A", "B", "--model", "C", "--module", "p.m:f"])
    assert args.model == ["A", "B", "C"] and args.module == ["p.m:f"]


def test_help_shows_defaults_and_examples(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: [13, 17, 21, 23])" in text and "(default: reports/verify)" in text
    assert "examples:" in text and "--model BatchNorm2d-momentum cnn_bn" in text


@pytest.mark.parametrize("under", [False, True])
def test_an_out_that_is_a_file_is_a_usage_error_before_any_work(
    tmp_path, capsys, monkeypatch, under
):
    monkeypatch.setattr(cli, "verify_subject", lambda *a, **k: pytest.fail("work started"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "sub" if under else blocker
    assert cli.main(["--model", "LayerNorm", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}: ") and err.count("\n") == 1
    assert "is a file" in err or "not a folder" in err


def test_a_state_the_pytorch_module_lacks_fails_the_cell_not_errors_it(monkeypatch):
    """The export carries running statistics under names the module has no buffer of (here
    the PyTorch side is wrapped, so its buffers are ``inner.*``): the export computes something
    else (fail, infinite error, naming the state), not a runtime error."""
    real = parity._torch_train

    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(*args)

    monkeypatch.setattr(parity, "_torch_train", lambda *a, **k: Wrapped(real(*a, **k)))
    cells = _verify("make_dropout_model", modes=["train"]).cells
    (cell,) = [c for c in cells if c.runtime == "onnxruntime" and c.dtype == "float32"]
    assert cell.status == "fail", cell.reason
    assert "no such buffer in the PyTorch module" in cell.reason
