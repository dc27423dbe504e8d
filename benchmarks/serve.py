"""Benchmark the service against in-process onnxruntime on the same inputs, in the same run.

    python -m benchmarks.serve [--out reports/bench/serve.json] [--quick] [--repository DIR]
                               [--threads 1] [--duration 1.5] [--repeats 5] [--models a,b]
                               [--no-pin]

Models: :data:`benchmarks.cases.SERVED` (``seq_bn``: small; ``cnn_bn``: a CNN onnxruntime does
not run cheaper in batches; ``transformer_ln``: token ids, 2x cheaper per sample in batches),
exported into a temporary repository unless ``--repository`` holds them.  One sample per
request, of the case's ``sample_shape`` (float32; int64 token ids in ``[0, 8)`` where the
model's input is INT64).

Two servers run side by side, each in its own process (``python -m runtime serve``, one with
dynamic batching and one with ``--no-batching``, same repository and threads), and the load
generator (:mod:`benchmarks.loadgen`, closed loop) drives one at a time, *interleaved*: each
repeat goes over every model, protocol (JSON, binary) and concurrency (1, 16, 64), batching on
then off (off then on in odd repeats). Cells report medians over the repeats; the batched /
unbatched ratio is taken within each repeat, then its median. With two CPUs or more the load
generator runs on the last one and the servers on the others (``--no-pin``: wherever the OS puts
them); with a CPU of its own, the load generator polls its sockets instead of sleeping (``spin``
of :func:`benchmarks.loadgen.run_load`), so that its own wake-up, 50-60 us on this VM at
concurrency 1, does not count as the server's latency. On a 2-CPU machine that leaves the
servers one CPU, where the batcher runs in loop mode (:mod:`runtime.serve.batcher`: the event
loop runs and merges the queue itself).

The *HTTP floor* (:mod:`benchmarks.http_floor`: the service's uvicorn settings and protocol
serving an app that answers 12 fixed bytes, in its own process on the servers' CPUs) is driven
the same way, at every concurrency, in every repeat: what HTTP, loopback TCP, the client and the
machine's wake-ups cost before any handler runs.  The servers busy poll as the service does by
default (``--busy-poll-us``, :mod:`runtime.serve.busypoll`); the floor does not, so its latency
at concurrency 1 includes the wake-up of a sleeping event loop that polling avoids.

In-process onnxruntime (the server's session options, same inputs) gives the limits: batch-1
latency (the p50 overhead at concurrency 1 is the served p50 minus it) and the throughput of
running *the same batches* the server ran at concurrency 64 (batch 1 for the unbatched server);
and whether onnxruntime itself gains from batching a model: its cost per sample at batch 16
against batch 1.

Targets (``targets`` in the report, each with its value and whether it is met):

- batched / unbatched throughput at concurrency 16 and 64: at least 1.0 for every model, and
  at least 1.5 where onnxruntime runs a sample at least 1.5x cheaper at batch 16;
- p50 overhead over in-process onnxruntime at concurrency 1, binary requests: at most 0.3 ms
  (the target is set for a batch-1 binary request; JSON's p50 is in the table);
- throughput at concurrency 64: at least 0.6x in-process onnxruntime on the same batches.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.cases import SERVED, served_cases
from benchmarks.loadgen import build_body, decode_output, pin, run, run_load
from benchmarks.report import environment, verdict, write_report
from benchmarks.servers import stop
from normport.runtime.serve.busypoll import DEFAULT_WINDOW_S

__all__ = ["CONCURRENCY", "TARGETS", "format_report", "main"]

CONCURRENCY = (1, 16, 64)
QUICK_CONCURRENCY = (1, 16)
TARGETS = {
    "batching_ratio": 1.0,  # batched / unbatched throughput, every model
    "batching_ratio_gaining": 1.5,  # ... where onnxruntime gains from batching
    "gaining": 1.5,  # onnxruntime's per-sample speedup at batch 16 that makes a model "gaining"
    "overhead_p50_ms": 0.3,  # concurrency 1, binary
    "vs_inprocess": 0.6,  # concurrency 64
}
_POOL = 64  # distinct inputs per model
_GAIN_BATCH = 16
_MODES = (True, False)  # batching on, off


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="reports/bench/serve.json")
    p.add_argument("--repository", help="a repository holding the models (else exported)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--duration", type=float, default=1.5, help="seconds measured per cell")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians)")
    p.add_argument(
        "--quick", action="store_true", help="0.2 s cells, concurrency 1 and 16, one round"
    )
    p.add_argument("--no-pin", action="store_true", help="leave CPU placement to the OS")
    p.add_argument(
        "--busy-poll-us", type=int, default=round(DEFAULT_WINDOW_S * 1e6), metavar="US",
        help="the servers' --busy-poll-us (default: the server's, %(default)s)",
    )  # fmt: skip
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


def _placement(enabled: bool) -> tuple[set[int] | None, set[int] | None]:
    """(the load generator's CPUs, the servers' CPUs): the last CPU, and the others."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not enabled or len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


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
def _server(
    repository: Path,
    threads: int,
    batching: bool,
    cpus: set[int] | None = None,
    busy_poll_us: int = round(DEFAULT_WINDOW_S * 1e6),
) -> Iterator[tuple[str, int]]:
    """``python -m runtime serve`` in a subprocess (its own GIL and event loop) on ``cpus``;
    yields its URL and process id."""
    port = _free_port()
    command = [sys.executable, "-m", "runtime", "serve", "--repository", str(repository)]
    command += ["--port", str(port), "--threads", str(threads), "--log-level", "warning"]
    command += ["--busy-poll-us", str(busy_poll_us)]
    command += ["--no-probe-cache"] + ([] if batching else ["--no-batching"])
    with _process(command, port, cpus) as running:
        yield running


@contextmanager
def _floor(cpus: set[int] | None = None) -> Iterator[tuple[str, int]]:
    """The HTTP floor (:mod:`benchmarks.http_floor`) in a subprocess on ``cpus``."""
    port = _free_port()
    command = [sys.executable, "-m", "benchmarks.http_floor", "--port", str(port)]
    with _process(command, port, cpus) as running:
        yield running


@contextmanager
def _process(command: list[str], port: int, cpus: set[int] | None) -> Iterator[tuple[str, int]]:
    """Start a server ``command`` listening on ``port``; yield its URL and process id once
    ``/v2/health/ready`` answers 200; stop it after."""
    process = subprocess.Popen(command)
    if cpus is not None:
        os.sched_setaffinity(process.pid, cpus)  # its threads start later: they inherit it
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
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
        stop(process)


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
    input and one output (their names and the input's type are read off the file)."""

    def __init__(self, path: Path, threads: int) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = False  # as runtime.serve.session
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        (node,) = self.session.get_inputs()
        self.input_name, self.integer = node.name, node.type == "tensor(int64)"
        (self.output_name,) = (node.name for node in self.session.get_outputs())

    def pool(self, rng: np.random.Generator, sample_shape: tuple[int, ...]) -> np.ndarray:
        """``_POOL`` distinct samples: float32 normal, or int64 token ids in [0, 8)."""
        if self.integer:
            return rng.integers(0, 8, (_POOL, *sample_shape), dtype=np.int64)
        return rng.standard_normal((_POOL, *sample_shape)).astype(np.float32)

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

    def gain(self, pool: np.ndarray, batch: int = _GAIN_BATCH, runs: int = 20) -> float:
        """How much cheaper a sample is at ``batch`` than alone (the best of ``runs`` each)."""

        def best(x: np.ndarray) -> float:
            self.run(x)
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                self.run(x)
                times.append(time.perf_counter() - t)
            return min(times)

        return best(pool[:1]) * batch / best(pool[:batch])

    def same_batches(self, pool: np.ndarray, counts: dict[int, int], seconds: float) -> float:
        """Samples per second running the batch sizes in ``counts`` in the same proportions."""
        sizes = [s for s, n in sorted(counts.items()) for _ in range(n)]
        if not sizes:
            return float("nan")
        rng = np.random.default_rng(0)
        rng.shuffle(sizes)
        batches = {s: np.concatenate([pool] * (s // len(pool) + 1))[:s] for s in set(sizes)}
        samples, spent, i = 0, 0.0, 0
        while spent < seconds or i < min(len(sizes), 1000):
            size = sizes[i % len(sizes)]
            t = time.perf_counter()
            self.run(batches[size])
            spent += time.perf_counter() - t
            samples += size
            i += 1
        return samples / spent


def _cell(
    url: str, pid: int, name: str, bodies: list, concurrency: int, seconds: float, spin: bool
) -> dict:
    """One load run (``spin``: :func:`benchmarks.loadgen.run_load`'s): latency, throughput,
    the batches the server ran, CPU per request."""
    before = _stats(url, name)
    server_cpu, client_cpu = _cpu_seconds(pid), time.process_time()
    load = run(
        run_load(f"{url}/v2/models/{name}/infer", bodies, concurrency=concurrency,
                 duration_s=seconds, spin=spin)
    )  # fmt: skip
    client_cpu = time.process_time() - client_cpu
    server_end = _cpu_seconds(pid)
    counts = _batch_counts(before, _stats(url, name))
    runs = sum(counts.values())
    samples = sum(s * n for s, n in counts.items())  # one per request, warmup included

    def per_request(seconds: float | None) -> float | None:
        return seconds / samples * 1e6 if seconds is not None and samples else None

    return {
        "requests": len(load.latencies_s),
        "errors": load.errors,
        "first_error": load.first_error,
        "throughput_rps": load.throughput,
        "p50_ms": load.percentile_ms(50),
        "p99_ms": load.percentile_ms(99),
        "mean_batch": samples / runs if runs else None,
        "batch_counts": counts,
        "server_cpu_us_per_request": per_request(
            None if server_cpu is None or server_end is None else server_end - server_cpu
        ),
        "client_cpu_us_per_request": per_request(client_cpu),
    }


def _floor_cell(
    url: str, pid: int, bodies: list, concurrency: int, seconds: float, spin: bool
) -> dict:
    """One load run against the HTTP floor."""
    server_cpu = _cpu_seconds(pid)
    load = run(run_load(f"{url}/floor", bodies, concurrency=concurrency, duration_s=seconds,
                        decode=False, spin=spin))  # fmt: skip
    server_end = _cpu_seconds(pid)
    cpu = None
    if server_cpu is not None and server_end is not None and load.completed:
        cpu = (server_end - server_cpu) / load.completed * 1e6
    return {
        "requests": len(load.latencies_s),
        "errors": load.errors,
        "throughput_rps": load.throughput,
        "p50_ms": load.percentile_ms(50),
        "server_cpu_us_per_request": cpu,
    }


def _median(values: list[Any], digits: int) -> float | None:
    numbers = [v for v in values if v is not None and v == v]  # drop None and NaN
    return round(statistics.median(numbers), digits) if numbers else None


def _row(key: tuple[str, str, int, bool], cells: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: the medians of a cell's repeats."""
    model, protocol, concurrency, batching = key
    counts: dict[int, int] = {}
    for cell in cells:
        for size, n in cell["batch_counts"].items():
            counts[size] = counts.get(size, 0) + n
    return {
        "model": model,
        "protocol": protocol,
        "batching": batching,
        "concurrency": concurrency,
        "repeats": len(cells),
        "requests": sum(c["requests"] for c in cells),
        "errors": sum(c["errors"] for c in cells),
        "first_error": next((c["first_error"] for c in cells if c["first_error"]), ""),
        "throughput_rps": _median([c["throughput_rps"] for c in cells], 1),
        "throughput_rps_each": [round(c["throughput_rps"], 1) for c in cells],
        "p50_ms": _median([c["p50_ms"] for c in cells], 3),
        "p99_ms": _median([c["p99_ms"] for c in cells], 3),
        "mean_batch": _median([c["mean_batch"] for c in cells], 2),
        "batch_counts": {str(s): n for s, n in sorted(counts.items())},
        "server_cpu_us_per_request": _median([c["server_cpu_us_per_request"] for c in cells], 0),
        "client_cpu_us_per_request": _median([c["client_cpu_us_per_request"] for c in cells], 0),
    }


def _bodies(local: _InProcess, pool: np.ndarray) -> dict[str, list]:
    samples = [pool[i : i + 1] for i in range(len(pool))]
    return {
        protocol: [
            build_body(local.input_name, x, local.output_name, binary=protocol == "binary")
            for x in samples
        ]
        for protocol in ("json", "binary")
    }


def _check_results(url: str, name: str, local: _InProcess, pool: np.ndarray) -> None:
    """A few requests answered bit-identically to in-process onnxruntime, before timing."""
    for protocol, bodies in _bodies(local, pool[:4]).items():
        for i, body in enumerate(bodies):
            request = urllib.request.Request(
                f"{url}/v2/models/{name}/infer", data=body.content, headers=body.headers
            )
            with urllib.request.urlopen(request, timeout=10) as r:
                got = decode_output(r.read(), r.headers.get("Inference-Header-Content-Length"))
            if not np.array_equal(got, local.run(pool[i : i + 1])):
                raise RuntimeError(
                    f"{name} ({protocol}): served result differs from in-process onnxruntime"
                )


def _measure(
    args: argparse.Namespace,
    repository: Path,
    cases: list,
    servers: dict[bool, tuple[str, int]],
    floor: tuple[str, int],
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, float], dict[str, Any]]:
    """Every cell, interleaved; then the in-process limits.  Returns (rows, baselines,
    batched/unbatched ratios keyed "model/protocol/concurrency", the HTTP floor per
    concurrency)."""
    rng = np.random.default_rng(0)
    models = {}
    for case in cases:
        local = _InProcess(repository / case.network / "1" / "model.onnx", args.threads)
        pool = local.pool(rng, case.sample_shape)
        for url, _ in servers.values():
            _check_results(url, case.network, local, pool)
        models[case.network] = (local, pool, _bodies(local, pool))
    cells: dict[tuple[str, str, int, bool], list[dict[str, Any]]] = {}
    ratios: dict[str, list[float]] = {}
    floor_cells: dict[int, list[dict[str, Any]]] = {}
    floor_bodies = next(iter(models.values()))[2]["binary"]
    for repeat in range(args.repeats):
        for concurrency in args.concurrency:
            cell = _floor_cell(*floor, floor_bodies, concurrency, args.duration, args.spin)
            floor_cells.setdefault(concurrency, []).append(cell)
            _log(f"[{repeat + 1}] HTTP floor c={concurrency:<3d} {cell['throughput_rps']:8.0f} "
                 f"req/s  p50 {cell['p50_ms']:7.3f} ms  errors {cell['errors']}")  # fmt: skip
        modes = _MODES if repeat % 2 == 0 else _MODES[::-1]
        for name, (_, _, bodies) in models.items():
            for protocol in ("json", "binary"):
                for concurrency in args.concurrency:
                    got = {}
                    for batching in modes:
                        url, pid = servers[batching]
                        cell = _cell(
                            url, pid, name, bodies[protocol], concurrency, args.duration, args.spin
                        )
                        cells.setdefault((name, protocol, concurrency, batching), []).append(cell)
                        got[batching] = cell["throughput_rps"]
                        _log(_progress(repeat, name, protocol, concurrency, batching, cell))
                    if got[False]:
                        key = f"{name}/{protocol}/{concurrency}"
                        ratios.setdefault(key, []).append(got[True] / got[False])
    rows = [_row(key, found) for key, found in cells.items()]
    baselines = {}
    for name, (local, pool, _) in models.items():
        seconds = min(args.duration, 1.0)
        base = local.latency(pool, seconds)
        baseline: dict[str, Any] = {
            k: round(v, 4 if k.endswith("_ms") else 1) for k, v in base.items()
        }
        baseline["gain_at_16"] = round(local.gain(pool), 2)
        for row in rows:
            if row["model"] == name and row["concurrency"] == max(args.concurrency):
                counts = {int(s): n for s, n in row["batch_counts"].items()}
                limit = local.same_batches(pool, counts, seconds) if row["batching"] else None
                row["inprocess_same_batches_sps"] = round(limit or base["throughput"], 1)
        baselines[name] = baseline
    floor_rows = {
        str(concurrency): {
            key: _median([c[key] for c in found], 3)
            for key in ("throughput_rps", "p50_ms", "server_cpu_us_per_request")
        }
        | {"errors": sum(c["errors"] for c in found)}
        for concurrency, found in floor_cells.items()
    }
    ratios_out = {k: round(statistics.median(v), 3) for k, v in ratios.items()}
    return rows, baselines, ratios_out, floor_rows


def _progress(
    repeat: int, name: str, protocol: str, concurrency: int, batching: bool, cell: dict
) -> str:
    mode = "on " if batching else "off"
    return (
        f"[{repeat + 1}] {name:15s} {protocol:6s} c={concurrency:<3d} batching {mode} "
        f"{cell['throughput_rps']:8.0f} req/s  p50 {cell['p50_ms']:7.3f} ms  "
        f"errors {cell['errors']}"
    )


def _target(value: float, op: str, target: float) -> dict[str, Any]:
    met = value >= target if op == ">=" else value <= target
    return {"value": round(value, 3), "target": f"{op} {target}", "met": met}


def _targets(
    rows: list[dict[str, Any]], baselines: dict[str, Any], ratios: dict[str, float]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, ratio in ratios.items():
        name, protocol, concurrency = key.split("/")
        if concurrency == "1":
            continue
        gaining = baselines[name]["gain_at_16"] >= TARGETS["gaining"]
        target = TARGETS["batching_ratio_gaining" if gaining else "batching_ratio"]
        out[f"{name}_{protocol}_c{concurrency}_batched_vs_unbatched"] = _target(ratio, ">=", target)
    for row in rows:
        name, protocol, mode = row["model"], row["protocol"], "on" if row["batching"] else "off"
        where = f"{name}_{protocol}_c{row['concurrency']}_batching_{mode}"
        # the latency target is for a batch-1 *binary* request; JSON's p50 is reported
        if row["concurrency"] == 1 and row["protocol"] == "binary" and row["p50_ms"] is not None:
            overhead = row["p50_ms"] - baselines[name]["p50_ms"]
            out[f"{where}_p50_overhead_ms"] = _target(overhead, "<=", TARGETS["overhead_p50_ms"])
        limit = row.get("inprocess_same_batches_sps")
        if row["concurrency"] == 64 and limit and row["throughput_rps"] is not None:
            share = row["throughput_rps"] / limit
            out[f"{where}_vs_inprocess"] = _target(share, ">=", TARGETS["vs_inprocess"])
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


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _format_row(row: dict[str, Any]) -> str:
    return "  ".join(
        _cell_text(row.get(key, "")).ljust(width)
        if key == "model"
        else _cell_text(row.get(key, "")).rjust(width)
        for key, _, width in _COLUMNS
    )


def format_report(report: dict[str, Any]) -> str:
    """The results table, the ratios, the in-process limits and the targets, as text."""
    header = "  ".join(
        label.ljust(w) if key == "model" else label.rjust(w) for key, label, w in _COLUMNS
    )
    lines = [header, "-" * len(header), *(_format_row(r) for r in report["rows"]), ""]
    lines.append("batched / unbatched throughput (median of the per-repeat ratios):")
    for key, ratio in report["batching_ratios"].items():
        lines.append(f"  {key:32s} {ratio:6.2f}")
    lines.append("")
    for name, base in report["inprocess_batch1"].items():
        lines.append(
            f"in-process onnxruntime {name} batch 1: p50 {base['p50_ms']:.3f} ms, "
            f"p99 {base['p99_ms']:.3f} ms, {base['throughput']:.0f} runs/s; "
            f"a sample costs {base['gain_at_16']:.2f}x less at batch {_GAIN_BATCH}"
        )
    for concurrency, floor in report["http_floor"].items():
        lines.append(
            f"HTTP floor (benchmarks.http_floor: uvicorn as served, an app answering 12 bytes) "
            f"c={concurrency}: p50 {_number(floor['p50_ms'], 3)} ms, "
            f"{_number(floor['throughput_rps'], 0)} req/s, "
            f"server {_number(floor['server_cpu_us_per_request'], 0)} us/request"
        )
    lines.append(f"placement: {report['metadata']['placement']}")
    lines.append("")
    met = sum(t["met"] for t in report["targets"].values())
    lines.append(f"targets: {met} of {len(report['targets'])} met")
    for key, t in report["targets"].items():
        outcome = verdict(t["met"])
        lines.append(f"  {key}: {t['value']} (target {t['target']}): {outcome}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the JSON report, print the table; return the report."""
    args = _parser().parse_args(argv)
    args.concurrency = QUICK_CONCURRENCY if args.quick else CONCURRENCY
    if args.quick:
        args.duration, args.repeats = min(args.duration, 0.2), 1
    cases = served_cases(args.models.split(",") if args.models else None)
    names = [case.network for case in cases]
    client_cpus, server_cpus = _placement(not args.no_pin)
    args.spin = client_cpus is not None  # a CPU of its own: the load generator never sleeps
    placement = (
        f"load generator on CPU {sorted(client_cpus)}, servers on CPUs {sorted(server_cpus)}"
        if client_cpus and server_cpus
        else "not pinned"
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp, ExitStack() as stack:
        repository = Path(args.repository) if args.repository else Path(tmp)
        missing = [n for n in names if not (repository / n / "config.pbtxt").is_file()]
        if missing:
            if args.repository:
                raise SystemExit(f"{args.repository} lacks {missing}")
            _log(f"exporting {', '.join(missing)} ...")
            _export(missing, repository)
        servers = {
            batching: stack.enter_context(
                _server(repository, args.threads, batching, server_cpus, args.busy_poll_us)
            )
            for batching in _MODES
        }
        floor = stack.enter_context(_floor(server_cpus))
        pin(client_cpus)
        rows, baselines, ratios, floor_rows = _measure(args, repository, cases, servers, floor)
    rows.sort(key=lambda r: (names.index(r["model"]), r["protocol"], not r["batching"],
                             r["concurrency"]))  # fmt: skip
    report = {
        "metadata": {
            **environment(),
            "threads": args.threads,
            "duration_s": args.duration,
            "repeats": args.repeats,
            "quick": args.quick,
            "placement": placement,
            "busy_poll_us": args.busy_poll_us,
            "client": "benchmarks.loadgen closed loop, one sample per request, same host"
            + (", polling without sleeping on its own CPU" if args.spin else ""),
            "elapsed_s": round(time.perf_counter() - started, 1),
        },
        "rows": rows,
        "batching_ratios": ratios,
        "inprocess_batch1": baselines,
        "http_floor": floor_rows,
        "targets": _targets(rows, baselines, ratios),
    }
    write_report(Path(args.out), report)
    print(format_report(report))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
