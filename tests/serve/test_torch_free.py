"""The serving path without PyTorch: ``python -m runtime serve`` and its probe children run with
``torch`` and ``onnxscript`` replaced by packages that raise on import, and answer a real
Triton client with what onnxruntime computes in this process; the ``serve`` extra's
dependencies, read from the installed metadata, pull in neither."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as http

from normport.models import zoo
from tests.serve.abuse.harness import CliServer
from tests.serve.repo import export_zoo

FORBIDDEN = ("torch", "onnxscript")
MODELS = ("cnn_bn", "transformer_ln")


def _poisoned(root: Path) -> Path:
    """A folder whose ``torch`` / ``onnxscript`` raise when imported (first on PYTHONPATH)."""
    for name in FORBIDDEN:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(
            f"raise ImportError('the serving path imported {name}')\n"
        )
    return root


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("torch_free")
    for name in MODELS:
        export_zoo(root, name, max_batch_size=8)
    return root


def test_the_poison_works(tmp_path: Path) -> None:
    """Near miss: the same PYTHONPATH does stop a process that imports torch."""
    env = {**os.environ, "PYTHONPATH": os.fspath(_poisoned(tmp_path / "poison"))}
    done = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0
    assert "the serving path imported torch" in done.stderr


def test_serving_imports_neither_torch_nor_onnxscript(repository: Path, tmp_path: Path) -> None:
    poison = _poisoned(tmp_path / "poison")
    env = {**os.environ, "PYTHONPATH": os.fspath(poison)}
    flags = {"--threads": 1, "--probe-cache": tmp_path / "probe_cache"}
    with CliServer(repository, tmp_path, flags, env=env) as server:
        client = http.InferenceServerClient(f"127.0.0.1:{server.port}")
        index = {m["name"]: m["state"] for m in client.get_model_repository_index()}
        assert index == dict.fromkeys(MODELS, "READY"), server.log()
        for name in MODELS:
            spec = zoo.get(name)
            (x,) = (t.numpy() for t in spec.example_inputs(3, seed=5))
            session = ort.InferenceSession(os.fspath(repository / name / "1" / "model.onnx"))
            (want,) = session.run(None, {spec.input_names[0]: x})
            request = http.InferInput(spec.input_names[0], list(x.shape),
                                      "FP32" if x.dtype == np.float32 else "INT64")  # fmt: skip
            request.set_data_from_numpy(x, binary_data=True)
            got = client.infer(name, [request]).as_numpy(spec.output_names[0])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert "imported" not in server.log()


def _requirements(extra: str) -> list[str]:
    """The names ``pip install normport[extra]`` installs directly (the base dependencies and
    the extra's), from the installed metadata."""
    found = []
    for line in metadata.requires("normport") or []:
        if "extra ==" not in line or re.search(rf"""extra\s*==\s*["']{extra}["']""", line):
            found.append(re.split(r"[\s\[<>=!~;(]", line, maxsplit=1)[0].lower())
    return found


def _closure(names: list[str]) -> set[str]:
    """Every installed distribution ``names`` need, transitively (extras of theirs left out)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            if "extra ==" in line:
                continue
            todo.append(re.split(r"[\s\[<>=!~;(]", line, maxsplit=1)[0].lower())
    return seen


def test_the_serve_extra_needs_no_torch() -> None:
    serve = _requirements("serve")
    assert {"onnxruntime", "numpy", "starlette", "uvicorn", "protobuf"} <= set(serve), serve
    needed = _closure(serve)
    assert not needed & {"torch", "onnxscript", "torchvision"}, sorted(needed)
    assert "torch" in _closure(_requirements("export"))  # near miss: the export extra does
