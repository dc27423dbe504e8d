"""The dynamic batcher on its own, with a fake session: what runs together, what is split
back to whom, when a batch is dispatched, and that one bad request fails alone.

The merging mechanics run under :class:`AlwaysMerge` (Triton's rule); how the learned limit
bounds merging and waiting is tested with a policy that states its limit
(:mod:`tests.serve.test_merge_policy` tests the learning itself)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from normport.runtime.serve.batcher import Batcher, Execution
from normport.runtime.serve.errors import BadRequest, InferenceFailed, ModelUnavailable
from normport.runtime.serve.merge_policy import AlwaysMerge, LearnedMerge, MergePolicy
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


_MODE = {"on_loop": False}


@pytest.fixture(autouse=True, params=[False, True], ids=["worker", "loop mode"])
def mode(request: pytest.FixtureRequest):
    """Every test runs with the worker thread taking the queue, and in loop mode (the event
    loop taking it wherever it may, as on one CPU)."""
    _MODE["on_loop"] = request.param
    yield request.param
    _MODE["on_loop"] = False


def batcher(
    session: FakeSession,
    batching: Batching | None,
    max_batch_size: int = 8,
    max_batch_bytes: int | None = None,
    policy: MergePolicy | None = None,
) -> Batcher:
    executions: list[Execution] = []
    policy = policy or AlwaysMerge(max_batch_size)
    b = Batcher(session, "fake:1", max_batch_size=max_batch_size, batching=batching,
                on_execution=executions.append, max_batch_bytes=max_batch_bytes,
                policy=policy, on_loop=_MODE["on_loop"])  # fmt: skip
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


class Limit:
    """A policy with a stated limit, recording the costs it is told."""

    def __init__(self, limit: int) -> None:
        self.value = limit
        self.observed: list[tuple[int, float]] = []

    def limit(self, key) -> int:
        return self.value

    def plan(self, key, queued: int) -> int:
        return self.value

    def observe(self, key, samples: int, seconds: float) -> None:
        self.observed.append((samples, seconds))

    def should_wait(self, key) -> bool:
        return True

    def waited(self, key, joined: bool) -> None:
        pass

    def alone(self, key) -> bool:
        return self.value <= 1


def test_a_run_takes_no_more_than_the_policy_s_limit() -> None:
    session = FakeSession()
    policy = Limit(3)
    b = batcher(session, SLOW, policy=policy)
    requests = [request(i) for i in range(8)]
    results = asyncio.run(queue_behind_first(b, session, requests))
    assert session.batches == [1, 3, 3, 1]
    for r, result in zip(requests, results, strict=True):
        assert np.array_equal(result.outputs["y"], r["x"] * 2)
    assert [samples for samples, _ in policy.observed] == session.batches
    assert all(seconds > 0 for _, seconds in policy.observed)


def test_at_limit_one_nothing_waits_and_nothing_merges() -> None:
    """Merging measured not to pay: a 5 s queue delay and a preferred size of 8 are not waited
    for, and each request runs alone, as without dynamic batching."""
    session = FakeSession()
    session.gate.set()
    b = batcher(session, Batching((8,), max_queue_delay_s=5.0), policy=Limit(1))

    async def run() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.gather(*(b.infer(request(i), 1) for i in range(4)))
        return loop.time() - start

    assert asyncio.run(run()) < 2.0
    assert session.batches == [1, 1, 1, 1]


def test_waiting_ends_when_the_queue_reaches_the_limit() -> None:
    session = FakeSession()
    session.gate.set()
    b = batcher(session, Batching((8,), max_queue_delay_s=5.0), policy=Limit(4))

    async def run() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.gather(*(b.infer(request(i), 1) for i in range(4)))
        return loop.time() - start

    assert asyncio.run(run()) < 2.0  # 4 is no preferred size, but the most worth merging
    assert session.batches == [4]


class Timed(FakeSession):
    """A run of ``n`` samples sleeps ``per_run + per_sample * n**2`` seconds (so it is
    measured): with ``per_sample`` 0, merging pays; with ``per_run`` 0, a sample costs ``n``
    times more in a run of ``n`` (a cache-bound model past its knee)."""

    def __init__(self, per_run: float, per_sample: float) -> None:
        super().__init__()
        self.gate.set()
        self.per_run, self.per_sample = per_run, per_sample

    def run(self, feeds, *, shrink=False):
        time.sleep(self.per_run + self.per_sample * len(feeds["x"]) ** 2)
        return super().run(feeds, shrink=shrink)


@pytest.mark.parametrize(
    ("per_run", "per_sample", "merges"),
    [(0.004, 0.0, True), (0.0, 0.002, False)],
    ids=["fixed_cost_per_run", "cost_per_sample_grows_with_the_batch"],
)
def test_the_learned_limit_follows_what_runs_cost(
    per_run: float, per_sample: float, merges: bool
) -> None:
    """Eight clients in a closed loop: merging is learned when runs cost the same whatever
    their size, and not when merged samples cost more than lone ones."""
    session = Timed(per_run, per_sample)
    b = batcher(session, Batching((), max_queue_delay_s=0.001), policy=LearnedMerge(8))

    async def client(i: int) -> None:
        for k in range(12):
            result = await b.infer(request(10 * i + k), 1)
            assert np.array_equal(result.outputs["y"], request(10 * i + k)["x"] * 2)

    async def run() -> None:
        await asyncio.gather(*(client(i) for i in range(8)))

    asyncio.run(run())
    (limit,) = b.limits().values()
    if merges:
        assert limit > 1 and len(session.batches) < 96 / 2
    else:
        assert limit == 1 and sum(n > 1 for n in session.batches) < len(session.batches) / 4


def test_a_failing_policy_fails_the_queued_requests_then_serving_goes_on() -> None:
    """A bug while picking a batch answers every queued request (500) instead of leaving
    them waiting forever, and the next requests are served."""

    class Broken(Limit):
        def limit(self, key) -> int:
            if not self.observed:
                raise RuntimeError("policy bug")
            return 8

    session = FakeSession()
    session.gate.set()
    b = batcher(session, Batching((), max_queue_delay_s=0.0), policy=Broken(8))
    b.policy.observed.append((0, 0.0))  # type: ignore[attr-defined]  # healthy from the start

    async def run() -> None:
        b.policy.observed.clear()  # type: ignore[attr-defined]  # now broken
        with pytest.raises(InferenceFailed, match="model 'fake:1' failed to run: policy bug"):
            await b.infer(request(1), 1)
        b.policy.observed.append((0, 0.0))  # type: ignore[attr-defined]  # mended
        result = await b.infer(request(2), 1)
        assert np.array_equal(result.outputs["y"], request(2)["x"] * 2)

    asyncio.run(asyncio.wait_for(run(), 10))


class ThreadRecordingSession(FakeSession):
    """FakeSession that also records the thread of each run and the most runs at once."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.gate.set()
        self.threads: list[threading.Thread] = []
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self.active = self.most_active = 0

    def run(self, feeds, *, shrink=False):
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            self.threads.append(threading.current_thread())
            time.sleep(self.delay_s)
            return super().run(feeds, shrink=shrink)
        finally:
            with self._lock:
                self.active -= 1


async def _one_by_one(b: Batcher, count: int, value: float = 1.0, pause_s: float = 0.0) -> list:
    results = []
    for i in range(count):
        results.append(await b.infer(request(value + i), 1))
        await asyncio.sleep(pause_s * (i % 3))  # now and then the batcher goes idle
    return results


def flat_costs() -> LearnedMerge:
    """A learned policy that measured merging the width-3 requests as not paying (limit 1):
    10 ms per sample at every size, dearer than any fake run, whose own costs (the runs on the
    event loop's thread report theirs) then keep bucket 1 the cheapest."""
    from normport.runtime.serve.merge_policy import MIN_RUNS

    policy = LearnedMerge(8)
    for size in (1, 2, 4):
        for _ in range(MIN_RUNS):
            policy.observe((("x", (3,)),), size, size * 1e-2)
    return policy


@pytest.mark.parametrize("policy", [None, flat_costs()], ids=["no batching", "learned limit 1"])
def test_a_short_run_at_an_idle_batcher_runs_on_the_callers_thread(
    policy, monkeypatch, mode
) -> None:
    """The first run of a key goes through the worker (which measures it); after that, a
    request that finds the batcher idle runs on the event loop's thread, with the same answer
    and one execution counted per run; with a learned policy, one request in EXPLORE_EVERY
    still goes through the worker, except in loop mode, where the queue is the loop's too.
    (The bound on a run's length is lifted: on a loaded machine a preempted run may take over
    1 ms.)"""
    from normport.runtime.serve import batcher as module
    from normport.runtime.serve.merge_policy import EXPLORE_EVERY

    monkeypatch.setattr(module, "INLINE_MAX_S", 10.0)

    session = ThreadRecordingSession()
    b = batcher(session, None if policy is None else SLOW, policy=policy)

    async def run() -> tuple[list, threading.Thread]:
        return await _one_by_one(b, 2 * EXPLORE_EVERY), threading.current_thread()

    results, loop_thread = asyncio.run(run())
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.outputs["y"], request(1.0 + i)["x"] * 2)
    on_loop = [t is loop_thread for t in session.threads]
    assert not on_loop[0]  # the first run of the key: the worker
    if mode:  # loop mode: the worker runs nothing else
        assert on_loop.count(False) == 1
    else:  # it also takes a request that comes before it is back asleep (timing-dependent)
        least_on_worker = 1 if policy is None else 2  # + the one in EXPLORE_EVERY
        assert least_on_worker <= on_loop.count(False) <= len(on_loop) // 2
    assert len(b.executions) == len(results) == len(session.batches)


def test_after_the_loop_slept_a_request_runs_on_its_thread_even_where_merging_pays(
    monkeypatch, mode
) -> None:
    """Under AlwaysMerge (merging always pays, so no key ever runs alone): a request that
    comes after its event loop slept (a lone client's round trip) has nobody to merge with and
    runs on the loop's thread; requests that come back to back, the loop never off its CPU
    between an answer and the next request (a backlog), queue for the worker, or in loop mode
    for the loop's own drain.  (The bound on a run's length is lifted: on a loaded machine a
    preempted run may take over 1 ms.)"""
    from normport.runtime.serve import batcher as module

    monkeypatch.setattr(module, "INLINE_MAX_S", 10.0)
    IDLE_MIN_S = module.IDLE_MIN_S
    session = ThreadRecordingSession()
    b = batcher(session, SLOW)

    async def run() -> threading.Thread:
        await b.infer(request(0), 1)  # the key's first run: the worker measures it
        for i in range(1, 9):
            await b.infer(request(i), 1)
        for i in range(9, 17):
            await asyncio.sleep(100 * IDLE_MIN_S)
            result = await b.infer(request(i), 1)
            np.testing.assert_array_equal(result.outputs["y"], request(i)["x"] * 2)
        return threading.current_thread()

    loop_thread = asyncio.run(run())
    on_loop = [t is loop_thread for t in session.threads]
    assert not on_loop[0]
    # back to back: the worker (one may be taken inline if the loop thread was preempted)
    assert on_loop[1:9].count(False) >= 6 if not mode else all(on_loop[1:9])
    assert all(on_loop[9:])  # after a sleep: every one inline
    assert len(b.executions) == 17


def test_a_loop_that_slept_does_not_run_a_request_inline_behind_a_queue() -> None:
    """The idle-loop rule needs an idle batcher too: a request that finds others queued or a
    run in flight queues behind them, however long its loop slept."""
    session = ThreadRecordingSession(delay_s=0.02)
    b = batcher(session, SLOW)

    async def run() -> None:
        await b.infer(request(0), 1)
        await asyncio.sleep(0.01)
        await asyncio.gather(*(b.infer(request(i), 1) for i in range(1, 6)))

    asyncio.run(run())
    assert session.batches[0] == 1
    assert sum(session.batches[1:]) == 5 and len(session.batches) < 6  # merged behind the first


def test_the_policy_sees_each_run_s_cost_with_a_hand_over_only_on_the_worker(
    monkeypatch,
) -> None:
    """Runs on the worker come back to the policy as their cost plus HANDOFF_S; runs on the
    event loop's thread (at limit 1, most runs after the first) as 1 sample and their cost
    alone.  HANDOFF_S is made 1 s here, which no fake run comes near."""
    from normport.runtime.serve import batcher as module

    HANDOFF_S = 1.0
    monkeypatch.setattr(module, "HANDOFF_S", HANDOFF_S)
    session = ThreadRecordingSession()
    policy = Limit(1)
    b = batcher(session, SLOW, policy=policy)

    async def run() -> threading.Thread:
        await _one_by_one(b, 12)
        return threading.current_thread()

    loop_thread = asyncio.run(run())
    assert len(policy.observed) == len(session.threads) == 12
    for thread, (samples, seconds) in zip(session.threads, policy.observed, strict=True):
        assert samples == 1
        if thread is loop_thread:
            assert 0 <= seconds < HANDOFF_S
        else:
            assert seconds >= HANDOFF_S
    assert any(t is loop_thread for t in session.threads)


def test_a_run_longer_than_the_inline_bound_stays_on_the_worker() -> None:
    from normport.runtime.serve.batcher import INLINE_MAX_S

    session = ThreadRecordingSession(delay_s=3 * INLINE_MAX_S)
    b = batcher(session, None)

    async def run() -> threading.Thread:
        await _one_by_one(b, 5)
        return threading.current_thread()

    loop_thread = asyncio.run(run())
    assert all(t is not loop_thread for t in session.threads)


def test_a_request_that_finds_a_run_in_flight_queues_behind_it() -> None:
    """Requests gathered on one loop: the first runs, the others queue and merge behind it
    (under AlwaysMerge) instead of each running alone on the loop."""
    session = ThreadRecordingSession(delay_s=0.02)
    b = batcher(session, SLOW)

    async def run() -> None:
        await b.infer(request(0), 1)  # measured: the key could run inline from now on
        await asyncio.gather(*(b.infer(request(i), 1) for i in range(1, 6)))

    asyncio.run(run())
    assert session.batches[0] == 1
    assert sum(session.batches[1:]) == 5 and len(session.batches) < 6  # merged


def test_a_failing_run_on_the_callers_thread_fails_alone_with_the_same_errors() -> None:
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    class Refusing(ThreadRecordingSession):
        def run(self, feeds, *, shrink=False):
            if (feeds["x"] == 7).any():
                raise InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : bad index")
            return super().run(feeds, shrink=shrink)

    session = Refusing()
    b = batcher(session, None)

    async def run() -> None:
        await _one_by_one(b, 3)
        with pytest.raises(BadRequest, match=r"refused the request: .*bad index"):
            await b.infer(request(7), 1)
        with pytest.raises(InferenceFailed, match="poisoned input"):
            await b.infer(request(-1), 1)
        assert np.array_equal((await b.infer(request(2), 1)).outputs["y"], request(2)["x"] * 2)

    asyncio.run(run())


def test_runs_from_several_event_loops_never_overlap() -> None:
    """Two clients, each on its own event loop and thread, take the fast path whenever the
    batcher is idle: the model still runs one request at a time."""
    session = ThreadRecordingSession(delay_s=0.0005)
    b = batcher(session, None)
    errors: list[BaseException] = []

    def client(offset: float) -> None:
        try:
            asyncio.run(_one_by_one(b, 60, offset, pause_s=0.002))
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(v,)) for v in (0.0, 100.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert session.most_active == 1
    assert len(session.batches) == 120
    client_threads = {t.ident for t in threads}
    assert any(t.ident in client_threads for t in session.threads)  # some ran on a loop


def test_a_policy_failing_to_plan_a_batch_fails_every_queued_request() -> None:
    """The plan comes before the oldest request leaves the queue: a policy that fails there
    fails every queued request (none is lost, waiting forever), and serving goes on."""

    class FailingPlan(Limit):
        broken = False

        def plan(self, key, queued: int) -> int:
            if self.broken:
                raise RuntimeError("plan bug")
            return self.value

    session = FakeSession()
    policy = FailingPlan(8)
    b = batcher(session, SLOW, policy=policy)

    async def run() -> list:
        first = asyncio.ensure_future(b.infer(request(0), 1))
        await asyncio.to_thread(session.entered.wait, 10)
        policy.broken = True
        rest = [asyncio.ensure_future(b.infer(request(i), 1)) for i in range(1, 4)]
        await asyncio.sleep(0.01)
        session.gate.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        policy.broken = False
        again = await b.infer(request(5), 1)
        np.testing.assert_array_equal(again.outputs["y"], request(5)["x"] * 2)
        return results

    results = asyncio.run(asyncio.wait_for(run(), 10))
    np.testing.assert_array_equal(results[0].outputs["y"], request(0)["x"] * 2)
    assert all(isinstance(r, InferenceFailed) and "plan bug" in str(r) for r in results[1:])


def test_a_failing_statistics_callback_keeps_no_request_from_its_answer(caplog) -> None:
    """Every answer is delivered, and the failure logged, when recording a run raises: for a
    run on the worker, and for runs merged from the queue."""

    def broken(execution: Execution) -> None:
        raise RuntimeError("statistics bug")

    session = FakeSession()
    b = Batcher(session, "fake:1", max_batch_size=8, batching=SLOW, on_execution=broken,
                policy=AlwaysMerge(8), on_loop=_MODE["on_loop"])  # fmt: skip
    requests = [request(i) for i in range(5)]
    results = asyncio.run(asyncio.wait_for(queue_behind_first(b, session, requests), 10))
    for r, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.outputs["y"], r["x"] * 2)
    assert session.batches == [1, 4]
    assert "recording a run failed" in caplog.text and "statistics bug" in caplog.text
