"""The dynamic batcher on its own, with a fake session: what runs together, what is split
back to whom, when a batch is dispatched, and that one bad request fails alone."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from normport.runtime.serve.batcher import Batcher, Execution
from normport.runtime.serve.errors import BadRequest, InferenceFailed, ModelUnavailable
from normport.runtime.serve.spec import Batching


class FakeSession:
    """``y = 2 * x``; records each run's batch; the first run waits for ``gate``; a feed
    holding -1 fails the run (as a bad request would)."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.shrinks: list[bool] = []
        self.gate = threading.Event()
        self.entered = threading.Event()

    def run(self, feeds: dict[str, np.ndarray], *, shrink: bool = False) -> dict[str, np.ndarray]:
        self.entered.set()
        self.gate.wait(10)
        x = feeds["x"]
        self.batches.append(len(x))
        self.shrinks.append(shrink)
        if (x == -1).any():
            raise ValueError("poisoned input")
        return {"y": x * 2}


def batcher(
    session: FakeSession,
    batching: Batching | None,
    max_batch_size: int = 8,
    max_batch_bytes: int | None = None,
) -> Batcher:
    executions: list[Execution] = []
    b = Batcher(session, "fake:1", max_batch_size=max_batch_size, batching=batching,
                on_execution=executions.append, max_batch_bytes=max_batch_bytes)  # fmt: skip
    b.executions = executions  # type: ignore[attr-defined]
    return b


def request(value: float, batch: int = 1, width: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.full((batch, width), value, np.float32)}


async def queue_behind_first(
    b: Batcher, session: FakeSession, requests: list, run_bytes: int = 0
) -> list:
    """Run ``requests[0]`` (held at the gate), queue the rest behind it, then open the gate;
    each request is charged ``run_bytes``."""
    first = asyncio.ensure_future(b.infer(requests[0], len(requests[0]["x"]), run_bytes))
    await asyncio.to_thread(session.entered.wait, 10)
    rest = [asyncio.ensure_future(b.infer(r, len(r["x"]), run_bytes)) for r in requests[1:]]
    await asyncio.sleep(0.01)  # all queued
    session.gate.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


SLOW = Batching(preferred_batch_sizes=(), max_queue_delay_s=0.0)


def test_queued_requests_run_as_one_batch_and_split_back() -> None:
    session = FakeSession()
    b = batcher(session, SLOW)
    requests = [request(0)] + [request(i, batch=1 + i % 2) for i in range(1, 6)]
    results = asyncio.run(queue_behind_first(b, session, requests))
    assert session.batches == [1, sum(len(r["x"]) for r in requests[1:])]  # 8 = max
    for r, result in zip(requests, results, strict=True):
        assert np.array_equal(result.outputs["y"], r["x"] * 2)
        assert result.execution.batch_size == session.batches[0 if r is requests[0] else 1]
    assert [e.batch_size for e in b.executions] == session.batches


def test_only_equal_non_batch_shapes_are_merged() -> None:
    session = FakeSession()
    b = batcher(session, SLOW)
    requests = [request(0), request(1, width=3), request(2, width=5), request(3, width=3)]
    results = asyncio.run(queue_behind_first(b, session, requests))
    assert session.batches == [1, 2, 1]  # the width-5 request waits for its own run
    for r, result in zip(requests, results, strict=True):
        assert np.array_equal(result.outputs["y"], r["x"] * 2)


def test_batches_never_exceed_max_batch_size() -> None:
    session = FakeSession()
    b = batcher(session, SLOW, max_batch_size=4)
    requests = [request(0)] + [request(i, batch=3) for i in range(1, 4)]
    asyncio.run(queue_behind_first(b, session, requests))
    assert session.batches == [1, 3, 3, 3]


def test_a_bad_request_fails_alone() -> None:
    session = FakeSession()
    b = batcher(session, SLOW)
    requests = [request(0), request(1), request(-1), request(3)]
    results = asyncio.run(queue_behind_first(b, session, requests))
    assert isinstance(results[2], InferenceFailed)
    assert "model 'fake:1' failed to run: poisoned input" in str(results[2])
    for i in (0, 1, 3):
        assert np.array_equal(results[i].outputs["y"], requests[i]["x"] * 2)
    assert session.batches == [1, 3, 1, 1, 1]  # the batch of 3 failed, then one by one


def test_without_batching_each_request_runs_alone() -> None:
    session = FakeSession()
    b = batcher(session, None)
    asyncio.run(queue_behind_first(b, session, [request(i) for i in range(4)]))
    assert session.batches == [1, 1, 1, 1]


def test_waits_for_a_preferred_batch_size_then_dispatches_at_once() -> None:
    session = FakeSession()
    session.gate.set()
    b = batcher(session, Batching(preferred_batch_sizes=(4,), max_queue_delay_s=5.0))

    async def run() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.gather(*(b.infer(request(i), 1) for i in range(4)))
        return loop.time() - start

    assert asyncio.run(run()) < 2.0  # far below the 5 s delay: 4 is a preferred size
    assert session.batches == [4]


def test_delay_expires_for_a_partial_batch() -> None:
    session = FakeSession()
    session.gate.set()
    b = batcher(session, Batching(preferred_batch_sizes=(8,), max_queue_delay_s=0.05))

    async def run() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.gather(*(b.infer(request(i), 1) for i in range(3)))
        return loop.time() - start

    assert asyncio.run(run()) >= 0.04
    assert session.batches == [3]


def test_close_finishes_queued_requests_then_refuses() -> None:
    session = FakeSession()
    b = batcher(session, SLOW)

    async def run() -> None:
        first = asyncio.ensure_future(b.infer(request(1), 1))
        await asyncio.to_thread(session.entered.wait, 10)
        second = asyncio.ensure_future(b.infer(request(2), 1))
        await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0.01)
        session.gate.set()
        await closing
        assert np.array_equal((await first).outputs["y"], request(1)["x"] * 2)
        assert np.array_equal((await second).outputs["y"], request(2)["x"] * 2)
        with pytest.raises(ModelUnavailable, match="shutting down"):
            await b.infer(request(3), 1)

    asyncio.run(run())


def test_onnxruntime_invalid_argument_is_a_bad_request() -> None:
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    class Refusing(FakeSession):
        def run(self, feeds, *, shrink=False):
            raise InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : bad index\nmore")

    b = batcher(Refusing(), None)
    with pytest.raises(BadRequest, match=r"^model 'fake:1' refused the request: .*bad index$"):
        asyncio.run(b.infer(request(1), 1))


def test_a_batch_never_holds_more_estimated_bytes_than_the_budget() -> None:
    """Seven requests of 100 bytes queue behind a first one; with 250 bytes a batch the queue
    runs as 2 + 2 + 2 + 1, where samples alone would have allowed all seven at once."""
    session = FakeSession()
    b = batcher(session, SLOW, max_batch_size=8, max_batch_bytes=250)
    results = asyncio.run(queue_behind_first(b, session, [request(i) for i in range(8)], 100))
    assert session.batches == [1, 2, 2, 2, 1]
    for i, result in enumerate(results):  # each still gets its own answer
        np.testing.assert_array_equal(result.outputs["y"], request(i)["x"] * 2)


@pytest.mark.parametrize(("run_bytes", "shrink"), [(1 << 20, False), (1 << 30, True)])
def test_a_large_run_gives_its_memory_back(run_bytes: int, shrink: bool) -> None:
    session = FakeSession()
    session.gate.set()
    b = batcher(session, None)
    asyncio.run(b.infer(request(1), 1, run_bytes))
    assert session.shrinks == [shrink]
