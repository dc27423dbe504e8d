"""Crash-isolated loading and memory calibration, on real models in real child processes.

- a float16 ``nn.MultiheadAttention`` block with a dynamic batch segfaults onnxruntime 1.32 at
  session creation: its probe reports the signal, and the models after it still load;
- a probe that overruns its time is killed and reported;
- the probe's memory estimate for a long sequence through ``rnn_ln`` (whose working memory
  grows with the square of the length) is checked against onnxruntime's peak RSS measured in a
  fresh process (the oracle: ``/proc``, not the code under test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

from normport.export import triton_config
from normport.export.repository import build_config, write_model
from normport.runtime.serve.probe import Job, Probed, ProbeFailed, probe_all
from tests.serve.repo import affine, export_zoo

FEATURES = 8


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def _crashing_model() -> onnx.ModelProto:
    """torch.onnx's export of a float16 MultiheadAttention block with a dynamic batch."""
    torch.manual_seed(0)
    module = _Attention().eval().half()
    program = torch.onnx.export(
        module,
        (torch.randn(2, 5, 16).half(),),
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        input_names=["x"],
        output_names=["y"],
        verbose=False,
    )
    return program.model_proto


def _job(root: Path, name: str) -> Job:
    from normport.export import triton_config

    config = triton_config.read(root / name)
    return Job(os.fspath(root / name / "1" / "model.onnx"), config, "1", 1)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loading")
    write_model(root, "crashes", _crashing_model(), max_batch_size=8)
    write_model(root, "fine", affine(1.5, ["batch", 4]), max_batch_size=8)
    export_zoo(root, "rnn_ln", max_batch_size=8)
    return root


def test_a_model_that_crashes_onnxruntime_is_reported_and_the_next_ones_load(
    repository: Path,
) -> None:
    crashes, fine = probe_all([_job(repository, "crashes"), _job(repository, "fine")])
    assert isinstance(crashes, ProbeFailed)
    assert "signal SIGSEGV" in str(crashes)
    assert "creating the session" in str(crashes)
    assert isinstance(fine, Probed)
    assert fine.providers == ("CPUExecutionProvider",)


def test_a_probe_that_overruns_its_time_is_killed(repository: Path) -> None:
    (result,) = probe_all([_job(repository, "fine")], timeout=0.05)
    assert isinstance(result, ProbeFailed)
    assert "did not load within 0.05 s" in str(result)


def test_a_config_the_graph_contradicts_is_reported_by_the_probe(tmp_path: Path) -> None:
    model = affine(1.0, ["batch", 4])
    config = build_config("m", model, max_batch_size=8)
    config.input[0].data_type = triton_config.DataType.Value("TYPE_INT64")
    path = tmp_path / "model.onnx"
    onnx.save(model, os.fspath(path))
    (result,) = probe_all([Job(os.fspath(path), config, "1")])
    assert isinstance(result, ProbeFailed)
    assert "config says TYPE_INT64, the graph has TYPE_FP32" in str(result)


_MEASURE = """
import json, sys
import numpy as np
import onnxruntime as ort

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((1, int(sys.argv[2]), 8)).astype(np.float32)
session.run(None, {"sequence": x[:, :4]})
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
session.run(None, {"sequence": x})
print(json.dumps({"peak": status("VmHWM") - before}))
"""


def test_the_estimate_covers_the_measured_peak_of_a_long_sequence(repository: Path) -> None:
    """Calibrated on short sequences only (it stops at ~128 MiB), the estimate for 1,600 steps
    (~1 GiB, grown with the square of the length) is at least what onnxruntime then uses, and
    not wildly more."""
    (probed,) = probe_all([_job(repository, "rnn_ln")])
    assert isinstance(probed, Probed)
    length = 1600
    assert max(e for e, _, _ in probed.profile.points) < length * FEATURES  # extrapolated
    path = os.fspath(repository / "rnn_ln" / "1" / "model.onnx")
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, path, str(length)],
        capture_output=True,
        check=True,
        text=True,
        timeout=120,
    )
    measured = json.loads(out.stdout)["peak"]
    estimate = probed.profile.run_bytes(1, length * FEATURES)
    assert measured > 256 << 20  # the case is real: a long sequence is expensive
    assert measured <= estimate <= 4 * measured


def test_an_input_the_probe_cannot_feed_is_not_a_crash(tmp_path: Path) -> None:
    """A model whose only input is a string tensor calibrates on empty strings."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", TensorProto.STRING, ["batch", 2])],
        [onnx.helper.make_tensor_value_info("y", TensorProto.STRING, ["batch", 2])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    model.ir_version = 10
    write_model(tmp_path, "strings", model, max_batch_size=4)
    (result,) = probe_all([_job(tmp_path, "strings")])
    assert isinstance(result, Probed)
