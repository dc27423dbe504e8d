"""Dynamic batching: one queue and one onnxruntime worker thread per model version.

Requests wait in a queue; the worker thread takes the oldest request and every later one with
the same *batch key* (the non-batch shape of each input; datatypes are fixed per input by the
config), up to ``max_batch_size`` samples, concatenates them along axis 0, runs onnxruntime,
splits every output back along axis 0 and hands each request its share on its event loop.

When to dispatch (Triton's rule, simplified): at once when the key's queued samples reach a
preferred batch size or the largest one; otherwise when the *oldest* request has waited
``max_queue_delay``.  One run is in flight at a time (one model instance), so under load
requests pile up while a run executes and the next run takes them: that is where
``execution_count < inference_count`` comes from.  Without ``dynamic_batching`` (``batching``
None) every request runs on its own, in arrival order.

Whether merging pays is learned per key (:mod:`runtime.serve.merge_policy`): a run never takes
more samples than the key's *limit*, the batch size measured cheapest per sample, and nothing
waits for more than that limit (limit 1: no waiting and no merging, as without dynamic
batching).  What each run cost goes back to the policy: the worker's CPU time for it (forming
the batch, onnxruntime, splitting; its wall time when onnxruntime computes in threads of its
own) plus :data:`HANDOFF_S`, the hand-over of the results and the event loop's share of a run;
for a run on the event loop's own thread (the fast path below), that thread's CPU time alone,
with no hand-over: so a model whose runs cost the same per sample at any batch size (a CNN)
is measured cheaper alone, and its requests are not merged to save hand-overs that running
alone does not pay.  CPU time, because on a core shared with the event loop a run's wall time
counts whatever the loop did meanwhile: a batch of 64 overlaps the handling of 64 requests, a
lone request almost nothing, and wall time made merging a CNN look 40% dearer per sample than
it is.

Why the worker thread forms the batches itself, rather than a task on the event loop handing
each batch to an executor: a round trip through ``run_in_executor`` and a dispatch task cost
the event loop about 100 us of CPU per run on a 2-core machine, six times what ``seq_bn``
spends in onnxruntime.  Here the event loop only appends to the queue (waking the worker when
it sleeps or when its batch is complete) and receives one callback per run; the worker waits
for a batch on a condition variable, which times ``max_queue_delay`` to the microsecond where
event-loop timers are millisecond-grained.

The fast path: a request that finds the batcher idle (nothing queued, no run in flight), whose
last run alone took at most :data:`INLINE_MAX_S`, and that has nobody to merge with, runs at
once on the event loop's own thread.  Nobody to merge with: no dynamic batching; or
:meth:`~runtime.serve.merge_policy.MergePolicy.alone` (merging is measured not to pay); or the
event loop has *slept* since it last answered this model (of the wall time since then, at
least :data:`IDLE_MIN_S` was not the loop thread's CPU time; or, busy polling, a poll found
nothing to do, :mod:`runtime.serve.busypoll`): it waited in its selector with every request
read, so no backlog holds a request to merge with (a lone client, say; Triton
likewise runs at once a request that finds its model idle when ``max_queue_delay`` is 0).
Under load the loop never sleeps between requests, so they queue and merge; a burst that
wakes a sleeping loop runs its first request alone and merges the rest behind it.

Handing a run to the worker and its results back costs two thread wake-ups: about 220 us of
CPU and latency per request on a 2-core VM, 14 times what ``seq_bn`` spends in onnxruntime.
A run on the loop blocks it for the run's duration, hence the bound; the first run of a key,
and any larger than the bound, go through the worker (which measures them).
One run is still in flight at a time: the worker waits while a run on the loop holds the model.

*Loop mode* (where the process may use one CPU's worth of time, by affinity or cgroup quota,
:func:`runtime.serve.cpus.one_cpu`, and onnxruntime computes in the calling thread; or
``on_loop=True``): the worker thread cannot run beside the event loop, only instead of it,
so handing it a run buys nothing and costs the two wake-ups.  There the queue is the loop's
too: a request that cannot run at once is queued, and a *drain* scheduled with ``call_soon``
on the caller's loop (from the worker, on each loop with a request queued; any loop drains
every request) runs the queue after the loop has read every request that arrived meanwhile:
merged as the worker would merge them (the policy's plan, the byte budget), waiting for a batch
(the config's delay, while the policy says company comes) with a loop timer instead of a
condition variable, and telling the policy each run's cost with no hand-over.  What the worker
still takes: a key's first run, keys whose last run alone took longer than
:data:`INLINE_MAX_S` (a merged batch on the loop may take longer), requests estimated above
:data:`~runtime.serve.session.SHRINK_ABOVE_BYTES` (a merged batch that is trims the heap on
the loop), requests of a loop that is not running, and everything once the batcher is
closing.  Served on one CPU, seq_bn at concurrency 64 (one interleaved run, batched /
unbatched throughput): binary 1.58 with the worker, 1.59 in loop mode; JSON 1.07 vs 1.45.

Memory: each request carries its estimated run bytes (:mod:`runtime.serve.memory`); a batch
never adds a request that would take the batch over ``max_batch_bytes`` (the model's memory
budget), and a run estimated above :data:`runtime.serve.session.SHRINK_ABOVE_BYTES` trims the
heap when it ends (:func:`runtime.serve.heap.trim`).

A batched run that fails is retried request by request, so one bad request (say, a token id
outside the vocabulary) fails alone instead of failing its neighbours.

Requests may come from several event loops (tests start one per client); each gets its answer
on its own loop, and a request whose loop has closed, or whose caller stopped waiting, is
dropped before it runs.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from normport.runtime.messages import first_line
from normport.runtime.serve import busypoll
from normport.runtime.serve.cpus import one_cpu
from normport.runtime.serve.errors import BadRequest, InferenceFailed, ModelUnavailable, ServeError
from normport.runtime.serve.merge_policy import LearnedMerge, MergePolicy
from normport.runtime.serve.session import SHRINK_ABOVE_BYTES, Session
from normport.runtime.serve.spec import Batching

__all__ = ["HANDOFF_S", "IDLE_MIN_S", "INLINE_MAX_S", "Batcher", "Execution", "Result"]

log = logging.getLogger(__name__)

# What a run costs the event loop beyond its requests' own work: one wake-up, the hand-over of
# the results, the run's statistics (measured: ~15 us on a 2-core x86 machine).  Added to the
# worker's cost of each run, so that merging is credited with the hand-overs it saves.
HANDOFF_S = 15e-6

# The longest run alone (wall time, last measured for its key) that may run on the event loop
# instead of the worker thread: the loop answers nothing else meanwhile.
INLINE_MAX_S = 1e-3
# The least time the event loop must have spent off its CPU since it last answered a model for
# its next request to count as arriving at an idle server: more than the few microseconds of
# scheduler noise between two requests it handles back to back, less than any client's round
# trip over loopback (50 us and up).
IDLE_MIN_S = 20e-6
_INLINE_KEYS = 64  # keys whose last run alone is remembered (clients choose shapes)


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
    loop: asyncio.AbstractEventLoop
    run_bytes: int = 0
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)


class Batcher:
    """The queue and worker thread of one model version.

    Args:
        session: the model's session.
        model: ``"name:version"``, for error messages.
        max_batch_size: samples per run (0: the model takes no batch dimension).
        batching: when and how to merge requests; None runs each request alone.
        on_execution: called on the event loop after every successful run.
        max_batch_bytes: the most estimated run bytes one batch may hold (None: no bound).
        policy: how many samples a run may merge, per key; default
            :class:`~runtime.serve.merge_policy.LearnedMerge` (unused without ``batching``).
        on_loop: run queued requests on the event loop rather than the worker thread where
            they may (*loop mode*, module docstring); default: where onnxruntime computes in
            the calling thread and the process may use one CPU only.
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
        policy: MergePolicy | None = None,
        on_loop: bool | None = None,
    ) -> None:
        self._session = session
        self._model = model
        self._max_batch_size = max_batch_size
        self._batching = batching if max_batch_size > 0 else None
        self._on_execution = on_execution
        self._max_batch_bytes = max_batch_bytes
        self.policy = policy or LearnedMerge(max_batch_size)
        # A run's cost: the worker thread's CPU time when onnxruntime computes in it (immune to
        # the event loop preempting it on a shared core), else the wall time.
        single = getattr(session, "single_threaded", False)
        self._clock = time.thread_time_ns if single else time.perf_counter_ns
        self._on_loop = single and one_cpu() if on_loop is None else on_loop
        # Everything below is guarded by _ready (a condition over one lock), which an event
        # loop holds to append a request or pick a batch (loop mode), the worker to pick one.
        self._ready = threading.Condition()
        self._pending: collections.deque[_Pending] = collections.deque()
        self._queued_samples: collections.Counter[Hashable] = collections.Counter()
        self._closed = False
        self._thread: threading.Thread | None = None
        # What the worker sleeps for: None (running), _ANY (an empty queue), or a batch key
        # with the queued sample counts that complete its batch.
        self._sleeping_for: object = None
        self._enough: tuple[frozenset[int], int] = (frozenset(), 0)
        self._running_here = False  # a run on a caller's thread holds the model
        self._worker_busy = False  # the worker holds a batch (from taking it to answering it)
        # the worker's answers for its current batch, sent when it is done with it
        self._outbox: list[_Answer] = []
        self._alone_ns: collections.OrderedDict[Hashable, int] = collections.OrderedDict()
        # when an event loop last answered a request of this model: (thread, wall, thread CPU)
        self._answered: tuple[int, int, int] = (0, 0, 0)
        # loop mode: the loops a drain is scheduled on (call_soon); the loop a timer for a
        # batch's delay is armed on; the request whose batch is waited for, and its key's
        # samples queued then
        self._drains: set[asyncio.AbstractEventLoop] = set()
        self._timer_on: asyncio.AbstractEventLoop | None = None
        self._wait: tuple[_Pending, int] | None = None

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
        loop = asyncio.get_running_loop()
        key = tuple((name, a.shape[1:]) for name, a in inputs.items())
        with self._ready:
            if self._closed:
                raise ModelUnavailable(f"model '{self._model}' is shutting down")
            here = self._runs_here(key, run_bytes)
            if here:
                self._running_here = True
            else:
                item = _Pending(inputs, batch_size, key, loop.create_future(), loop, run_bytes)
                self._enqueue(item)
        if here:
            return self._run_here(key, inputs)
        return await item.future

    def _enqueue(self, item: _Pending) -> None:
        """Under the lock: queue ``item``, waking the worker when it waits for it (and holding
        off event loops' busy polling until the worker is idle again)."""
        self._pending.append(item)
        key = item.key
        queued = self._queued_samples[key] = self._queued_samples[key] + item.batch_size
        if self._for_loop(self._pending[0]):
            self._schedule_drain()
        else:
            self._wake_worker(key, queued)

    def _wake_worker(self, key: Hashable, queued: int) -> None:
        """Under the lock, ``queued`` samples of ``key`` waiting: start the worker, or wake it
        where it waits for them; no event loop busy polls until it is idle again."""
        busypoll.hold(self)
        if self._thread is None or not self._thread.is_alive():
            self._start()
        sleeping = self._sleeping_for
        if sleeping is _ANY or (sleeping == key and self._completes(queued)):
            self._ready.notify()

    def _resume(self) -> None:
        """Under the lock, the model just freed with requests queued: hand them on."""
        first = self._pending[0]
        if self._for_loop(first):
            self._schedule_drain()
        else:
            self._wake_worker(first.key, self._queued_samples[first.key])

    def _for_loop(self, item: _Pending) -> bool:
        """Under the lock: whether loop mode runs ``item`` on its event loop: its key's last
        run alone took at most :data:`INLINE_MAX_S`, it is not a large run, and its loop is
        open (the worker takes everything once the batcher is closing)."""
        return (
            self._on_loop
            and not self._closed
            and self._short(item.key, item.run_bytes)
            and item.loop.is_running()
        )

    def _short(self, key: Hashable, run_bytes: int) -> bool:
        """Under the lock: whether a run of ``key`` may take the event loop: not a large run,
        and its last run alone took at most :data:`INLINE_MAX_S` (none yet: unknown, no)."""
        last = self._alone_ns.get(key)
        return run_bytes < SHRINK_ABOVE_BYTES and last is not None and last <= INLINE_MAX_S * 1e9

    def _schedule_drain(self) -> None:
        """Under the lock: :meth:`_drain` soon on the calling event loop; from the worker, on
        every running loop with a request queued (any loop drains every request: should one
        stop before its drain runs, another's still does).  A loop with a drain scheduled gets
        no second one."""
        here = asyncio._get_running_loop()
        loops = {here} if here is not None else {item.loop for item in self._pending}
        for loop in loops - self._drains:
            if loop.is_running() and _call_soon(loop, self._drain):
                self._drains.add(loop)

    def _runs_here(self, key: Hashable, run_bytes: int) -> bool:
        """Under the lock: whether this request takes the fast path (module docstring)."""
        if self._pending or self._running_here or self._worker_busy:
            return False
        if not self._short(key, run_bytes):
            return False
        return self._batching is None or self._loop_slept() or self.policy.alone(key)

    def _loop_slept(self) -> bool:
        """On an event loop: whether, since it last answered this model, it spent at least
        :data:`IDLE_MIN_S` of wall time off its CPU,

        ``(wall - wall_0) - (cpu - cpu_0) >= IDLE_MIN_S``, the loop thread's clocks,

        or, busy polling instead of sleeping, polled and found nothing to do
        (:func:`runtime.serve.busypoll.idle_since_ns`).  False on another thread than the one
        that answered last: nothing is known there."""
        thread, wall, cpu = self._answered
        if thread != threading.get_ident():
            return False
        if busypoll.idle_since_ns() > wall:
            return True
        off = (time.perf_counter_ns() - wall) - (time.thread_time_ns() - cpu)
        return off >= IDLE_MIN_S * 1e9

    def _mark_answered(self) -> None:
        """On an event loop, once it has a request's answer (see :meth:`_loop_slept`; not
        needed without dynamic batching)."""
        if self._batching is None:
            return
        self._answered = (threading.get_ident(), time.perf_counter_ns(), time.thread_time_ns())

    def _run_here(self, key: Hashable, inputs: dict[str, np.ndarray]) -> Result:
        """Run one request on the caller's thread (the lock is not held, the model is)."""
        start, cost_from = time.perf_counter_ns(), self._clock()
        cost = None
        try:
            outputs, execution = self._run([inputs], shrink=False)
            cost = (self._clock() - cost_from) / 1e9
        except Exception as error:
            raise _as_serve_error(error, self._model) from error
        finally:
            with self._ready:
                self._running_here = False
                self._remember_alone(key, time.perf_counter_ns() - start)
                if cost is not None and self._batching is not None:
                    self.policy.observe(key, 1, cost)  # no hand-over to add
                if self._pending:  # queued from another event loop meanwhile
                    self._resume()
        self._on_execution(execution)
        self._mark_answered()
        return Result(outputs[0], 0, execution)

    def _remember_alone(self, key: Hashable, ns: int) -> None:
        """Under the lock: the wall time of ``key``'s latest run of one request."""
        self._alone_ns[key] = ns
        self._alone_ns.move_to_end(key)
        if len(self._alone_ns) > _INLINE_KEYS:
            self._alone_ns.popitem(last=False)

    def _completes(self, queued: int) -> bool:
        sizes, enough = self._enough
        return queued in sizes or queued >= enough

    def _start(self) -> None:
        # A daemon: a run inside onnxruntime cannot be interrupted, and must not hold the
        # process when the server exits with it in flight (runtime.serve.server.Server).
        self._thread = threading.Thread(target=self._work, name=f"ort-{self._model}", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the worker thread."""
        with self._ready:
            self._closed = True  # from now on the worker runs everything still queued
            if self._pending and (self._thread is None or not self._thread.is_alive()):
                self._start()
            self._ready.notify()
            thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join)
        # A run on another event loop's thread: polled, where an Event would cost every run
        # on a loop a set and a clear.
        while self._running_here:
            await asyncio.sleep(0.001)

    def limits(self) -> dict[Hashable, int]:
        """The policy's current limit per batch key (empty when the policy keeps none)."""
        with self._ready:
            known = getattr(self.policy, "limits", None)
            return dict(known()) if known is not None else {}

    # -- the worker thread -----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch: list[_Pending] = []
            try:
                with self._ready:
                    while (
                        not self._pending or self._running_here or self._for_loop(self._pending[0])
                    ):
                        if self._closed and not self._pending:
                            return
                        self._sleep(_ANY, None)
                    self._worker_busy = True
                    if self._batching is not None:
                        self._wait_for_batch(self._batching)
                    taken, cost_from = time.perf_counter_ns(), self._clock()
                    batch = self._take()
                self._execute(batch, taken, cost_from, self._outbox, HANDOFF_S)
            except BaseException as error:  # a bug: nobody may wait forever
                log.exception("model %s: the batcher failed", self._model)
                if not batch:  # while picking a batch: the queue cannot be trusted
                    batch = self._take_all()
                for item in batch:
                    self._send_failure(self._outbox, item, _as_serve_error(error, self._model))
                if not isinstance(error, Exception):
                    raise
            finally:
                self._hand_over()

    def _hand_over(self) -> None:
        """The worker is done with its batch: mark it idle, *then* send the answers, so that
        the next request of a client it answers finds it idle (and may take the fast path)."""
        with self._ready:
            self._worker_busy = False
            to_loop = bool(self._pending) and self._for_loop(self._pending[0])
            if to_loop:
                self._schedule_drain()
            if to_loop or not self._pending:
                busypoll.release(self)
        outbox, self._outbox = self._outbox, []
        for loop, callback, args in outbox:
            _call_soon(loop, callback, *args)

    @staticmethod
    def _send(
        outbox: list[_Answer],
        loop: asyncio.AbstractEventLoop,
        callback: Callable[..., None],
        *args: object,
    ) -> None:
        """``callback(*args)`` on ``loop``, once the batch is done (``outbox``: its answers)."""
        outbox.append((loop, callback, args))

    def _send_failure(self, outbox: list[_Answer], item: _Pending, error: ServeError) -> None:
        self._send(outbox, item.loop, _fail, item.future, error)

    def _sleep(self, what: object, timeout: float | None) -> None:
        self._sleeping_for = what
        try:
            self._ready.wait(timeout)
        finally:
            self._sleeping_for = None

    # -- loop mode -------------------------------------------------------------------------

    def _drain(self) -> None:
        """On an event loop (loop mode): run the queued requests here, batch by batch, while
        the model is free and the oldest request is for the loop (:meth:`_for_loop`); wait for
        a batch with a timer, not a thread."""
        loop = asyncio.get_running_loop()
        with self._ready:
            self._drains.discard(loop)
        while True:
            try:
                picked = self._pick_for_loop(loop)
            except Exception as error:  # a bug while picking: the queue cannot be trusted
                log.exception("model %s: the batcher failed", self._model)
                for item in self._take_all():
                    _call_soon(item.loop, _fail, item.future, _as_serve_error(error, self._model))
                return
            if picked is None:
                return
            batch, taken, cost_from = picked
            outbox: list[_Answer] = []
            leaving = False
            try:
                self._execute(batch, taken, cost_from, outbox, 0.0)  # no hand-over
            except BaseException as error:  # a bug: nobody may wait forever
                log.exception("model %s: the batcher failed", self._model)
                for item in batch:
                    self._send_failure(outbox, item, _as_serve_error(error, self._model))
                if not isinstance(error, Exception):
                    leaving = True
                    raise
            finally:
                with self._ready:
                    self._running_here = False
                    if leaving and self._pending:
                        self._resume()  # this drain ends here: hand the queue on
                for target, callback, args in outbox:
                    if target is loop:
                        callback(*args)
                    else:
                        _call_soon(target, callback, *args)

    def _pick_for_loop(
        self, loop: asyncio.AbstractEventLoop
    ) -> tuple[list[_Pending], int, int] | None:
        """For :meth:`_drain`: the next batch to run on the loop, taking the model (its time
        taken and cost clock); None where there is none now (the queue is empty, the model
        busy, the oldest request for the worker, or its batch worth waiting for)."""
        with self._ready:
            if not self._pending or self._running_here or self._worker_busy:
                return None  # whoever holds the model hands the queue on when done
            first = self._pending[0]
            if not self._for_loop(first):
                self._wake_worker(first.key, self._queued_samples[first.key])
                return None
            if self._batching is not None:
                wait_ns = self._batch_wait_ns(self._batching)
                if wait_ns > 0:
                    timer_on = self._timer_on
                    if timer_on is None or not timer_on.is_running():  # none, or lost
                        self._timer_on = loop
                        loop.call_later(wait_ns / 1e9, self._on_timer, loop)
                    return None
            taken, cost_from = time.perf_counter_ns(), self._clock()
            batch = self._take()
            self._running_here = True
            return batch, taken, cost_from

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._ready:
            if self._timer_on is loop:
                self._timer_on = None
        self._drain()

    def _batch_wait_ns(self, batching: Batching) -> int:
        """Under the lock, in loop mode: how much longer to wait for the oldest request's
        batch (0: run it now); the rule and the policy's part are :meth:`_wait_for_batch`'s."""
        oldest = self._pending[0]
        queued = self._queued_samples[oldest.key]
        if self._wait is None or self._wait[0] is not oldest:
            if not self._worth_waiting(batching, oldest):
                self._wait = None
                return 0
            self._wait = (oldest, queued)
        remaining = self._deadline_ns(batching, oldest) - time.perf_counter_ns()
        if remaining > 0 and not self._completes(queued):
            return remaining
        self.policy.waited(oldest.key, queued > self._wait[1])
        self._wait = None
        return 0

    def _wait_for_batch(self, batching: Batching) -> None:
        """Wait, at most until the oldest request is ``max_queue_delay`` old, for a full batch:
        a preferred size, the largest one, or the policy's limit for the key; and only when
        the policy expects company (see :mod:`runtime.serve.merge_policy`)."""
        oldest = self._pending[0]
        queued = self._queued_samples[oldest.key]
        if not self._worth_waiting(batching, oldest):
            return
        deadline = self._deadline_ns(batching, oldest)
        while not self._closed and not self._completes(self._queued_samples[oldest.key]):
            remaining = deadline - time.perf_counter_ns()
            if remaining <= 0:
                break
            self._sleep(oldest.key, remaining / 1e9)
        self.policy.waited(oldest.key, self._queued_samples[oldest.key] > queued)

    def _worth_waiting(self, batching: Batching, oldest: _Pending) -> bool:
        """Under the lock: set the sizes that complete ``oldest``'s batch (a preferred size,
        the largest one, or the policy's limit); whether its batch is short of them and the
        policy expects company (see :mod:`runtime.serve.merge_policy`)."""
        target = batching.preferred_batch_sizes or (self._max_batch_size,)
        enough = min(target[-1], self._max_batch_size, self.policy.limit(oldest.key))
        self._enough = (frozenset(target), enough)
        queued = self._queued_samples[oldest.key]
        return not self._completes(queued) and self.policy.should_wait(oldest.key)

    @staticmethod
    def _deadline_ns(batching: Batching, oldest: _Pending) -> int:
        """When ``oldest`` has waited ``max_queue_delay`` (``time.perf_counter_ns``)."""
        return oldest.enqueued_ns + int(batching.max_queue_delay_s * 1e9)

    def _take_all(self) -> list[_Pending]:
        """Empty the queue (after a bug while picking a batch: it cannot be trusted)."""
        with self._ready:
            taken, self._pending = list(self._pending), collections.deque()
            self._queued_samples.clear()
        return taken

    def _take(self) -> list[_Pending]:
        """The oldest request and the later ones sharing its key, up to the policy's plan
        (at most max_batch_size samples) and max_batch_bytes estimated bytes."""
        first = self._pending[0]
        merging = self._batching is not None and len(self._pending) > 1
        if merging:  # the plan first: a policy that fails leaves the queue whole
            most = min(self.policy.plan(first.key, self._queued_samples[first.key]),
                       self._max_batch_size)  # fmt: skip
        self._pending.popleft()
        batch, samples, size = [first], first.batch_size, first.run_bytes
        limit = self._max_batch_bytes
        if merging:
            kept: collections.deque[_Pending] = collections.deque()
            for item in self._pending:
                if (
                    item.key == first.key
                    and samples + item.batch_size <= most
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

    def _execute(
        self,
        batch: list[_Pending],
        taken_ns: int,
        cost_from: int,
        outbox: list[_Answer],
        handoff_s: float,
    ) -> None:
        """Run ``batch``, put its answers in ``outbox``, tell the policy what it cost (plus
        ``handoff_s``, the hand-over of a worker's run)."""
        # drop abandoned requests: the caller stopped waiting, or its event loop is gone
        batch = [item for item in batch if not item.future.done() and not item.loop.is_closed()]
        if not batch:
            return
        try:
            outputs, execution = self._run(
                [item.inputs for item in batch],
                sum(item.run_bytes for item in batch) >= SHRINK_ABOVE_BYTES,
            )
        except Exception as error:
            if len(batch) > 1:  # find the culprit: run each request on its own
                for item in batch:
                    self._execute([item], time.perf_counter_ns(), self._clock(), outbox, handoff_s)
                return
            self._send_failure(outbox, batch[0], _as_serve_error(error, self._model))
            return
        loops: dict[asyncio.AbstractEventLoop, list[tuple[_Pending, dict[str, np.ndarray]]]] = {}
        for item, own in zip(batch, outputs, strict=True):
            loops.setdefault(item.loop, []).append((item, own))
        counted = False
        for loop, answers in loops.items():
            on_execution = None if counted else self._on_execution
            counted = True
            self._send(
                outbox,
                loop,
                _deliver,
                answers,
                taken_ns,
                execution,
                on_execution,
                self._mark_answered,
            )
        if len(batch) == 1:
            with self._ready:
                wall = execution.input_ns + execution.infer_ns + execution.output_ns
                self._remember_alone(batch[0].key, wall)
        if self._batching is not None:
            cost = (self._clock() - cost_from) / 1e9 + handoff_s
            with self._ready:
                self.policy.observe(batch[0].key, execution.batch_size, cost)

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


_ANY = object()  # what the worker sleeps for when the queue is empty
_Answer = tuple[asyncio.AbstractEventLoop, Callable[..., None], tuple]


def _deliver(
    answers: list[tuple[_Pending, dict[str, np.ndarray]]],
    dispatched_ns: int,
    execution: Execution,
    on_execution: Callable[[Execution], None] | None,
    mark_answered: Callable[[], None],
) -> None:
    """On the requests' event loop: count the run, answer every request still waiting."""
    if on_execution is not None:
        try:
            on_execution(execution)
        except Exception:  # statistics must not keep anyone from an answer
            log.exception("recording a run failed")
    for item, own in answers:
        if not item.future.done():  # the client may have gone away
            item.future.set_result(Result(own, dispatched_ns - item.enqueued_ns, execution))
    mark_answered()


def _call_soon(
    loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: object
) -> bool:
    """``callback(*args)`` on ``loop``: ``loop.call_soon`` on its own thread, else
    ``call_soon_threadsafe``; False where the loop has closed since (nobody waits there)."""
    try:
        if asyncio._get_running_loop() is loop:
            loop.call_soon(callback, *args)
        else:
            loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        return False
    return True


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
