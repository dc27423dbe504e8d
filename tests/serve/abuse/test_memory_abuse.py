"""Memory abuse against the real server (``python -m runtime serve`` in a child process, so that
its RSS is its own), one row per defect found:

- one long sequence to ``rnn_ln`` (memory grows with its square) drove RSS past 9 GiB;
- 16 concurrent long sequences were merged by the batcher past 9 GiB;
- 8 concurrent valid 58 MiB ``seq_bn`` bodies reached 9.2 GiB, and kept 8.7 GiB after.

The oracle is ``/proc/<server pid>/status``: the peak (``VmHWM``, reset once the server is
idle and warm) must stay under the configured budget plus the idle baseline, and after the
storm RSS must come back near the baseline.  Every 200 is checked against onnxruntime.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest

from tests.serve.repo import export_zoo

MIB = 1 << 20
BUDGET = 2048 * MIB
FEATURES = 8


@dataclass
class Served:
    url: str
    pid: int
    root: Path

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def reset_peak(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("memory_abuse")
    for name in ("rnn_ln", "seq_bn"):
        export_zoo(root, name, max_batch_size=8)
    port_file = root.parent / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime", "serve", "--repository", os.fspath(root),
         "--port", "0", "--port-file", os.fspath(port_file), "--threads", "1",
         "--memory-budget", f"{BUDGET}", "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {proc.stderr.read()!r}")
            time.sleep(0.1)
        yield Served(f"http://127.0.0.1:{port_file.read_text().strip()}", proc.pid, root)
    finally:
        proc.terminate()
        proc.wait(60)


def _binary(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "sequence", "datatype": "FP32", "shape": list(x.shape),
                 "parameters": {"binary_data_size": x.nbytes}}
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    )  # fmt: skip
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def _output(response: httpx.Response, shape: tuple[int, ...]) -> np.ndarray:
    length = int(response.headers["inference-header-content-length"])
    return np.frombuffer(response.content[length:], np.float32).reshape(shape)


def _reference(root: Path, model: str, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    path = os.fspath(root / model / "1" / "model.onnx")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"sequence": x})[0]


def _post_all(served: Served, model: str, bodies: list[tuple[bytes, dict]]) -> list:
    def post(body: tuple[bytes, dict]) -> httpx.Response:
        with httpx.Client(timeout=300) as client:
            return client.post(f"{served.url}/v2/models/{model}/infer", content=body[0],
                               headers=body[1])  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def _warm_baseline(served: Served) -> int:
    """Warm every model with a small request, then the idle RSS; resets the peak."""
    rng = np.random.default_rng(0)
    for model in ("rnn_ln", "seq_bn"):
        x = rng.standard_normal((2, 16, FEATURES)).astype(np.float32)
        (response,) = _post_all(served, model, [_binary(x)])
        assert response.status_code == 200, response.text
    time.sleep(0.2)
    served.reset_peak()
    return served.status("VmRSS")


def _sequences(count: int, length: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, length, FEATURES)).astype(np.float32) for _ in range(count)]


ROWS = {
    # name: (model, concurrent requests, sequence length)
    "one_long_sequence_to_rnn_ln": ("rnn_ln", 1, 6000),
    "16_concurrent_long_sequences_to_rnn_ln": ("rnn_ln", 16, 1000),
    "8_concurrent_58_MiB_bodies_to_seq_bn": ("seq_bn", 8, 58 * MIB // (FEATURES * 4)),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_memory_stays_within_the_budget(served: Served, row: str) -> None:
    model, count, length = ROWS[row]
    idle = _warm_baseline(served)
    inputs = _sequences(count, length, seed=len(row))
    responses = _post_all(served, model, [_binary(x) for x in inputs])
    peak = served.status("VmHWM")
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 413, 503}, [r.text for r in responses]
    for response in responses:
        if response.status_code != 200:
            error = response.json()["error"]
            assert f"model '{model}'" in error and "needs an estimated" in error
    assert peak <= idle + BUDGET, f"peak {peak / MIB:.0f} MiB, idle {idle / MIB:.0f} MiB"
    answered = [(x, r) for x, r in zip(inputs, responses, strict=True) if r.status_code == 200]
    if row == "one_long_sequence_to_rnn_ln":
        assert statuses == [413]  # ~9 GiB of onnxruntime working memory: never allocated
        assert "memory budget of 2.0 GiB" in responses[0].json()["error"]
    else:
        assert answered, statuses  # the budget admits one at a time, not none
        assert 503 in statuses  # and refuses the rest at once
    for x, response in answered[:1]:
        expected = _reference(served.root, model, x)
        np.testing.assert_array_equal(_output(response, expected.shape), expected)
    time.sleep(0.5)
    after = served.status("VmRSS")
    assert after <= idle + 256 * MIB, f"kept {(after - idle) / MIB:.0f} MiB after the storm"
