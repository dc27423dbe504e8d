"""normport's server side by side with KServe's Python model server, on the same model files.

    python -m benchmarks.kserve [--out reports/bench/kserve.json] [--venv reports/kserve-venv]
                                [--repository DIR] [--models a,b] [--threads 1]
                                [--duration 2] [--repeats 3] [--quick] [--no-pin]

KServe runs in a virtual environment of its own (``--venv``; built on first use with
``pip install kserve==0.21.0 onnxruntime==<ours> numpy``, which must not bring torch), serving
each ``model.onnx`` through a small ``kserve.Model`` (this file, run by that environment's
Python with ``--kserve-server``) whose onnxruntime session has normport's options
(:mod:`runtime.serve.session`: all graph optimizations, ``--threads`` intra-op threads, one
inter-op thread, no CPU memory arena).  Both servers: one worker, one process, logs at warning
and no per-request logging; normport as its command line starts it (dynamic batching as the
configs ask).  Without the KServe environment (no network to build it) the benchmark says so
and writes a report marked ``skipped``: it does not fail.

One client (:mod:`benchmarks.loadgen`, pinned and polling as in :mod:`benchmarks.serve`) drives
both over OIP v2 REST, interleaved: every repeat runs each model x protocol (JSON, binary) x
concurrency (1, 16, 64) on both servers, in alternating order. Rows: throughput, p50 and p99
(medians of the repeats), the servers' start (process start to every model ready: normport's
first start probes its models, its restart reads the probe cache) and RSS (after the load), each
with the ratio normport / KServe turned so that above 1 means normport is better. Target: at
least 1.5 on every row.
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
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

__all__ = ["KSERVE", "TARGET", "main", "venv_python"]

KSERVE = "kserve==0.21.0"
TARGET = 1.5  # normport better by this factor on every row
CONCURRENCY = (1, 16, 64)
DEFAULT_MODELS = ("cnn_bn", "transformer_ln")
_CONFIG_ENV = "NORMPORT_KSERVE_CONFIG"  # the server's settings (kserve parses sys.argv itself)
_INSTALL_TIMEOUT_S = 900


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the KServe side: runs in KServe's environment, which has no normport --------------------


def _kserve_server() -> None:
    """``<venv>/bin/python benchmarks/kserve.py --kserve-server``: serve the models named in
    ``$NORMPORT_KSERVE_CONFIG`` with KServe (imports only kserve, onnxruntime, numpy)."""
    import logging

    import kserve
    import onnxruntime as ort
    from kserve import InferOutput, InferRequest, InferResponse
    from kserve.utils.utils import generate_uuid

    config = json.loads(os.environ[_CONFIG_ENV])

    class OnnxModel(kserve.Model):  # type: ignore[misc]  # untyped third-party base
        def __init__(self, name: str, path: str) -> None:
            super().__init__(name)
            self.path = path
            self.load()

        def load(self) -> bool:
            options = ort.SessionOptions()  # normport's (runtime/serve/session.py)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = config["threads"]
            options.inter_op_num_threads = 1
            options.enable_cpu_mem_arena = False
            options.log_severity_level = 4
            self.session = ort.InferenceSession(
                self.path, options, providers=["CPUExecutionProvider"]
            )
            self.outputs = [o.name for o in self.session.get_outputs()]
            self.ready = True
            return True

        def predict(
            self,
            payload: InferRequest,
            headers: dict[str, str] | None = None,
            response_headers: dict[str, str] | None = None,
        ) -> InferResponse:
            feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
            values = self.session.run(self.outputs, feeds)
            outputs = []
            for name, value in zip(self.outputs, values, strict=True):
                output = InferOutput(name=name, shape=list(value.shape), datatype="FP32")
                output.set_data_from_numpy(value, binary_data=False)
                outputs.append(output)
            return InferResponse(
                response_id=payload.id or generate_uuid(),  # as KServe's own models do
                model_name=self.name,
                infer_outputs=outputs,
                use_binary_outputs=payload.use_binary_outputs,
                requested_outputs=payload.request_outputs,
            )

    models = [OnnxModel(name, path) for name, path in config["models"].items()]
    server = kserve.ModelServer(
        http_port=config["port"], workers=1, enable_grpc=False, enable_latency_logging=False
    )
    # after ModelServer, which configures logging: warnings only, no line per request
    for name in ("", "kserve", "kserve.trace", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start(models)


# -- the environment ---------------------------------------------------------------------------


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _works(python: Path) -> str | None:
    """None when ``python`` imports kserve and onnxruntime and has no torch; else why not."""
    if not python.is_file():
        return f"{python} does not exist"
    check = (
        "import importlib.util, kserve, onnxruntime, numpy; "
        "assert importlib.util.find_spec('torch') is None, 'kserve brought torch'"
    )
    done = subprocess.run([str(python), "-c", check], capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]


def ensure_venv(venv: Path) -> str | None:
    """Build (once) the KServe environment at ``venv``; None when it works, else the reason
    it could not be built."""
    python = venv_python(venv)
    if _works(python) is None:
        return None
    import onnxruntime

    packages = [KSERVE, f"onnxruntime=={onnxruntime.__version__}", "numpy"]
    _log(f"building the KServe environment in {venv}: pip install {' '.join(packages)}")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *packages,
            ],
            check=True,
            timeout=_INSTALL_TIMEOUT_S,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    except subprocess.CalledProcessError as e:
        detail = (e.stderr or "").strip().splitlines()[-1:] or [str(e)]
        return f"pip could not install {KSERVE} ({detail[0]})"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not build the environment: {e}"
    return _works(python)


# -- servers -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except OSError:
        return 0


def _rss_mb(pid: int) -> float:
    """The resident memory of ``pid`` and its live descendants, MiB (Linux ``/proc``)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


@contextmanager
def _started(
    command: list[str], models: Sequence[str], port: int, cpus: set[int] | None, **popen: Any
) -> Iterator[tuple[str, int, float]]:
    """Start a server; yields its URL, pid and the seconds until every model was ready."""
    from benchmarks.servers import stop  # not at the top: KServe's side runs without normport

    start = time.perf_counter()
    process = subprocess.Popen(command, **popen)
    if cpus is not None:
        os.sched_setaffinity(process.pid, cpus)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not all(_get(f"{url}/v2/models/{m}/ready") == 200 for m in models):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]}: the server did not start")
            time.sleep(0.02)
        yield url, process.pid, time.perf_counter() - start
    finally:
        stop(process)


def _normport(
    repository: Path,
    models: Sequence[str],
    args: argparse.Namespace,
    cache: Path,
    cpus: set[int] | None,
) -> AbstractContextManager[tuple[str, int, float]]:
    """``python -m runtime serve`` as its command line starts it, with its own probe cache."""
    port = _free_port()
    command = [sys.executable, "-m", "runtime", "serve", "--repository", str(repository)]
    command += ["--port", str(port), "--threads", str(args.threads), "--log-level", "warning"]
    command += ["--probe-cache", str(cache)]
    return _started(command, models, port, cpus)


def _kserve(
    repository: Path, models: Sequence[str], args: argparse.Namespace, cpus: set[int] | None
) -> AbstractContextManager[tuple[str, int, float]]:
    """KServe's model server, this file run by its environment's Python."""
    port = _free_port()
    config = {
        "port": port,
        "threads": args.threads,
        "models": {m: str(repository / m / "1" / "model.onnx") for m in models},
    }
    # -P: this file is named kserve.py; its folder must not shadow the kserve package
    command = [str(venv_python(args.venv)), "-P", str(Path(__file__).resolve()), "--kserve-server"]
    env = {**os.environ, _CONFIG_ENV: json.dumps(config), "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    return _started(command, models, port, cpus, env=env, cwd=tempfile.gettempdir())


# -- measuring ---------------------------------------------------------------------------------


def _ratio(normport: float, kserve: float, higher_is_better: bool) -> float | None:
    if not normport or not kserve:
        return None
    return normport / kserve if higher_is_better else kserve / normport


def _compare(
    what: str, normport: float, kserve: float, higher_is_better: bool, unit: str
) -> dict[str, Any]:
    ratio = _ratio(normport, kserve, higher_is_better)
    return {
        "row": what,
        "unit": unit,
        "normport": round(normport, 3),
        "kserve": round(kserve, 3),
        "ratio": None if ratio is None else round(ratio, 2),
        "target": f">= {TARGET}",
        "met": ratio is not None and ratio >= TARGET,
    }


def _bodies(args: argparse.Namespace, repository: Path) -> tuple[dict, dict]:
    """The request of each (model, protocol), and what onnxruntime answers to it."""
    import numpy as np

    from benchmarks.loadgen import build_body
    from benchmarks.serve import _InProcess  # the inputs of the serve benchmark

    rng = np.random.default_rng(0)
    bodies, expected = {}, {}
    for name in args.models:
        local = _InProcess(repository / name / "1" / "model.onnx", args.threads)
        x = local.pool(rng, _sample_shape(name))[:1]
        expected[name] = local.run(x)
        for protocol in ("json", "binary"):
            binary = protocol == "binary"
            body = build_body(local.input_name, x, local.output_name, binary=binary)
            bodies[name, protocol] = body
    return bodies, expected


def _check(servers: dict[str, str], bodies: dict, expected: dict) -> None:
    """Both servers answer every request as onnxruntime does."""
    import numpy as np

    from benchmarks.loadgen import decode_output

    for (name, protocol), body in bodies.items():
        for side, url in servers.items():
            request = urllib.request.Request(
                f"{url}/v2/models/{name}/infer", data=body.content, headers=body.headers
            )
            with urllib.request.urlopen(request, timeout=30) as r:
                got = decode_output(r.read(), r.headers.get("Inference-Header-Content-Length"))
            if not np.allclose(got, expected[name], rtol=1e-5, atol=1e-6):
                raise RuntimeError(f"{side}, {name} ({protocol}): not onnxruntime's answer")


def _load_rows(
    args: argparse.Namespace, servers: dict[str, str], bodies: dict
) -> list[dict[str, Any]]:
    """Every cell on both servers, interleaved; a throughput, p50 and p99 row per cell."""
    from benchmarks.loadgen import LoadResult, run, run_load

    results: dict[tuple[str, str, int, str], list[LoadResult]] = {}
    for repeat in range(args.repeats):
        order = list(servers) if repeat % 2 == 0 else list(servers)[::-1]
        for (name, protocol), body in bodies.items():
            for concurrency in args.concurrency:
                for side in order:
                    url = f"{servers[side]}/v2/models/{name}/infer"
                    load = run(
                        run_load(
                            url,
                            [body],
                            concurrency=concurrency,
                            duration_s=args.duration,
                            spin=args.spin,
                        )
                    )
                    if load.errors:
                        raise RuntimeError(f"{side}, {name}: {load.first_error}")
                    results.setdefault((name, protocol, concurrency, side), []).append(load)
                    _log(
                        f"[{repeat + 1}] {side:8s} {name:15s} {protocol:6s} c={concurrency:<3d} "
                        f"{load.throughput:8.0f} req/s  p50 {load.percentile_ms(50):.3f} ms"
                    )

    def median(cell: tuple[str, str, int], side: str, metric: str) -> float:
        loads = results[(*cell, side)]
        if metric == "throughput":
            return statistics.median(load.throughput for load in loads)
        return statistics.median(load.percentile_ms(float(metric[1:])) for load in loads)

    rows = []
    for name, protocol in bodies:
        for concurrency in args.concurrency:
            cell = (name, protocol, concurrency)
            for metric, unit in (("throughput", "req/s"), ("p50", "ms"), ("p99", "ms")):
                rows.append(
                    _compare(
                        f"{name} {protocol} c={concurrency} {metric}",
                        median(cell, "normport", metric),
                        median(cell, "kserve", metric),
                        higher_is_better=metric == "throughput",
                        unit=unit,
                    )
                )
    return rows


def _sample_shape(name: str) -> tuple[int, ...]:
    from benchmarks.cases import SERVED

    return next(case.sample_shape for case in SERVED if case.network == name)


def _export(names: Sequence[str], root: Path) -> None:
    from benchmarks.serve import _export as export

    export(list(names), root)


def _starts(
    args: argparse.Namespace, repository: Path, cache: Path, cpus: set[int] | None
) -> dict[str, list[float]]:
    """Seconds from process start to every model ready, each server alone on the machine,
    alternating: KServe; normport's first start (probing) and its restarts (probe cache)."""
    starts: dict[str, list[float]] = {"kserve": [], "normport": [], "normport_restart": []}
    for _ in range(args.starts):
        with _kserve(repository, args.models, args, cpus) as (_, _, seconds):
            starts["kserve"].append(seconds)
        with _normport(repository, args.models, args, cache, cpus) as (_, _, seconds):
            starts["normport_restart" if starts["normport"] else "normport"].append(seconds)
    return starts


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """The rows of the report (KServe's environment is there)."""
    from benchmarks.loadgen import pin
    from benchmarks.serve import _placement

    client_cpus, server_cpus = _placement(not args.no_pin)
    args.spin = client_cpus is not None  # a CPU of its own: the load generator never sleeps
    with tempfile.TemporaryDirectory(prefix="kserve-bench-") as tmp, ExitStack() as stack:
        repository = Path(args.repository) if args.repository else Path(tmp) / "repo"
        missing = [n for n in args.models if not (repository / n / "config.pbtxt").is_file()]
        if missing:
            if args.repository:
                raise SystemExit(f"{args.repository} lacks {missing}")
            _log(f"exporting {', '.join(missing)} ...")
            _export(missing, repository)
        cache = Path(tmp) / "probe-cache"
        starts = _starts(args, repository, cache, server_cpus)
        np_url, np_pid, _ = stack.enter_context(
            _normport(repository, args.models, args, cache, server_cpus)
        )
        ks_url, ks_pid, _ = stack.enter_context(_kserve(repository, args.models, args, server_cpus))
        servers = {"normport": np_url, "kserve": ks_url}
        bodies, expected = _bodies(args, repository)
        _check(servers, bodies, expected)
        pin(client_cpus)
        rows = _load_rows(args, servers, bodies)
        rss = _compare("RSS after the load", _rss_mb(np_pid), _rss_mb(ks_pid), False, "MiB")
    kserve_start = statistics.median(starts["kserve"])
    rows += [
        rss,
        _compare(
            "start, first (normport probes)",
            statistics.median(starts["normport"]),
            kserve_start,
            False,
            "s",
        ),
    ]
    if starts["normport_restart"]:
        rows.append(
            _compare(
                "start, restart (probe cache)",
                statistics.median(starts["normport_restart"]),
                kserve_start,
                False,
                "s",
            )
        )
    placement = (
        f"load generator on CPU {sorted(client_cpus)}, servers on CPUs {sorted(server_cpus)}"
        if client_cpus and server_cpus
        else "not pinned"
    )
    return {"rows": rows, "placement": placement}


def format_report(report: dict[str, Any]) -> str:
    from benchmarks.report import verdict

    if report.get("skipped"):
        return f"KServe side by side skipped: {report['skipped']}"
    lines = [f"{'row':44s} {'normport':>10s} {'kserve':>10s} {'ratio':>6s}  target"]
    for row in report["rows"]:
        outcome = verdict(row["met"])
        lines.append(
            f"{row['row'] + ' (' + row['unit'] + ')':44s} {row['normport']:>10} "
            f"{row['kserve']:>10} {row['ratio']!s:>6}  {row['target']}: {outcome}"
        )
    met = sum(row["met"] for row in report["rows"])
    lines.append(
        f"\nratio: normport / KServe, turned so that above 1 means normport is better;"
        f" {met} of {len(report['rows'])} rows meet the target"
    )
    lines.append(f"placement: {report['metadata']['placement']}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.kserve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="reports/bench/kserve.json")
    p.add_argument(
        "--venv",
        type=Path,
        default=Path("reports/kserve-venv"),
        help="KServe's environment, built there when missing (default: %(default)s)",
    )
    p.add_argument("--repository", help="a repository holding the models (else exported)")
    p.add_argument("--models", help=f"comma-separated (default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--duration", type=float, default=2.0, help="seconds measured per cell")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians)")
    p.add_argument("--starts", type=int, default=2, help="starts of each server (timed)")
    p.add_argument("--quick", action="store_true", help="0.2 s cells, concurrency 1, one round")
    p.add_argument("--no-pin", action="store_true", help="leave CPU placement to the OS")
    p.add_argument("--kserve-server", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the side by side (or skip it, saying why), write the JSON report, print it."""
    args = _parser().parse_args(argv)
    if args.kserve_server:
        _kserve_server()
        return {}
    from benchmarks.report import environment, write_report

    args.venv = args.venv.absolute()  # KServe runs from another folder
    args.models = args.models.split(",") if args.models else list(DEFAULT_MODELS)
    args.concurrency = (1,) if args.quick else CONCURRENCY
    if args.quick:
        args.duration, args.repeats, args.starts = min(args.duration, 0.2), 1, 1
    started = time.perf_counter()
    metadata = {
        **environment(),
        "kserve": KSERVE,
        "threads": args.threads,
        "duration_s": args.duration,
        "repeats": args.repeats,
        "venv": str(args.venv),
    }
    reason = ensure_venv(args.venv)
    if reason is not None:
        report: dict[str, Any] = {"metadata": metadata, "skipped": reason, "rows": []}
    else:
        result = run_benchmark(args)
        metadata |= {"placement": result["placement"]}
        metadata["elapsed_s"] = round(time.perf_counter() - started, 1)
        report = {"metadata": metadata, "rows": result["rows"]}
    write_report(Path(args.out), report)
    print(format_report(report))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    if "--kserve-server" in sys.argv:  # in KServe's environment: no normport, no benchmarks
        _kserve_server()
    else:
        main()
