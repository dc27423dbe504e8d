"""``python -m export --module pkg.mod:factory --name NAME``: a user's own model, end to end.

The CLI runs as a user types it (a subprocess, ``python -m export``) with factory modules
written into a temporary folder on ``PYTHONPATH``.  Checked: the files, ``config.pbtxt`` read
back, onnxruntime against PyTorch (eval, and a train step), the printed tables, usage errors
(exit status 2, one line, no traceback, nothing written: one case of each kind in a
subprocess, all of them through ``main()`` in-process) and ``--help``.  In-process:
:func:`export.__main__.layer_table` on hand-made models, :mod:`export.factory`.  Slow:
torchvision's resnet18 and a tiny transformers BERT.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from normport.export import factory
from normport.export.__main__ import (
    LAYERS_KEY,
    UNRECOGNIZED_KEY,
    layer_table,
    main,
    valid_model_name,
)
from tests.triton_schema import read_config

ROOT = Path(__file__).resolve().parents[1]

USER_NETS = '''
import torch
from torch import nn


class Net(nn.Module):
    """Conv -> torch.nn BatchNorm2d -> pool -> torch.nn LayerNorm -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 5)

    def forward(self, image):
        x = torch.relu(self.bn(self.conv(image)))
        return self.head(self.ln(x.mean((2, 3))))


def _net(cls=Net):
    torch.manual_seed(0)
    net = cls()
    with torch.no_grad():  # non-trivial statistics and affine parameters
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        for p in (*net.bn.parameters(), *net.ln.parameters()):
            p.uniform_(0.5, 1.5)
    return net


def make():
    return _net().eval(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


class SampledNet(Net):
    def example_inputs(self, batch_size, seed):
        return torch.randn(batch_size, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def make_sampled():
    return _net(SampledNet)


NOT_CALLABLE = 3


def junk():
    return "junk"


def bad_example():
    return _net(), "not a tensor"


def module_only():
    return _net()


def raises():
    raise RuntimeError("no weights here")


class MaxNorm(nn.Module):
    """Named like a norm, but divides by the largest magnitude: no normalization it knows."""

    def forward(self, x):
        return x / x.abs().amax(-1, keepdim=True).clamp_min(1e-6)


class PartlyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(6)
        self.norm = MaxNorm()

    def forward(self, tokens):
        return self.norm(self.ln(tokens))


def make_partly():
    torch.manual_seed(0)
    return PartlyNet().eval(), torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))


def make_gn():
    """Conv -> torch.nn GroupNorm: a layer whose form depends on --target."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net.eval(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
'''

THIRDPARTY_NETS = """
import tests.thirdparty._torchvision  # noqa: F401  torchvision's op schemas, before torchvision
import torch


def resnet18():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = resnet18(num_classes=10)
    with torch.no_grad():  # trained-looking statistics, not the initial 0 / 1
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    return net.eval(), torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    return BertModel(config).eval(), ids
"""


@pytest.fixture(scope="module")
def nets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("factories")
    (folder / "usernets.py").write_text(USER_NETS)
    (folder / "thirdparty_nets.py").write_text(THIRDPARTY_NETS)
    (folder / "broken_nets.py").write_text("raise RuntimeError('boom at import')\n")
    (folder / "needs_missing.py").write_text("import no_such_dependency_xyz\n")
    return folder


def run_cli(nets_dir: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(nets_dir), str(ROOT)])}
    return subprocess.run(
        [sys.executable, "-m", "export", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_nets(nets_dir: Path, name: str) -> ModuleType:
    """The factory module, imported in-process under a private name."""
    spec = importlib.util.spec_from_file_location(f"_{name}_under_test", nets_dir / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ort_run(model_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def table_rows(stdout: str, title: str) -> list[list[str]]:
    """The rows of the aligned table under the line ``title`` (its header and rule dropped)."""
    lines = stdout.splitlines()
    start = lines.index(title)
    header, rule = lines[start + 1], lines[start + 2]
    assert header.split()[:2] == ["path", "class"] and set(rule.replace(" ", "")) == {"-"}
    columns = [m.start() for m in re.finditer(r"\S+", rule)]
    rows = []
    for line in lines[start + 3 :]:
        if not line.strip() or line.startswith("normalization-like, not one node"):
            break
        assert [m.start() for m in re.finditer(r"\S+", line)] == columns, line
        rows.append(line.split())
    return rows


# -- a custom model with torch.nn BatchNorm2d and LayerNorm ----------------------------------------


@pytest.fixture(scope="module")
def exported(nets_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("repo")
    result = run_cli(nets_dir, "--module", "usernets:make", "--name", "user_net", "--out", str(out))
    return result, out


def test_custom_model_writes_a_triton_model(exported) -> None:
    result, out = exported
    assert result.returncode == 0, result.stderr
    assert "[1/1] user_net: exporting usernets:make ..." in result.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "user_net/1/model.onnx",
        "user_net/config.pbtxt",
    ]
    config = read_config(out / "user_net")
    assert config["name"] == "user_net"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 64
    assert config["inputs"] == [
        {"name": "image", "data_type": "TYPE_FP32", "dims": [3, 8, 8], "reshape": None}
    ]
    assert config["outputs"] == [
        {"name": "output", "data_type": "TYPE_FP32", "dims": [5], "reshape": None}
    ]


def test_custom_model_matches_pytorch_in_onnxruntime(exported, nets_dir: Path) -> None:
    result, out = exported
    assert result.returncode == 0, result.stderr
    net, _ = load_nets(nets_dir, "usernets").make()
    model = onnx.load(out / "user_net" / "1" / "model.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == 1 and ops.count("LayerNormalization") == 1
    image = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(7))  # batch 3, not 2
    with torch.no_grad():
        expected = net(image).numpy()
    got = ort_run(out / "user_net" / "1" / "model.onnx", {"image": image.numpy()})
    np.testing.assert_allclose(got["output"], expected, rtol=1e-4, atol=1e-5)


def test_custom_model_prints_its_layers_and_a_summary(exported) -> None:
    result, _ = exported
    assert result.returncode == 0, result.stderr
    assert table_rows(result.stdout, "normalization layers: 2") == [
        ["bn", "BatchNorm2d", "batchnorm", "module", "BatchNormalization"],
        ["ln", "LayerNorm", "layernorm", "module", "LayerNormalization"],
    ]
    assert "normalization-like, not one node" not in result.stdout
    summary = result.stdout.strip().splitlines()[-1].split()
    assert summary[:4] == ["user_net", "eval", "23", "float32"]
    assert summary[5] == "BatchNormalization,LayerNormalization"
    assert summary[-1] == "ok"


def test_train_mode_with_an_example_inputs_method(nets_dir: Path, tmp_path: Path) -> None:
    """The method form, a train graph: full shapes, running statistics as outputs, one step."""
    result = run_cli(
        nets_dir, "--module", "usernets:make_sampled", "--name", "sampled", "--mode", "train",
        "--opset", "21", "--out", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = read_config(tmp_path / "sampled")
    assert config["max_batch_size"] == 0 and config["dynamic_batching"] is None
    assert config["inputs"][0]["dims"] == [-1, 3, 6, 6]
    outputs = {t["name"] for t in config["outputs"]}
    assert {"output", "bn.running_mean.next", "bn.running_var.next"} <= outputs
    net = load_nets(nets_dir, "usernets").make_sampled()
    image = net.example_inputs(5, seed=3)
    torch_net = copy.deepcopy(net).train()
    with torch.no_grad():
        expected = torch_net(image).numpy()
    got = ort_run(tmp_path / "sampled" / "1" / "model.onnx", {"image": image.numpy()})
    np.testing.assert_allclose(got["output"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        got["bn.running_var.next"], torch_net.bn.running_var.numpy(), rtol=1e-5, atol=1e-6
    )
    assert table_rows(result.stdout, "normalization layers: 2")[0][-1].startswith("normport.")


def test_a_norm_like_module_that_is_not_one_node_is_named(nets_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        nets_dir, "--module", "usernets:make_partly", "--name", "partly", "--out", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    assert table_rows(result.stdout, "normalization layers: 1") == [
        ["ln", "LayerNorm", "layernorm", "module", "LayerNormalization"]
    ]
    lines = result.stdout.splitlines()
    start = lines.index("normalization-like, not one node: 1")
    assert lines[start + 1].split() == ["path", "class", "why"]
    path, cls, why = lines[start + 3].split(maxsplit=2)
    assert (path, cls) == ("norm", "MaxNorm") and why
    net, _ = load_nets(nets_dir, "usernets").make_partly()
    tokens = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = net(tokens).numpy()
    got = ort_run(tmp_path / "partly" / "1" / "model.onnx", {"tokens": tokens.numpy()})
    np.testing.assert_allclose(got["output"], expected, rtol=1e-4, atol=1e-5)


def test_max_batch_size_0_writes_full_shapes(
    nets_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.syspath_prepend(str(nets_dir))
    argv = ["--module", "usernets:make", "--name", "n", "--max-batch-size", "0"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    config = read_config(tmp_path / "n")
    assert config["max_batch_size"] == 0 and config["dynamic_batching"] is None
    assert config["inputs"][0]["dims"] == [-1, 3, 8, 8]
    assert config["outputs"][0]["dims"] == [-1, 5]
    assert capsys.readouterr().out.strip().splitlines()[-1].split()[-1] == "ok"


@pytest.mark.parametrize(
    ("argv", "target", "op"),
    [
        ([], "onnxruntime", "normport.GroupNorm"),  # the default: 0.31x the standard op there
        (["--target", "standard"], "standard", "GroupNormalization"),
    ],
    ids=["default", "standard"],
)
def test_target_picks_the_groupnorm_form(
    nets_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    target: str,
    op: str,
) -> None:
    monkeypatch.syspath_prepend(str(nets_dir))
    common = ["--module", "usernets:make_gn", "--name", "gn", "--out", str(tmp_path)]
    assert main([*common, *argv]) == 0
    out = capsys.readouterr().out
    assert table_rows(out, "normalization layers: 1") == [
        ["1", "GroupNorm", "groupnorm", "module", op]
    ]
    summary = out.strip().splitlines()[-1].split()
    assert summary[:4] == ["gn", "eval", "23", "float32"] and summary[5] == op.split(".")[-1]
    path = tmp_path / "gn" / "1" / "model.onnx"
    model = onnx.load(path)
    assert {p.key: p.value for p in model.metadata_props}["target"] == target
    net, _ = load_nets(nets_dir, "usernets").make_gn()
    image = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = net(image).numpy()
    got = ort_run(path, {"input": image.numpy()})
    np.testing.assert_allclose(got["output"], expected, rtol=1e-4, atol=1e-5)


# -- usage errors: exit 2, one line, no traceback, nothing written -----------------------------


def _module(target: str) -> list[str]:
    return ["--module", target, "--name", "n"]


USAGE_ERRORS = {
    "no_colon": (_module("usernets"), r"--module expects 'pkg\.mod:factory', got 'usernets'"),
    "no_attr": (_module("usernets:"), r"--module expects 'pkg\.mod:factory', got 'usernets:'"),
    "no_module": (_module(":make"), r"--module expects 'pkg\.mod:factory', got ':make'"),
    "two_colons": (_module("a:b:c"), r"--module expects 'pkg\.mod:factory', got 'a:b:c'"),
    "relative": (_module(".usernets:make"), r"expects 'pkg\.mod:factory', got '\.usernets"),
    "not_importable": (
        _module("no_such_pkg.nets:make"),
        r"--module 'no_such_pkg\.nets:make': No module named 'no_such_pkg'",
    ),
    "import_raises": (
        _module("broken_nets:make"),
        r"--module 'broken_nets:make': importing 'broken_nets' raised RuntimeError: boom at import",
    ),
    "import_of_a_dependency_fails": (
        _module("needs_missing:make"),
        r"importing 'needs_missing' raised ModuleNotFoundError: No module named "
        r"'no_such_dependency_xyz'",
    ),
    "missing_attr": (
        _module("usernets:nope"),
        r"--module 'usernets:nope': module 'usernets' has no attribute 'nope'",
    ),
    "not_callable": (
        _module("usernets:NOT_CALLABLE"),
        r"'NOT_CALLABLE' is not callable \(its type is int\)",
    ),
    "returns_junk": (
        _module("usernets:junk"),
        r"the factory must return \(module, example_inputs\) or a module with an "
        r"example_inputs\(batch_size, seed\) method, got str$",
    ),
    "module_without_inputs": (
        _module("usernets:module_only"),
        r"got Net \(an nn\.Module without example_inputs\)$",
    ),
    "bad_example_inputs": (
        _module("usernets:bad_example"),
        r"example_inputs: expected a tensor or a tuple of tensors, got str$",
    ),
    "factory_raises": (
        _module("usernets:raises"),
        r"the factory raised RuntimeError: no weights here$",
    ),
    "no_name": (["--module", "usernets:make"], r"--module needs --name NAME"),
    "name_with_slash": (
        ["--module", "usernets:make", "--name", "a/b"],
        r"--name 'a/b' is not a Triton model name",
    ),
    "hidden_name": (
        ["--module", "usernets:make", "--name", ".net"],
        r"--name '\.net' is not a Triton model name",
    ),
    "name_for_zoo": (["--model", "seq_bn", "--name", "x"], r"--name names a --module model"),
    "max_batch_in_train": (
        ["--module", "usernets:make", "--name", "n", "--mode", "train", "--max-batch-size", "8"],
        r"--max-batch-size: train graphs are written with 0",
    ),
    "out_is_a_file": (
        ["--module", "usernets:make", "--name", "n", "--out", "{file}"],
        r"--out '{file}' is a file, expected a folder",
    ),
    "out_under_a_file": (
        ["--module", "usernets:make", "--name", "n", "--out", "{file}/repo"],
        r"--out '{file}/repo': '{file}' is a file, expected a folder",
    ),
    "unknown_target": (
        ["--module", "usernets:make", "--name", "n", "--target", "tensorrt"],
        r"--target 'tensorrt' is not a target: choose from onnxruntime, standard$",
    ),
    "zoo_out_is_a_file": (
        ["--model", "seq_bn", "--out", "{file}"],
        r"--out '{file}' is a file, expected a folder",
    ),
}


# Through a real process for one case of each kind (each start imports torch: seconds); every
# case in-process, through the same main().
IN_A_SUBPROCESS = (
    "no_colon", "not_importable", "import_raises", "missing_attr", "returns_junk",
    "name_with_slash", "out_under_a_file",
)  # fmt: skip


def _usage_case(tmp_path: Path, argv: list[str], message: str) -> tuple[list[str], str, Path]:
    """argv with ``{file}`` filled in and ``--out`` added; the message regex; the repo folder."""
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    repo = tmp_path / "repo"
    argv = [a.replace("{file}", str(file)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(repo)]
    return argv, message.replace("{file}", re.escape(str(file))), repo


def _check_usage_error(stdout: str, stderr: str, message: str, tmp_path: Path, repo: Path) -> None:
    assert "Traceback" not in stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("python -m export: error: ")
    assert re.search(message, line), line
    assert stdout == ""
    assert not repo.exists() and (tmp_path / "a_file").read_text() == "not a folder"


@pytest.mark.parametrize(
    ("argv", "message"),
    [USAGE_ERRORS[k] for k in IN_A_SUBPROCESS],
    ids=IN_A_SUBPROCESS,
)
def test_usage_error_exits_2_with_one_line(
    nets_dir: Path, tmp_path: Path, argv: list[str], message: str
) -> None:
    argv, message, repo = _usage_case(tmp_path, argv, message)
    result = run_cli(nets_dir, *argv)
    assert result.returncode == 2, result.stderr
    _check_usage_error(result.stdout, result.stderr, message, tmp_path, repo)


@pytest.mark.parametrize(("argv", "message"), USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_usage_error(
    nets_dir: Path,
    tmp_path: Path,
    argv: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.syspath_prepend(str(nets_dir))
    argv, message, repo = _usage_case(tmp_path, argv, message)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    _check_usage_error(captured.out, captured.err, message, tmp_path, repo)


def test_help_shows_the_defaults(nets_dir: Path) -> None:
    result = run_cli(nets_dir, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for shown in (
        "--module PKG.MOD:FACTORY",
        "--name NAME",
        "(default: eval)",
        "(default: 23)",
        "(default: float32)",
        "(default: model_repository)",
        "--target {onnxruntime,standard}",
        "(default: onnxruntime)",
    ):
        assert shown in text
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("resnet18", True),
        ("bert-tiny_v1.2", True),
        ("_x", True),
        ("9", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        (".hidden", False),
        ("-opt", False),
        ("a/b", False),
        ("a b", False),
        ("a\\b", False),
        ("..", False),
        ("naïve", False),
    ],
)
def test_valid_model_name(name: str, valid: bool) -> None:
    assert valid_model_name(name) is valid


# -- layer_table, on hand-made models -------------------------------------------------------------


def _model(**props: object) -> onnx.ModelProto:
    model = onnx.ModelProto()
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    return model


_BN = {"path": "layer1.0.bn1", "cls": "BatchNorm2d", "kind": "batchnorm", "source": "module"}
_LAYERS = [
    {**_BN, "node": "normport.BatchNormTrain"},
    {"path": "", "cls": "rms_norm", "kind": "rmsnorm", "source": "functional",
     "node": "RMSNormalization"},
    {"path": "blocks.3.norm", "cls": "T5LayerNorm", "kind": "rmsnorm", "source": "handwritten",
     "node": "normport.RMSNorm", "training": False},
]  # fmt: skip


def test_layer_table_lists_layers_then_the_partly_recognised() -> None:
    partly = [{"path": "head.norm", "cls": "WeirdNorm", "why": "mean over a dim it also scales"}]
    text = layer_table(_model(**{LAYERS_KEY: _LAYERS, UNRECOGNIZED_KEY: partly}))
    assert text.splitlines() == [
        "normalization layers: 3",
        "path           class        kind       source       node",
        "-------------  -----------  ---------  -----------  -----------------------",
        "layer1.0.bn1   BatchNorm2d  batchnorm  module       normport.BatchNormTrain",
        "<root>         rms_norm     rmsnorm    functional   RMSNormalization",
        "blocks.3.norm  T5LayerNorm  rmsnorm    handwritten  normport.RMSNorm",
        "normalization-like, not one node: 1",
        "path       class      why",
        "---------  ---------  ------------------------------",
        "head.norm  WeirdNorm  mean over a dim it also scales",
    ]


@pytest.mark.parametrize("partly", [None, "", "[]"])
def test_layer_table_without_partly_recognised_modules(partly: str | None) -> None:
    props = {LAYERS_KEY: [_LAYERS[0]]}
    if partly is not None:
        props[UNRECOGNIZED_KEY] = partly
    text = layer_table(_model(**props))
    assert "normalization-like, not one node" not in text
    assert text.splitlines()[0] == "normalization layers: 1"


def test_layer_table_without_layers() -> None:
    assert layer_table(_model(**{LAYERS_KEY: []})) == "normalization layers: none found"


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ({}, r"no metadata_props\['normalization_layers'\]: not written by export\.to_onnx"),
        ({LAYERS_KEY: "bn1:BatchNorm2d"}, r"metadata_props\['normalization_layers'\] is not JSON"),
        ({LAYERS_KEY: {"a": 1}}, r"\['normalization_layers'\] must be a JSON list"),
        (
            {LAYERS_KEY: [{**_BN}]},
            r"\['normalization_layers'\]\[0\] must be an object with string fields "
            r"path, cls, kind, source, node",
        ),
        (
            {LAYERS_KEY: [], UNRECOGNIZED_KEY: [{"path": "x", "cls": "Y"}]},
            r"\['normport\.unrecognized'\]\[0\] must be an object with string fields path, cls, why",
        ),
    ],
    ids=["missing", "not_json", "not_a_list", "entry_without_node", "unrecognized_without_why"],
)
def test_layer_table_rejects_metadata_outside_the_contract(props: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        layer_table(_model(**props))


# -- export.factory in-process ----------------------------------------------------------------------


def test_factory_method_form_samples_batches(nets_dir: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(nets_dir))
    made = factory.build("usernets:make_sampled", batch_size=3, seed=2)
    assert made.example[0].shape == (3, 3, 6, 6)
    assert torch.equal(made.sample(3, 2)[0], made.example[0])
    assert made.sample(7, 0)[0].shape == (7, 3, 6, 6)
    tuple_form = factory.build("usernets:make")
    assert tuple_form.sample is None and tuple_form.example[0].shape == (2, 3, 8, 8)


def test_factory_errors_are_value_and_type_errors(nets_dir: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(nets_dir))
    with pytest.raises(factory.FactoryError) as info:
        factory.build("usernets:nope")
    assert isinstance(info.value, ValueError) and not isinstance(info.value, TypeError)
    with pytest.raises(TypeError, match=r"got str$"):
        factory.build("usernets:junk")
    with pytest.raises(factory.FactoryTypeError, match=r"got list of nothing"):
        factory.as_inputs([], "x")


# -- real architectures (wait on the core: any torch.nn module, ModelOutput fields) ---------------


@pytest.mark.slow
def test_torchvision_resnet18(nets_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        nets_dir, "--module", "thirdparty_nets:resnet18", "--name", "resnet18",
        "--out", str(tmp_path), timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout, "normalization layers: 20")
    assert {tuple(r[1:]) for r in rows} == {
        ("BatchNorm2d", "batchnorm", "module", "BatchNormalization")
    }
    assert rows[0][0] == "bn1" and "layer4.1.bn2" in {r[0] for r in rows}
    config = read_config(tmp_path / "resnet18")
    assert [t["dims"] for t in config["inputs"]] == [[3, 64, 64]]
    assert [t["dims"] for t in config["outputs"]] == [[10]]
    net, _ = load_nets(nets_dir, "thirdparty_nets").resnet18()
    image = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = net(image).numpy()
    (input_name,) = (t["name"] for t in config["inputs"])
    got = ort_run(tmp_path / "resnet18" / "1" / "model.onnx", {input_name: image.numpy()})
    (output,) = got.values()
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_transformers_bert(nets_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        nets_dir, "--module", "thirdparty_nets:bert", "--name", "bert",
        "--out", str(tmp_path), timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout, "normalization layers: 5")
    assert {tuple(r[1:]) for r in rows} == {
        ("LayerNorm", "layernorm", "module", "LayerNormalization")
    }
    assert rows[0][0] == "embeddings.LayerNorm"
    config = read_config(tmp_path / "bert")
    assert config["inputs"] == [
        {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [16], "reshape": None}
    ]
    assert [(t["name"], t["dims"]) for t in config["outputs"]] == [
        ("last_hidden_state", [16, 32]),
        ("pooler_output", [32]),
    ]
    net, _ = load_nets(nets_dir, "thirdparty_nets").bert()
    ids = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = net(ids)
    got = ort_run(tmp_path / "bert" / "1" / "model.onnx", {"input_ids": ids.numpy()})
    np.testing.assert_allclose(
        got["last_hidden_state"], expected.last_hidden_state.numpy(), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        got["pooler_output"], expected.pooler_output.numpy(), rtol=1e-4, atol=1e-4
    )
