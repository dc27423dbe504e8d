"""Busy polling after an answer (runtime.serve.busypoll), on asyncio's loop and uvloop's.

The oracle is the operating system's CPU clock of the loop's thread: a loop that polls for a
window spends it on the CPU, a loop that sleeps spends next to nothing.  Each scenario runs in
a thread of its own (the state is per thread) with a window far above scheduler noise."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest
import uvloop

from normport.runtime.serve import busypoll
from normport.runtime.serve.batcher import Batcher
from normport.runtime.serve.merge_policy import AlwaysMerge
from normport.runtime.serve.spec import Batching

WINDOW_S = 0.04
POLLING_CPU_S = 0.01  # a polling loop spends a good part of the window on the CPU...
SLEEPING_CPU_S = 0.004  # ...a sleeping one next to none of it

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def in_own_thread(new_loop: Callable[[], asyncio.AbstractEventLoop], main: Coroutine) -> Any:
    """Run ``main`` on a new loop in a new thread (fresh per-thread polling state)."""

    def target() -> Any:
        loop = new_loop()
        try:
            return loop.run_until_complete(main)
        finally:
            loop.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(target).result(timeout=30)


async def cpu_while_waiting(seconds: float) -> float:
    """The loop thread's CPU time while this coroutine sleeps ``seconds``."""
    start = time.thread_time()
    await asyncio.sleep(seconds)
    return time.thread_time() - start


async def answer_and_come_back(pause_s: float) -> None:
    """An answer, then a request ``pause_s`` later (the gap), then its answer."""
    busypoll.after_answer(WINDOW_S)
    await asyncio.sleep(pause_s)
    busypoll.on_arrival()
    busypoll.after_answer(WINDOW_S)


@pytest.mark.parametrize("new_loop", LOOPS.values(), ids=LOOPS.keys())
def test_a_loop_polls_after_answering_a_client_that_came_back_within_the_window(
    new_loop,
) -> None:
    async def main() -> tuple[float, float]:
        await answer_and_come_back(0.0)
        polling = await cpu_while_waiting(1.5 * WINDOW_S)
        idle = await cpu_while_waiting(1.5 * WINDOW_S)  # the window is over: asleep
        return polling, idle

    polling, idle = in_own_thread(new_loop, main())
    assert polling >= POLLING_CPU_S
    assert idle <= SLEEPING_CPU_S


@pytest.mark.parametrize("new_loop", LOOPS.values(), ids=LOOPS.keys())
def test_a_client_slower_than_the_window_never_makes_the_loop_poll(new_loop) -> None:
    async def main() -> list[float]:
        spent = []
        for _ in range(2):
            await answer_and_come_back(1.5 * WINDOW_S)  # the gap: over the window
            spent.append(await cpu_while_waiting(1.5 * WINDOW_S))
        return spent

    assert max(in_own_thread(new_loop, main())) <= SLEEPING_CPU_S


def test_a_first_request_makes_no_poll_and_zero_turns_polling_off() -> None:
    async def main() -> tuple[float, float]:
        busypoll.on_arrival()  # nothing answered yet on this loop: no gap known
        busypoll.after_answer(WINDOW_S)
        first = await cpu_while_waiting(1.5 * WINDOW_S)
        busypoll.on_arrival()
        busypoll.after_answer(0.0)
        return first, await cpu_while_waiting(1.5 * WINDOW_S)

    first, off = in_own_thread(asyncio.new_event_loop, main())
    assert first <= SLEEPING_CPU_S and off <= SLEEPING_CPU_S


@pytest.mark.parametrize("new_loop", LOOPS.values(), ids=LOOPS.keys())
def test_a_hold_stops_polling_until_released(new_loop) -> None:
    token = object()

    async def main() -> tuple[float, float]:
        busypoll.hold(token)
        try:
            await answer_and_come_back(0.0)
            held = await cpu_while_waiting(1.5 * WINDOW_S)
        finally:
            busypoll.release(token)
        await answer_and_come_back(0.0)
        return held, await cpu_while_waiting(1.5 * WINDOW_S)

    held, released = in_own_thread(new_loop, main())
    assert held <= SLEEPING_CPU_S
    assert released >= POLLING_CPU_S


def test_a_poll_that_finds_nothing_to_do_marks_the_loop_idle() -> None:
    async def main() -> tuple[int, int, int]:
        await answer_and_come_back(0.0)
        answered = time.perf_counter_ns()
        before = busypoll.idle_since_ns()
        await asyncio.sleep(WINDOW_S / 2)
        return before, answered, busypoll.idle_since_ns()

    before, answered, after = in_own_thread(uvloop.new_event_loop, main())
    assert before <= answered < after


def test_a_new_loop_on_the_same_thread_polls_again() -> None:
    """A loop that stopped while polling does not keep the next one from polling."""

    def target() -> tuple[float, float]:
        results = []
        for _ in range(2):
            loop = asyncio.new_event_loop()
            try:

                async def main() -> float:
                    await answer_and_come_back(0.0)
                    return await cpu_while_waiting(WINDOW_S / 2)  # stops mid-window

                results.append(loop.run_until_complete(main()))
            finally:
                loop.close()
        return results[0], results[1]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first, second = pool.submit(target).result(timeout=30)
    assert first >= POLLING_CPU_S / 2 and second >= POLLING_CPU_S / 2


class SlowSession:
    """``y = 2 * x`` after 60 ms off the CPU (as onnxruntime waiting for a core would be)."""

    def run(self, feeds: dict[str, np.ndarray], *, shrink: bool = False) -> dict[str, np.ndarray]:
        time.sleep(0.06)
        return {"y": feeds["x"] * 2}


def test_no_loop_polls_while_a_batcher_s_worker_has_work() -> None:
    """A request queued for the worker stops a polling loop (the worker would share its core)
    until the worker is idle again: the loop spends next to no CPU awaiting a 60 ms run."""
    b = Batcher(SlowSession(), "slow:1", max_batch_size=4,
                batching=Batching(preferred_batch_sizes=(), max_queue_delay_s=0.0),
                policy=AlwaysMerge(4))  # fmt: skip
    x = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}

    async def main() -> tuple[float, float]:
        await answer_and_come_back(0.0)  # polling from here, for WINDOW_S
        start = time.thread_time()
        result = await b.infer(x, 2)
        spent = time.thread_time() - start
        np.testing.assert_array_equal(result.outputs["y"], x["x"] * 2)
        await answer_and_come_back(0.0)  # the worker is idle: polling again
        after = await cpu_while_waiting(1.5 * WINDOW_S)
        await b.close()
        return spent, after

    spent, after = in_own_thread(uvloop.new_event_loop, main())
    assert spent <= SLEEPING_CPU_S
    assert after >= POLLING_CPU_S


class ThreadOfEachRun:
    """``y = 2 * x``, recording the thread of each run."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def run(self, feeds: dict[str, np.ndarray], *, shrink: bool = False) -> dict[str, np.ndarray]:
        self.threads.append(threading.get_ident())
        return {"y": feeds["x"] * 2}


def test_after_a_poll_found_nothing_a_request_runs_on_the_loop_even_where_merging_pays(
    monkeypatch,
) -> None:
    """A polling loop never sleeps, so it counts as idle once a poll found nothing to do: a
    request then runs on its thread under AlwaysMerge (nobody to merge with), as after a sleep.
    The sleep rule is turned off here (IDLE_MIN_S of 10 s), and the bound on a run's length
    lifted (a preempted run may take over 1 ms)."""
    from normport.runtime.serve import batcher as module

    monkeypatch.setattr(module, "IDLE_MIN_S", 10.0)
    monkeypatch.setattr(module, "INLINE_MAX_S", 10.0)
    session = ThreadOfEachRun()
    b = Batcher(session, "fake:1", max_batch_size=4,
                batching=Batching(preferred_batch_sizes=(), max_queue_delay_s=0.0),
                policy=AlwaysMerge(4))  # fmt: skip

    async def main() -> tuple[int, list[int]]:
        await b.infer({"x": np.zeros((1, 3), np.float32)}, 1)  # first run: the worker's
        polled = []
        for i in range(1, 9):
            x = {"x": np.full((1, 3), i, np.float32)}
            polls = i % 2 == 0
            if polls:
                await answer_and_come_back(0.0)
                await asyncio.sleep(WINDOW_S / 8)  # polling, within the window
            result = await b.infer(x, 1)
            np.testing.assert_array_equal(result.outputs["y"], x["x"] * 2)
            polled.append(polls)
        await b.close()
        return threading.get_ident(), polled

    loop_thread, polled = in_own_thread(uvloop.new_event_loop, main())
    on_loop = [t == loop_thread for t in session.threads[1:]]
    assert session.threads[0] != loop_thread
    assert [on for on, polls in zip(on_loop, polled, strict=True) if polls] == [True] * 4
    assert [on for on, polls in zip(on_loop, polled, strict=True) if not polls] == [False] * 4
