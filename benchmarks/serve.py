"""Benchmark the service against in-process onnxruntime on the same inputs, in the same run.

    python -m benchmarks.serve [--out reports/bench/serve.json] [--quick]
                                  [--repository DIR] [--threads 1] [--duration 3]

Models: :data:`benchmarks.cases.SERVED`, a small one (``seq_bn``) and a CNN (``cnn_bn``),
exported into a temporary repository unless ``--repository`` holds them.  For each model the
server runs in a subprocess (``python -m runtime serve``, one per batching mode) and an aiohttp
closed-loop client drives it at concurrency 1, 8 and 64, with JSON and with binary tensors, one
sample per request (float32, of the case's ``sample_shape``).
In-process onnxruntime (same session options, same inputs) gives the baselines: batch-1
latency, and the throughput of running *the same batches* the server ran (the batch sizes its
statistics recorded in that cell).

Targets (``targets`` in the report): binary p50 overhead over in-process onnxruntime at
concurrency 1 at most 0.5 ms; for ``cnn_bn`` at concurrency 64, binary, batching on at least
3x batching off and at least 80% of in-process onnxruntime on the same batches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.cases import SERVED, served_cases
from benchmarks.loadgen import build_body, decode_output, run_load
from benchmarks.report import environment, write_report

__all__ = ["TARGETS", "main"]

CONCURRENCY = (1, 8, 64)
QUICK_CONCURRENCY = (1, 8)
TARGETS = {"overhead_p50_ms": 0.5, "batching_speedup": 3.0, "vs_inprocess": 0.8}
_POOL = 64  # distinct inputs per model


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__)
    p.add_argument("--out", default="reports/bench/serve.json")
    p.add_argument("--repository", help="a repository holding the models (else exported)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--duration", type=float, default=2.5, help="seconds measured per cell")
    p.add_argument(
        "--quick", action="store_true", help="0.2 s cells, concurrency 1 and 8: a smoke test"
    )
    served = ",".join(case.network for case in SERVED)
    p.add_argument("--models", help=f"comma-separated subset of {served} (default: all)")
    return p


def _export(names: list[str], root: Path) -> None:
    from normport import export  # lazy: torch is only needed when the repository is missing
    from normport.export.repository import write_model
    from normport.models import zoo

    for name in names:
        spec = zoo.get(name)
        model = export.to_onnx(
            spec.build(),
            spec.example_inputs(4),
            mode="eval",
            dynamic=spec.dynamic_dims,
            input_names=spec.input_names,
            output_names=spec.output_names,
        )
        write_model(root, name, model)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (Linux ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


@contextmanager
def _server(repository: Path, threads: int, batching: bool) -> Iterator[tuple[str, int]]:
    """``python -m runtime serve`` in a subprocess (its own GIL and event loop); yields its URL
    and process id."""
    port = _free_port()
    command = [sys.executable, "-m", "runtime", "serve", "--repository", str(repository)]
    command += ["--port", str(port), "--threads", str(threads), "--log-level", "warning"]
    command += [] if batching else ["--no-batching"]
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the benchmark server did not start") from None
                time.sleep(0.1)
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _stats(url: str, model: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/v2/models/{model}/stats", timeout=10) as r:
        return json.loads(r.read())["model_stats"][0]


def _batch_counts(before: dict[str, Any], after: dict[str, Any]) -> dict[int, int]:
    """Runs per batch size between two statistics snapshots."""

    def counts(stats: dict[str, Any]) -> dict[int, int]:
        return {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}

    old = counts(before)
    return {s: n - old.get(s, 0) for s, n in counts(after).items() if n - old.get(s, 0) > 0}


class _InProcess:
    """onnxruntime in this process with the server's session options, on a model with one
    input and one output (their names are read off the file)."""

    def __init__(self, path: Path, threads: int) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        (self.input_name,) = (node.name for node in self.session.get_inputs())
        (self.output_name,) = (node.name for node in self.session.get_outputs())

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def latency(self, pool: np.ndarray, seconds: float) -> dict[str, float]:
        """Batch-1 runs over the pool: p50/p99 latency and runs per second."""
        times: list[float] = []
        i = 0
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop or len(times) < 20:
            x = pool[i % len(pool) : i % len(pool) + 1]
            t = time.perf_counter()
            self.run(x)
            times.append(time.perf_counter() - t)
            i += 1
        return {
            "p50_ms": float(np.percentile(times, 50) * 1e3),
            "p99_ms": float(np.percentile(times, 99) * 1e3),
            "throughput": len(times) / sum(times),
        }

    def same_batches(self, pool: np.ndarray, counts: dict[int, int], seconds: float) -> float:
        """Samples per second running the batch sizes in ``counts`` in the same proportions."""
        sizes = [s for s, n in sorted(counts.items()) for _ in range(n)]
        if not sizes:
            return float("nan")
        rng = np.random.default_rng(0)
        rng.shuffle(sizes)
        batches = {s: np.concatenate([pool] * (s // len(pool) + 1))[:s] for s in set(sizes)}
        samples, spent, i = 0, 0.0, 0
        while spent < seconds or i < len(sizes):
            size = sizes[i % len(sizes)]
            t = time.perf_counter()
            self.run(batches[size])
            spent += time.perf_counter() - t
            samples += size
            i += 1
        return samples / spent


def _cell(url: str, pid: int, name: str, bodies: list, concurrency: int, seconds: float) -> dict:
    """One load run: latency, throughput, the batches the server ran, CPU per request."""
    before = _stats(url, name)
    server_cpu, client_cpu = _cpu_seconds(pid), time.process_time()
    load = asyncio.run(
        run_load(f"{url}/v2/models/{name}/infer", bodies, concurrency=concurrency,
                 duration_s=seconds)
    )  # fmt: skip
    client_cpu = time.process_time() - client_cpu
    server_end = _cpu_seconds(pid)
    counts = _batch_counts(before, _stats(url, name))
    runs = sum(counts.values())
    samples = sum(s * n for s, n in counts.items())  # one per request, warmup included

    def per_request(seconds: float | None) -> int | None:
        return round(seconds / samples * 1e6) if seconds is not None and samples else None

    return {
        "concurrency": concurrency,
        "requests": len(load.latencies_s),
        "errors": load.errors,
        "first_error": load.first_error,
        "throughput_rps": round(load.throughput, 1),
        "p50_ms": round(load.percentile_ms(50), 3),
        "p99_ms": round(load.percentile_ms(99), 3),
        "mean_batch": round(samples / runs, 2) if runs else None,
        "batch_counts": {str(s): n for s, n in sorted(counts.items())},
        "server_cpu_us_per_request": per_request(
            None if server_cpu is None or server_end is None else server_end - server_cpu
        ),
        "client_cpu_us_per_request": per_request(client_cpu),
    }


def _bench_model(
    name: str, repository: Path, args: argparse.Namespace, inputs: np.ndarray
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    local = _InProcess(repository / name / "1" / "model.onnx", args.threads)
    samples = [inputs[i : i + 1] for i in range(len(inputs))]
    expected = [local.run(x) for x in samples]
    bodies = {
        binary: [build_body(local.input_name, x, local.output_name, binary=binary) for x in samples]
        for binary in (False, True)
    }
    rows = []
    for batching in (True, False):
        with _server(repository, args.threads, batching) as (url, pid):
            _check_results(f"{url}/v2/models/{name}/infer", bodies[True][:4], expected[:4], name)
            for binary in (False, True):
                for concurrency in args.concurrency:
                    cell = _cell(url, pid, name, bodies[binary], concurrency, args.duration)
                    row = {
                        "model": name,
                        "protocol": "binary" if binary else "json",
                        "batching": batching,
                        **cell,
                    }
                    if batching and concurrency > 1:  # onnxruntime alone on the same batches
                        counts = {int(s): n for s, n in cell["batch_counts"].items()}
                        row["inprocess_same_batches_sps"] = round(
                            local.same_batches(inputs, counts, min(args.duration, 1.0)), 1
                        )
                    rows.append(row)
                    _log(_format_row(row))
    baseline = local.latency(inputs, min(args.duration, 1.0))
    baseline = {k: round(v, 4 if k.endswith("_ms") else 1) for k, v in baseline.items()}
    return rows, baseline


def _check_results(url: str, bodies: list, expected: list[np.ndarray], name: str) -> None:
    """A few requests answered bit-identically to in-process onnxruntime, before timing."""
    for body, want in zip(bodies, expected, strict=True):
        request = urllib.request.Request(url, data=body.content, headers=body.headers)
        with urllib.request.urlopen(request, timeout=10) as r:
            got = decode_output(r.read(), r.headers.get("Inference-Header-Content-Length"))
        if not np.array_equal(got, want):
            raise RuntimeError(f"{name}: served result differs from in-process onnxruntime")


def _row(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r[k] == v for k, v in match.items())), None)


def _targets(rows: list[dict[str, Any]], baselines: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, base in baselines.items():
        for batching in (True, False):
            row = _row(rows, model=name, protocol="binary", batching=batching, concurrency=1)
            if row is None:
                continue
            overhead = row["p50_ms"] - base["p50_ms"]
            key = f"{name}_binary_c1_overhead_p50_ms_batching_{'on' if batching else 'off'}"
            out[key] = {
                "value": round(overhead, 3),
                "target": f"<= {TARGETS['overhead_p50_ms']}",
                "met": overhead <= TARGETS["overhead_p50_ms"],
            }
    on = _row(rows, model="cnn_bn", protocol="binary", batching=True, concurrency=64)
    off = _row(rows, model="cnn_bn", protocol="binary", batching=False, concurrency=64)
    if on is not None and off is not None:
        speedup = on["throughput_rps"] / off["throughput_rps"]
        share = on["throughput_rps"] / on["inprocess_same_batches_sps"]
        out["cnn_bn_c64_batching_speedup"] = {
            "value": round(speedup, 2),
            "target": f">= {TARGETS['batching_speedup']}",
            "met": speedup >= TARGETS["batching_speedup"],
        }
        out["cnn_bn_c64_vs_inprocess_same_batches"] = {
            "value": round(share, 3),
            "target": f">= {TARGETS['vs_inprocess']}",
            "met": share >= TARGETS["vs_inprocess"],
        }
    return out


# (row key, column label, width)
_COLUMNS = (
    ("model", "model", 14), ("protocol", "proto", 6), ("batching", "batch", 5),
    ("concurrency", "conc", 4), ("requests", "requests", 8), ("errors", "errors", 6),
    ("throughput_rps", "req/s", 8), ("p50_ms", "p50 ms", 7), ("p99_ms", "p99 ms", 7),
    ("mean_batch", "mean batch", 10), ("inprocess_same_batches_sps", "ORT same batches/s", 18),
    ("server_cpu_us_per_request", "server us/req", 13),
    ("client_cpu_us_per_request", "client us/req", 13),
)  # fmt: skip


def _cell_text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _format_row(row: dict[str, Any]) -> str:
    return "  ".join(
        _cell_text(row.get(key, "")).ljust(width)
        if key == "model"
        else _cell_text(row.get(key, "")).rjust(width)
        for key, _, width in _COLUMNS
    )


def format_report(report: dict[str, Any]) -> str:
    """The results table, the in-process baselines and the targets, as text."""
    header = "  ".join(
        label.ljust(w) if key == "model" else label.rjust(w) for key, label, w in _COLUMNS
    )
    lines = [header, "-" * len(header), *(_format_row(r) for r in report["rows"]), ""]
    for name, base in report["inprocess_batch1"].items():
        lines.append(
            f"in-process onnxruntime {name} batch 1: p50 {base['p50_ms']:.3f} ms, "
            f"p99 {base['p99_ms']:.3f} ms, {base['throughput']:.0f} runs/s"
        )
    lines.append("")
    for key, t in report["targets"].items():
        verdict = "met" if t["met"] else "NOT met"
        lines.append(f"{key}: {t['value']} (target {t['target']}): {verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the JSON report, print the table; return the report."""
    args = _parser().parse_args(argv)
    args.concurrency = QUICK_CONCURRENCY if args.quick else CONCURRENCY
    if args.quick:
        args.duration = min(args.duration, 0.2)
    cases = served_cases(args.models.split(",") if args.models else None)
    names = [case.network for case in cases]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        repository = Path(args.repository) if args.repository else Path(tmp)
        missing = [n for n in names if not (repository / n / "config.pbtxt").is_file()]
        if missing:
            if args.repository:
                raise SystemExit(f"{args.repository} lacks {missing}")
            _log(f"exporting {', '.join(missing)} ...")
            _export(missing, repository)
        rows, baselines = [], {}
        rng = np.random.default_rng(0)
        for case in cases:
            inputs = rng.standard_normal((_POOL, *case.sample_shape)).astype(np.float32)
            model_rows, baselines[case.network] = _bench_model(
                case.network, repository, args, inputs
            )
            rows += model_rows
    report = {
        "metadata": {
            **environment(),
            "threads": args.threads,
            "duration_s": args.duration,
            "quick": args.quick,
            "client": "aiohttp closed loop, one sample per request, same host",
            "elapsed_s": round(time.perf_counter() - started, 1),
        },
        "rows": rows,
        "inprocess_batch1": baselines,
        "targets": _targets(rows, baselines),
    }
    write_report(Path(args.out), report)
    print(format_report(report))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
