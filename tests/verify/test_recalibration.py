"""Recalibration on onnxruntime equals recalibration in PyTorch, for every stateful zoo network;
the CLI with .npy / .npz data; errors that name the offending value."""

from __future__ import annotations

import functools
import re

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from normport import export, models, runtime
from normport.export.train_graph import state_pairs
from normport.models import zoo
from normport.runtime import recalibration
from normport.runtime.sessions import cpu_session as session
from tests.onnx_helpers import top_level_ops

STATEFUL = ("cnn_bn", "seq_bn", "style_in", "cnn_sn")
OPSETS = (13, 23)


def test_every_zoo_network_with_running_statistics_is_covered():
    with_stats = [
        name
        for name in zoo.names()
        if any(getattr(m, "track_running_stats", False) for m in zoo.get(name).build().modules())
    ]
    assert sorted(with_stats) == sorted(STATEFUL)


def _kwargs(spec) -> dict:
    return {
        "dynamic": spec.dynamic_dims,
        "input_names": spec.input_names,
        "output_names": spec.output_names,
    }


@functools.cache
def _train_models(name: str) -> dict[int, onnx.ModelProto]:
    spec = zoo.get(name)
    net = spec.build(seed=0).train()
    return export.to_onnx_opsets(
        net, spec.example_inputs(4), mode="train", opsets=OPSETS, **_kwargs(spec)
    )


def _shifted(spec, batch_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Another domain: the statistics have somewhere to move to."""
    return tuple(
        t * 1.7 - 0.4 if t.is_floating_point() else t
        for t in spec.example_inputs(batch_size, seed=seed)
    )


def _numpy(batch) -> tuple[np.ndarray, ...]:
    return tuple(t.numpy() for t in batch)


@pytest.mark.parametrize("name", STATEFUL)
def test_recalibration_equals_pytorch_then_eval_export(name):
    spec = zoo.get(name)
    batches = [_shifted(spec, b, 100 + i) for i, b in enumerate((6, 3, 8))]
    net = spec.build(seed=0).train()
    with torch.no_grad():
        for batch in batches:
            net(*batch)
    net.eval()
    expected_models = export.to_onnx_opsets(
        net, spec.example_inputs(4), mode="eval", opsets=OPSETS, **_kwargs(spec)
    )
    held_out = {k: v.numpy() for k, v in zip(spec.input_names, _shifted(spec, 5, 999), strict=True)}
    for opset in OPSETS:
        batches_np = [_numpy(b) for b in batches]
        ours = runtime.recalibrate(_train_models(name)[opset], batches_np, method="ema")
        expected = expected_models[opset]
        onnx.checker.check_model(ours, full_check=True)
        assert top_level_ops(ours) == top_level_ops(expected)
        assert not state_pairs(ours)
        metadata = {p.key: p.value for p in ours.metadata_props}
        assert metadata["mode"] == "eval" and metadata["recalibration_batches"] == "3"
        assert metadata["recalibration_method"] == "ema"
        got = session(ours).run(None, held_out)[0]
        want = session(expected).run(None, held_out)[0]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"{name} {opset}")
        # The statistics themselves, where the eval graph keeps them as initializers.
        values = {t.name: onnx.numpy_helper.to_array(t) for t in ours.graph.initializer}
        checked = 0
        for key, buffer in net.state_dict().items():
            if key.endswith(("running_mean", "running_var")) and key in values:
                np.testing.assert_allclose(values[key], buffer.numpy(), atol=1e-5, rtol=1e-5)
                checked += 1
        assert checked or name == "seq_bn"  # seq_bn's eval form folds them into scale / shift


def test_reset_stats_is_pytorchs_reset_running_stats():
    spec = zoo.get("cnn_bn")
    batches = [_shifted(spec, 4, 200 + i) for i in range(2)]
    net = spec.build(seed=0)
    for m in net.modules():
        if isinstance(m, models.BatchNorm2d):
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        for batch in batches:
            net(*batch)
    x = _shifted(spec, 3, 201)[0]
    with torch.no_grad():
        expected = net.eval()(x).numpy()
    with pytest.warns(runtime.recalibration.RecalibrationWarning, match=r"momentum 0.1 over 2"):
        ours = runtime.recalibrate(
            _train_models("cnn_bn")[23],
            [_numpy(b) for b in batches],
            method="ema",
            reset_stats=True,
        )
    np.testing.assert_allclose(
        session(ours).run(None, {"image": x.numpy()})[0], expected, atol=1e-5, rtol=1e-5
    )


class _WithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.norm = models.BatchNorm1d(6, momentum=None)
        self.drop = nn.Dropout(0.5)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.linear(input)))


def test_train_mode_dropout_becomes_identity():
    torch.manual_seed(0)
    net = _WithDropout().train()
    train = export.to_onnx(net, torch.randn(5, 4), mode="train", opset=21)
    batches = [torch.randn(8, 4) * 2 + 1 for _ in range(3)]
    with torch.no_grad():
        for batch in batches:
            net(batch)  # the norm comes before the dropout: its statistics are deterministic
    ours = runtime.recalibrate(train, [b.numpy() for b in batches], method="ema")
    assert top_level_ops(ours) == ["Gemm", "BatchNormalization", "Identity"]
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = net.eval()(x).numpy()
    got = session(ours).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@functools.cache
def _seq_layer_train() -> onnx.ModelProto:
    layer = models.SequenceBatchNorm(3).train()
    dynamic = {"input": {0: "batch", 1: "seq"}}
    return export.to_onnx(layer, torch.randn(2, 5, 3), mode="train", opset=23, dynamic=dynamic)


@pytest.mark.parametrize(
    ("batches", "error", "message"),
    [
        ([], ValueError, r"no batches: recalibration needs at least one batch"),
        (
            [np.zeros((2, 5), np.float32)],
            ValueError,
            r"batch 0: input 'input' expects rank 3 \(batch, seq, 3\) float32, got shape \(2, 5\)",
        ),
        (
            [np.zeros((2, 5, 4), np.float32)],
            ValueError,
            r"batch 0: input 'input' expects size 3 at axis 2",
        ),
        (
            [np.zeros((2, 5, 3), np.int64)],
            TypeError,
            r"batch 0: input 'input' expects float32 \(any float type is cast\), got int64",
        ),
        (
            [{"x": np.zeros((2, 5, 3), np.float32)}],
            ValueError,
            r"named after the graph inputs \['input'\]; unknown \['x'\], missing \['input'\]",
        ),
        (
            [np.ones((2, 5, 3), np.float32), np.zeros((1, 1, 3), np.float32)],
            ValueError,
            r"^batch 1 \('input' \(1, 1, 3\)\): the top-level layer sees one value per channel, so its "
            r"unbiased variance var \* n / \(n - 1\) is undefined \(batch size 1: use batches "
            r"of at least 2 samples\)$",
        ),
    ],
    ids=["empty", "rank", "size", "dtype", "names", "one_value"],
)
def test_bad_batches_are_named(batches, error, message):
    with pytest.raises(error, match=message):
        runtime.recalibrate(_seq_layer_train(), batches)


def test_models_it_cannot_recalibrate(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train model '.*missing.onnx' does not exist"):
        runtime.recalibrate(tmp_path / "missing.onnx", [])
    layer = models.SequenceBatchNorm(3)
    evals = export.to_onnx(layer.eval(), torch.randn(2, 5, 3), mode="eval", opset=23)
    with pytest.raises(
        ValueError,
        match=r"^the model is an inference graph \(no running statistics to update\); pass a "
        r"training export \(python -m export --mode train ...\)$",
    ):
        runtime.recalibrate(evals, [np.zeros((2, 5, 3), np.float32)])
    inlined = export.to_onnx(
        layer.train(), torch.randn(2, 5, 3), mode="train", opset=23, inline=True
    )
    with pytest.raises(ValueError, match=r"no normport training calls \(exported with inline"):
        runtime.recalibrate(inlined, [np.ones((2, 5, 3), np.float32)])


# -- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recal") / "seq.train.onnx"
    export.save(_seq_layer_train(), path)
    return path


def _data() -> np.ndarray:
    return np.random.default_rng(3).normal(1.0, 2.0, size=(3, 4, 5, 3)).astype(np.float32)


def _run(train_file, tmp_path, *extra) -> tuple[int, onnx.ModelProto | None]:
    out = tmp_path / "seq.eval.onnx"
    code = recalibration.main(["--train-model", str(train_file), *extra, "--out", str(out)])
    return code, onnx.load(out) if out.exists() else None


def _same(model: onnx.ModelProto, expected: onnx.ModelProto) -> None:
    x = {"input": np.random.default_rng(4).normal(size=(2, 6, 3)).astype(np.float32)}
    np.testing.assert_allclose(
        session(model).run(None, x)[0], session(expected).run(None, x)[0], atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("layout", ["npy_stacked", "npy_split", "npz_named"])
def test_cli_reads_npy_and_npz(layout, train_file, tmp_path, capsys):
    data = _data()
    expected = runtime.recalibrate(train_file, list(data))
    if layout == "npy_stacked":
        np.save(tmp_path / "d.npy", data)
        extra = ["--data", str(tmp_path / "d.npy")]
    elif layout == "npy_split":
        np.save(tmp_path / "d.npy", data.reshape(12, 5, 3))
        extra = ["--data", str(tmp_path / "d.npy"), "--batch-size", "4"]
    else:
        np.savez(tmp_path / "d.npz", input=data)
        extra = ["--data", str(tmp_path / "d.npz")]
    code, model = _run(train_file, tmp_path, *extra)
    assert code == 0, capsys.readouterr().err
    assert (
        "recalibrated 1 layer(s) with method precise over 3 batch(es), 12 samples"
        in capsys.readouterr().out
    )
    _same(model, expected)


@pytest.mark.parametrize(
    ("files", "extra", "message"),
    [
        ({}, ["--data", "{tmp}/absent.npy"], r"data file '.*absent.npy' does not exist"),
        ({"d.npz": {"inputs": _data()}}, [], r"unknown \['inputs'\], missing \['input'\]"),
        (
            {"d.npy": _data()[0]},
            [],
            r"d.npy\['input'\]: expected batches stacked along a leading axis, rank 4 "
            r"\(num_batches, batch, seq, 3\), got shape \(4, 5, 3\) \(one batch\? pass "
            r"--batch-size",
        ),
        ({"d.npy": _data()}, ["--batch-size", "2"], r"with --batch-size expected one batch"),
        ({"d.txt": None}, [], r"data file 'd.txt': expected a .npy or .npz file"),
    ],
    ids=["missing_file", "npz_names", "npy_rank", "split_rank", "extension"],
)
def test_cli_errors_name_the_offending_value(files, extra, message, train_file, tmp_path, capsys):
    for name, value in files.items():
        path = tmp_path / name
        if name.endswith(".npz"):
            np.savez(path, **value)
        elif name.endswith(".npy"):
            np.save(path, value)
        else:
            path.write_text("1 2 3")
    data = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    if "--data" not in data:
        data = ["--data", str(tmp_path / next(iter(files))), *data]
    code, model = _run(train_file, tmp_path, *data)
    assert code == 2 and model is None
    assert re.search(message, capsys.readouterr().err)


def test_cli_missing_train_model(tmp_path, capsys):
    np.save(tmp_path / "d.npy", _data())
    code, _ = _run(tmp_path / "nope.onnx", tmp_path, "--data", str(tmp_path / "d.npy"))
    assert code == 2
    assert "train model" in capsys.readouterr().err
