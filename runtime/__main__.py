"""``python -m runtime {serve,verify,recalibrate} ...``: one entry point, one module per command.

Each command parses its own arguments (``python -m runtime COMMAND --help``); this module only
picks the command, so a command's flags and errors are its own.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "serve": (
        "serve.cli",
        "serve a model repository over the Open Inference Protocol",
    ),
    "verify": (
        "verify.cli",
        "parity matrix and train-vs-inference divergence report",
    ),
    "recalibrate": (
        "recalibration",
        "recalibrate running statistics on onnxruntime",
    ),
}

USAGE = "usage: python -m runtime {serve,verify,recalibrate} [options]"

EXAMPLES = """\
examples:
  python -m runtime serve --repository model_repository --port 8000
  python -m runtime verify --model cnn_bn --opset 23 --out reports/verify
  python -m runtime recalibrate --train-model train.onnx --data batches.npy --out eval.onnx
  python -m runtime COMMAND --help      # the command's flags, with their defaults"""


def _help() -> str:
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join([*lines, "", EXAMPLES])


def _error(message: str) -> int:
    print(f"{USAGE}\npython -m runtime: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; exit status 2 (one ``error:`` line) for a missing or unknown command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(_help())
        return 0
    if not args:
        return _error(f"a command is required, one of {', '.join(COMMANDS)}")
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        return _error(f"unknown command {command!r}, expected one of {', '.join(COMMANDS)}")
    module = importlib.import_module(f"normport.runtime.{COMMANDS[command][0]}")
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
