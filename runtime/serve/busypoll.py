"""Busy polling: after answering a request, the event loop polls its sockets without sleeping
for a short window, where the next request is expected within it.

Why: a client that sends its next request as soon as it has an answer (a pipeline stage, a
benchmark at concurrency 1, a sidecar) finds the event loop asleep in ``epoll_wait`` every
time.  Waking it costs a thread wake-up and, on a VM, a halted vCPU's exit and re-entry; the
request then runs with cold caches.  On a 2-core VM, ``seq_bn`` over loopback at concurrency 1:
p50 0.496 ms asleep vs 0.415 ms polling, cnn_bn 0.747 vs 0.652 (the server on one CPU, the
client on the other, interleaved).  Linux's ``SO_BUSY_POLL``, Go's scheduler and Seastar poll
for the same reason.

How: a callback that schedules itself again with ``call_soon`` keeps the loop's ready queue
non-empty, so the loop (asyncio's or uvloop's) polls its sockets with a timeout of 0 until the
window closes:

.. code-block:: text

    on a request's arrival:   gap = now - last answer (on this loop)
    after its answer:         poll until now + window, if gap <= window

A client whose requests come further apart than the window (a remote one, a slow one) never
makes the loop poll: the gap is measured whether or not the loop polled, so a client that
speeds up is noticed at its next request.  Polling costs CPU: at most ``window`` per request.

Not while another thread needs the CPU: a model's worker thread (onnxruntime) sharing a core
with a polling loop would run at half speed.  A :class:`~runtime.serve.batcher.Batcher` holds
the polling off (:func:`hold`, :func:`release`) from the moment a request is queued for its
worker until the worker is idle again.

Whether the loop is idle: a polling loop never sleeps, so "the loop slept since it last
answered" (the batcher's test for a request with nobody to merge with) also counts a poll that
found nothing to do, :func:`idle_since_ns`: two polling callbacks at most
:data:`EMPTY_POLL_S` apart (an iteration that short read no request).

State is per event-loop thread (a thread runs one loop at a time); the holds are process-wide,
since every thread shares the CPUs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable

__all__ = [
    "DEFAULT_WINDOW_S",
    "EMPTY_POLL_S",
    "MAX_WINDOW_S",
    "after_answer",
    "hold",
    "idle_since_ns",
    "on_arrival",
    "release",
]

# Longer than a client's round trip over loopback or a local socket (0.1-0.2 ms here), far
# shorter than one over a network (where polling would only burn CPU: the gap test turns it off).
DEFAULT_WINDOW_S = 250e-6
MAX_WINDOW_S = 0.01  # polling for longer than a network round trip only burns CPU
# The longest loop iteration that counts as empty: a poll with nothing to run takes 2-5 us;
# reading and parsing a request, 15 us and up.
EMPTY_POLL_S = 8e-6

_holders: set[Hashable] = set()  # whoever needs the CPU now (set.add / discard: atomic)


class _LoopState(threading.local):
    def __init__(self) -> None:
        self.answered_ns = 0  # the loop's last answer
        self.gap_ns = -1  # from the answer before the latest arrival to that arrival (-1: none)
        self.until_ns = 0  # poll until then
        self.polling: asyncio.AbstractEventLoop | None = None  # the loop polling (not closed)
        self.last_poll_ns = 0
        self.idle_ns = 0  # the latest poll that found nothing to do


_state = _LoopState()


def hold(owner: Hashable) -> None:
    """``owner`` (a batcher) has work for another thread: no loop polls until it releases."""
    _holders.add(owner)


def release(owner: Hashable) -> None:
    """``owner``'s other thread is idle again."""
    _holders.discard(owner)


def on_arrival() -> None:
    """On an event loop, as a request arrives: how long after the loop's last answer."""
    state = _state
    if state.answered_ns:
        state.gap_ns = time.perf_counter_ns() - state.answered_ns


def after_answer(window_s: float) -> None:
    """On an event loop, once a request is answered: poll for ``window_s`` seconds if the
    latest request came within ``window_s`` of the answer before it (0: never poll)."""
    state = _state
    now = state.answered_ns = time.perf_counter_ns()
    window = int(window_s * 1e9)
    if not 0 <= state.gap_ns <= window:
        return
    state.until_ns = now + window
    loop = asyncio.get_running_loop()
    if state.polling is not loop:  # not polling, or a previous loop of this thread stopped
        state.polling = loop
        state.last_poll_ns = now
        loop.call_soon(_poll, loop, state)


def idle_since_ns() -> int:
    """On an event loop: when (``time.perf_counter_ns``) a poll last found nothing to do
    there (0: never)."""
    return _state.idle_ns


def _poll(loop: asyncio.AbstractEventLoop, state: _LoopState) -> None:
    now = time.perf_counter_ns()
    if now - state.last_poll_ns <= EMPTY_POLL_S * 1e9:
        state.idle_ns = now
    state.last_poll_ns = now
    if now < state.until_ns and not _holders:
        loop.call_soon(_poll, loop, state)
    else:
        state.polling = None
