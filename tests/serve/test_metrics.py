"""Prometheus metrics per model; a client-chosen name never becomes a label."""

from __future__ import annotations

import re

import numpy as np
import tritonclient.http as triton


def value(text: str, name: str, model: str) -> float:
    match = re.search(rf'^{name}\{{model="{model}",version="1"\}} (\S+)$', text, re.M)
    assert match, f"{name} for {model} missing"
    return float(match.group(1))


def test_metrics_per_model(client, http) -> None:
    x = np.zeros((2, 3), np.float32)
    tensor = triton.InferInput("x", [2, 3], "FP32")
    tensor.set_data_from_numpy(x)
    before = http.get("/metrics").text
    client.infer("t_fp32", [tensor])
    http.post("/v2/models/t_fp32/infer", content=b"{")  # a failure
    http.post("/v2/models/client_chosen_name/infer", content=b"{}")
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for metric, delta in (("normport_inference_requests_total", 2), ("normport_inference_failures_total", 1),
                          ("normport_inference_samples_total", 2), ("normport_inference_executions_total", 1)):  # fmt: skip
        assert value(text, metric, "t_fp32") - value(before, metric, "t_fp32") == delta, metric
    for histogram in ("request_duration_seconds", "queue_duration_seconds",
                      "compute_duration_seconds", "batch_size"):  # fmt: skip
        assert value(text, f"normport_inference_{histogram}_count", "t_fp32") >= 1
    assert value(text, "normport_model_ready", "cnn_bn") == 1
    assert value(text, "normport_model_ready", "broken_truncated") == 0
    assert "client_chosen_name" not in text
