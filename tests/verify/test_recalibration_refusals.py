"""What recalibration refuses, before any statistic is computed, and how the CLI reports it:
one line naming the batch and the array (or the file), exit status 2, nothing written."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch

from normport import export, models, runtime
from normport.runtime import recalibration


@functools.cache
def _seq_train(dtype: torch.dtype | None = None) -> onnx.ModelProto:
    torch.manual_seed(0)
    layer = models.SequenceBatchNorm(3, momentum=0.1).train()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    dynamic = {"input": {0: "batch", 1: "seq"}}
    return export.to_onnx(
        layer, torch.randn(2, 5, 3), mode="train", opset=23, dynamic=dynamic, dtype=dtype
    )


def _good(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(1.0, 2.0, size=(n, 5, 3)).astype(np.float32)


def _with(value: float, index: tuple[int, ...]) -> np.ndarray:
    array = _good()
    array[index] = value
    return array


@pytest.mark.parametrize(
    ("batches", "error", "message"),
    [
        (
            [np.zeros((0, 5, 3), np.float32)] * 6,
            ValueError,
            r"^batch 0: input 'input' is empty, shape \(0, 5, 3\) \(batch size 0\): every batch "
            r"needs at least one sample$",
        ),
        (
            [_good(), np.zeros((3, 0, 3), np.float32)],
            ValueError,
            r"^batch 1: input 'input' is empty, shape \(3, 0, 3\) \(a dimension of size 0\)",
        ),
        (iter(()), ValueError, r"^no batches: recalibration needs at least one batch$"),
        (
            [_good(), _good(), _with(np.nan, (1, 2, 0))],
            ValueError,
            r"^batch 2: input 'input' holds non-finite data: nan at index \(1, 2, 0\)$",
        ),
        (
            [np.where(np.arange(60).reshape(4, 5, 3) == 40, -np.inf, _with(np.inf, (0, 0, 1)))],
            ValueError,
            r"^batch 0: input 'input' holds non-finite data: inf at index \(0, 0, 1\) "
            r"\(and 1 more\)$",
        ),
        (
            [_good() > 0],
            TypeError,
            r"^batch 0: input 'input' expects float32 \(any float type is cast\), got bool$",
        ),
        (
            [_good(), np.zeros((2, 5), np.float32)],
            ValueError,
            r"^batch 1: input 'input' expects rank 3 \(batch, seq, 3\) float32, got shape \(2, 5\)",
        ),
    ],
    ids=["six_empty_batches", "empty_seq", "no_batches", "nan", "inf", "bool", "rank"],
)
def test_refused_before_anything_runs(batches, error, message):
    model = _seq_train()
    before = model.SerializeToString()
    for method in ("precise", "ema"):
        with pytest.raises(error, match=message):
            runtime.recalibrate(model, list(batches) if method == "ema" else batches, method=method)
        batches = [] if isinstance(batches, type(iter(()))) else batches
    assert model.SerializeToString() == before


def test_nan_is_not_blamed_on_the_batch_size():
    with pytest.raises(ValueError) as caught:
        runtime.recalibrate(_seq_train(), [_with(np.nan, (0, 0, 0))])
    assert "one value" not in str(caught.value) and "nan at index (0, 0, 0)" in str(caught.value)


def test_batch_size_one_is_fine_where_each_channel_still_sees_several_values():
    """(1, L, C) with L > 1: L values per channel, a finite unbiased variance."""
    data = [_good(1, seed=i) for i in range(3)]
    state, _ = recalibration.recalibrated_statistics(_seq_train(), data)
    per_batch = [d.reshape(-1, 3) for d in data]
    want = np.mean([p.var(axis=0, ddof=1) for p in per_batch], axis=0)
    np.testing.assert_allclose(state["running_var"], want, rtol=1e-5)


def test_float_data_of_any_precision_is_cast_and_overflow_is_refused():
    half = _seq_train(torch.float16)
    for dtype in (np.float64, np.float32, np.float16):
        runtime.recalibrate(half, [_good().astype(dtype)])
    with pytest.raises(
        ValueError,
        match=r"^batch 0: input 'input' has values beyond float16's range, which the cast to "
        r"float16 turns into inf at index \(0, 0, 0\)$",
    ):
        runtime.recalibrate(half, [_with(1e6, (0, 0, 0))])


# -- the command line --------------------------------------------------------------------------


@pytest.fixture()
def files(tmp_path):
    train = tmp_path / "seq.train.onnx"
    export.save(_seq_train(), train)
    data = tmp_path / "d.npy"
    np.save(data, np.stack([_good(4, seed=i) for i in range(3)]))
    return train, data, tmp_path / "out" / "seq.eval.onnx"


def _main(capsys, *argv) -> tuple[int, str, str]:
    code = recalibration.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _refused(code: int, err: str, message: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], err


def test_cli_progress_and_summary(files, capsys):
    train, data, out = files
    code, stdout, stderr = _main(capsys, "--train-model", train, "--data", data, "--out", out)
    assert code == 0, stderr
    assert stderr.splitlines() == [f"batch {i}/3 (4 samples)" for i in (1, 2, 3)]
    assert stdout.strip() == (
        f"recalibrated 1 layer(s) with method precise over 3 batch(es), 12 samples; wrote {out}"
    )
    assert {p.key: p.value for p in onnx.load(out).metadata_props}["recalibration_method"] == (
        "precise"
    )


def test_cli_ema_from_reset_warns(files, capsys):
    train, data, out = files
    code, stdout, stderr = _main(
        capsys, "--train-model", train, "--data", data, "--out", out, "--method", "ema",
        "--reset-stats",
    )  # fmt: skip
    assert code == 0, stderr
    assert (
        "warning: momentum 0.1 over 3 batch(es): the statistics carry 27% of the data's mean "
        "and 73% of the reset values; use --method precise"
    ) in stderr
    assert "with method ema" in stdout


@pytest.mark.parametrize("case", ["out_is_dir", "out_below_file"])
def test_cli_out_is_checked_before_any_work(case, files, capsys):
    train, _, out = files
    if case == "out_is_dir":
        out.mkdir(parents=True)
        target, message = out, f"--out {str(out)!r} is a directory"
    else:
        out.parent.write_text("a file")
        target, message = out, f"{str(out.parent)!r} is a file, not a directory"
    # The data file does not exist: --out is refused first.
    code, _, err = _main(
        capsys, "--train-model", train, "--data", out.parent / "absent.npy", "--out", target
    )
    _refused(code, err, message)


@pytest.mark.parametrize("content", [b"\x08\x07garbage\xff\xff\xff", b""], ids=["junk", "empty"])
def test_cli_corrupt_model_file(content, files, capsys):
    _, data, out = files
    bad = out.parent.parent / "bad.onnx"
    bad.write_bytes(content)
    code, _, err = _main(capsys, "--train-model", bad, "--data", data, "--out", out)
    _refused(code, err, f"train model {str(bad)!r} is not an ONNX model")
    assert not out.exists()


def test_cli_refusals_are_one_line(files, capsys):
    train, data, out = files
    code, _, err = _main(
        capsys, "--train-model", train, "--data", data.parent / "x.npy", "--out", out
    )
    _refused(code, err, "data file")
    nan = data.parent / "nan.npy"
    np.save(nan, np.stack([_good(), _with(np.nan, (3, 4, 2))]))
    code, _, err = _main(capsys, "--train-model", train, "--data", nan, "--out", out)
    _refused(code, err, "batch 1: input 'input' holds non-finite data: nan at index (3, 4, 2)")
    evals = data.parent / "eval.onnx"
    export.save(runtime.recalibrate(train, [_good()]), evals)
    code, _, err = _main(capsys, "--train-model", evals, "--data", data, "--out", out)
    _refused(code, err, "is an inference graph (no running statistics to update); pass a training")
    assert not out.exists() and "Traceback" not in err


def test_cli_help_shows_defaults_and_examples(capsys):
    code, out, _ = _main(capsys, "--help")
    assert code == 0
    assert "default: precise" in out and "default: 1" in out
    assert "examples:" in out and "python -m runtime recalibrate --train-model" in out
    assert "precise" in out and "update_bn" in out and "1 - (1 - m)^K" in out


def test_an_error_without_a_message_is_named_by_its_type() -> None:
    """Near misses of the one-line error: an empty message, a message starting with a blank."""
    from normport.runtime.messages import first_line

    assert first_line(ValueError("")) == "ValueError"
    assert first_line(ValueError(""), default="") == ""
    assert first_line(RuntimeError("\n  the real line\nmore")) == "the real line"
    assert first_line(OSError("plain words"), limit=5) == "plain"
