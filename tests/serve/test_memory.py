"""Memory estimates and budgets on their own: the calibration curve against known growth laws,
the probe's estimate against onnxruntime's measured peak, sizes, and budget accounting."""

from __future__ import annotations

import math

import pytest

from normport.runtime.serve.admission import Budget, Hold, parse_bytes
from normport.runtime.serve.errors import PayloadTooLarge, ServerBusy
from normport.runtime.serve.memory import FLOOR, Curve, MemoryProfile, sample_elements

MIB = 1 << 20


@pytest.mark.parametrize("power", [1, 2])
def test_the_curve_extrapolates_at_the_measured_rate(power: int) -> None:
    """Points of ``y = k E^p`` above the floor: beyond them the curve follows the same law."""
    k = 3.0 * MIB / 1000**power
    points = [(e, k * e**power) for e in (1000, 2000, 4000, 8000)]
    curve = Curve.fit(points)
    for e in (16000, 48000):
        assert curve(e) == pytest.approx(k * e**power, rel=1e-9)


def test_inside_the_range_a_request_is_charged_the_next_size_up() -> None:
    curve = Curve.fit([(10, 5 * MIB), (20, 4 * MIB), (40, 9 * MIB)])  # noisy: 20 under 10
    assert curve(1) == 5 * MIB
    assert curve(15) == 5 * MIB  # the envelope: never below a smaller size's measurement
    assert curve(20) == 5 * MIB
    assert curve(21) == 9 * MIB


def test_growth_below_the_floor_is_taken_as_linear_from_the_floor() -> None:
    curve = Curve.fit([(64, 4096), (128, 8192)])  # page-level noise only
    assert curve.exponent == 1.0
    assert curve(1280) == pytest.approx(FLOOR * 10)


def test_the_exponent_is_clipped_to_one_to_three() -> None:
    shrinking = Curve.fit([(1000, 8 * MIB), (2000, 8 * MIB)])
    explosive = Curve.fit([(1000, 2 * MIB), (2000, 64 * MIB)])  # 2**5: treated as cubic
    assert shrinking.exponent == 1.0
    assert explosive.exponent == 3.0


def test_a_curve_needs_points() -> None:
    with pytest.raises(ValueError, match="no calibration point"):
        Curve.fit([])
    with pytest.raises(ValueError, match=">= 1 element"):
        Curve.fit([(0, 5)])


def test_sample_elements_counts_a_zero_dim_as_one() -> None:
    """``[1, 0, 2**62]`` holds no element, but admitting it as free is how it used to reach
    onnxruntime; per sample it is ``1 * 2**62`` elements."""
    assert sample_elements([(4, 0, 2**62)], batched=True) == 2**62
    assert sample_elements([(4, 3, 5), (4, 7)], batched=True) == 15 + 7
    assert sample_elements([(3, 5)], batched=False) == 15


def test_a_request_costs_its_body_run_and_outputs() -> None:
    flat = Curve.fit([(100, 10 * MIB)])
    profile = MemoryProfile(work=flat, output=Curve.fit([(100, MIB)]), resident=0, points=())
    binary = profile.request_bytes(
        body=MIB, json_input=False, batch=2, elements=100, json_output=False
    )
    as_json = profile.request_bytes(
        body=MIB, json_input=True, batch=2, elements=100, json_output=True
    )
    run = math.ceil(1.25 * 2 * 10 * MIB)
    assert binary == math.ceil(2 * MIB + run + 1.25 * 2 * MIB * 2)
    assert as_json == math.ceil(5 * MIB + run + 1.25 * 2 * MIB * 4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1048576", 1 << 20), ("512MiB", 512 << 20), ("4 GiB", 4 << 30), ("1.5G", 1_500_000_000),
     ("64kB", 64_000), ("2gib", 2 << 30)],
)  # fmt: skip
def test_sizes_parse(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "0", "1 parsec", "1e9", "GiB", "0.0001B"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_bytes(text)


def test_a_budget_refuses_what_never_fits_and_what_does_not_fit_now() -> None:
    budget = Budget("the server's memory budget", 100, "--memory-budget")
    first, second = Hold.empty(), Hold.empty()
    first.take(budget, 60, "m", "a request")
    with pytest.raises(PayloadTooLarge, match=r"model 'm': a request .* over the server's"):
        second.take(budget, 101, "m", "a request")
    with pytest.raises(ServerBusy, match="retry later"):
        second.take(budget, 41, "m", "a request")
    second.take(budget, 40, "m", "a request")
    assert budget.used == 100
    first.release()
    first.release()  # twice is harmless
    assert budget.used == 40
    second.release()
    assert budget.used == 0
    assert budget.peak == 100
