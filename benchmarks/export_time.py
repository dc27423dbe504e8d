"""Export time: ``export.to_onnx`` vs ``torch.onnx.export`` on real architectures.

Run as ``python -m benchmarks.export_time --out reports/bench/export_time.json`` (part of
``make bench``).  Both sides export the same eval model with a dynamic batch at opset 18
(torch.onnx's own opset, so it converts nothing) and normport also at 23 (its default).
Rounds interleave the sides (the order alternates) on the shared machine; the ratio is the
median over rounds of same-round ``normport / torch.onnx``.  normport's time includes what it
adds: recognition, lowering, opset conversion, the full checker and strict shape inference.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.report import environment, verdict, write_report
from normport import export
from tests.thirdparty.models import ARCHS

MODELS = ("tv_resnet18", "hf_bert")
TARGET = 1.2


def _torch_onnx(model, inputs) -> None:
    """torch.onnx's export up to the ``ModelProto`` (what ``to_onnx`` returns and both sides
    would write to a file)."""
    shapes = tuple({0: torch.export.Dim.DYNAMIC} for _ in inputs)
    program = torch.onnx.export(model, inputs, dynamo=True, opset_version=18, dynamic_shapes=shapes)
    program.model_proto  # noqa: B018 (serializes the IR)


def _sides(model, inputs) -> dict[str, Callable[[], object]]:
    return {
        "torch_onnx_18": lambda: _torch_onnx(model, inputs),
        "normport_18": lambda: export.to_onnx(model, inputs, mode="eval", opset=18),
        "normport_23": lambda: export.to_onnx(model, inputs, mode="eval", opset=23),
    }


@contextlib.contextmanager
def _quiet():
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def bench(name: str, rounds: int) -> dict:
    arch = ARCHS[name]
    model = arch.build(seed=0)
    inputs = arch.inputs(2, 0)
    sides = _sides(model, inputs)
    samples: dict[str, list[float]] = {side: [] for side in sides}
    with _quiet():
        for fn in sides.values():  # warm-up: imports, registries, first-call caches
            fn()
        for r in range(rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for side in order:
                gc.collect()  # the previous side's garbage is not this side's cost
                start = time.perf_counter()
                sides[side]()
                samples[side].append(time.perf_counter() - start)
    base = samples["torch_onnx_18"]
    row = {f"{side}_s": statistics.median(v) for side, v in samples.items()}
    for side in ("normport_18", "normport_23"):
        row[f"ratio_{side}"] = statistics.median(
            a / b for a, b in zip(samples[side], base, strict=True)
        )
    met = all(row[f"ratio_{side}"] <= TARGET for side in ("normport_18", "normport_23"))
    return {"model": name, "rounds": rounds, **row, "target": TARGET, "target_met": met}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("reports/bench/export_time.json"))
    args = parser.parse_args(argv)
    rows = [bench(name, args.rounds) for name in MODELS]
    result = {"metadata": environment(), "target_ratio": TARGET, "rows": rows}
    write_report(args.out, result)
    print(
        f"{'model':14} {'torch.onnx':>11} {'normport@18':>12} {'normport@23':>12} ratio@18 ratio@23"
        f"  target"
    )
    for r in rows:
        print(
            f"{r['model']:14} {r['torch_onnx_18_s']:10.2f}s {r['normport_18_s']:11.2f}s "
            f"{r['normport_23_s']:11.2f}s {r['ratio_normport_18']:8.2f} "
            f"{r['ratio_normport_23']:8.2f}  <= {TARGET} {verdict(r['target_met'])}"
        )
    return result


if __name__ == "__main__":
    main()
