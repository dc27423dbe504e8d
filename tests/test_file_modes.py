"""Written files honour the umask: a Triton container running as another user reads them.

The atomic writer's temporary file starts 0600 (``mkstemp``); what lands at the path must have
the mode a plain ``open()`` gives (``0666 & ~umask``), and created folders ``0777 & ~umask``.
Checked under umask 022 (0644 / 0755) and 027 (0640 / 0750), for ``export.save`` (also what
``python -m runtime recalibrate`` writes with), ``atomic_write``, and a whole repository model
(``write_model``: ``config.pbtxt``, ``1/model.onnx`` and their folders), including a file left
0600 by an older export.  The expected modes are written out here, not derived from the code.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from normport import export
from normport.export._save import atomic_write
from normport.export.repository import write_model

# umask -> (file mode, folder mode)
MODES = {0o022: (0o644, 0o755), 0o027: (0o640, 0o750), 0o077: (0o600, 0o700)}


@pytest.fixture(params=sorted(MODES), ids=lambda m: f"umask{m:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_save_and_atomic_write_honour_the_umask(tmp_path: Path, umask: int) -> None:
    file_mode, folder_mode = MODES[umask]
    saved = export.save(_model(), tmp_path / "a" / "b" / "model.onnx")
    written = atomic_write(tmp_path / "c" / "notes.txt", b"text")
    assert _mode(saved) == file_mode and _mode(written) == file_mode
    for folder in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "c"):
        assert _mode(folder) == folder_mode, folder
    assert onnx.load(saved).graph.node[0].op_type == "Relu"


def test_a_repository_model_is_readable_by_others_under_umask_022(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        folder = write_model(tmp_path / "repo", "m", _model(), max_batch_size=8)
    finally:
        os.umask(previous)
    assert {
        p.relative_to(tmp_path).as_posix(): oct(_mode(p)) for p in sorted(tmp_path.rglob("*"))
    } == {
        "repo": "0o755",
        "repo/m": "0o755",
        "repo/m/1": "0o755",
        "repo/m/1/model.onnx": "0o644",
        "repo/m/config.pbtxt": "0o644",
    }
    assert not [p for p in folder.rglob(".*")]  # no temporary file left behind


def test_rewriting_a_0600_file_gives_it_the_umask_mode(tmp_path: Path, umask: int) -> None:
    """A repository written by an older export (0600 files) becomes readable when rewritten."""
    path = tmp_path / "m" / "config.pbtxt"
    path.parent.mkdir()
    path.write_text("old")
    path.chmod(0o600)
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and _mode(path) == MODES[umask][0]
