"""Dynamic batching: one queue and one onnxruntime worker thread per model version.

Requests wait in a queue; the dispatch loop (a task on the event loop) takes the oldest request
and every later one with the same *batch key* (the non-batch shape of each input; datatypes are
fixed per input by the config), up to ``max_batch_size`` samples, concatenates them along
axis 0, runs onnxruntime in the worker thread, and splits every output back along axis 0.

When to dispatch (Triton's rule, simplified): at once when the key's queued samples reach a
preferred batch size or the largest one; otherwise when the *oldest* request has waited
``max_queue_delay``.  One run is in flight at a time (one model instance), so under load
requests pile up while a run executes and the next run takes them all: that is where
``execution_count < inference_count`` comes from.  Without ``dynamic_batching`` (``batching``
None) every request runs on its own, in arrival order.

Memory: each request carries its estimated run bytes (:mod:`runtime.serve.memory`); a batch
never adds a request that would take the batch over ``max_batch_bytes`` (the model's memory
budget), and a run estimated above :data:`runtime.serve.session.SHRINK_ABOVE_BYTES` trims the
heap when it ends (:func:`runtime.serve.heap.trim`).

A batched run that fails is retried request by request, so one bad request (say, a token id
outside the vocabulary) fails alone instead of failing its neighbours.

The queue lives on one event loop at a time; a batcher first used from another loop (a new
test client) starts afresh there.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from normport.runtime.messages import first_line
from normport.runtime.serve.errors import BadRequest, InferenceFailed, ModelUnavailable, ServeError
from normport.runtime.serve.session import SHRINK_ABOVE_BYTES, Session
from normport.runtime.serve.spec import Batching

__all__ = ["Batcher", "Execution", "Result"]

_TIMER_RESOLUTION_S = 1e-3


@dataclass(frozen=True)
class Execution:
    """One onnxruntime run: samples in it and the time of each phase (ns)."""

    batch_size: int
    input_ns: int
    infer_ns: int
    output_ns: int


@dataclass(frozen=True)
class Result:
    """What a request gets back: its own slice of every output, and where its time went."""

    outputs: dict[str, np.ndarray]
    queue_ns: int
    execution: Execution


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]
    batch_size: int
    key: Hashable
    future: asyncio.Future
    run_bytes: int = 0
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)


class Batcher:
    """The queue and worker of one model version.

    Args:
        session: the model's session.
        model: ``"name:version"``, for error messages.
        max_batch_size: samples per run (0: the model takes no batch dimension).
        batching: when and how to merge requests; None runs each request alone.
        on_execution: called on the event loop after every successful run.
        max_batch_bytes: the most estimated run bytes one batch may hold (None: no bound).
    """

    def __init__(
        self,
        session: Session,
        model: str,
        *,
        max_batch_size: int,
        batching: Batching | None,
        on_execution: Callable[[Execution], None] = lambda _: None,
        max_batch_bytes: int | None = None,
    ) -> None:
        self._session = session
        self._model = model
        self._max_batch_size = max_batch_size
        self._batching = batching if max_batch_size > 0 else None
        self._on_execution = on_execution
        self._max_batch_bytes = max_batch_bytes
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"ort-{model}")
        self._pending: collections.deque[_Pending] = collections.deque()
        self._queued_samples: collections.Counter[Hashable] = collections.Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    async def infer(
        self, inputs: dict[str, np.ndarray], batch_size: int, run_bytes: int = 0
    ) -> Result:
        """Queue one request (graph-facing arrays, ``batch_size`` samples, onnxruntime's
        estimated working memory for it) and await its result.

        Raises:
            ModelUnavailable: the batcher is closed (the server is stopping).
            BadRequest: onnxruntime refused the request's values (InvalidArgument).
            InferenceFailed: any other onnxruntime failure.
        """
        if self._closed:
            raise ModelUnavailable(f"model '{self._model}' is shutting down")
        self._ensure_worker()
        assert self._wakeup is not None and self._loop is not None  # set by _ensure_worker
        key = tuple((name, a.shape[1:]) for name, a in inputs.items())
        item = _Pending(inputs, batch_size, key, self._loop.create_future(), run_bytes)
        self._pending.append(item)
        self._queued_samples[key] += batch_size
        self._wakeup.set()
        return await item.future

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._task is not None and not self._task.done():
            return
        if self._loop is not loop:  # first use, or a new event loop (a new test client)
            self._loop, self._wakeup = loop, asyncio.Event()
            self._pending.clear()
            self._queued_samples.clear()
        self._task = loop.create_task(self._dispatch_loop(), name=f"batcher-{self._model}")

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the worker thread."""
        self._closed = True
        if self._task is not None and self._loop is asyncio.get_running_loop():
            assert self._wakeup is not None
            self._wakeup.set()
            await self._task
        self._executor.shutdown(wait=True)

    # -- the dispatch loop (event loop side) ----------------------------------------------

    async def _dispatch_loop(self) -> None:
        try:
            await self._dispatch_forever()
        except BaseException as error:  # a bug or a cancelled loop: nobody may wait forever
            for item in self._pending:
                _fail(item.future, _as_serve_error(error, self._model))
            raise

    async def _dispatch_forever(self) -> None:
        assert self._wakeup is not None
        while True:
            while not self._pending:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._batching is not None:
                await self._wait_for_batch(self._batching)
            batch = self._take()
            await self._execute(batch)

    async def _wait_for_batch(self, batching: Batching) -> None:
        """Wait, at most until the oldest request is ``max_queue_delay`` old, for a full batch."""
        assert self._wakeup is not None
        oldest = self._pending[0]
        target = batching.preferred_batch_sizes or (self._max_batch_size,)
        deadline = oldest.enqueued_ns / 1e9 + batching.max_queue_delay_s
        while not self._closed:
            queued = self._queued_samples[oldest.key]
            if queued in target or queued >= min(target[-1], self._max_batch_size):
                return
            remaining = deadline - time.perf_counter_ns() / 1e9
            if remaining <= 0:
                return
            if remaining < _TIMER_RESOLUTION_S:
                # Event-loop timers are millisecond-grained (epoll; uvloop rounds down, asyncio
                # up): yield instead, still serving I/O, so that e.g. 100 us means 100 us.
                await asyncio.sleep(0)
                continue
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining - _TIMER_RESOLUTION_S):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    def _take(self) -> list[_Pending]:
        """The oldest request and the later ones sharing its key, up to max_batch_size samples
        and max_batch_bytes estimated bytes."""
        first = self._pending.popleft()
        batch, samples, size = [first], first.batch_size, first.run_bytes
        limit = self._max_batch_bytes
        if self._batching is not None and self._pending:
            kept: collections.deque[_Pending] = collections.deque()
            for item in self._pending:
                if (
                    item.key == first.key
                    and samples + item.batch_size <= self._max_batch_size
                    and (limit is None or size + item.run_bytes <= limit)
                ):
                    batch.append(item)
                    samples += item.batch_size
                    size += item.run_bytes
                else:
                    kept.append(item)
            self._pending = kept
        for item in batch:
            self._queued_samples[item.key] -= item.batch_size
            if not self._queued_samples[item.key]:
                del self._queued_samples[item.key]
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        assert self._loop is not None
        batch = [item for item in batch if not item.future.done()]  # drop abandoned requests
        if not batch:
            return
        dispatched = time.perf_counter_ns()
        try:
            outputs, execution = await self._loop.run_in_executor(
                self._executor,
                self._run,
                [item.inputs for item in batch],
                sum(item.run_bytes for item in batch) >= SHRINK_ABOVE_BYTES,
            )
        except Exception as error:
            if len(batch) > 1:  # find the culprit: run each request on its own
                for item in batch:
                    await self._execute([item])
                return
            _fail(batch[0].future, _as_serve_error(error, self._model))
            return
        self._on_execution(execution)
        for item, own in zip(batch, outputs, strict=True):
            if not item.future.done():  # the client may have gone away
                item.future.set_result(Result(own, dispatched - item.enqueued_ns, execution))

    # -- the worker thread -----------------------------------------------------------------

    def _run(
        self, requests: list[dict[str, np.ndarray]], shrink: bool
    ) -> tuple[list[dict[str, np.ndarray]], Execution]:
        t0 = time.perf_counter_ns()
        if len(requests) == 1:
            feeds = requests[0]
        else:
            feeds = {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}
        t1 = time.perf_counter_ns()
        outputs = self._session.run(feeds, shrink=shrink)
        t2 = time.perf_counter_ns()
        sizes = [len(next(iter(r.values()))) for r in requests] if self._max_batch_size else [1]
        split = self._split(outputs, sizes) if len(requests) > 1 else [outputs]
        t3 = time.perf_counter_ns()
        return split, Execution(sum(sizes), t1 - t0, t2 - t1, t3 - t2)

    def _split(
        self, outputs: dict[str, np.ndarray], sizes: list[int]
    ) -> list[dict[str, np.ndarray]]:
        total = sum(sizes)
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise InferenceFailed(
                    f"model '{self._model}': output '{name}' has shape {list(array.shape)}, "
                    f"expected a batch of {total} along axis 0"
                )
        bounds = np.cumsum([0, *sizes])
        return [
            {name: array[lo:hi] for name, array in outputs.items()}
            for lo, hi in itertools.pairwise(bounds)
        ]


def _as_serve_error(error: BaseException, model: str) -> ServeError:
    if isinstance(error, ServeError):
        return error
    message = first_line(error)
    if isinstance(error, InvalidArgument):
        return BadRequest(f"model '{model}' refused the request: {message}")
    return InferenceFailed(f"model '{model}' failed to run: {message}")


def _fail(future: asyncio.Future, error: ServeError) -> None:
    if not future.done():
        future.set_exception(error)
