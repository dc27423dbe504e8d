"""``python -m runtime serve``: serve a model repository over the Open Inference Protocol.

    python -m runtime serve [--repository model_repository] [--host 127.0.0.1] [--port 8000]
                            [options]   (``--help`` lists every flag with its default)

Binds 127.0.0.1 unless told otherwise; ``--port 0`` takes a free port, which the log line
``serving on http://HOST:PORT`` and ``--port-file`` report.  The time and connection bounds
(timeouts, header size, connection cap) are described in :mod:`runtime.serve.limits`.

SIGINT/SIGTERM stop accepting connections, answer 503 to requests still being received, let the
requests in flight finish (at most ``--exit-timeout`` seconds: then uvicorn cancels them), stop
the onnxruntime workers and exit with status 0, at the latest 2 s after the exit timeout even
if an onnxruntime run is still going (:class:`runtime.serve.server.Server`).  Exit status 2
for bad arguments (a repository that is not a folder, a port outside 0-65535: one line
``error: ...`` before any work), 3 when the address cannot be bound.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from normport.runtime.serve import argtypes, busypoll
from normport.runtime.serve.admission import format_bytes
from normport.runtime.serve.app import create_app
from normport.runtime.serve.body import DEFAULT_MAX_BODY_BYTES
from normport.runtime.serve.limits import FD_RESERVE, HttpLimits, connection_cap, raise_fd_limit
from normport.runtime.serve.probe import DEFAULT_TIMEOUT_S as DEFAULT_LOAD_TIMEOUT_S
from normport.runtime.serve.probe_cache import default_folder
from normport.runtime.serve.repository import default_memory_budget
from normport.runtime.serve.server import Server, serve_until_signalled, uvicorn_config

__all__ = ["limits_from_args", "main", "uvicorn_config"]  # uvicorn_config: from .server

log = logging.getLogger(__name__)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_DEFAULTS = HttpLimits()

EPILOG = """\
examples:
  python -m export --all --out model_repository    # a repository of every zoo network
  python -m runtime serve                          # serves it on 127.0.0.1:8000
  python -m runtime serve --repository repo --port 0 --port-file repo.port
  python -m runtime serve --memory-budget 8GiB --model-memory-budget 2GiB --threads 2

exit status: 0 after SIGINT/SIGTERM (in-flight requests finished), 2 bad arguments,
3 the address cannot be bound.
"""


# One flag per HttpLimits field, named after it: (field, type, metavar, help).
_LIMIT_FLAGS = (
    ("header_timeout", argtypes.seconds, "S",
     "from connection open (or a later request's first byte) to the end of its headers, "
     "else 408 (default: %(default)s)"),
    ("body_timeout", argtypes.seconds, "S",
     "longest wait for more body bytes, else 408 (default: %(default)s)"),
    ("body_deadline", argtypes.seconds, "S",
     "from the end of the headers to the end of the body, else 408 (default: %(default)s)"),
    ("keep_alive_timeout", argtypes.seconds, "S",
     "idle time after a response before the connection closes (default: %(default)s)"),
    ("max_header_bytes", argtypes.positive, "N",
     "request line and headers limit, else 431 (default: %(default)s)"),
    ("max_connections", argtypes.non_negative, "N",
     "open connections limit, else 503 (default: %(default)s: the file-descriptor limit, "
     f"raised to its hard value, less {FD_RESERVE})"),
    ("exit_timeout", argtypes.seconds, "S",
     "on SIGTERM/SIGINT, how long requests in flight may take to finish (default: %(default)s)"),
)  # fmt: skip


def _add_limits(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection limits (see runtime/serve/limits.py)")
    for field, kind, metavar, text in _LIMIT_FLAGS:
        flag = "--" + field.replace("_", "-")
        g.add_argument(
            flag, type=kind, default=getattr(_DEFAULTS, field), metavar=metavar, help=text
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime serve",
        usage="%(prog)s [--repository DIR] [--host HOST] [--port PORT] [options]",
        description="Serve a Triton-layout model repository with onnxruntime over the Open\n"
        "Inference Protocol (KServe v2 / Triton HTTP).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--repository", type=argtypes.folder, default="model_repository", metavar="DIR",
        help="model repository folder, Triton layout (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument(
        "--port", type=argtypes.port, default=8000,
        help="port to bind, 0 for any free one (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--port-file", type=argtypes.writable_file, metavar="PATH",
        help="write the bound port here once serving (for --port 0; default: none)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=argtypes.non_negative, default=0, metavar="N",
        help="onnxruntime intra-op threads per model, 0 for onnxruntime's choice "
        "(default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--max-body-bytes", type=argtypes.positive, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
        help="request body limit, compressed and decompressed, else 413 (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--no-batching", action="store_true",
        help="turn dynamic batching off (default: on where config.pbtxt asks for it)",
    )  # fmt: skip
    p.add_argument(
        "--busy-poll-us", type=argtypes.busy_poll_us,
        default=round(busypoll.DEFAULT_WINDOW_S * 1e6), metavar="US",
        help="after answering an infer request whose client came back within this many "
        "microseconds, poll for the next one without sleeping for as long (lower latency for "
        "a close client, at most that much CPU per request); 0: never (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--strict-readiness", action="store_true",
        help="ready only when every model loaded (default: ready when the server is up)",
    )  # fmt: skip
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="(default: %(default)s)")
    _add_limits(p)
    _add_memory(p)
    return p


def _add_memory(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory and loading (see runtime/serve/admission.py)")
    g.add_argument(
        "--memory-budget", type=argtypes.size, default=None, metavar="SIZE",
        help="estimated bytes all requests in flight may hold together, e.g. 8GiB; over it "
        "503, or 413 when one request alone is over (default: half the machine's memory, "
        f"here {format_bytes(default_memory_budget())})",
    )  # fmt: skip
    g.add_argument(
        "--model-memory-budget", type=argtypes.size, default=None, metavar="SIZE",
        help="the same for each model's requests and batches, unless its config.pbtxt sets "
        "parameter normport.memory_budget (default: --memory-budget)",
    )  # fmt: skip
    g.add_argument(
        "--load-timeout", type=argtypes.seconds, default=DEFAULT_LOAD_TIMEOUT_S, metavar="S",
        help="seconds each model may take to load and calibrate in its probe process, else "
        "it is UNAVAILABLE (default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--probe-cache", type=Path, default=default_folder(), metavar="DIR",
        help="keep each model's probe result here, keyed by its bytes, config, onnxruntime "
        "version and settings, so that a restart skips the probes of unchanged models "
        "(default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--no-probe-cache", action="store_true",
        help="probe every model at every start, and keep nothing (default: keep)",
    )  # fmt: skip


def limits_from_args(args: argparse.Namespace) -> HttpLimits:
    """The :class:`HttpLimits` named by the parsed flags."""
    return HttpLimits(**{field: getattr(args, field) for field, *_ in _LIMIT_FLAGS})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    limits = limits_from_args(args)
    soft, hard = raise_fd_limit()
    cap = connection_cap(limits.max_connections)
    log.info("RLIMIT_NOFILE soft %d hard %d: at most %d open connections", soft, hard, cap)
    if 0 < soft - FD_RESERVE < cap:
        log.warning("--max-connections %d: over the file-descriptor limit %d less %d", cap, soft,
                    FD_RESERVE)  # fmt: skip
    try:
        app = create_app(
            args.repository,
            threads=args.threads,
            max_body_bytes=args.max_body_bytes,
            batching=not args.no_batching,
            strict_readiness=args.strict_readiness,
            memory_budget=args.memory_budget,
            model_memory_budget=args.model_memory_budget,
            load_timeout=args.load_timeout,
            probe_cache=None if args.no_probe_cache else args.probe_cache,
            busy_poll_s=args.busy_poll_us / 1e6,
        )
    except ValueError as e:
        parser.error(str(e))
    config = uvicorn_config(app, args.host, args.port, args.log_level, limits=limits)
    serve_until_signalled(Server(config, port_file=args.port_file))
    return 0
