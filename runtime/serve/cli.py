"""``python -m runtime serve``: serve a model repository over the Open Inference Protocol.

    python -m runtime serve [--repository model_repository] [--host 127.0.0.1] [--port 8000]
                            [--port-file PATH] [--threads N] [--max-body-bytes N]
                            [--no-batching] [--strict-readiness] [--log-level info]
                            [--header-timeout S] [--body-timeout S] [--body-deadline S]
                            [--keep-alive-timeout S] [--max-header-bytes N]
                            [--max-connections N] [--exit-timeout S]

Binds 127.0.0.1 unless told otherwise; ``--port 0`` takes a free port, which the log line
``serving on http://HOST:PORT`` and ``--port-file`` report.  The time and connection bounds
(timeouts, header size, connection cap) are described in :mod:`runtime.serve.limits`.

SIGINT/SIGTERM stop accepting connections, answer 503 to requests still being received, let the
requests in flight finish (at most ``--exit-timeout`` seconds: then uvicorn cancels them), stop
the onnxruntime workers and exit with status 0, at the latest 2 s after the exit timeout even
if an onnxruntime run is still going (:class:`runtime.serve.server.Server`).  Exit status 2
for bad arguments (including a repository folder that does not exist), 3 when the address
cannot be bound.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence

from runtime.serve.admission import format_bytes, parse_bytes
from runtime.serve.app import create_app
from runtime.serve.body import DEFAULT_MAX_BODY_BYTES
from runtime.serve.limits import FD_RESERVE, HttpLimits, connection_cap, raise_fd_limit
from runtime.serve.probe import DEFAULT_TIMEOUT_S as DEFAULT_LOAD_TIMEOUT_S
from runtime.serve.repository import default_memory_budget
from runtime.serve.server import Server, serve_until_signalled, uvicorn_config

__all__ = ["limits_from_args", "main", "uvicorn_config"]  # uvicorn_config: from .server

log = logging.getLogger(__name__)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_DEFAULTS = HttpLimits()


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def _add_limits(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    g = p.add_argument_group("connection limits (see runtime/serve/limits.py)")
    g.add_argument(
        "--header-timeout", type=_seconds, default=d.header_timeout, metavar="S",
        help="from connection open (or a later request's first byte) to the end of its headers, "
        f"else 408 (default {d.header_timeout:g})",
    )  # fmt: skip
    g.add_argument(
        "--body-timeout", type=_seconds, default=d.body_timeout, metavar="S",
        help=f"longest wait for more body bytes, else 408 (default {d.body_timeout:g})",
    )  # fmt: skip
    g.add_argument(
        "--body-deadline", type=_seconds, default=d.body_deadline, metavar="S",
        help=f"from the end of the headers to the end of the body, else 408 "
        f"(default {d.body_deadline:g})",
    )  # fmt: skip
    g.add_argument(
        "--keep-alive-timeout", type=_seconds, default=d.keep_alive_timeout, metavar="S",
        help=f"idle time after a response before the connection closes "
        f"(default {d.keep_alive_timeout:g})",
    )  # fmt: skip
    g.add_argument(
        "--max-header-bytes", type=_positive, default=d.max_header_bytes, metavar="N",
        help=f"request line and headers limit, else 431 (default {d.max_header_bytes})",
    )  # fmt: skip
    g.add_argument(
        "--max-connections", type=_non_negative, default=d.max_connections, metavar="N",
        help="open connections limit, else 503 (default 0: the file-descriptor limit, "
        "raised to its hard value, less 64)",
    )  # fmt: skip
    g.add_argument(
        "--exit-timeout", type=_seconds, default=d.exit_timeout, metavar="S",
        help="on SIGTERM/SIGINT, how long requests in flight may take to finish "
        f"(default {d.exit_timeout:g})",
    )  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime serve",
        description="Serve a Triton-layout model repository with onnxruntime over the Open "
        "Inference Protocol (KServe v2 / Triton HTTP).",
    )
    p.add_argument("--repository", default="model_repository", help="model repository folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free)")
    p.add_argument("--port-file", help="write the bound port here once serving (for --port 0)")
    p.add_argument(
        "--threads", type=int, default=0, help="onnxruntime intra-op threads per model (0: auto)"
    )
    p.add_argument(
        "--max-body-bytes",
        type=_positive,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"request body limit, compressed and decompressed (default {DEFAULT_MAX_BODY_BYTES})",
    )
    p.add_argument("--no-batching", action="store_true", help="turn dynamic batching off")
    p.add_argument(
        "--strict-readiness", action="store_true", help="ready only when every model loaded"
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    _add_limits(p)
    _add_memory(p)
    return p


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_memory(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory and loading (see runtime/serve/admission.py)")
    g.add_argument(
        "--memory-budget", type=_size, default=None, metavar="SIZE",
        help="estimated bytes all requests in flight may hold together, e.g. 8GiB; over it "
        "503, or 413 when one request alone is over (default: half the machine's memory, "
        f"here {format_bytes(default_memory_budget())})",
    )  # fmt: skip
    g.add_argument(
        "--model-memory-budget", type=_size, default=None, metavar="SIZE",
        help="the same for each model's requests and batches, unless its config.pbtxt sets "
        "parameter normport.memory_budget (default: --memory-budget)",
    )  # fmt: skip
    g.add_argument(
        "--load-timeout", type=_seconds, default=DEFAULT_LOAD_TIMEOUT_S, metavar="S",
        help="seconds each model may take to load and calibrate in its probe process, else "
        f"it is UNAVAILABLE (default {DEFAULT_LOAD_TIMEOUT_S:g})",
    )  # fmt: skip


def limits_from_args(args: argparse.Namespace) -> HttpLimits:
    """The :class:`HttpLimits` named by the parsed flags."""
    return HttpLimits(
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        body_deadline=args.body_deadline,
        keep_alive_timeout=args.keep_alive_timeout,
        max_header_bytes=args.max_header_bytes,
        max_connections=args.max_connections,
        exit_timeout=args.exit_timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
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
        )
    except ValueError as e:
        parser.error(str(e))
    config = uvicorn_config(app, args.host, args.port, args.log_level, limits=limits)
    serve_until_signalled(Server(config, port_file=args.port_file))
    return 0
