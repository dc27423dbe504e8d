"""``python -m runtime {serve,verify,recalibrate} ...``: one entry point, one module per command."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "serve": ("runtime.serve.cli", "serve a model repository over the Open Inference Protocol"),
    "verify": ("runtime.verify.cli", "parity matrix and train-vs-inference divergence report"),
    "recalibrate": ("runtime.recalibration", "recalibrate running statistics on onnxruntime"),
}


def _usage() -> str:
    lines = ["usage: python -m runtime {serve,verify,recalibrate} [options]", ""]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"{_usage()}\n\nerror: unknown command {command!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
