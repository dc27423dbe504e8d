"""Helpers for :mod:`benchmarks.export`: sessions, exports, graph summaries, hand graphs, tables.

* :func:`ort_session` / :func:`ort_side`: an onnxruntime CPU session pinned to the benchmark's
  threads, and one benchmarked side (graph summary, agreement with eager, timed step);
* :func:`export_twin`: ``torch.onnx.export(..., dynamo=True)`` with its chatter silenced;
* :func:`graph_summary` / :func:`ort_optimized_ops`: which ops a file contains, before and
  after onnxruntime's graph optimizations; :func:`same_graph`: whether two exports differ in
  anything but their metadata (the two targets' files of a layer whose form does not depend
  on the target); :func:`recorded_choice`: the form table's row behind a layer's export;
* :func:`transpose_bn_transpose`: the hand-built alternative to SequenceBatchNorm's folded
  ``X * scale + shift`` eval lowering;
* ``format_*_table``: the aligned text tables printed to stdout.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from benchmarks.report import verdict
from benchmarks.timing import Step
from normport.export._opset import default_opset
from normport.export.lowerings._choices import ANY, CHOICES, Choice

__all__ = [
    "eager_step",
    "export_twin",
    "format_fold_table",
    "format_layer_table",
    "format_target_table",
    "format_zoo_table",
    "graph_summary",
    "max_abs_diff",
    "model_opset",
    "ort_optimized_ops",
    "ort_session",
    "ort_side",
    "ort_step",
    "outputs",
    "recorded_choice",
    "same_graph",
    "seconds",
    "transpose_bn_transpose",
]


def _session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def ort_session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    """A CPU session on ``model`` (``intra_op=threads``, ``inter_op=1``, ORT_ENABLE_ALL)."""
    return ort.InferenceSession(
        model.SerializeToString(),
        sess_options=_session_options(threads),
        providers=["CPUExecutionProvider"],
    )


def model_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset a file actually imports."""
    return default_opset(model)


def _op_name(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def graph_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """The file's opset, its top-level op types (in order), its functions and their bodies."""
    return {
        "opset": model_opset(model),
        "ops": [_op_name(node) for node in model.graph.node],
        "functions": [f"{f.domain}.{f.name}" for f in model.functions],
        "function_ops": {
            f"{f.domain}.{f.name}": [_op_name(node) for node in f.node] for f in model.functions
        },
    }


def ort_optimized_ops(model: onnx.ModelProto, threads: int) -> list[str] | None:
    """Op types onnxruntime actually runs after ORT_ENABLE_ALL (None if it cannot save them).

    Read from the optimized model onnxruntime writes at session creation; fused kernels show
    up as ``com.microsoft.*`` ops, layout transforms as ``com.microsoft.nchwc.*``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        options = _session_options(threads)
        options.optimized_model_filepath = str(path)
        try:
            ort.InferenceSession(
                model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
            )
            optimized = onnx.load(str(path), load_external_data=False)
        except Exception:  # best effort: the summary is informative, not essential
            return None
    return [_op_name(node) for node in optimized.graph.node]


def same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Whether ``a`` and ``b`` hold the same graph, functions and opsets (metadata aside)."""

    def body(model: onnx.ModelProto) -> bytes:
        stripped = onnx.ModelProto()
        stripped.CopyFrom(model)
        stripped.ClearField("metadata_props")
        return stripped.SerializeToString(deterministic=True)

    return body(a) == body(b)


def recorded_choice(model: onnx.ModelProto, opset: int) -> Choice | None:
    """The form table's row (:mod:`export.lowerings._choices`) for the one normalization layer
    of a layer case's export at ``opset``; None where the table has none (a function-only
    layer such as SwitchableNorm)."""
    meta = {p.key: p.value for p in model.metadata_props}
    (layer,) = json.loads(meta["normalization_layers"])
    stats = "update" if layer["updates_running_stats"] else layer["statistics"]
    for row in CHOICES:
        if row.kind == layer["kind"] and row.statistics in (ANY, stats) and opset in row.opsets:
            return row
    return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch.onnx's progress prints, logging and warnings for one export."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_twin(module: nn.Module, x: Tensor, opset: int) -> onnx.ModelProto:
    """``torch.onnx.export(module, (x,), dynamo=True, opset_version=opset)`` as a ModelProto.

    torch.onnx implements opsets >= 18 only: asked for less, it tries a version conversion and
    may keep 18 (see :func:`model_opset` on the result for what the file really imports).
    """
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(module, (x,), dynamo=True, opset_version=opset)
    return program.model_proto


def transpose_bn_transpose(
    template: onnx.ModelProto,
    *,
    scale: np.ndarray,
    bias: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    epsilon: float,
) -> onnx.ModelProto:
    """SequenceBatchNorm eval as ``Transpose -> BatchNormalization -> Transpose``.

    The unfused alternative to normport's folded ``X * scale + shift`` on a channel-last
    ``(N, L, C)`` input, built with the same numbers.  Inputs, outputs (shapes, dynamic axes
    included) and opset are copied from ``template`` (normport's export of the same layer), so
    only the graph between them differs.
    """
    x_in, y_out = template.graph.input[0], template.graph.output[0]
    if x_in.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError("transpose_bn_transpose builds float32 graphs only")
    initializers = [
        numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)
        for name, value in (("scale", scale), ("bias", bias), ("mean", mean), ("var", var))
    ]
    nodes = [
        helper.make_node("Transpose", [x_in.name], ["x_ncl"], perm=[0, 2, 1]),
        helper.make_node(
            "BatchNormalization",
            ["x_ncl", "scale", "bias", "mean", "var"],
            ["y_ncl"],
            epsilon=float(epsilon),
        ),
        helper.make_node("Transpose", ["y_ncl"], [y_out.name], perm=[0, 2, 1]),
    ]
    graph = helper.make_graph(
        nodes, "sequence_batchnorm_transposed", [x_in], [y_out], initializer=initializers
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", model_opset(template))],
        ir_version=template.ir_version,
    )
    onnx.checker.check_model(model)
    return model


# -- sides and steps ----------------------------------------------------------------------------


def ort_step(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> Step:
    """One timed ``session.run`` on ``feed`` (outputs allocated by onnxruntime)."""
    return Step(prepare=lambda: None, run=lambda: session.run(None, feed))


def eager_step(module: nn.Module, inputs: tuple[Tensor, ...]) -> Step:
    """One timed eager forward under ``torch.no_grad()``."""

    def run() -> None:
        with torch.no_grad():
            module(*inputs)

    return Step(prepare=lambda: None, run=run)


def ort_side(
    model: onnx.ModelProto,
    feed: dict[str, np.ndarray],
    want: list[np.ndarray],
    threads: int,
    limit: float,
) -> tuple[dict[str, Any], Step]:
    """An onnxruntime side: graph summary, agreement with ``want`` (eager), its timed step."""
    session = ort_session(model, threads)
    diff = max_abs_diff(session.run(None, feed), want)
    side = {
        **graph_summary(model),
        "ort_ops": ort_optimized_ops(model, threads),
        "max_abs_diff": diff,
        "valid": diff is not None and diff <= limit,
    }
    return side, ort_step(session, feed)


def seconds(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the seconds it took."""
    start = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - start, 3)


# -- outputs ------------------------------------------------------------------------------------


def outputs(result: Any) -> list[np.ndarray]:
    """A module's output(s) as a list of numpy arrays."""
    items = result if isinstance(result, tuple | list) else [result]
    return [np.asarray(t.detach().numpy() if isinstance(t, Tensor) else t) for t in items]


def max_abs_diff(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float | None:
    """The largest ``|got - want|`` over all outputs; None if they do not line up (or NaN)."""
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want, strict=True)):
        return None
    pairs = zip(got, want, strict=True)
    worst = max(float(np.abs(g.astype(np.float64) - w).max()) for g, w in pairs)
    return None if np.isnan(worst) else worst


# -- text tables --------------------------------------------------------------------------------


def _table(header: list[str], body: list[list[str]], left: int) -> str:
    """Aligned columns: the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def render(line: list[str]) -> str:
        cells = (
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *(render(line) for line in body)])


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _flag(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def _ops(side: dict[str, Any] | None) -> str:
    if side is None:
        return "-"
    return f"[{side['opset']}] " + ",".join(op.removeprefix("normport.") for op in side["ops"])


def _kernels(side: dict[str, Any] | None) -> str:
    """What onnxruntime runs after optimization: the ops if few, else their count."""
    if side is None:
        return "-"
    ops = side["ort_ops"]
    if ops is None:
        return "?"
    return ",".join(ops) if len(ops) <= 3 else f"{len(ops)} ops"


def format_layer_table(rows: list[dict[str, Any]]) -> str:
    """Part 1 as text: times, ratio, the ops each file contains, agreement."""
    header = ["layer", "opset", "normport ms", "twin ms", "eager ms", "ratio", "ok"]
    header += ["normport ops [file opset]", "twin ops [file opset]", "ORT runs: normport | twin"]
    header += ["max|diff|", "valid"]
    body = []
    for row in rows:
        ours, twin = row["normport_ort"], row.get("twin_ort")
        diffs = [s["max_abs_diff"] for s in (ours, twin) if s is not None]
        known = [d for d in diffs if d is not None]
        body.append(
            [
                row["layer"],
                str(row["opset"]),
                _num(ours["ms"], ".3f"),
                _num(twin and twin["ms"], ".3f"),
                _num(row["eager"]["ms"], ".3f"),
                _num(row["ratio"], ".2f"),
                _flag(row["ok"]),
                _ops(ours),
                _ops(twin),
                f"{_kernels(ours)} | {_kernels(twin)}",
                _num(max(known) if len(known) == len(diffs) else None, ".1e"),
                _flag(row["valid"]),
            ]
        )
    return _table(header, body, left=2)


def _target_cell(target: dict[str, Any]) -> str:
    ratio = "-" if target["ratio"] is None else f"{target['ratio']:.2f}"
    return f"{ratio} <= {target['limit']:.2f} {verdict(target['met'])}"


def format_target_table(rows: list[dict[str, Any]]) -> str:
    """Per row: the onnxruntime target's file against the standard target's and torch.onnx's,
    each ratio with its limit and whether it is met, and the form table's recorded ratio.
    "same kernels": onnxruntime runs the same ops for both files after its optimizations, so
    the ratio is machine noise around 1."""
    header = ["layer", "opset", "onnxruntime-target ops", "standard ms", "vs standard"]
    header += ["table", "vs torch.onnx", "met"]
    body = []
    for row in rows:
        targets = {t["name"]: t for t in row["targets"]}
        standard = row.get("standard_ort")
        body.append(
            [
                row["layer"],
                str(row["opset"]),
                _ops(row["normport_ort"]),
                "same graph" if standard is None else _num(standard["ms"], ".3f"),
                _target_cell(targets["vs_standard"]),
                _num(row["recorded_ratio"], ".2f"),
                _target_cell(targets["vs_twin"]) + (" (same kernels)" * bool(row["same_kernels"])),
                _flag(row["met"]),
            ]
        )
    return _table(header, body, left=3)


def format_fold_table(rows: list[dict[str, Any]]) -> str:
    """SequenceBatchNorm: folded Mul + Add vs Transpose -> BatchNormalization -> Transpose."""
    header = ["opset", "Mul+Add ms", "Transpose-BN-Transpose ms", "ratio", "alt ops in ORT"]
    body = [
        [
            str(row["opset"]),
            _num(row["normport_ort"]["ms"], ".3f"),
            _num(row["alt_ort"]["ms"], ".3f"),
            _num(row["fold_ratio"], ".2f"),
            ",".join(row["alt_ort"]["ort_ops"] or ["?"]),
        ]
        for row in rows
        if row.get("alt_ort")
    ]
    return _table(header, body, left=1)


def format_zoo_table(networks: list[dict[str, Any]]) -> str:
    """Part 2 as text: one line per network and batch size."""
    header = ["network", "batch", "export s", "normport ORT ms", "eager ms", "ORT/eager"]
    header += ["max|diff|", "valid"]
    body = [
        [
            net["network"],
            str(b["batch"]),
            _num(net["export_s"], ".2f"),
            _num(b["normport_ort"]["ms"], ".3f"),
            _num(b["eager"]["ms"], ".3f"),
            _num(b["ratio_vs_eager"], ".2f"),
            _num(b["normport_ort"]["max_abs_diff"], ".1e"),
            _flag(b["normport_ort"]["valid"]),
        ]
        for net in networks
        for b in net["batches"]
    ]
    return _table(header, body, left=2)
