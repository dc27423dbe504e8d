"""Benchmark normport's ONNX exports in onnxruntime against torch.onnx's and PyTorch eager.

Run as ``python -m benchmarks.export --threads 1 --out reports/bench/export.json`` (``make bench``).

Part 1, per layer case of :data:`benchmarks.cases.LAYERS` (shared with :mod:`benchmarks.layers`)
and each of its opsets (eval mode, random non-trivial state), on the same input:

- ``normport_ort``: onnxruntime on ``export.to_onnx(layer, mode="eval", opset=opset)`` (dynamic
  batch, the default ``target="onnxruntime"``);
- ``standard_ort``: the same with ``target="standard"``; not timed where both targets give the
  same graph (``ratio_vs_standard`` is then 1 by construction, ``standard_same_graph``);
- ``twin_ort``: onnxruntime on ``torch.onnx.export(twin, (x,), dynamo=True,
  opset_version=opset)`` of the torch.nn twin; below 18 torch.onnx may keep opset 18, so each
  row records the opset every file really imports;
- ``eager``: the twin under ``no_grad``.  SwitchableNorm2d has no twin: normport ORT vs
  normport eager.  SequenceBatchNorm also times ``alt_ort``, a hand-built ``Transpose ->
  BatchNormalization -> Transpose`` graph with the same numbers (``fold_ratio``).

Ratios are medians over rounds of same-round samples.  ``ratio``: ``normport_ort / twin_ort``,
target <= :data:`RATIO_TARGET` (``ok``).  ``ratio_vs_standard``: ``normport_ort /
standard_ort``, target <= :data:`RATIO_TARGET` for the same graph and <= the form table's
``CLEAR_WIN`` (:mod:`export.lowerings._choices`) where the onnxruntime target took another
form, whose ratio as the table recorded it is ``recorded_ratio``.  ``targets`` lists both with
their limits and ``met``; the row's ``met``: every target met and every output valid (each ORT
output within ``MAX_ABS_DIFF`` of the eager output).

Part 2, per zoo network (all of them): onnxruntime on normport's eval export (opset 23, the
spec's dynamic dims) vs PyTorch eager at batch 1 and 32, plus the time ``export.to_onnx`` takes.

Timing follows :mod:`benchmarks.layers`: every round times every side (the order alternates), the
warmup sizes ``inner`` steps per sample to a time budget, ``*_ms`` is the median over rounds.
onnxruntime: CPU, ``intra_op=threads``, ``inter_op=1``, ORT_ENABLE_ALL; torch:
``set_num_threads(threads)``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import onnx
import torch

from benchmarks import _export_graphs as graphs
from benchmarks.cases import LayerCase, layer_cases, pick
from benchmarks.options import layer_parser, parse
from benchmarks.report import environment, write_report
from benchmarks.timing import (
    Step,
    TimingPlan,
    pin_threads,
    summarize,
    time_cpu,
    time_interleaved,
)
from benchmarks.twins import make_input, make_layer, make_twin, torch_twin
from normport import export
from normport.export.lowerings._choices import CLEAR_WIN, MEASURED_ON, Choice
from normport.models import zoo

__all__ = ["MAX_ABS_DIFF", "RATIO_TARGET", "main"]

RATIO_TARGET = 1.0
"""A layer row is ``ok`` when normport's file runs at most this many times the twin's time."""

MAX_ABS_DIFF = 1e-3
"""Each onnxruntime output must stay within this of the PyTorch eager output."""

ZOO_OPSET = 23
ZOO_BATCHES = (1, 32)
SEED = 0


# -- measuring ----------------------------------------------------------------------------------


def _timed(steps: dict[str, Step], plan: TimingPlan) -> tuple[dict[str, dict[str, float]], Any]:
    """Interleaved timing of ``steps``: ``{side: {"ms": median, "iqr_ms": iqr}}`` and samples."""
    samples = time_interleaved(steps, plan, time_cpu)
    stats = {}
    for name, values in samples.ms.items():
        median, iqr = summarize(values)
        stats[name] = {"ms": round(median, 4), "iqr_ms": round(iqr, 4)}
    return stats, samples


def bench_layer(case: LayerCase, opset: int, threads: int, plan: TimingPlan) -> dict[str, Any]:
    """One layer at one opset: normport ORT vs twin ORT vs eager (vs the hand-built graph)."""
    gen = torch.Generator().manual_seed(SEED)
    ours = make_layer(case, gen).eval()
    x = make_input(case.shape, gen)
    twin = torch_twin(case)  # None: normport ORT is compared with normport eager only
    ref = ours if twin is None else make_twin(twin, case, ours)
    with torch.no_grad():
        want = graphs.outputs(ref(x))
    ours_model, ours_export_s = graphs.seconds(
        lambda: export.to_onnx(ours, (x,), mode="eval", opset=opset, target="onnxruntime")
    )
    standard_model = export.to_onnx(ours, (x,), mode="eval", opset=opset, target="standard")
    same = graphs.same_graph(ours_model, standard_model)
    feed = {ours_model.graph.input[0].name: x.numpy()}
    sides: dict[str, dict[str, Any]] = {}
    steps: dict[str, Step] = {}
    sides["normport_ort"], steps["normport_ort"] = graphs.ort_side(
        ours_model, feed, want, threads, MAX_ABS_DIFF
    )
    sides["normport_ort"]["export_s"] = ours_export_s
    if not same:
        sides["standard_ort"], steps["standard_ort"] = graphs.ort_side(
            standard_model, feed, want, threads, MAX_ABS_DIFF
        )
    if twin is not None:
        twin_model, twin_export_s = graphs.seconds(lambda: graphs.export_twin(ref, x, opset))
        twin_feed = {twin_model.graph.input[0].name: feed[ours_model.graph.input[0].name]}
        sides["twin_ort"], steps["twin_ort"] = graphs.ort_side(
            twin_model, twin_feed, want, threads, MAX_ABS_DIFF
        )
        sides["twin_ort"]["export_s"] = twin_export_s
    if case.layer == "SequenceBatchNorm":
        alt = graphs.transpose_bn_transpose(
            ours_model,
            scale=ours.weight.detach().numpy(),
            bias=ours.bias.detach().numpy(),
            mean=ours.running_mean.numpy(),
            var=ours.running_var.numpy(),
            epsilon=ours.eps,
        )
        sides["alt_ort"], steps["alt_ort"] = graphs.ort_side(alt, feed, want, threads, MAX_ABS_DIFF)
    sides["eager"] = {"impl": f"{type(ref).__module__}.{type(ref).__qualname__}"}
    steps["eager"] = graphs.eager_step(ref, (x,))
    stats, samples = _timed(steps, plan)
    for name, values in stats.items():
        sides[name].update(values)
    choice = graphs.recorded_choice(ours_model, opset)
    return _layer_row(case, opset, sides, samples, choice)


def _ratio(samples: Any, side: str, other: str) -> float | None:
    """Median over rounds of ``side / other``: both were timed in the same round, so a burst of
    machine load hits the pair alike (steadier than a ratio of medians on a shared machine)."""
    if other not in samples.ms:
        return None
    pairs = zip(samples.ms[side], samples.ms[other], strict=True)
    return round(statistics.median(a / b for a, b in pairs), 3)


def _target(name: str, ratio: float | None, limit: float) -> dict[str, Any]:
    met = None if ratio is None else ratio <= limit
    return {"name": name, "ratio": ratio, "limit": limit, "met": met}


def _layer_row(
    case: LayerCase,
    opset: int,
    sides: dict[str, dict[str, Any]],
    samples: Any,
    choice: Choice | None,
) -> dict[str, Any]:
    ours, twin = sides["normport_ort"], sides.get("twin_ort")
    valid = all(side.get("valid", True) for side in sides.values())
    ratio = _ratio(samples, "normport_ort", "twin_ort")
    same = "standard_ort" not in sides
    vs_standard = 1.0 if same else _ratio(samples, "normport_ort", "standard_ort")
    recorded = None
    if choice is not None and choice.onnxruntime != choice.standard:
        recorded = dict(choice.measured)[choice.onnxruntime]
    targets = [
        _target("vs_standard", vs_standard, RATIO_TARGET if same else CLEAR_WIN),
        _target("vs_twin", ratio, RATIO_TARGET),
    ]
    # the same kernels after onnxruntime's optimizations: the ratio to the twin is noise
    same_kernels = twin is not None and bool(ours["ort_ops"]) and ours["ort_ops"] == twin["ort_ops"]
    return {
        "layer": case.layer,
        "shape": list(case.shape),
        "opset": opset,
        "ratio": ratio,
        "ok": None if ratio is None else bool(valid and ratio <= RATIO_TARGET),
        "ratio_vs_standard": vs_standard,
        "standard_same_graph": same,
        "recorded_ratio": recorded,
        "targets": targets,
        "met": bool(valid and all(t["met"] is not False for t in targets)),
        "same_ops": None if twin is None else ours["ops"] == twin["ops"],
        "same_kernels": None if twin is None else same_kernels,
        "ratio_vs_eager": _ratio(samples, "normport_ort", "eager"),
        "fold_ratio": _ratio(samples, "normport_ort", "alt_ort"),
        "valid": valid,
        "repeats": len(samples.ms["eager"]),
        "inner": samples.inner,
        **sides,
    }


def bench_network(name: str, threads: int, plan: TimingPlan, export_runs: int) -> dict[str, Any]:
    """One zoo network: export time, then normport ORT vs eager at each batch size."""
    spec = zoo.get(name)
    net = spec.build(seed=SEED)

    def run_export() -> onnx.ModelProto:
        return export.to_onnx(
            net,
            spec.example_inputs(2),
            mode="eval",
            opset=ZOO_OPSET,
            dynamic=spec.dynamic_dims,
            input_names=spec.input_names,
            output_names=spec.output_names,
        )

    timings = [graphs.seconds(run_export) for _ in range(export_runs)]
    model = timings[0][0]
    session = graphs.ort_session(model, threads)
    batches = []
    for batch in ZOO_BATCHES:
        inputs = spec.example_inputs(batch, seed=SEED + 1)
        feed = {n: t.numpy() for n, t in zip(spec.input_names, inputs, strict=True)}
        with torch.no_grad():
            want = graphs.outputs(net(*inputs))
        diff = graphs.max_abs_diff(session.run(None, feed), want)
        steps = {
            "normport_ort": graphs.ort_step(session, feed),
            "eager": graphs.eager_step(net, inputs),
        }
        stats, samples = _timed(steps, plan)
        stats["normport_ort"].update(
            max_abs_diff=diff, valid=diff is not None and diff <= MAX_ABS_DIFF
        )
        batches.append(
            {
                "batch": batch,
                "input_shapes": {n: list(t.shape) for n, t in feed.items()},
                "ratio_vs_eager": _ratio(samples, "normport_ort", "eager"),
                "repeats": len(samples.ms["eager"]),
                "inner": samples.inner,
                **stats,
            }
        )
    summary = graphs.graph_summary(model)
    return {
        "network": name,
        "opset": ZOO_OPSET,
        "dynamic_dims": spec.dynamic_dims,
        "export_s": min(seconds for _, seconds in timings),
        "export_runs": export_runs,
        "node_count": len(summary["ops"]),
        "functions": summary["functions"],
        "batches": batches,
    }


# -- output -------------------------------------------------------------------------------------


def metadata(args: argparse.Namespace, plan: TimingPlan) -> dict[str, Any]:
    """Versions, machine, settings."""
    return {
        **environment(),
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "plan": vars(plan),
        "onnxruntime_settings": {
            "providers": ["CPUExecutionProvider"],
            "intra_op_num_threads": args.threads,
            "inter_op_num_threads": 1,
            "graph_optimization_level": "ORT_ENABLE_ALL",
        },
        "ratio": "median over rounds of normport_ort / twin_ort (samples of the same round)",
        "ratio_target": RATIO_TARGET,
        "ratio_vs_standard": (
            "median over rounds of normport_ort (target='onnxruntime') / standard_ort "
            "(target='standard'); 1 where both targets give the same graph"
        ),
        "ratio_vs_standard_target": {"same graph": RATIO_TARGET, "other form": CLEAR_WIN},
        "form_table_measured_on": MEASURED_ON,
        "max_abs_diff_limit": MAX_ABS_DIFF,
        "normport_export": (
            "export.to_onnx(layer, (x,), mode='eval', opset=opset, target=...), dynamic batch"
        ),
        "twin_export": "torch.onnx.export(twin, (x,), dynamo=True, opset_version=opset), static",
        "timer": (
            "time.perf_counter per step; a sample averages `inner` steps; all sides alternate "
            "within every round; ms = median over `repeats` rounds, iqr_ms = interquartile range"
        ),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (the shared ones: :mod:`benchmarks.options`)."""
    parser = layer_parser(
        "python -m benchmarks.export",
        "Time normport's ONNX exports in onnxruntime vs torch.onnx's and eager.",
        "reports/bench/export.json",
    )
    parser.add_argument("--opsets", nargs="+", type=int, help="opsets for every layer")
    parser.add_argument("--zoo", nargs="+", help="zoo networks (default: all)")
    parser.add_argument("--no-zoo", action="store_true", help="skip part 2")
    parser.add_argument("--budget-s", type=float, default=3.0, help="seconds of timing per row")
    return parse(parser, argv)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run both parts, write the JSON report, print the tables; return the report."""
    args = parse_args(argv)
    pin_threads(args.threads)
    plan = (
        TimingPlan(1, 3, 3, 0.0, 1, 1)
        if args.quick
        else TimingPlan(2, 9, 30, args.budget_s, min_inner=1, max_inner=50)
    )
    started = time.perf_counter()
    rows = []
    for case in layer_cases(args.layers):
        for opset in args.opsets or case.opsets:
            _log(f"  {case.layer} opset {opset} ...")
            rows.append(bench_layer(case, opset, args.threads, plan))
    networks = []
    if not args.no_zoo:
        for name in pick(zoo.names(), args.zoo, "zoo network"):
            _log(f"  zoo {name} ...")
            networks.append(bench_network(name, args.threads, plan, 1 if args.quick else 2))
    meta = {**metadata(args, plan), "elapsed_s": round(time.perf_counter() - started, 1)}
    report = {"metadata": meta, "layers": rows, "zoo": networks}
    write_report(args.out, report)
    print(f"Part 1: onnxruntime per layer ({args.threads} thread(s))\n")
    print(graphs.format_layer_table(rows))
    print("\nTargets: the onnxruntime-target file vs the standard-target file and torch.onnx's")
    print(f"(form table measured on {MEASURED_ON}; this run: onnxruntime {meta['onnxruntime']})\n")
    print(graphs.format_target_table(rows))
    if any(row.get("alt_ort") for row in rows):
        print("\nSequenceBatchNorm eval: folded Mul+Add vs Transpose-BN-Transpose\n")
        print(graphs.format_fold_table(rows))
    if networks:
        print(f"\nPart 2: zoo networks (opset {ZOO_OPSET}, normport eval export)\n")
        print(graphs.format_zoo_table(networks))
    slow = [f"{r['layer']}@{r['opset']}" for r in rows if r["ok"] is False]
    print(f"\n{len(rows)} layer rows; over ratio {RATIO_TARGET} or invalid: {slow or 'none'}")
    unmet = [f"{r['layer']}@{r['opset']}" for r in rows if not r["met"]]
    print(f"targets not met: {unmet or 'none'}")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
