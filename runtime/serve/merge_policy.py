"""Whether merging requests pays: per model and input shape, the cost of a run of each batch
size, learned from the runs themselves.

Merging is not free.  A run of ``n`` samples costs ``t(n)``; ``n`` runs of one sample cost
``n t(1)``, where ``t`` holds onnxruntime's fixed cost per call and the batcher's per run.  A CNN
whose convolutions already keep a core busy at batch 1 costs about the same per sample at batch
8 and 1.7x more at batch 32 (its activations leave the cache): merging it buys little and can
lose a lot, and waiting for a batch only adds latency.  A small sequence model costs 4x less per
sample at batch 16.  :class:`LearnedMerge` measures, for each *batch key* (the non-batch shape
of every input), what runs cost per sample in power-of-two *buckets* (a run of ``n`` samples,
``n`` in ``(b/2, b]``, belongs to bucket ``b``), and merges only up to the bucket that is
cheapest per sample by a clear margin:

.. code-block:: text

    u(b) = min of the last WINDOW observations of t(n) / n,  n in bucket b
    choice = the smallest bucket with MIN_RUNS observations
    for the larger such buckets b, ascending:
        if u(b) <= (1 - MIN_SAVING) * u(choice): choice = b

``choice`` becomes the *limit*, the most samples one run takes and the most worth waiting for
(limit 1: every request runs alone and nothing waits, exactly as without dynamic batching),
when it is cheaper than the current limit by the same margin; costs about even keep the limit
where it is (a CNN measured flat from batch 4 to 64 would otherwise hop between them).
The least of recent observations, not their mean: a run slowed by another thread on its core
(the event loop, a neighbour process) says nothing about what its size costs, and slowdowns
only ever add.  The margin keeps noise from making the limit flap, and prefers the smaller
batch (lower latency) when costs are about even.

*Exploration* keeps the table honest.  A key starts at limit 1 and first measures it; then a
dispatch may run a *neighbouring* size instead of the limit: the next bucket up (above the
largest one measured so far, while that one costs within the margin of the limit's, so that a
plateau is crossed; else just above the limit), the bucket below the limit, and 1.  A neighbour
with fewer than MIN_RUNS observations is tried at the next dispatch that can show it (the queue
must hold enough samples for the run to land in its bucket); once all are measured, one dispatch
in EXPLORE_EVERY tries the next in turn.  Exploring only ever takes requests already queued:
it never waits.

*Waiting* for a batch (up to the config's ``max_queue_delay``) pays only when requests come to
join it.  A lone client (concurrency 1) never brings company, and would pay the whole delay on
every request: after IDLE_WAITS waits in a row that nobody joined, a key waits only once per
EXPLORE_EVERY chances, until a wait is joined again.  Nothing waits at limit 1.

*Running alone, at once*: a request that finds the batcher idle (nothing queued, no run in
flight) skips the queue and runs on the caller's thread when :meth:`ShapeCosts.alone` says so:
at limit 1 once a larger bucket has been measured, except one such request in EXPLORE_EVERY,
which takes the queue so that, under load, the requests behind it queue up and can merge.

Keys are kept for the MAX_KEYS most recently used shapes (clients choose shapes, so their
number is unbounded); a forgotten key starts afresh.  Nothing here reads a clock or takes a
lock: costs come in as numbers, and the batcher calls under its own lock.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from typing import Protocol

__all__ = [
    "EXPLORE_EVERY",
    "IDLE_WAITS",
    "MAX_KEYS",
    "MIN_RUNS",
    "MIN_SAVING",
    "WINDOW",
    "AlwaysMerge",
    "LearnedMerge",
    "MergePolicy",
    "ShapeCosts",
    "bucket",
]

MIN_SAVING = 0.05  # a larger run must save 5% per sample
MIN_RUNS = 3  # observations before a bucket's cost counts
WINDOW = 8  # the least of this many recent observations
EXPLORE_EVERY = 16  # dispatches per exploratory run, once every neighbour is measured
IDLE_WAITS = 4  # waits in a row that nobody joined: then wait once per EXPLORE_EVERY only
MAX_KEYS = 64


def bucket(samples: int, max_batch_size: int) -> int:
    """The power of two at or above ``samples``, at most ``max_batch_size``."""
    return min(1 << max(samples - 1, 0).bit_length(), max_batch_size)


class MergePolicy(Protocol):
    """What the batcher asks before and after each run of one batch key."""

    def limit(self, key: Hashable) -> int:
        """The most samples worth merging into one run (and waiting for)."""
        ...

    def plan(self, key: Hashable, queued: int) -> int:
        """The most samples the next run of ``key`` may take, ``queued`` samples waiting:
        :meth:`limit`, or a neighbouring size being explored."""
        ...

    def observe(self, key: Hashable, samples: int, seconds: float) -> None:
        """A run of ``samples`` samples cost ``seconds`` (what the batcher spent on it)."""
        ...

    def should_wait(self, key: Hashable) -> bool:
        """Whether to wait (up to ``max_queue_delay``) for more of ``key`` to arrive."""
        ...

    def waited(self, key: Hashable, joined: bool) -> None:
        """A wait ended; ``joined``: more samples of ``key`` arrived during it."""
        ...

    def alone(self, key: Hashable) -> bool:
        """Whether a request of ``key`` arriving at an idle batcher (empty queue, no run in
        flight) should run at once on its own, on the caller's thread."""
        ...


class AlwaysMerge:
    """Triton's rule: merge up to ``max_batch_size``, whatever it costs."""

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size

    def limit(self, key: Hashable) -> int:
        return self.max_batch_size

    def plan(self, key: Hashable, queued: int) -> int:
        return self.max_batch_size

    def observe(self, key: Hashable, samples: int, seconds: float) -> None:
        pass

    def should_wait(self, key: Hashable) -> bool:
        return True

    def waited(self, key: Hashable, joined: bool) -> None:
        pass

    def alone(self, key: Hashable) -> bool:
        return False


class ShapeCosts:
    """The cost table and the decision of one batch key (see the module docstring)."""

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self._costs: dict[int, collections.deque[float]] = {}
        self._least: dict[int, float] = {}  # per bucket with MIN_RUNS observations: u(b)
        self._limit = 1
        self._dispatches = 0
        self._turn = 0
        self._idle_waits = 0  # waits in a row that nobody joined
        self._waits_skipped = 0
        self._alone_turns = 0

    def observe(self, samples: int, seconds: float) -> None:
        if samples < 1:
            return
        b = bucket(samples, self.max_batch_size)
        costs = self._costs.get(b)
        if costs is None:
            costs = self._costs[b] = collections.deque(maxlen=WINDOW)
        per_sample = seconds / samples
        evicted = costs[0] if len(costs) == WINDOW else None
        costs.append(per_sample)
        if len(costs) < MIN_RUNS:
            return
        least = self._least.get(b)
        if least is not None and per_sample >= least and (evicted is None or evicted > least):
            return  # u(b) is unchanged, and so is the decision (it depends on u alone)
        self._least[b] = min(costs)
        self._limit = self._decide()

    def per_sample(self, b: int) -> float | None:
        """Bucket ``b``'s cost per sample (seconds); None before MIN_RUNS observations."""
        return self._least.get(b)

    def _decide(self) -> int:
        known = sorted(self._least.items())
        choice, best = known[0]
        for b, u in known[1:]:
            if u <= (1 - MIN_SAVING) * best:
                choice, best = b, u
        current = self._least.get(self._limit)
        if current is None or best <= (1 - MIN_SAVING) * current:
            return choice
        return self._limit  # about even: keep the limit where it is

    def limit(self) -> int:
        return self._limit

    def should_wait(self) -> bool:
        """Wait for company only where merging pays (limit above 1), and, after IDLE_WAITS
        waits in a row that nobody joined (a lone client), only once per EXPLORE_EVERY."""
        if self._limit <= 1:
            return False
        if self._idle_waits < IDLE_WAITS:
            return True
        self._waits_skipped += 1
        return self._waits_skipped % EXPLORE_EVERY == 0

    def waited(self, joined: bool) -> None:
        self._idle_waits = 0 if joined else self._idle_waits + 1

    def alone(self) -> bool:
        """Run a request that finds the batcher idle at once, on its own, only where the table
        shows that merging does not pay: limit 1 with a larger bucket measured.  Not before
        (a key starts at limit 1, and a request run on the event loop's thread blocks it, so
        no queue forms to measure merging from), and not for a lone client where merging pays
        (under load its requests must queue to merge).  One call in EXPLORE_EVERY says no, so
        that request goes through the queue and, under load, the ones behind it queue up and
        keep the table current."""
        self._alone_turns += 1
        if self._alone_turns % EXPLORE_EVERY == 0:
            return False
        return self._limit <= 1 and any(b > 1 for b in self._least)

    def _up(self, limit: int) -> int | None:
        """The larger size to try: the largest bucket tried so far while it is short of
        observations; the next one above it while its cost is within the margin of the
        limit's (crossing a plateau); else the next one above the limit."""
        top = max(self._costs, default=limit)
        if top > limit:
            top_cost, best = self._least.get(top), self._least.get(limit)
            if top_cost is None:
                return top
            if best is not None and (1 - MIN_SAVING) * top_cost > best:
                top = limit  # clearly costlier: refresh the size just above the limit
        if top >= self.max_batch_size:
            return None
        return bucket(top + 1, self.max_batch_size)

    def plan(self, queued: int) -> int:
        self._dispatches += 1
        limit = self._limit
        if limit not in self._least:
            return limit  # the baseline first: what running at the limit costs
        down = _below(limit)
        candidates = (self._up(limit), down, 1 if down is not None and down > 1 else None)
        # a size shows only when the run lands in its bucket: a larger one needs more samples
        # queued than the bucket below it holds, a smaller one fewer than are queued
        neighbours = [
            size
            for size in candidates
            if size is not None and queued > ((_below(size) or 0) if size > limit else size)
        ]
        for size in neighbours:
            if size not in self._least:
                return size  # not measured yet: try it now
        if neighbours and self._dispatches % EXPLORE_EVERY == 0:
            self._turn += 1
            return neighbours[self._turn % len(neighbours)]
        return limit


def _below(b: int) -> int | None:
    """The bucket below bucket ``b`` (the largest power of two under it); None below 1."""
    return 1 << ((b - 1).bit_length() - 1) if b > 1 else None


class LearnedMerge:
    """:class:`ShapeCosts` for each batch key, the MAX_KEYS most recently used."""

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self._keys: collections.OrderedDict[Hashable, ShapeCosts] = collections.OrderedDict()

    def costs(self, key: Hashable) -> ShapeCosts:
        table = self._keys.get(key)
        if table is None:
            table = self._keys[key] = ShapeCosts(self.max_batch_size)
            if len(self._keys) > MAX_KEYS:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
        return table

    def limit(self, key: Hashable) -> int:
        return self.costs(key).limit()

    def plan(self, key: Hashable, queued: int) -> int:
        return self.costs(key).plan(queued)

    def observe(self, key: Hashable, samples: int, seconds: float) -> None:
        self.costs(key).observe(samples, seconds)

    def should_wait(self, key: Hashable) -> bool:
        return self.costs(key).should_wait()

    def waited(self, key: Hashable, joined: bool) -> None:
        self.costs(key).waited(joined)

    def alone(self, key: Hashable) -> bool:
        return self.costs(key).alone()

    def limits(self) -> dict[Hashable, int]:
        """Every known key's current limit (for logs and tests)."""
        return {key: table.limit() for key, table in self._keys.items()}
