"""Whichever way the batcher decides, every answer is its own input's onnxruntime result.

A real server on loopback (two zoo models: ``cnn_bn``, which onnxruntime does not run cheaper
in batches, and ``transformer_ln``, which it runs 2x cheaper) is driven by 32 concurrent
``tritonclient.http.aio`` clients, once per merge policy: never merging, always merging
(Triton's rule) and the learned policy.  Each request mixes image sizes / sequence lengths
(separate batch keys) and binary / JSON outputs; each answer must equal a direct onnxruntime
run on that request alone, bit for bit, and the statistics must show the decision taken.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio

from normport.runtime.serve import create_app
from normport.runtime.serve.merge_policy import AlwaysMerge, LearnedMerge, MergePolicy
from normport.runtime.serve.repository import Repository
from normport.runtime.serve.server import BackgroundServer

MODELS = ("cnn_bn", "transformer_ln")
CLIENTS = 32
PER_CLIENT = 4


class NeverMerge(AlwaysMerge):
    """Limit 1: each request runs alone and nothing waits."""

    def limit(self, key: Hashable) -> int:
        return 1

    def plan(self, key: Hashable, queued: int) -> int:
        return 1


POLICIES: dict[str, Callable[[int], MergePolicy]] = {
    "never": NeverMerge,
    "always": AlwaysMerge,
    "learned": LearnedMerge,
}


@pytest.fixture(scope="module")
def served(
    repo_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[BackgroundServer, Repository]]:
    root = tmp_path_factory.mktemp("decisions")
    for name in MODELS:
        shutil.copytree(repo_root / name, root / name)
    app = create_app(root, threads=1)
    with BackgroundServer(app) as server:
        yield server, app.state.repository


def _request(i: int, k: int) -> tuple[str, str, str, np.ndarray, bool]:
    rng = np.random.default_rng(100 * i + k)
    binary = (i + k) % 2 == 0
    if i % 2 == 0:
        size = 32 if i % 4 == 0 else 16
        x = rng.standard_normal((1, 3, size, size)).astype(np.float32)
        return "cnn_bn", "image", "FP32", x, binary
    length = 8 if i % 4 == 1 else 12
    return "transformer_ln", "tokens", "INT64", rng.integers(0, 64, (1, length)), binary


def _counts(client: triton.InferenceServerClient, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model)["model_stats"][0]
    return stats["inference_count"], stats["execution_count"]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_answers_are_onnxruntime_s_whatever_the_decision(served, reference, policy: str) -> None:
    server, repository = served
    for version in repository.versions():
        version.batcher.policy = POLICIES[policy](version.spec.max_batch_size)
    plan = {(i, k): _request(i, k) for i in range(CLIENTS) for k in range(PER_CLIENT)}
    expected = {key: reference(m, {name: x})["logits"] for key, (m, name, _, x, _) in plan.items()}
    with triton.InferenceServerClient(server.url) as client:
        before = {m: _counts(client, m) for m in MODELS}

        async def one_client(i: int) -> list[tuple[tuple[int, int], np.ndarray]]:
            got = []
            async with triton_aio.InferenceServerClient(server.url, conn_timeout=60) as c:
                for k in range(PER_CLIENT):
                    model, name, datatype, x, binary = plan[(i, k)]
                    tensor = triton_aio.InferInput(name, list(x.shape), datatype)
                    tensor.set_data_from_numpy(x, binary_data=binary)
                    wanted = [triton_aio.InferRequestedOutput("logits", binary_data=binary)]
                    result = await c.infer(model, [tensor], outputs=wanted)
                    got.append(((i, k), result.as_numpy("logits")))
            return got

        async def everyone() -> list[list[tuple[tuple[int, int], np.ndarray]]]:
            return await asyncio.gather(*(one_client(i) for i in range(CLIENTS)))

        answers = [a for per in asyncio.run(asyncio.wait_for(everyone(), 120)) for a in per]
        after = {m: _counts(client, m) for m in MODELS}

    assert len(answers) == CLIENTS * PER_CLIENT
    for key, logits in answers:
        assert logits.shape == expected[key].shape
        assert np.array_equal(logits, expected[key]), f"{policy}: request {key} got another answer"
    for model in MODELS:
        inferences, executions = (a - b for a, b in zip(after[model], before[model], strict=True))
        assert inferences == sum(1 for m, *_ in plan.values() if m == model)
        if policy == "never":
            assert executions == inferences, f"{model}: merged although the limit is 1"
        elif policy == "always":
            assert executions < inferences, f"{model}: 32 clients, yet nothing merged"
    if policy == "learned":  # one table per batch key seen: two shapes per model
        for version in repository.versions():
            limits = version.batcher.limits()
            assert len(limits) == 2 and all(1 <= n <= 64 for n in limits.values()), limits
