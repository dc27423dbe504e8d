"""Soak test: the real server, every zoo model, many clients, every answer checked.

    python -m benchmarks.soak --out reports/bench/soak.json [--duration 60] [--clients 64]
                               [--repository DIR] [--models a,b] [--threads 1]

The eight zoo models are exported (``python -m export --all``) into a temporary repository
unless ``--repository`` is given (then the zoo models it holds are used).  The server runs as a
subprocess (``python -m runtime serve``, :func:`benchmarks.serve._server`), so the resident
set sampled from ``/proc/<pid>/status`` every 0.5 s is the server's alone.

``--clients`` closed-loop aiohttp clients cycle over the models; even requests are JSON, odd
ones binary tensor data.  Each request comes from a pool built up front: per model, 5 shape
variants (``seq_len`` 1..64, image height/width 8..32, multiples of 4) x batch sizes 1, 2, 3,
4, 8 x 2 draws, each with its answer from a direct onnxruntime run of the same ``model.onnx``
on that request alone (same session options as the server).  Every served answer is compared
with it, although the server's dynamic batcher ran it merged with other requests.

Tolerance.  Answers must be bit-identical, except for the models in :data:`TOLERANCE_ULPS`,
where ``|served - direct| <= n * spacing(max |direct|)`` per sample (``n`` units in the last
place of the sample's largest output).  Measured with onnxruntime 1.32 on CPU, every batch size
1..64 at every shape above: all models are bit-identical whatever they are batched with, except
``cnn_sn``.  Its SwitchableNorm averages instance statistics over channels (``ReduceMean`` over
axis 1 of an ``(N, C, 1, 1)`` tensor), and onnxruntime sums that axis in a different order for
``N = 1`` than for ``N > 1`` (and differently again by ``N``): up to 4 ulps of the sample's
largest logit.  A row never depends on its neighbours' values, only on the batch size.

Report (JSON, ``--out``)::

    metadata        date, versions, cpus, threads, clients, duration_s, models, repository,
                    pool_per_model, batch_sizes, dims, tolerance_ulps
    requests, samples, elapsed_s
    throughput      {requests_per_s, samples_per_s}
    latency_ms      {p50, p99, json: {requests, p50, p99}, binary: {requests, p50, p99}}
    models          {name: {requests, samples, requests_per_s, samples_per_s, p50_ms, p99_ms,
                     server_runs, mean_server_batch (samples per onnxruntime run),
                     requests_per_server_run (> 1: requests were merged), max_error_ulps,
                     tolerance_ulps}}
    errors          {by_status: {"503": n}, transport: {"ServerDisconnectedError": n},
                     first: "..." | null}
    status_5xx      n
    wrong_answers   {count, first: {model, format, input_shape, batch, problem} | null}
    rss             {idle_baseline_mib, early_s, early_mib, end_s, end_mib, growth_mib,
                     peak_mib, samples: [[t_s, mib], ...]}   t from the start of the load
    passed          no wrong answer, no 5xx, no other failed request

``early_s`` is 10 s (``duration / 2`` for shorter runs), ``end_s`` the last sample of the load;
``growth_mib = end_mib - early_mib``.  The baseline is read after 1 s idle, models loaded, before
the first request.  Exit status 1 unless ``passed``: every request is valid, so a 4xx or a
dropped connection fails the run as much as a 5xx or a wrong answer does.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmarks.loadgen import Body, build_body, decode_output
from benchmarks.report import environment, write_report
from benchmarks.serve import _InProcess, _server, _stats

__all__ = ["BATCH_SIZES", "DIMS", "TOLERANCE_ULPS", "main"]

# model -> ulps of the sample's largest |output| (see the module docstring); others: bit-exact.
TOLERANCE_ULPS: dict[str, int] = {"cnn_sn": 4}
BATCH_SIZES = (1, 2, 3, 4, 8)
# Per symbolic dimension, the sizes the pool's shape variants take (variant k takes entry k).
# Token models' positional embedding has 64 positions, so seq_len <= 64; style_in downsamples
# twice by 2 and upsamples back, so height and width are multiples of 4.
DIMS: dict[str, tuple[int, ...]] = {
    "seq_len": (1, 5, 16, 33, 64),
    "height": (8, 12, 16, 24, 32),
    "width": (8, 20, 16, 32, 12),
}
_DRAWS = 2  # distinct inputs per (shape variant, batch size)
_RSS_PERIOD_S = 0.5
_EARLY_S = 10.0
_IDLE_S = 1.0
_MIB = 1024 * 1024


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Case:
    """One prebuilt request of the pool and its onnxruntime answer."""

    model: str
    batch: int
    input_shape: tuple[int, ...]
    json: Body
    binary: Body
    expected: np.ndarray


def _variants(dims: dict[str, int]) -> list[dict[str, int]]:
    """Shape variants: variant k gives each of the model's dimensions ``DIMS[name][k]``."""
    count = min((len(DIMS[d]) for d in dims if d in DIMS), default=1)
    return [{d: DIMS[d][k] for d in dims if d in DIMS} for k in range(count)]


def build_pool(name: str, model_path: Path, threads: int) -> list[Case]:
    """The requests of one zoo model, each answered by onnxruntime running it alone."""
    from normport.models import zoo  # lazy: torch, only to draw inputs the way the zoo does

    spec = zoo.get(name)
    (input_name,), (output_name,) = spec.input_names, spec.output_names
    direct = _InProcess(model_path, threads)
    pool = []
    for seed, (dims, batch, _) in enumerate(
        itertools.product(_variants(spec.dims), BATCH_SIZES, range(_DRAWS))
    ):
        (x,) = (t.numpy() for t in spec.example_inputs(batch, seed=seed, **dims))
        pool.append(
            Case(
                model=name,
                batch=batch,
                input_shape=tuple(x.shape),
                json=build_body(input_name, x, output_name, binary=False),
                binary=build_body(input_name, x, output_name, binary=True),
                expected=direct.run(x),
            )
        )
    return pool


def error_ulps(got: np.ndarray, want: np.ndarray) -> float:
    """Largest ``|got - want|`` in units of ``spacing(max |want|)`` of its sample (axis 0)."""
    diff = np.abs(got.astype(np.float64) - want).reshape(len(want), -1)
    scale = np.abs(want).reshape(len(want), -1).max(axis=1, keepdims=True)
    return float((diff / np.spacing(scale).astype(np.float64)).max(initial=0.0))


def check(case: Case, got: np.ndarray) -> tuple[float, str | None]:
    """``(error in ulps, problem)``; ``problem`` is None when the answer is right."""
    want = case.expected
    if got.shape != want.shape or got.dtype != want.dtype:
        expected = f"{want.dtype}{list(want.shape)}"
        return float("inf"), f"got {got.dtype}{list(got.shape)}, expected {expected}"
    tolerance = TOLERANCE_ULPS.get(case.model, 0)
    if tolerance == 0 and np.array_equal(got.view(np.uint32), want.view(np.uint32)):
        return 0.0, None
    ulps = error_ulps(got, want)
    if tolerance and ulps <= tolerance:
        return ulps, None
    diff = np.abs(got.astype(np.float64) - want)
    index = np.unravel_index(int(np.argmax(np.where(np.isnan(diff), np.inf, diff))), got.shape)
    return ulps, (
        f"{ulps:.3g} ulps > tolerance {tolerance}; worst at {list(map(int, index))}: "
        f"got {got[index]!r}, expected {want[index]!r}"
    )


@dataclass
class Tally:
    """Everything the clients saw."""

    latencies: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    samples: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    transport: Counter = field(default_factory=Counter)
    first_error: str | None = None
    wrong: int = 0
    first_wrong: dict[str, Any] | None = None
    max_ulps: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def error(self, key: str, text: str) -> None:
        self.first_error = self.first_error or f"{key}: {text}"

    def answer(self, case: Case, fmt: str, latency: float, got: np.ndarray | str) -> None:
        ulps, problem = (float("inf"), got) if isinstance(got, str) else check(case, got)
        self.latencies[case.model, fmt].append(latency)
        self.samples[case.model] += case.batch
        if ulps != float("inf"):
            self.max_ulps[case.model] = max(self.max_ulps[case.model], ulps)
        if problem is not None:
            self.wrong += 1
            self.first_wrong = self.first_wrong or {
                "model": case.model,
                "format": fmt,
                "input_shape": list(case.input_shape),
                "batch": case.batch,
                "problem": problem,
            }


async def drive(
    url: str, pools: dict[str, list[Case]], clients: int, duration_s: float
) -> tuple[Tally, float, float]:
    """``clients`` closed-loop workers for ``duration_s``: the tally, the start (perf_counter)
    and the seconds until the last worker finished."""
    tally, counter, names = Tally(), itertools.count(), sorted(pools)
    urls = {name: f"{url}/v2/models/{name}/infer" for name in names}
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        start = time.perf_counter()
        stop = start + duration_s

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.perf_counter() < stop:
                i = next(counter)
                fmt = "binary" if i % 2 else "json"
                case = rng.choice(pools[names[i // 2 % len(names)]])
                body = case.binary if i % 2 else case.json
                sent = time.perf_counter()
                try:
                    async with session.post(
                        urls[case.model], data=body.content, headers=body.headers
                    ) as r:
                        content, status = await r.read(), r.status
                        header = r.headers.get("Inference-Header-Content-Length")
                except (aiohttp.ClientError, TimeoutError) as e:
                    tally.transport[type(e).__name__] += 1
                    tally.error(type(e).__name__, str(e))
                    continue
                latency = time.perf_counter() - sent
                if status != 200:
                    tally.by_status[str(status)] += 1
                    tally.error(f"HTTP {status}", content[:300].decode(errors="replace"))
                    continue
                try:
                    got: np.ndarray | str = decode_output(content, header)
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    got = f"undecodable answer: {type(e).__name__}: {e}"
                tally.answer(case, fmt, latency, got)

        await asyncio.gather(*(worker(k) for k in range(clients)))
        return tally, start, time.perf_counter() - start


class RssSampler(threading.Thread):
    """VmRSS of ``pid`` every ``period_s`` seconds, as ``(perf_counter time, MiB)``."""

    def __init__(self, pid: int, period_s: float = _RSS_PERIOD_S) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid, self.period_s = pid, period_s
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()

    def read(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / _MIB
        raise RuntimeError(f"no VmRSS in /proc/{self.pid}/status")

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.perf_counter(), self.read()))
            self._halt.wait(self.period_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _rss_report(samples: list[tuple[float, float]], start: float, duration: float) -> dict:
    """RSS figures from ``samples`` (perf_counter time, MiB), the load having begun at ``start``."""
    relative = [(t - start, mib) for t, mib in samples]
    idle = [mib for t, mib in relative if t < 0]
    load = [(t, mib) for t, mib in relative if t >= 0]
    if not idle or not load:
        raise RuntimeError(f"too few RSS samples: {len(idle)} idle, {len(load)} under load")
    early_s = _EARLY_S if duration >= 2 * _EARLY_S else duration / 2
    _, early = min(load, key=lambda s: abs(s[0] - early_s))
    end_s, end = load[-1]
    return {
        "idle_baseline_mib": round(idle[-1], 1),
        "early_s": round(early_s, 1),
        "early_mib": round(early, 1),
        "end_s": round(end_s, 1),
        "end_mib": round(end, 1),
        "growth_mib": round(end - early, 1),
        "peak_mib": round(max(mib for _, mib in relative), 1),
        "samples": [[round(t, 2), round(mib, 1)] for t, mib in relative],
    }


def _ms(latencies: list[float], q: float) -> float | None:
    return round(float(np.percentile(latencies, q)) * 1e3, 3) if latencies else None


def _summary(tally: Tally, elapsed: float, runs: dict[str, dict[str, int]]) -> dict[str, Any]:
    every = [x for v in tally.latencies.values() for x in v]
    by_format = {
        fmt: [x for (_, f), v in tally.latencies.items() if f == fmt for x in v]
        for fmt in ("json", "binary")
    }
    models = {}
    for name in sorted(runs):
        mine = [x for (m, _), v in tally.latencies.items() if m == name for x in v]
        executions, inferences = runs[name]["execution_count"], runs[name]["inference_count"]
        models[name] = {
            "requests": len(mine),
            "samples": tally.samples[name],
            "requests_per_s": round(len(mine) / elapsed, 1),
            "samples_per_s": round(tally.samples[name] / elapsed, 1),
            "p50_ms": _ms(mine, 50),
            "p99_ms": _ms(mine, 99),
            "server_runs": executions,
            "mean_server_batch": round(inferences / executions, 2) if executions else None,
            "requests_per_server_run": round(len(mine) / executions, 2) if executions else None,
            "max_error_ulps": tally.max_ulps.get(name, 0.0),
            "tolerance_ulps": TOLERANCE_ULPS.get(name, 0),
        }
    status_5xx = sum(n for s, n in tally.by_status.items() if s.startswith("5"))
    return {
        "requests": len(every),
        "samples": sum(tally.samples.values()),
        "elapsed_s": round(elapsed, 2),
        "throughput": {
            "requests_per_s": round(len(every) / elapsed, 1),
            "samples_per_s": round(sum(tally.samples.values()) / elapsed, 1),
        },
        "latency_ms": {
            "p50": _ms(every, 50),
            "p99": _ms(every, 99),
            **{
                f: {"requests": len(v), "p50": _ms(v, 50), "p99": _ms(v, 99)}
                for f, v in by_format.items()
            },
        },
        "models": models,
        "errors": {
            "by_status": dict(sorted(tally.by_status.items())),
            "transport": dict(sorted(tally.transport.items())),
            "first": tally.first_error,
        },
        "status_5xx": status_5xx,
        "wrong_answers": {"count": tally.wrong, "first": tally.first_wrong},
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="reports/bench/soak.json")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--clients", type=int, default=64, help="concurrent closed-loop clients")
    p.add_argument("--repository", help="serve the zoo models this repository holds")
    p.add_argument("--models", help="comma-separated subset of the zoo models")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    return p


def _models(args: argparse.Namespace, repository: Path) -> list[str]:
    from normport.models import zoo

    known = zoo.names()
    wanted = [n for n in args.models.split(",") if n] if args.models else known
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SystemExit(f"unknown zoo model(s) {unknown}; known: {known}")
    present = [n for n in wanted if (repository / n / "config.pbtxt").is_file()]
    if not present or (args.models and len(present) < len(wanted)):
        raise SystemExit(f"{repository} lacks {sorted(set(wanted) - set(present)) or wanted}")
    return present


def _export_zoo(root: Path) -> None:
    """``python -m export --all --out root`` (the zoo as ``make export`` writes it)."""
    _log(f"exporting the zoo into {root} ...")
    done = subprocess.run(
        [sys.executable, "-m", "export", "--all", "--out", str(root)], stdout=sys.stderr
    )
    if done.returncode != 0:
        raise SystemExit(f"python -m export --all failed (exit status {done.returncode})")


def _check_ready(url: str, names: list[str]) -> None:
    for name in names:
        try:
            with urllib.request.urlopen(f"{url}/v2/models/{name}/ready", timeout=10) as r:
                r.read()
        except OSError as e:
            raise SystemExit(f"model {name} is not ready on the server: {e}") from None


def soak(args: argparse.Namespace, repository: Path) -> dict[str, Any]:
    """Build the pools, start the server, run the load; returns the report (no ``metadata``)."""
    names = _models(args, repository)
    _log(f"building request pools for {', '.join(names)} ...")
    pools = {n: build_pool(n, repository / n / "1" / "model.onnx", args.threads) for n in names}
    with _server(repository, args.threads, batching=True) as (url, pid):
        _check_ready(url, names)
        sampler = RssSampler(pid)
        sampler.start()
        time.sleep(_IDLE_S)
        _log(f"load: {args.clients} clients, {args.duration:g} s, server pid {pid}")
        tally, start, elapsed = asyncio.run(drive(url, pools, args.clients, args.duration))
        sampler.stop()
        runs = {n: _stats(url, n) for n in names}
    report = _summary(tally, elapsed, runs)
    report["rss"] = _rss_report(sampler.samples, start, args.duration)
    errors = sum(tally.by_status.values()) + sum(tally.transport.values())
    report["passed"] = tally.wrong == 0 and errors == 0
    report["pool_per_model"] = {n: len(p) for n, p in pools.items()}
    return report


def format_summary(report: dict[str, Any]) -> str:
    """A few lines: throughput, latency, errors, wrong answers, RSS, one line per model."""
    lat, rss, wrong = report["latency_ms"], report["rss"], report["wrong_answers"]
    lines = [
        f"{report['requests']} requests ({report['samples']} samples) in "
        f"{report['elapsed_s']} s: {report['throughput']['requests_per_s']} req/s, "
        f"{report['throughput']['samples_per_s']} samples/s",
        f"latency p50/p99 ms: all {lat['p50']}/{lat['p99']}, json {lat['json']['p50']}/"
        f"{lat['json']['p99']}, binary {lat['binary']['p50']}/{lat['binary']['p99']}",
        f"errors: {report['errors']['by_status'] or 'none'} {report['errors']['transport'] or ''}"
        f"  5xx: {report['status_5xx']}  wrong answers: {wrong['count']}",
        f"server RSS MiB: idle {rss['idle_baseline_mib']}, at {rss['early_s']} s "
        f"{rss['early_mib']}, at {rss['end_s']} s {rss['end_mib']} "
        f"(growth {rss['growth_mib']}), peak {rss['peak_mib']}",
    ]
    for name, m in report["models"].items():
        lines.append(
            f"  {name:15s} {m['requests_per_s']:7} req/s {m['samples_per_s']:8} samples/s  "
            f"p50 {m['p50_ms']} p99 {m['p99_ms']} ms  req/run {m['requests_per_server_run']}  "
            f"max err {m['max_error_ulps']:g}/{m['tolerance_ulps']} ulps"
        )
    if wrong["first"]:
        lines.append(f"first wrong answer: {wrong['first']}")
    if report["errors"]["first"]:
        lines.append(f"first error: {report['errors']['first']}")
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak, write the JSON report, print a summary; 0 when it passed, else 1."""
    args = _parser().parse_args(argv)
    if args.duration <= 0 or args.clients <= 0:
        raise SystemExit("--duration and --clients must be > 0")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        repository = Path(args.repository) if args.repository else Path(tmp)
        if not args.repository:
            _export_zoo(repository)
        report = soak(args, repository)
    report = {
        "metadata": {
            **environment(),
            "threads": args.threads,
            "clients": args.clients,
            "duration_s": args.duration,
            "models": list(report["models"]),
            "pool_per_model": report.pop("pool_per_model"),
            "repository": args.repository or "exported (python -m export --all)",
            "batch_sizes": list(BATCH_SIZES),
            "dims": {k: list(v) for k, v in DIMS.items()},
            "tolerance_ulps": TOLERANCE_ULPS,
            "elapsed_s": round(time.perf_counter() - started, 1),
        },
        **report,
    }
    write_report(Path(args.out), report)
    print(format_summary(report))
    print(f"wrote {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
