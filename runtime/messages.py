"""One line from an exception, for reasons, errors and log lines (never a traceback).

>>> first_line(ValueError("bad size\\n  detail"))
'bad size'
>>> first_line(RuntimeError(""))   # no message: the type names it
'RuntimeError'

Imports nothing: the server uses it too.
"""

from __future__ import annotations

__all__ = ["first_line"]


def first_line(error: BaseException, *, default: str | None = None, limit: int = 0) -> str:
    """The message's first non-empty line, stripped (cut to ``limit`` characters when > 0);
    without one, ``default``, or the exception's type name when ``default`` is None."""
    for line in str(error).splitlines():
        if line.strip():
            text = line.strip()
            return text[:limit] if limit > 0 else text
    return type(error).__name__ if default is None else default
