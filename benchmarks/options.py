"""The command-line options the layer and export benchmarks share.

``--threads`` (intra-op threads, at least 1), ``--out`` (the JSON report), ``--quick`` (a smoke
run) and ``--layers`` (which of :data:`benchmarks.cases.LAYERS`; comma- or space-separated).

>>> parser = layer_parser("python -m benchmarks.layers", "Time the layers.", "layers.json")
>>> parse(parser, ["--layers", "LayerNorm,GroupNorm", "RMSNorm"]).layers
['LayerNorm', 'GroupNorm', 'RMSNorm']
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

__all__ = ["layer_parser", "parse"]


def layer_parser(prog: str, description: str, out: str) -> argparse.ArgumentParser:
    """A parser holding the shared options; ``out`` is the default of ``--out``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    parser.add_argument(
        "--layers", nargs="+", help="layer names, comma- or space-separated (default: all)"
    )
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with ``--threads`` checked and ``--layers`` split into names
    (None when not given)."""
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    names = [name for item in args.layers or [] for name in item.split(",") if name.strip()]
    args.layers = names or None
    return args
