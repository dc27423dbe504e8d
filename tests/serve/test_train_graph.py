"""A real server on a repository with a train export and a batch-dependent eval model.

The train graph is refused, and the whole reason reaches ``/v2/repository/index`` and the
load error of an inference request: what it is (state inputs ``<path>.running_mean``, outputs
``.next``, metadata mode=train), why it cannot be served, and what to do (``--mode eval`` or
``python -m runtime recalibrate``).  Before, the reason was onnxruntime's input mismatch, and
any reason was cut at 500 characters.  The batch-dependent model (``max_batch_size`` without
``dynamic_batching``, the reason in a ``#`` comment) loads, and a client's own batch of 3
comes back equal to PyTorch's output for that batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from normport import export
from normport.export.batch_mates import measure, reason
from normport.export.repository import write_model
from normport.models import zoo
from normport.runtime.serve import create_app
from normport.runtime.serve.server import BackgroundServer


def _dependent() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net.eval(), torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, nn.Module]]:
    root = tmp_path_factory.mktemp("train_graph_repo")
    spec = zoo.get("seq_bn")
    train = export.to_onnx(spec.build().train(), spec.example_inputs(4), mode="train", opset=21)
    write_model(root, "seq_bn_train", train, max_batch_size=0)
    net, x = _dependent()
    why = reason(measure(net, x))
    assert why is not None
    model = export.to_onnx(net, x, mode="eval", opset=21)
    write_model(root, "dep", model, max_batch_size=8, dynamic_batching=why)
    with (
        BackgroundServer(create_app(root, threads=1)) as server,
        httpx.Client(base_url=f"http://{server.url}", timeout=60) as client,
    ):
        yield client, net


PARTS = (
    "TrainGraphError: a training graph (metadata mode=train; state inputs bn1.running_mean, ",
    "and outputs bn1.running_mean.next, ",
    "it cannot be served, because its outputs include the updated running statistics and its "
    "batch statistics mix the requests batched together",
    "export an eval model with 'python -m export --mode eval'",
    "or turn this one into an eval model with 'python -m runtime recalibrate --train-model "
    "<this model.onnx> --data <batches> --out <eval model.onnx>'",
)


def test_the_index_gives_the_whole_reason(served) -> None:
    client, _ = served
    index = {e["name"]: e for e in client.post("/v2/repository/index", json={}).json()}
    entry = index["seq_bn_train"]
    assert entry["state"] == "UNAVAILABLE"
    for part in PARTS:
        assert part in entry["reason"], part
    assert entry["reason"].endswith(PARTS[-1])  # nothing cut off
    assert len(entry["reason"]) > 500  # longer than any other reason may be
    assert index["dep"]["state"] == "READY"


def test_the_load_error_gives_the_whole_reason(served) -> None:
    client, _ = served
    body = {"inputs": [{"name": "sequence", "shape": [2, 5, 8], "datatype": "FP32",
                        "data": [0.0] * 80}]}  # fmt: skip
    response = client.post("/v2/models/seq_bn_train/infer", json=body)
    assert response.status_code == 503
    error = response.json()["error"]
    assert "model 'seq_bn_train' is not available: " in error
    for part in PARTS:
        assert part in error, part


def test_a_batch_dependent_model_serves_a_clients_own_batch(served) -> None:
    client, net = served
    config = client.get("/v2/models/dep/config").json()
    assert config["max_batch_size"] == 8 and "dynamic_batching" not in config
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(7))
    body = {"inputs": [{"name": "input", "shape": [3, 3, 6, 6], "datatype": "FP32",
                        "data": x.flatten().tolist()}]}  # fmt: skip
    response = client.post("/v2/models/dep/infer", json=body)
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    with torch.no_grad():
        expected = net(x).numpy()
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
