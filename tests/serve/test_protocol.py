"""Health, server and model metadata, model config, readiness, versions, repository index and
statistics, through tritonclient against the real server."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest
import tritonclient.http as triton
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from normport.runtime.serve.app import EXTENSIONS
from tests.serve.repo import BROKEN, DATATYPES, ZOO
from tests.triton_schema import as_dict, read_config, schema

READY_MODELS = [*ZOO, *(f"t_{d.lower()}" for d in DATATYPES), "pair", "scalar", "nobatch",
                "versioned", "external_ok"]  # fmt: skip
ONNX_TO_V2 = {elem: name for name, (elem, _) in DATATYPES.items()}


def test_health(client: triton.InferenceServerClient, http) -> None:
    assert client.is_server_live() and client.is_server_ready()
    # kserve's client parses these bodies (kserve#4267): JSON, not an empty 200
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}


def test_server_metadata_lists_only_served_extensions(client) -> None:
    meta = client.get_server_metadata()
    assert meta["name"] == "normport" and meta["version"]
    assert meta["extensions"] == list(EXTENSIONS)
    assert "model_repository" not in meta["extensions"]  # index only, no load/unload


@pytest.mark.parametrize("version", ["", "1"])
@pytest.mark.parametrize("model", READY_MODELS)
def test_model_ready(client, model: str, version: str) -> None:
    assert client.is_model_ready(model, version)


@pytest.mark.parametrize(
    ("model", "version"),
    [("nope", ""), ("cnn_bn", "2"), ("cnn_bn", "x"), *((name, "") for name in BROKEN)],
)
def test_model_not_ready(client, model: str, version: str) -> None:
    assert not client.is_model_ready(model, version)


@pytest.mark.parametrize("model", READY_MODELS)
def test_metadata_matches_graph_and_config(client, repo_root: Path, model: str) -> None:
    meta = client.get_model_metadata(model)
    config = client.get_model_config(model)
    graph = onnx.load(repo_root / model / "1" / "model.onnx", load_external_data=False).graph
    assert meta["name"] == config["name"] == model
    assert meta["platform"] == config["platform"] == "onnxruntime_onnx"
    assert config == client.get_model_config(model, "1")
    batched = config["max_batch_size"] > 0
    for key, field, values in (
        ("inputs", "input", graph.input),
        ("outputs", "output", graph.output),
    ):
        assert [t["name"] for t in meta[key]] == [v.name for v in values]
        for t, c, v in zip(meta[key], config[field], values, strict=True):
            assert t["datatype"] == ONNX_TO_V2[v.type.tensor_type.elem_type]
            assert c["data_type"] == "TYPE_" + (
                "STRING" if t["datatype"] == "BYTES" else t["datatype"]
            )
            assert t["shape"] == ([-1] if batched else []) + c["dims"]
            onnx_dims = [
                d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim
            ]
            expected = onnx_dims[1:] if batched else onnx_dims
            assert c["dims"] == (expected or [1])
    assert config["max_batch_size"] == read_config(repo_root / model)["max_batch_size"]


def test_config_is_the_json_form_of_config_pbtxt(client, repo_root: Path) -> None:
    """Triton's schema reads the served JSON back into the message config.pbtxt holds, plus
    what is implied (backend, version policy, one instance, the model file)."""
    served = client.get_model_config("cnn_bn")
    message = json_format.ParseDict(served, schema().ModelConfig())  # every field is Triton's
    assert as_dict(message) == read_config(repo_root / "cnn_bn")
    assert served["max_batch_size"] == 64
    image = served["input"][0]
    assert (image["name"], image["data_type"]) == ("image", "TYPE_FP32")
    assert image["dims"] == [3, -1, -1]  # int64 fields as JSON numbers, as Triton serves them
    assert served["dynamic_batching"]["preferred_batch_size"] == [16, 32, 64]
    assert served["backend"] == "onnxruntime"
    assert served["version_policy"] == {"all": {}}
    (group,) = served["instance_group"]
    assert (group["name"], group["kind"], group["count"]) == ("cnn_bn", "KIND_CPU", 1)
    assert served["default_model_filename"] == "model.onnx"
    assert "dynamic_batching" not in client.get_model_config("nobatch")
    scalar = client.get_model_config("scalar")["input"][0]
    assert scalar["dims"] == [1] and scalar["reshape"] == {"shape": []}


def test_versions(client) -> None:
    meta = client.get_model_metadata("versioned")
    assert meta["versions"] == ["1", "2"]
    assert client.get_model_metadata("versioned", "2")["versions"] == ["1", "2"]
    with pytest.raises(InferenceServerException, match="has no version '3'") as e:
        client.get_model_metadata("versioned", "3")
    assert e.value.status() == "404"


def test_repository_index_shows_broken_models_with_reasons(client, http, repo_root) -> None:
    index = client.get_model_repository_index()
    states = {(e["name"], e["version"]): e for e in index}
    for name in READY_MODELS:
        assert states[(name, "1")]["state"] == "READY", states[(name, "1")]
    assert states[("versioned", "2")]["state"] == "READY"
    for name, reason in BROKEN.items():
        entry = next(e for e in index if e["name"] == name)
        assert entry["state"] == "UNAVAILABLE"
        assert re.search(reason, entry["reason"]), entry["reason"]
        assert str(repo_root) not in entry["reason"]  # no server paths in client answers
    ready = http.post("/v2/repository/index", json={"ready": True}).json()
    assert {e["state"] for e in ready} == {"READY"}
    assert len(ready) == len(index) - len(BROKEN)


def test_unavailable_model_answers_503_with_its_reason(client) -> None:
    with pytest.raises(InferenceServerException, match="corrupt or truncated") as e:
        client.get_model_metadata("broken_truncated")
    assert e.value.status() == "503"


def test_statistics_shape(client) -> None:
    stats = client.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in stats} >= set(READY_MODELS)
    one = client.get_inference_statistics("versioned")["model_stats"]
    assert [s["version"] for s in one] == ["1", "2"]
    two = client.get_inference_statistics("versioned", "2")["model_stats"]
    assert len(two) == 1 and two[0]["version"] == "2"
    keys = {"success", "fail", "queue", "compute_input", "compute_infer", "compute_output"}
    assert keys <= set(two[0]["inference_stats"])
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_inference_statistics("nope")
