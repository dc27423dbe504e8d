"""The merge decision on its own: run costs in (fake, in seconds), limits and explored sizes out.

Cost curves are per sample, in microseconds, by bucket; each case feeds MIN_RUNS runs of every
bucket at the bucket's size.  The zoo curves are this machine's onnxruntime timings (one
intra-op thread) of the served models, with and without the executor hop added per run.
"""

from __future__ import annotations

import numpy as np
import pytest

from normport.runtime.serve.merge_policy import (
    EXPLORE_EVERY,
    IDLE_WAITS,
    MAX_KEYS,
    MIN_RUNS,
    MIN_SAVING,
    WINDOW,
    LearnedMerge,
    ShapeCosts,
    bucket,
)

MAX = 64


def measured(curve: dict[int, float], max_batch_size: int = MAX) -> ShapeCosts:
    """A table that saw MIN_RUNS runs of each bucket of ``curve`` (us per sample)."""
    table = ShapeCosts(max_batch_size)
    for size, per_sample in curve.items():
        for _ in range(MIN_RUNS):
            table.observe(size, per_sample * size * 1e-6)
    return table


@pytest.mark.parametrize(
    ("samples", "max_batch_size", "expected"),
    [(1, 64, 1), (2, 64, 2), (3, 64, 4), (4, 64, 4), (5, 64, 8), (33, 64, 64), (64, 64, 64),
     (33, 48, 48), (17, 48, 32), (9, 12, 12), (0, 8, 1)],
)  # fmt: skip
def test_bucket(samples: int, max_batch_size: int, expected: int) -> None:
    assert bucket(samples, max_batch_size) == expected


def test_margin_is_five_percent() -> None:
    assert MIN_SAVING == 0.05  # the near-miss cases below are written against it


@pytest.mark.parametrize(
    ("curve", "limit"),
    [
        pytest.param({1: 100, 2: 60}, 2, id="merging_clearly_cheaper"),
        pytest.param({1: 100, 2: 94.9}, 2, id="near_miss_just_above_the_margin"),
        pytest.param({1: 100, 2: 95.1}, 1, id="near_miss_just_below_the_margin"),
        pytest.param({1: 100, 2: 100.5}, 1, id="merging_barely_costlier"),
        pytest.param({1: 100, 2: 130, 4: 160}, 1, id="merging_clearly_costlier"),
        pytest.param({1: 100, 2: 96, 4: 94}, 4, id="a_larger_run_beats_the_plateau"),
        pytest.param({1: 100, 4: 80, 8: 78}, 4, id="the_smaller_of_two_about_even"),
        pytest.param({2: 100, 4: 90}, 4, id="requests_of_two_samples"),
        pytest.param(
            {1: 172, 2: 174, 4: 177, 8: 174, 16: 181, 32: 302, 64: 240}, 1, id="cnn_bn_onnxruntime"
        ),
        pytest.param(
            {1: 202, 2: 189, 4: 185, 8: 178, 16: 183, 32: 303, 64: 241}, 8, id="cnn_bn_with_hop"
        ),
        pytest.param(
            {1: 60.6, 2: 44.1, 4: 35.5, 8: 31.2, 16: 28.8, 32: 28.6, 64: 29.1},
            16,
            id="transformer_ln_onnxruntime",
        ),
        pytest.param(
            {1: 17, 2: 9.7, 4: 6.6, 8: 4.9, 16: 4.1, 32: 3.6, 64: 3.6}, 32, id="seq_bn_onnxruntime"
        ),
    ],
)
def test_limit_from_costs(curve: dict[int, float], limit: int) -> None:
    assert measured(curve).limit() == limit


def test_nothing_merges_before_the_baseline_is_measured() -> None:
    table = ShapeCosts(MAX)
    assert table.limit() == 1
    for _ in range(MIN_RUNS - 1):
        assert table.plan(queued=10) == 1  # running alone is measured first
        table.observe(1, 100e-6)
    assert table.plan(queued=10) == 1
    table.observe(1, 100e-6)
    assert table.limit() == 1
    assert table.plan(queued=10) == 2  # then the next size up, at once


def test_a_bucket_counts_only_after_min_runs() -> None:
    table = measured({1: 100})
    for _ in range(MIN_RUNS - 1):
        table.observe(2, 2 * 10e-6)  # ten times cheaper, but not yet trusted
        assert table.limit() == 1
    table.observe(2, 2 * 10e-6)
    assert table.limit() == 2


def test_one_slow_run_does_not_flip_the_decision() -> None:
    """The least of the window is the cost: a run slowed by a neighbour on the core (a
    preemption, a collection) is not what the size costs."""
    table = measured({1: 100, 2: 90})
    assert table.limit() == 2
    table.observe(2, 2 * 500e-6)
    assert table.limit() == 2


def test_the_decision_follows_a_lasting_change() -> None:
    table = measured({1: 100, 2: 90})
    for _ in range(WINDOW):
        table.observe(2, 2 * 120e-6)  # merging became costlier (say, a larger input shape)
    assert table.limit() == 1


def test_a_size_is_tried_only_when_the_queue_can_fill_its_bucket() -> None:
    table = measured({1: 100})
    assert table.plan(queued=1) == 1  # a larger run cannot show with one sample queued
    assert table.plan(queued=2) == 2
    table = measured({1: 100, 2: 99, 4: 98})  # next to try: 8, which needs 5 or more
    assert table.plan(queued=4) == 1  # 4 would land in bucket 4 again
    assert table.plan(queued=5) == 8
    table = measured({1: 100, 2: 60, 4: 40})  # limit 4; 2 and 1 below it, measured
    assert [table.plan(queued=2) for _ in range(EXPLORE_EVERY)][-1] == 1  # 2 would take all


def test_measured_neighbours_are_explored_once_every_explore_every() -> None:
    table = measured({1: 100, 2: 99, 4: 90, 8: 120})  # limit 4; 2 and 8 measured; 1 too
    assert table.limit() == 4
    plans = [table.plan(queued=64) for _ in range(4 * EXPLORE_EVERY)]
    explored = [p for p in plans if p != 4]
    assert len(explored) == 4
    assert set(explored) <= {1, 2, 8}


def test_a_plateau_is_crossed_upwards() -> None:
    """Costs about even up to 4 (not a clear saving, so the limit stays 1): the next size up
    to try is above the largest measured, not just above the limit."""
    table = measured({1: 100, 2: 99, 4: 98})
    assert table.limit() == 1
    assert table.plan(queued=64) == 8


def test_above_a_clearly_costlier_size_nothing_larger_is_tried() -> None:
    table = measured({1: 100, 2: 90, 4: 150})
    assert table.limit() == 2
    plans = {table.plan(queued=64) for _ in range(4 * EXPLORE_EVERY)}
    assert plans == {1, 2, 4}  # 4 is refreshed, 8 is never tried


def test_the_largest_size_is_not_exceeded() -> None:
    table = measured({1: 100, 2: 50, 4: 25, 8: 12}, max_batch_size=8)
    assert table.limit() == 8
    assert {table.plan(queued=64) for _ in range(4 * EXPLORE_EVERY)} == {1, 4, 8}


def test_keys_learn_apart_and_the_oldest_is_forgotten() -> None:
    policy = LearnedMerge(MAX)
    for _ in range(MIN_RUNS):
        policy.observe("small", 1, 100e-6)
        policy.observe("small", 2, 2 * 50e-6)
        policy.observe("large", 1, 100e-6)
        policy.observe("large", 2, 2 * 150e-6)
    assert policy.limits() == {"small": 2, "large": 1}
    for i in range(MAX_KEYS - 1):
        policy.observe(i, 1, 1e-6)
    assert policy.limit("large") == 1  # used: now the most recent
    policy.observe("one more", 1, 1e-6)
    assert "small" not in policy.limits()  # the least recently used went
    assert len(policy.limits()) == MAX_KEYS


def test_nothing_waits_at_limit_one() -> None:
    table = measured({1: 100, 2: 100})
    assert table.limit() == 1
    assert not any(table.should_wait() for _ in range(4 * EXPLORE_EVERY))


def test_a_lone_client_stops_paying_the_queue_delay() -> None:
    """Merging pays (limit 2), but nobody joins the waits: after IDLE_WAITS of them, one
    chance in EXPLORE_EVERY still waits, and a joined wait brings waiting back."""
    table = measured({1: 100, 2: 50})
    for _ in range(IDLE_WAITS):
        assert table.should_wait()
        table.waited(joined=False)
    chances = [table.should_wait() for _ in range(2 * EXPLORE_EVERY)]
    assert chances.count(True) == 2
    table.waited(joined=True)
    assert all(table.should_wait() for _ in range(IDLE_WAITS))


def test_about_even_costs_keep_the_limit_where_it_is() -> None:
    """A flat curve (a CNN from batch 8 up): noise moving one bucket a few percent does not
    move the limit; a bucket clearly cheaper than the limit's does."""
    table = measured({1: 200, 2: 190, 4: 185, 8: 176, 16: 175, 32: 176, 64: 174})
    assert table.limit() == 8
    for noisy in (180.0, 171.0, 178.0):  # 8 drifts; 16 and 64 stay within 5% of it
        for _ in range(WINDOW):
            table.observe(8, 8 * noisy * 1e-6)
        assert table.limit() == 8
    for _ in range(WINDOW):
        table.observe(8, 8 * 190e-6)  # now 16 is clearly cheaper
    assert table.limit() == 16


def test_alone_where_merging_does_not_pay_but_one_request_in_explore_every_queues() -> None:
    table = measured({1: 100, 2: 100})
    assert table.limit() == 1
    answers = [table.alone() for _ in range(3 * EXPLORE_EVERY)]
    assert answers.count(False) == 3
    assert all(not a for i, a in enumerate(answers) if (i + 1) % EXPLORE_EVERY == 0)


def test_never_alone_where_merging_pays_even_for_a_lone_client() -> None:
    table = measured({1: 100, 2: 50})
    assert table.limit() == 2
    assert not any(table.alone() for _ in range(2 * EXPLORE_EVERY))
    for _ in range(IDLE_WAITS):
        table.waited(joined=False)
    assert not any(table.alone() for _ in range(2 * EXPLORE_EVERY))


def test_not_alone_before_merging_is_measured() -> None:
    """A key starts at limit 1 with nothing measured: its requests queue (where, under load,
    merging gets measured), until a larger bucket shows that merging does not pay."""
    policy = LearnedMerge(MAX)
    assert not any(policy.alone("k") for _ in range(2 * EXPLORE_EVERY))
    table = policy.costs("k")
    for _ in range(MIN_RUNS):
        table.observe(1, 100e-6)
    assert not any(policy.alone("k") for _ in range(2 * EXPLORE_EVERY))  # only bucket 1
    for _ in range(MIN_RUNS):
        table.observe(2, 2 * 100e-6)
    assert policy.limits() == {"k": 1}
    assert [policy.alone("k") for _ in range(EXPLORE_EVERY)].count(True) == EXPLORE_EVERY - 1


@pytest.mark.parametrize("seed", range(5))
def test_a_bucket_s_cost_is_the_least_of_its_last_window_observations(seed: int) -> None:
    """u(b), after every observation, against its definition computed here from the whole
    history: random costs with ties, and far more observations than WINDOW, so that the least
    one is often evicted."""
    from normport.runtime.serve.merge_policy import MIN_RUNS, WINDOW, ShapeCosts, bucket

    rng = np.random.default_rng(seed)
    table = ShapeCosts(16)
    history: dict[int, list[float]] = {}
    for _ in range(400):
        samples = int(rng.integers(1, 17))
        seconds = samples * float(rng.choice([1e-4, 1.1e-4, 1.2e-4, rng.uniform(0.8e-4, 2e-4)]))
        table.observe(samples, seconds)
        history.setdefault(bucket(samples, 16), []).append(seconds / samples)
        for b, costs in history.items():
            expected = min(costs[-WINDOW:]) if len(costs) >= MIN_RUNS else None
            assert table.per_sample(b) == expected, (b, costs[-WINDOW:])
