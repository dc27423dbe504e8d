"""``python -m runtime serve``: serve a model repository over the Open Inference Protocol.

    python -m runtime serve [--repository model_repository] [--host 127.0.0.1] [--port 8000]
                            [--threads N] [--max-body-bytes N] [--no-batching]
                            [--strict-readiness] [--log-level info]

Binds 127.0.0.1 unless told otherwise.  SIGINT/SIGTERM stop accepting connections, finish the
requests in flight, then stop the onnxruntime workers.  Exit status 2 for bad arguments
(including a repository folder that does not exist).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Sequence

import uvicorn

from runtime.serve.app import create_app
from runtime.serve.body import DEFAULT_MAX_BODY_BYTES

__all__ = ["KEEP_ALIVE_S", "main", "uvicorn_config"]

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
KEEP_ALIVE_S = 75  # pooled clients (tritonclient, load balancers) keep connections open


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime serve",
        description="Serve a Triton-layout model repository with onnxruntime over the Open "
        "Inference Protocol (KServe v2 / Triton HTTP).",
    )
    p.add_argument("--repository", default="model_repository", help="model repository folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free)")
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
    return p


def uvicorn_config(app, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    """The uvicorn settings the service runs with (shared by the CLI, tests and benchmark)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=log_level == "debug",
        timeout_keep_alive=KEEP_ALIVE_S,
        lifespan="on",
        # X-Forwarded-* is not trusted (nor parsed, which also saves time per request).
        proxy_headers=False,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until interrupted; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    try:
        app = create_app(
            args.repository,
            threads=args.threads,
            max_body_bytes=args.max_body_bytes,
            batching=not args.no_batching,
            strict_readiness=args.strict_readiness,
        )
    except ValueError as e:
        parser.error(str(e))
    server = uvicorn.Server(uvicorn_config(app, args.host, args.port, args.log_level))
    # uvicorn finishes in-flight requests on SIGINT/SIGTERM, then re-raises the signal.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0
