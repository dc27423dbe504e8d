"""How much memory a request costs: a model's measured working-memory curve, and the machine's.

The probe (:mod:`runtime.serve.calibrate`) runs each model at batch 1 on inputs of growing size
and measures onnxruntime's peak RSS above what the process held before the run.  With ``E`` the
*sample elements* of a request (per sample, the elements of every input, a zero dim counted as
1 so that ``[0, 2**62]`` is not "empty"), :class:`Curve` turns those points into ``w(E)``, the
working memory of one sample.  A batch of ``n`` samples is charged ``n w(E)``, times
:data:`SAFETY`.  Growth beyond the largest calibrated size faster than the last measured rate
would be under-estimated; the per-model budget is the bound that still holds then (see
:mod:`runtime.serve.admission`).

A request's whole cost adds what the server itself holds around the run:

- the body: ``JSON_INPUT_FACTOR`` times its size for JSON (orjson's Python floats, then numpy:
  measured 3.9x the body at peak, plus the body), ``BINARY_INPUT_FACTOR`` for binary tensors
  (the body, and the batcher's concatenated copy);
- the outputs: ``o(E)`` bytes per sample (fitted like ``w``), times ``JSON_OUTPUT_FACTOR``
  (JSON text of up to 3x the bytes, plus the arrays) or ``BINARY_OUTPUT_FACTOR``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BINARY_INPUT_FACTOR",
    "BINARY_OUTPUT_FACTOR",
    "JSON_INPUT_FACTOR",
    "JSON_OUTPUT_FACTOR",
    "FLOOR",
    "SAFETY",
    "STEADY",
    "Curve",
    "MemoryProfile",
    "machine_memory",
    "sample_elements",
]

SAFETY = 1.25
FLOOR = 1 << 20  # bytes: differences below this are allocator and page noise
STEADY = 8 << 20  # bytes: above this, the growth rate is the model's, not the allocator's
JSON_INPUT_FACTOR = 5
BINARY_INPUT_FACTOR = 2
JSON_OUTPUT_FACTOR = 4
BINARY_OUTPUT_FACTOR = 2


def sample_elements(shapes: Iterable[Sequence[int]], batched: bool) -> int:
    """``E``: the elements of one sample over every input, each dim counted as ``max(d, 1)``."""
    total = 0
    for shape in shapes:
        dims = shape[1:] if batched else shape
        total += math.prod(max(int(d), 1) for d in dims)
    return total


@dataclass(frozen=True)
class Curve:
    """Bytes against ``E``: the calibration points' rising envelope, a power law beyond them.

    .. math::

        f(E) = \\begin{cases}
            \\max_{i \\le j} y_i & E_{j-1} < E \\le E_j \\\\
            y_n \\, (E / E_n)^p & E > E_n
        \\end{cases}

    with ``p`` the growth between the last two points ``m < n`` at or above :data:`STEADY`
    (:data:`FLOOR` when fewer than two reach it), ``p = log(y_n / y_m) / log(E_n / E_m)``,
    clipped to ``[1, 3]``; 1 when there are not two such points.  Inside the calibrated range
    a request is charged the next measured size up;
    beyond it, at the rate the model was last seen growing (2 for attention over the sequence
    and for a recurrence that keeps every step, 1 for convolutions and norms).
    """

    points: tuple[tuple[int, int], ...]
    exponent: float

    def __call__(self, elements: int) -> float:
        for e, y in self.points:
            if elements <= e:
                return float(y)
        e, y = self.points[-1]
        return max(y, FLOOR) * (elements / e) ** self.exponent

    @classmethod
    def fit(cls, points: Sequence[tuple[int, float]]) -> Curve:
        """The envelope of ``points`` ``(E, bytes)``.

        Raises:
            ValueError: no point, or a point with ``E < 1``.
        """
        if not points:
            raise ValueError("no calibration point to fit a memory curve to")
        if any(e < 1 for e, _ in points):
            raise ValueError(f"calibration sizes must be >= 1 element, got {sorted(points)}")
        merged: dict[int, int] = {}
        for e, y in points:
            merged[int(e)] = max(merged.get(int(e), 0), max(int(y), 0))
        envelope, top = [], 0
        for e in sorted(merged):
            top = max(top, merged[e])
            envelope.append((e, top))
        large = [(e, y) for e, y in envelope if y >= STEADY]
        if len(large) < 2:
            large = [(e, y) for e, y in envelope if y >= FLOOR]
        exponent = 1.0
        if len(large) >= 2:
            (e0, y0), (e1, y1) = large[-2], large[-1]
            exponent = min(max(math.log(y1 / y0) / math.log(e1 / e0), 1.0), 3.0)
        return cls(tuple(envelope), exponent)

    def json(self) -> dict:
        return {"points": [list(p) for p in self.points], "exponent": self.exponent}

    @classmethod
    def from_json(cls, doc: dict) -> Curve:
        return cls(tuple((int(e), int(y)) for e, y in doc["points"]), float(doc["exponent"]))


@dataclass(frozen=True)
class MemoryProfile:
    """A model version's memory, as measured by its probe.

    Attributes:
        work: onnxruntime's working memory of one sample (bytes) against ``E``.
        output: the output bytes of one sample against ``E``.
        resident: the session's RSS once loaded (weights, prepacked kernels): idle baseline.
        points: the calibration points ``(E, work bytes, output bytes)``.
    """

    work: Curve
    output: Curve
    resident: int
    points: tuple[tuple[int, int, int], ...]

    @classmethod
    def from_points(cls, points: Sequence[tuple[int, int, int]], resident: int) -> MemoryProfile:
        return cls(
            work=Curve.fit([(e, w) for e, w, _ in points]),
            output=Curve.fit([(e, o) for e, _, o in points]),
            resident=resident,
            points=tuple((int(e), int(w), int(o)) for e, w, o in points),
        )

    def run_bytes(self, batch: int, elements: int) -> int:
        """onnxruntime's working memory for ``batch`` samples of ``elements``."""
        return math.ceil(SAFETY * max(batch, 1) * self.work(elements))

    def request_bytes(
        self, *, body: int, json_input: bool, batch: int, elements: int, json_output: bool
    ) -> int:
        """The whole request: body and decoding, the run, the outputs and their encoding."""
        outputs = max(batch, 1) * self.output(elements)
        return math.ceil(
            body * (JSON_INPUT_FACTOR if json_input else BINARY_INPUT_FACTOR)
            + self.run_bytes(batch, elements)
            + SAFETY * outputs * (JSON_OUTPUT_FACTOR if json_output else BINARY_OUTPUT_FACTOR)
        )

    def json(self) -> dict:
        return {
            "work": self.work.json(),
            "output": self.output.json(),
            "resident": self.resident,
            "points": [list(p) for p in self.points],
        }

    @classmethod
    def from_json(cls, doc: dict) -> MemoryProfile:
        """The inverse of :meth:`json`."""
        return cls(
            Curve.from_json(doc["work"]),
            Curve.from_json(doc["output"]),
            int(doc["resident"]),
            tuple((int(e), int(w), int(o)) for e, w, o in doc["points"]),
        )


_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)


def machine_memory() -> int:
    """The memory this process may use: the machine's RAM, or its cgroup limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total
