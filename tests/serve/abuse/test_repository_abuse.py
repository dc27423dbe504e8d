"""Model repositories that Triton would refuse, served by a real server: the abusive folder must
come out UNAVAILABLE with a reason naming the problem, its neighbours must still load, and no
response may quote a file's content or the server's paths.

One row per defect, each building one model folder (named after the row) in a shared repository
of real ONNX models made with ``onnx.helper``:

- config dims that contradict the graph (every dim, the batch axis, ``reshape``, outputs);
- symlinks leading out of the repository (a config, a model folder, a version folder) and
  config errors that used to echo the file's text;
- version folders Triton ignores (``0``, ``01``): listed, never served;
- batching options Triton refuses (``max_batch_size: -1``, a queue delay of 10^12 us, ...).

Rows that must load (``READY``) are inferred through the server and checked against
``x + OFFSET`` computed in numpy.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from normport.export.triton_config import parse as parse_config
from normport.runtime.serve import create_app
from normport.runtime.serve.repository import IGNORED, READY, UNAVAILABLE, Repository
from normport.runtime.serve.server import BackgroundServer
from tests.serve.repo import OPSET

SECRET = "SECRET_hunter2"
OFFSET = 1.5
# A file outside the repository, shaped so that the old parse error ("unexpected '/SECRET...'")
# quoted SECRET.
PASSWD = f"root:x:0:0:/{SECRET}:/bin/bash\n"
DYNAMIC = "dynamic_batching { max_queue_delay_microseconds: 0 }"


def _model(shape: list, offset: float = OFFSET) -> onnx.ModelProto:
    """``y = x + offset`` in FP32, ``x`` and ``y`` of ``shape``."""
    c = numpy_helper.from_array(np.array(offset, np.float32), "c")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=[c],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    return model


def _config(
    name: str,
    *,
    max_batch: int = 8,
    x: str = "dims: [ 3 ]",
    y: str = "dims: [ 3 ]",
    batching: str = DYNAMIC,
    extra: str = "",
) -> str:
    return "\n".join(
        [
            f'name: "{name}"',
            'platform: "onnxruntime_onnx"',
            f"max_batch_size: {max_batch}",
            f'input [ {{ name: "x" data_type: TYPE_FP32 {x} }} ]',
            f'output [ {{ name: "y" data_type: TYPE_FP32 {y} }} ]',
            batching,
            extra,
        ]
    )


def _write(folder: Path, shape: list, config: str, version: str = "1", offset: float = OFFSET):
    (folder / version).mkdir(parents=True, exist_ok=True)
    onnx.save(_model(shape, offset), os.fspath(folder / version / "model.onnx"))
    (folder / "config.pbtxt").write_text(config)


def _model_with(shape: list, **config: Any) -> Callable[[Path, Path], None]:
    """A builder: ``shape`` for the graph, ``config`` for :func:`_config`."""

    def build(folder: Path, outside: Path) -> None:
        _write(folder, shape, _config(folder.name, **config))

    return build


def _config_text(text: str) -> Callable[[Path, Path], None]:
    """A healthy ``[batch, 3]`` model whose config.pbtxt is ``text`` ({name}: the folder)."""

    def build(folder: Path, outside: Path) -> None:
        _write(folder, ["batch", 3], text.replace("{name}", folder.name))

    return build


def _config_symlinked_outside(folder: Path, outside: Path) -> None:
    _write(folder, ["batch", 3], "")
    (folder / "config.pbtxt").unlink()
    (folder / "config.pbtxt").symlink_to(outside / "passwd")


def _config_symlink_loop(folder: Path, outside: Path) -> None:
    _write(folder, ["batch", 3], "")
    (folder / "config.pbtxt").unlink()
    (folder / "config.pbtxt").symlink_to(folder / "loop")
    (folder / "loop").symlink_to(folder / "config.pbtxt")


def _model_folder_symlinked_outside(folder: Path, outside: Path) -> None:
    elsewhere = outside / folder.name
    _write(elsewhere, ["batch", 3], _config(folder.name))
    folder.symlink_to(elsewhere, target_is_directory=True)


def _version_folder_symlinked_outside(folder: Path, outside: Path) -> None:
    _write(folder, ["batch", 3], _config(folder.name))
    elsewhere = outside / f"{folder.name}-1"
    (folder / "1").rename(elsewhere)
    (folder / "1").symlink_to(elsewhere, target_is_directory=True)


def _non_version_folders(folder: Path, outside: Path) -> None:
    _write(folder, ["batch", 3], _config(folder.name), "1", offset=OFFSET)
    for i, name in enumerate(("0", "01", "latest", ".hidden")):
        _write(folder, ["batch", 3], _config(folder.name), name, offset=100.0 + i)


def _not_utf8(folder: Path, outside: Path) -> None:
    _write(folder, ["batch", 3], "")
    (folder / "config.pbtxt").write_bytes(b'name: "m"\xff' + SECRET.encode())


@dataclass(frozen=True)
class Case:
    """``build(model_folder, outside)``; ``entries``: every index entry of the model, version ->
    (state, reason regex); ``infer``: for a READY model, the shape of ``x`` to send (None: the
    model must be unavailable); ``requests``: (path, status, error regex) GETs to check."""

    build: Callable[[Path, Path], None]
    entries: dict[str, tuple[str, str]]
    infer: list[int] | None = None
    requests: tuple[tuple[str, int, str], ...] = ()


def _refused(reason: str, version: str = "1") -> dict[str, tuple[str, str]]:
    return {version: (UNAVAILABLE, reason)}


def _bad_config(reason: str) -> dict[str, tuple[str, str]]:
    return {"": (UNAVAILABLE, r"^ValueError: config\.pbtxt: " + reason)}


GOOD = _config("{name}")
CASES: dict[str, Case] = {
    # 1. every config dim against the graph (inputs, outputs, batch axis, reshape)
    "dim-minus-one-where-the-graph-is-fixed": Case(
        _model_with(["batch", 3], x="dims: [ -1 ]"),
        _refused(r"input 'x': axis 1 \(dims\[0\]\) is -1 in the config, 3 in the graph"),
    ),
    "dim-other-size-than-the-graph": Case(
        _model_with(["batch", 3], x="dims: [ 4 ]"),
        _refused(r"input 'x': axis 1 \(dims\[0\]\) is 4 in the config, 3 in the graph"),
    ),
    "output-dims-contradict-the-graph": Case(
        _model_with(["batch", 3], y="dims: [ 4 ]"),
        _refused(r"output 'y': axis 1 \(dims\[0\]\) is 4 in the config, 3 in the graph"),
    ),
    "fixed-batch-axis-with-batching": Case(
        _model_with([4, 3]),
        _refused(r"input 'x': axis 0 is fixed at 4 in the graph, but max_batch_size 8 needs"),
    ),
    "reshape-contradicts-the-graph": Case(
        _model_with(["batch", 2, 3], x="dims: [ 6 ] reshape: { shape: [ 3, 2 ] }"),
        _refused(r"input 'x': axis 1 \(reshape\[0\]\) is 3 in the config, 2 in the graph"),
    ),
    "reshape-element-count-differs": Case(
        _model_with(["batch", 2, 3], x="dims: [ 5 ] reshape: { shape: [ 2, 3 ] }"),
        _refused(r"input 'x': dims \[5\] and reshape \[2, 3\] differ in element count"),
    ),
    # must still load: sizes for symbolic dims, a consistent reshape, no batching
    "size-for-a-symbolic-dim-loads": Case(
        _model_with(["batch", "n"], x="dims: [ 5 ]", y="dims: [ -1 ]"),
        {"1": (READY, "^$")},
        infer=[2, 5],
    ),
    "consistent-reshape-loads": Case(
        _model_with(
            ["batch", 2, 3],
            x="dims: [ 6 ] reshape: { shape: [ 2, 3 ] }",
            y="dims: [ 6 ] reshape: { shape: [ 2, 3 ] }",
        ),
        {"1": (READY, "^$")},
        infer=[3, 6],
    ),
    "fixed-dims-without-batching-load": Case(
        _model_with([2, 3], max_batch=0, x="dims: [ 2, 3 ]", y="dims: [ 2, 3 ]", batching=""),
        {"1": (READY, "^$")},
        infer=[2, 3],
    ),
    # 2. nothing outside the repository is read, and no file text reaches a message
    "config-symlinked-outside": Case(
        _config_symlinked_outside,
        {"": (UNAVAILABLE, r"^ValueError: config\.pbtxt resolves outside the model folder$")},
    ),
    "config-symlink-loop": Case(
        _config_symlink_loop,
        {"": (UNAVAILABLE, r"^ValueError: config\.pbtxt resolves outside the model folder$")},
    ),
    "model-folder-symlinked-outside": Case(
        _model_folder_symlinked_outside,
        {"": (UNAVAILABLE, r"^ValueError: model folder resolves outside the repository$")},
    ),
    "version-folder-symlinked-outside": Case(
        _version_folder_symlinked_outside,
        _refused(r"^ValueError: version folder 1 resolves outside the model folder$"),
    ),
    "syntax-error-quotes-no-token": Case(
        _config_text(f'name: "{{name}}"\n{SECRET} root\n'),
        _bad_config(r"line 2, column 1: unknown field in ModelConfig \(allowed: name, platform, "),
    ),
    "unexpected-character-quotes-nothing": Case(
        _config_text('name: "{name}"\n' + PASSWD),
        _bad_config(r"line 2, column 1: unknown field in ModelConfig \(allowed: name, platform, "),
    ),
    "unknown-field-quotes-no-name": Case(
        _config_text(GOOD + f"\n{SECRET}: 1\n"),
        _bad_config(r"line 8, column 1: unknown field in ModelConfig \(allowed: name, "),
    ),
    "mistyped-value-quotes-no-value": Case(
        _config_text(GOOD.replace("max_batch_size: 8", f"max_batch_size: {SECRET}")),
        _bad_config(r"line 3, column 17: expected an integer$"),
    ),
    "unterminated-string-quotes-no-string": Case(
        _config_text(GOOD.replace('name: "{name}"', f'name: "{SECRET}')),
        _bad_config(r"line 1, column 7: a quoted string has no closing quote$"),
    ),
    "unknown-data-type-quotes-no-name": Case(
        _config_text(GOOD.replace("TYPE_FP32", f"TYPE_{SECRET}", 1)),
        _bad_config(r"line 4, column 32: unknown value for DataType \(allowed: TYPE_INVALID, "),
    ),
    "config-not-utf8": Case(
        _not_utf8, {"": (UNAVAILABLE, r"^ValueError: config\.pbtxt is not UTF-8 text")}
    ),
    # 3. version folders: positive integers without a leading zero; others listed, not served
    "zero-and-leading-zero-versions-ignored": Case(
        _non_version_folders,
        {
            "1": (READY, "^$"),
            "0": (UNAVAILABLE, f"^{re.escape(IGNORED)}$"),
            "01": (UNAVAILABLE, f"^{re.escape(IGNORED)}$"),
            "latest": (UNAVAILABLE, f"^{re.escape(IGNORED)}$"),
        },
        infer=[1, 3],
        requests=(
            ("/versions/01", 404, r"has no version '01'"),
            ("/versions/0/ready", 404, r"has no version '0'"),
            ("/versions/1/ready", 200, ""),
        ),
    ),
    # 4. batching options Triton refuses
    "negative-max-batch-size": Case(
        _model_with(["batch", 3], max_batch=-1),
        _refused(r"max_batch_size must be in \[0, 2147483647\], got -1$"),
    ),
    "queue-delay-of-twelve-days": Case(
        _model_with(
            ["batch", 3],
            batching="dynamic_batching { max_queue_delay_microseconds: 1000000000000 }",
        ),
        _refused(r"max_queue_delay_microseconds must be in \[0, 10000000\], got 1000000000000$"),
    ),
    "preferred-batch-size-zero": Case(
        _model_with(["batch", 3], batching="dynamic_batching { preferred_batch_size: [ 0 ] }"),
        _refused(r"preferred_batch_size must be in \[1, max_batch_size 8\], got 0$"),
    ),
    "preferred-batch-size-above-max": Case(
        _model_with(["batch", 3], batching="dynamic_batching { preferred_batch_size: [ 16 ] }"),
        _refused(r"preferred_batch_size must be in \[1, max_batch_size 8\], got 16$"),
    ),
    "dynamic-batching-without-batching": Case(
        _model_with([2, 3], max_batch=0, x="dims: [ 2, 3 ]", y="dims: [ 2, 3 ]"),
        _refused(r"dynamic_batching needs max_batch_size > 0"),
    ),
}


@dataclass
class Served:
    tmp: Path
    http: httpx.Client


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("repository_abuse")
    root, outside = tmp / "repo", tmp / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "passwd").write_text(PASSWD)
    _write(root / "healthy", ["batch", 3], _config("healthy"))
    for name, case in CASES.items():
        case.build(root / name, outside)
    with (
        BackgroundServer(create_app(root, threads=1)) as server,
        httpx.Client(base_url=f"http://{server.url}", timeout=30) as http,
    ):
        yield Served(tmp, http)


def _clean(served: Served, text: str) -> str:
    assert SECRET not in text, text
    assert str(served.tmp) not in text, text
    return text


def _get(served: Served, path: str) -> httpx.Response:
    response = served.http.get(path)
    _clean(served, response.text)
    return response


@pytest.mark.parametrize("name", CASES)
def test_repository_abuse(served: Served, name: str) -> None:
    case, http = CASES[name], served.http
    index = http.post("/v2/repository/index").json()
    entries = {e["version"]: e for e in index if e["name"] == name}
    _clean(served, json.dumps(list(entries.values())))  # the other rows' entries are theirs
    assert set(entries) == set(case.entries), entries
    for version, (state, reason) in case.entries.items():
        entry = entries[version]
        assert entry["state"] == state and re.search(reason, entry["reason"]), entry
    assert {e["state"] for e in index if e["name"] == "healthy"} == {READY}

    base = f"/v2/models/{name}"
    for path in ("", "/config", "/ready", "/stats"):
        response = _get(served, base + path)
        assert response.status_code == (200 if case.infer else 503), response.text
    x = np.arange(np.prod(case.infer or [1, 3]), dtype=np.float32).reshape(case.infer or [1, 3])
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32"}]}
    body["inputs"][0]["data"] = x.reshape(-1).tolist()
    response = http.post(f"{base}/infer", json=body)
    _clean(served, response.text)
    if case.infer is None:
        assert response.status_code == 503, response.text
        latest = list(case.entries.values())[-1][1]
        assert re.search(latest.lstrip("^"), response.json()["error"]), response.text
    else:
        assert response.status_code == 200, response.text
        (y,) = response.json()["outputs"]
        assert y["shape"] == list(x.shape)
        np.testing.assert_array_equal(np.array(y["data"], np.float32), (x + OFFSET).reshape(-1))
        metadata = http.get(base).json()
        assert metadata["versions"] == ["1"]
    for path, status, error in case.requests:
        response = _get(served, base + path)
        assert response.status_code == status, response.text
        assert re.search(error, response.json().get("error", "")), response.text


def test_ignored_folders_are_logged_once_and_not_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _non_version_folders(tmp_path / "m", tmp_path)
    with caplog.at_level(logging.WARNING, logger="normport.runtime.serve.repository"):
        repo = Repository(tmp_path)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("'01'" in m for m in messages) == 1, messages
    assert not any("hidden" in m for m in messages), messages
    assert list(repo.models["m"]) == ["1"]
    assert [e["version"] for e in repo.index(ready_only=True)] == ["1"]
    assert repo.all_ready


@pytest.mark.parametrize(
    "text",
    [
        f"{SECRET} root",
        f"name: {SECRET}\nx: [ 1 {SECRET} ]",
        f'name: "{SECRET}\n',
        f"name: '{SECRET}",
        f"name: 1.{SECRET}",
        f"name: [ [ {SECRET} ] ]",
        f"name: {{ {SECRET} }} }}",
        f"x: 1 ;{SECRET}",
        f'x: "\\z{SECRET}"',
    ],
)
def test_parse_errors_say_where_and_what_kind_never_the_text(text: str) -> None:
    with pytest.raises(ValueError, match=r"^line \d+, column \d+: ") as info:
        parse_config(text)
    assert SECRET not in str(info.value)
