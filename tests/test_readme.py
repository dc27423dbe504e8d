"""README.md runs as written: every python block, and every name it shows.

Each python block runs alone in a fresh interpreter, in a temporary folder (files such as
``cnn_bn.onnx`` land there), with the repository on ``PYTHONPATH``; a failure names the block's
README line and the error, and tracebacks point at README lines. The serving block talks to a
real ``python -m runtime serve`` on a repository exported by ``python -m export --model cnn_bn``:
the test rewrites the address ``127.0.0.1:8000`` in that block, and only that, to the live
server's (the server takes a free port, so tests can run side by side).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.readme import README, ROOT, Block, dotted_names, fenced_blocks

README_ADDRESS = "127.0.0.1:8000"
PYTHON_BLOCKS = [b for b in fenced_blocks(README.read_text()) if b.lang == "python"]


def _env() -> dict[str, str]:
    path = [os.fspath(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def _run(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _wait_ready(address: str, model: str, process: subprocess.Popen, deadline: float) -> None:
    url = f"http://{address}/v2/models/{model}/ready"
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{model} was not ready at {url} (exit status {process.poll()})")


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``HOST:PORT`` of ``python -m runtime serve`` over ``python -m export --model cnn_bn``."""
    work = tmp_path_factory.mktemp("readme_server")
    exported = _run(["-m", "export", "--model", "cnn_bn", "--out", "repo"], work, 600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    log = (work / "server.log").open("wb")
    argv = ["-m", "runtime", "serve", "--repository", "repo", "--port", "0"]
    argv += ["--port-file", "port", "--threads", "1", "--log-level", "warning"]
    process = subprocess.Popen([sys.executable, *argv], cwd=work, env=_env(), stdout=log,
                               stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (work / "port").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server did not start:\n{(work / 'server.log').read_text()}"
                )
            time.sleep(0.1)
        address = f"127.0.0.1:{int((work / 'port').read_text())}"
        _wait_ready(address, "cnn_bn", process, deadline)
        yield address
    finally:
        process.terminate()
        process.wait(60)
        log.close()


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"line{b.line}" for b in PYTHON_BLOCKS])
def test_python_block_runs(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    code = block.code
    if README_ADDRESS in code:
        code = code.replace(README_ADDRESS, request.getfixturevalue("live_server"))
    script = tmp_path / "readme_block.py"
    script.write_text("\n" * (block.line - 1) + code)  # traceback line numbers = README lines
    result = _run([os.fspath(script)], tmp_path, 600)
    if result.returncode != 0:
        pytest.fail(
            f"README.md:{block.line}: python block exits {result.returncode}:\n"
            f"{result.stderr[-4000:]}",
            pytrace=False,
        )


def test_readme_has_python_blocks() -> None:
    assert len(PYTHON_BLOCKS) >= 4, "README.md: the test found fewer python blocks than expected"
    assert any(README_ADDRESS in b.code for b in PYTHON_BLOCKS), "no serving block found"


_RESOLVE = """\
import importlib, sys
for line, name in (item.split(":", 1) for item in sys.argv[1:]):
    top, *rest = name.split(".")
    try:
        value = importlib.import_module(f"normport.{top}")
        for part in rest:
            value = getattr(value, part)
    except Exception as e:
        print(f"README.md:{line}: `{name}` after `from normport import {top}`: {type(e).__name__}: {e}")
"""


def test_names_resolve_after_importing_the_top_package(tmp_path: Path) -> None:
    """``from normport import models`` then ``models.zoo.get``: in a fresh interpreter, since in this one
    other tests have imported every submodule already."""
    names = dotted_names(README.read_text())
    assert {"models.zoo.get", "models.convert", "export.save"} <= {n for _, n in names}
    result = _run(["-c", _RESOLVE, *(f"{line}:{name}" for line, name in names)], tmp_path, 300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not result.stdout, result.stdout
