"""A user project with its own ``models`` / ``export`` / ``runtime`` packages: normport's code
lives under the ``normport`` namespace, so the user's packages never shadow it.

The oracle is the user's own model in PyTorch: the file that ``python -m export`` wrote from
the user's root must reproduce it in onnxruntime.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

MYNET = '''\
"""The user's own network: it lives in the user's package ``models``."""
import torch
from torch import nn


def factory():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    with torch.no_grad():
        bn = net[1]
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval(), torch.randn(4, 3, 8, 8)
'''

# The user's packages of the same names as normport's folders: importing one is the bug.
SHADOW = 'raise ImportError("the user\'s own {name} package was imported by normport")\n'


def _project(root: Path, *, shadow: tuple[str, ...]) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "models" / "__init__.py").write_text('"""The user\'s own models package."""\n')
    (root / "models" / "mynet.py").write_text(MYNET)
    for name in shadow:
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(SHADOW.format(name=name))
    return root


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _user_model(root: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    return runpy.run_path(str(root / "models" / "mynet.py"))["factory"]()


def _check_export(root: Path, repo: Path) -> None:
    net, x = _user_model(root)
    session = ort.InferenceSession(str(repo / "mynet" / "1" / "model.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_user_models_package_with_the_plain_commands(tmp_path: Path) -> None:
    """``python -m export`` / ``python -m runtime verify --module models.mynet:factory`` from
    the root of a project whose ``models`` package is its own."""
    root = _project(tmp_path / "proj", shadow=())
    repo = root / "repo"
    done = _run(["-m", "export", "--module", "models.mynet:factory", "--name", "mynet",
                 "--out", str(repo)], root)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    _check_export(root, repo)

    out = root / "verify"
    done = _run(["-m", "runtime", "verify", "--module", "models.mynet:factory", "--opset", "17",
                 "--dtype", "float32", "--no-divergence", "--out", str(out)], root)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    cells = results["parity"]
    assert cells and all(c["status"] == "pass" for c in cells), [c["status"] for c in cells]
    assert results["summary"]["verdict"] == "PASS"


@pytest.mark.parametrize("command", [["normport.export"], ["normport.runtime", "verify"]])
def test_user_packages_named_like_every_folder(tmp_path: Path, command: list[str]) -> None:
    """A project with its own ``models``, ``export`` and ``runtime``: the namespaced commands
    run normport's, and nothing of the user's but ``models.mynet`` is imported."""
    root = _project(tmp_path / "proj", shadow=("export", "runtime"))
    out = root / "out"
    if command[0] == "normport.export":
        args = ["--module", "models.mynet:factory", "--name", "mynet", "--out", str(out)]
    else:
        args = ["--module", "models.mynet:factory", "--opset", "23", "--dtype", "float32",
                "--mode", "eval", "--no-divergence", "--out", str(out)]  # fmt: skip
    done = _run(["-m", command[0], *command[1:], *args], root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the user's own" not in done.stderr
    if command[0] == "normport.export":
        _check_export(root, out)
    else:
        assert json.loads((out / "results.json").read_text())["summary"]["verdict"] == "PASS"


def test_plain_command_names_the_shadowing_package(tmp_path: Path) -> None:
    """Near miss: with the user's own ``runtime`` package, ``python -m runtime`` is the
    user's (Python's rule, not normport's); the namespaced form is the way out."""
    root = _project(tmp_path / "proj", shadow=("runtime",))
    done = _run(["-m", "runtime", "verify", "--list"], root)
    assert done.returncode != 0
    assert "the user's own runtime package was imported" in done.stderr
