"""``python -m export`` tells the truth about what it writes: batching, names, refusals.

- Dynamic batching only for models whose eval outputs do not depend on their batch-mates; a
  batch-dependent model keeps ``max_batch_size``, gets no ``dynamic_batching``, and the reason
  (output, relative change, recomputed here in numpy) is printed and written as a comment that
  the config parser skips.
- A train export never overwrites an eval model: zoo networks become ``<name>_train``; an
  explicit ``--name`` holding the other mode is refused, as is a model file that does not parse.
- Every argument and ``--out`` problem is one line, exit 2, before any model is built (a
  factory that records its calls proves it) and fast.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from normport import export
from normport.export import triton_config
from normport.export.__main__ import main
from normport.models import zoo
from tests.triton_schema import as_dict, read_config

ROOT = Path(__file__).resolve().parents[1]
MODULE = "truthnets"

NETS = '''
import torch
from torch import nn

CALLS = []


def _randomize(net):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in [*net.named_parameters(), *net.named_buffers()]:
            if t.is_floating_point():
                u = torch.rand(t.shape, generator=g)
                t.copy_(0.5 + u if "weight" in name or "var" in name else u - 0.5)
    return net


def _example():
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(5)) * 2 + 1


def dependent():
    """BatchNorm with batch statistics in eval: outputs depend on batch-mates."""
    CALLS.append("dependent")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    return _randomize(net).eval(), _example()


def independent():
    CALLS.append("independent")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    return _randomize(net).eval(), _example()


def single():
    """A batch of one: batch-mates cannot be measured."""
    CALLS.append("single")
    net, x = independent()
    return net, x[:1]
'''


@pytest.fixture
def nets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "nets"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop(MODULE, None)
    yield importlib.import_module(MODULE)
    sys.modules.pop(MODULE, None)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, float]:
    """Run main(argv) expecting exit 2; returns its one stderr line and the seconds it took."""
    start = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main(argv)
    seconds = time.perf_counter() - start
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("python -m export: error: ")
    return line, seconds


# -- batching: measured, not assumed ------------------------------------------------------------


def _relative_change(net: torch.nn.Module, x: torch.Tensor) -> float:
    """The documented measure by hand: BatchNorm of the batch vs of each sample alone."""
    conv, bn = net[0], net[1]
    with torch.no_grad():
        h = conv(x).double().numpy()
    g, b = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()

    def norm(v: np.ndarray) -> np.ndarray:
        m, var = v.mean((0, 2, 3), keepdims=True), v.var((0, 2, 3), keepdims=True)
        return (v - m) / np.sqrt(var + bn.eps) * g[:, None, None] + b[:, None, None]

    together = norm(h)
    return max(
        float(np.abs(together[i] - norm(h[i : i + 1])[0]).max() / np.abs(norm(h[i : i + 1])).max())
        for i in range(len(h))
    )


def test_a_batch_dependent_model_gets_no_dynamic_batching(
    nets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "repo"
    assert main(["--module", f"{MODULE}:dependent", "--name", "dep", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    config = read_config(out / "dep")
    assert config["max_batch_size"] == 64 and config["dynamic_batching"] is None
    text = (out / "dep" / "config.pbtxt").read_text()
    assert "dynamic_batching {" not in text
    comment = " ".join(line[2:] for line in text.splitlines() if line.startswith("# "))
    assert "No dynamic_batching: output 'output' changes by up to" in comment
    assert as_dict(triton_config.parse(text)) == config  # both parsers skip the comments
    progress = captured.err.splitlines()
    assert progress[0] == f"[1/1] dep: exporting {MODULE}:dependent ..."
    found = re.search(
        r"no dynamic batching: output 'output' changes by up to (\S+) of its size", progress[1]
    )
    assert found, progress
    net, x = nets.dependent()
    assert float(found.group(1)) == pytest.approx(_relative_change(net, x), rel=2e-3)  # 3 digits
    assert captured.out.strip().splitlines()[-1].split()[-2:] == ["off", "ok"]


def test_a_batch_independent_model_gets_dynamic_batching(
    nets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--module", f"{MODULE}:independent", "--name", "ind", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    config = read_config(tmp_path / "ind")
    assert config["max_batch_size"] == 64
    assert config["dynamic_batching"] == {
        "preferred_batch_size": [16, 32, 64],
        "max_queue_delay_microseconds": 100,
    }
    assert captured.err.splitlines()[-1].endswith("; dynamic batching")
    assert captured.out.strip().splitlines()[-1].split()[-2:] == ["dynamic", "ok"]


def test_an_example_of_one_sample_gets_no_dynamic_batching(
    nets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--module", f"{MODULE}:single", "--name", "one", "--out", str(tmp_path)]) == 0
    assert read_config(tmp_path / "one")["dynamic_batching"] is None
    assert "fewer than 2 samples" in capsys.readouterr().err


# -- train exports never overwrite eval models ----------------------------------------------------


def test_a_zoo_train_export_is_written_beside_the_eval_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--model", "seq_bn", "--out", str(tmp_path)]) == 0
    eval_files = _files(tmp_path / "seq_bn")
    assert main(["--model", "seq_bn", "--mode", "train", "--out", str(tmp_path)]) == 0
    assert _files(tmp_path / "seq_bn") == eval_files  # untouched
    config = read_config(tmp_path / "seq_bn_train")
    assert config["name"] == "seq_bn_train"
    assert config["max_batch_size"] == 0 and config["dynamic_batching"] is None
    assert "bn1.running_mean.next" in {t["name"] for t in config["outputs"]}
    err = capsys.readouterr().err
    assert "[1/1] seq_bn_train: exporting ..." in err
    assert "seq_bn_train: ok (" in err and "no batching (max_batch_size 0)" in err


def test_an_explicit_name_holding_the_other_mode_is_refused(
    nets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--module", f"{MODULE}:independent", "--name", "net", "--out", str(tmp_path)]
    assert main(argv) == 0
    capsys.readouterr()
    before, nets.CALLS[:] = _files(tmp_path), []
    line, _ = _usage_error([*argv, "--mode", "train"], capsys)
    assert "holds an eval-mode model and this is a train-mode export named 'net'" in line
    assert "--name net_train" in line
    assert _files(tmp_path) == before and nets.CALLS == []


def test_a_zoo_eval_export_over_a_train_model_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A repository written before train exports got their own name."""
    model = export.to_onnx(
        zoo.get("seq_bn").build().train(), zoo.get("seq_bn").example_inputs(4), mode="train"
    )
    export.save(model, tmp_path / "seq_bn" / "1" / "model.onnx")
    line, _ = _usage_error(["--model", "seq_bn", "--out", str(tmp_path)], capsys)
    assert "holds a train-mode model and this is an eval-mode export named 'seq_bn'" in line


def test_an_unparsable_model_file_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cnn_gn" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00\xffnot onnx")
    line, _ = _usage_error(["--model", "cnn_gn", "--out", str(tmp_path)], capsys)
    assert "model.onnx' exists and cannot be checked" in line and "does not parse" in line
    assert path.read_bytes() == b"\x00\xffnot onnx"


# -- arguments and paths: checked first, fast, one line ---------------------------------------------


def _bad_outs(tmp_path: Path) -> dict[str, tuple[str, str]]:
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    long = "x" * 300
    return {
        "file": (str(file), r"is a file, expected a folder"),
        "under_a_file": (str(file / "repo"), r"'.*a_file' is a file, expected a folder"),
        "nul_byte": (str(tmp_path / "a\0b"), r"is not a usable path: it holds a NUL byte"),
        "name_too_long": (
            str(tmp_path / long / "repo"),
            r"longer than \d+ bytes|not a usable path",
        ),
    }


@pytest.mark.parametrize("case", ["file", "under_a_file", "nul_byte", "name_too_long"])
def test_a_bad_out_is_refused_before_any_model_is_built(
    nets, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    out, message = _bad_outs(tmp_path)[case]
    built = []
    monkeypatch.setattr(zoo, "get", lambda name: built.append(name))
    for argv in (
        ["--module", f"{MODULE}:dependent", "--name", "dep", "--out", out],
        ["--model", "cnn_bn", "--out", out],
    ):
        line, seconds = _usage_error(argv, capsys)
        assert re.search(message, line), line
        assert seconds < 2.0  # no tracing, no model
    assert nets.CALLS == [] and built == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "nets"]


def test_a_bad_out_in_a_real_process_is_one_line(nets, tmp_path: Path) -> None:
    out, _ = _bad_outs(tmp_path)["under_a_file"]
    result = subprocess.run(
        [sys.executable, "-m", "export", "--module", f"{MODULE}:dependent", "--name", "d",
         "--out", out],
        cwd=ROOT,
        env={"PYTHONPATH": f"{tmp_path / 'nets'}:{ROOT}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_help_shows_defaults_examples_and_the_naming_rule() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "export", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0
    text = result.stdout
    assert "examples:\n  python -m export --all" in text  # the epilog keeps its lines
    assert (
        "python -m export --model cnn_bn --mode train      writes model_repository/cnn_bn_" in text
    )
    flat = " ".join(text.split())
    for shown in (
        "(default: eval)",
        "(default: 23)",
        "(default: float32)",
        "(default: model_repository)",
        "(train mode: as <name>_train)",
        "used as given in both modes",
        "exit status: 0 all written, 1 some export failed, 2 bad arguments",
    ):
        assert shown in flat, shown
