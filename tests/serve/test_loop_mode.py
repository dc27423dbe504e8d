"""Loop mode (runtime.serve.batcher): queued requests run on the event loop's thread, merged
as the worker would merge them, with a timer instead of a thread for a batch's delay.

(tests/serve/test_batcher.py runs every batching mechanic in both modes; these are what only
loop mode does.)  The oracle for where a run happened is the thread it ran on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from normport.runtime.serve import batcher as module
from normport.runtime.serve import cpus as cpus_module
from normport.runtime.serve.batcher import Batcher
from normport.runtime.serve.errors import InferenceFailed
from normport.runtime.serve.merge_policy import AlwaysMerge
from normport.runtime.serve.spec import Batching


class Recording:
    """``y = 2 * x`` after ``delay_s``; records each run's batch and thread."""

    single_threaded = True  # as a session with one intra-op thread

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.runs: list[tuple[int, int]] = []  # (samples, thread id)

    def run(self, feeds: dict[str, np.ndarray], *, shrink: bool = False) -> dict[str, np.ndarray]:
        if self.delay_s:
            time.sleep(self.delay_s)
        self.runs.append((len(feeds["x"]), threading.get_ident()))
        return {"y": feeds["x"] * 2}


def x(value: float) -> dict[str, np.ndarray]:
    return {"x": np.full((1, 3), value, np.float32)}


def make(session, batching: Batching | None, policy=None, on_loop: bool | None = True) -> Batcher:
    return Batcher(session, "fake:1", max_batch_size=8, batching=batching,
                   policy=policy or AlwaysMerge(8), on_loop=on_loop)  # fmt: skip


async def all_answered(b: Batcher, values: list[float]) -> None:
    results = await asyncio.gather(*(b.infer(x(v), 1) for v in values))
    for v, result in zip(values, results, strict=True):
        np.testing.assert_array_equal(result.outputs["y"], x(v)["x"] * 2)


@pytest.fixture(autouse=True)
def no_inline_bound(monkeypatch) -> None:
    """A preempted run on a loaded machine may take over INLINE_MAX_S: lifted here, except
    where a test sets it."""
    monkeypatch.setattr(module, "INLINE_MAX_S", 10.0)


def test_queued_requests_merge_on_the_loop_thread() -> None:
    session = Recording()
    b = make(session, Batching((), max_queue_delay_s=0.0))

    async def main() -> int:
        await all_answered(b, [0.0])  # the key's first run: the worker measures it
        await all_answered(b, [float(v) for v in range(1, 8)])
        await b.close()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    (first, worker), *rest = session.runs
    assert (first, worker != loop_thread) == (1, True)
    assert all(thread == loop_thread for _, thread in rest)
    assert sum(n for n, _ in rest) == 7 and max(n for n, _ in rest) >= 5  # merged


def test_a_batch_delay_is_waited_with_a_timer_and_the_loop_stays_free() -> None:
    """Three requests wait 50 ms for a preferred batch of 8 that never comes, then run as one
    batch; meanwhile the loop keeps running other tasks (no blocking wait on its thread)."""
    session = Recording()
    b = make(session, Batching((8,), max_queue_delay_s=0.05))

    async def main() -> tuple[float, int, int]:
        await all_answered(b, [0.0])
        await asyncio.sleep(0)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        ticking = asyncio.ensure_future(ticker())
        start = time.perf_counter()
        await all_answered(b, [1.0, 2.0, 3.0])
        elapsed = time.perf_counter() - start
        ticking.cancel()
        await b.close()
        return elapsed, ticks, threading.get_ident()

    elapsed, ticks, loop_thread = asyncio.run(main())
    assert elapsed >= 0.04
    assert ticks >= 3
    rest = session.runs[1:]
    assert all(thread == loop_thread for _, thread in rest)
    assert rest[-1][0] >= 2  # the requests that waited ran together
    assert sum(n for n, _ in rest) == 3


def test_a_full_preferred_batch_runs_at_once() -> None:
    session = Recording()
    b = make(session, Batching((4,), max_queue_delay_s=5.0))

    async def main() -> float:
        await all_answered(b, [0.0])
        start = time.perf_counter()
        await all_answered(b, [float(v) for v in range(1, 6)])
        return time.perf_counter() - start

    assert asyncio.run(main()) < 2.0  # far below the 5 s delay
    assert session.runs[-1][0] >= 4  # the batch, with whatever else was queued by then


def test_a_run_longer_than_the_inline_bound_stays_on_the_worker(monkeypatch) -> None:
    monkeypatch.setattr(module, "INLINE_MAX_S", 1e-3)
    session = Recording(delay_s=0.005)
    b = make(session, Batching((), max_queue_delay_s=0.0))

    async def main() -> int:
        for _ in range(2):
            await all_answered(b, [1.0, 2.0, 3.0])
        await b.close()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert all(thread != loop_thread for _, thread in session.runs)


@pytest.mark.parametrize(("cpus", "on_loop"), [({0}, True), ({0, 1}, False)])
def test_loop_mode_is_the_default_on_one_cpu(monkeypatch, cpus: set[int], on_loop: bool) -> None:
    """With a single-threaded session: on one CPU the merged batch runs on the loop's thread,
    on two on the worker's (no cgroup quota: this machine's is not read)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus, raising=False)
    monkeypatch.setattr(cpus_module, "PROC_CGROUP", Path("/nonexistent/cgroup"))
    session = Recording()
    b = make(session, Batching((), max_queue_delay_s=0.0), on_loop=None)

    async def main() -> int:
        await all_answered(b, [0.0])
        await all_answered(b, [float(v) for v in range(1, 6)])
        await b.close()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    merged = [thread for n, thread in session.runs if n > 1]
    assert merged and all((thread == loop_thread) == on_loop for thread in merged)


def test_a_failing_policy_fails_the_queue_on_the_loop_then_serving_goes_on() -> None:
    """A bug while the loop picks a batch answers every queued request (500) instead of
    leaving them waiting forever; once mended, requests are served."""

    class Breakable(AlwaysMerge):
        broken = False

        def plan(self, key, queued: int) -> int:
            if self.broken:
                raise RuntimeError("policy bug")
            return super().plan(key, queued)

    session = Recording()
    policy = Breakable(8)
    b = make(session, Batching((), max_queue_delay_s=0.0), policy=policy)

    async def main() -> list:
        await all_answered(b, [0.0])
        policy.broken = True
        results = await asyncio.gather(*(b.infer(x(v), 1) for v in range(1, 6)),
                                       return_exceptions=True)  # fmt: skip
        policy.broken = False
        await all_answered(b, [7.0, 8.0])
        await b.close()
        return results

    results = asyncio.run(asyncio.wait_for(main(), 10))
    failed = [r for r in results if isinstance(r, BaseException)]
    assert failed and all(isinstance(r, InferenceFailed) for r in failed)
    assert all("model 'fake:1' failed to run: policy bug" in str(r) for r in failed)
    for v, r in zip(range(1, 6), results, strict=True):  # one may have run alone, at once
        if not isinstance(r, BaseException):
            np.testing.assert_array_equal(r.outputs["y"], x(v)["x"] * 2)


class TwoSpeeds(Recording):
    """``y = 2 * x``: width-5 requests take ``slow_s``, width-3 ones no time."""

    def __init__(self, slow_s: float) -> None:
        super().__init__()
        self.slow_s = slow_s

    def run(self, feeds: dict[str, np.ndarray], *, shrink: bool = False) -> dict[str, np.ndarray]:
        if feeds["x"].shape[1] == 5:
            time.sleep(self.slow_s)
        return super().run(feeds, shrink=shrink)


def stopped_with_work_queued(b: Batcher, blocker: threading.Event | None = None) -> None:
    """On a loop of its own: queue a request, then stop and close the loop before anything it
    has scheduled runs (its caller gave up; its drains and timers are thrown away).  With
    ``blocker``, the loop thread waits for it first, still running (a loop busy elsewhere)."""
    loop = asyncio.new_event_loop()

    def block_then_stop() -> None:
        assert blocker is not None
        blocker.wait(10)
        loop.stop()  # what was scheduled meanwhile never runs

    async def main() -> None:
        pending = asyncio.ensure_future(b.infer(x(-1.0), 1))
        await asyncio.sleep(0.005)  # queued, its drain run (the model was busy) or timer armed
        if blocker is not None:
            loop.call_soon(block_then_stop)
            await asyncio.sleep(1)  # stopped before this ends
        pending.cancel()

    with contextlib.suppress(RuntimeError):  # "Event loop stopped before Future completed."
        loop.run_until_complete(main())
    loop.close()


def test_a_loop_that_stops_with_requests_queued_holds_up_no_other_loop() -> None:
    """Loop A queues a request behind a slow run and stops while a drain is scheduled on it;
    loop B's request queued meanwhile is answered, and so are later requests of loop C that
    have to queue (nothing is left waiting for a drain that will never run)."""
    session = TwoSpeeds(slow_s=0.3)
    b = make(session, Batching((), max_queue_delay_s=0.0))
    b_queued = threading.Event()

    async def warm_then_hold_the_worker() -> None:
        await all_answered(b, [0.0])
        slow = asyncio.ensure_future(b.infer({"x": np.ones((1, 5), np.float32)}, 1))
        await asyncio.sleep(0.02)  # the worker runs the slow key's first run
        a = threading.Thread(target=stopped_with_work_queued, args=(b, b_queued))
        a.start()
        await asyncio.sleep(0.05)
        b_request = asyncio.ensure_future(b.infer(x(2.0), 1))  # queued behind A's
        await asyncio.sleep(0.005)
        b_queued.set()
        a.join(10)
        await slow
        np.testing.assert_array_equal((await b_request).outputs["y"], x(2.0)["x"] * 2)

    asyncio.run(asyncio.wait_for(warm_then_hold_the_worker(), 10))

    async def later_client() -> None:  # loop C: requests that queue behind each other
        for _ in range(3):
            await all_answered(b, [3.0, 4.0, 5.0, 6.0])
        await b.close()

    asyncio.run(asyncio.wait_for(later_client(), 10))


def test_a_batch_delay_timer_lost_with_its_loop_is_armed_again() -> None:
    """Loop A's request waits for a batch with a timer on A, and A closes before it fires;
    later requests that wait for a batch on loop B still run when their delay is over."""
    session = Recording()
    b = make(session, Batching((8,), max_queue_delay_s=0.05))

    async def warm() -> None:
        await all_answered(b, [0.0])

    asyncio.run(warm())
    stopped_with_work_queued(b)

    async def waiting_client() -> None:
        for _ in range(3):
            await all_answered(b, [1.0, 2.0, 3.0])
        await b.close()

    asyncio.run(asyncio.wait_for(waiting_client(), 10))
    assert sum(n for n, _ in session.runs) >= 1 + 9
