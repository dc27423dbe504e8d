"""Memory budgets: no request is run, nor its body read, unless its memory fits.

Two budgets, both counting the *estimated* bytes of the requests in flight (body, decoding, the
onnxruntime run, the outputs: :meth:`runtime.serve.memory.MemoryProfile.request_bytes`):

- the server's (``--memory-budget``; default half the machine's memory or cgroup limit), shared
  by every model, which also holds each body while it is read (``Content-Length``, or the body
  limit when the length is not declared);
- each model's (``parameters { key: "normport.memory_budget" ... }`` in its ``config.pbtxt``,
  else ``--model-memory-budget``; default the server's), which also bounds every batch the
  batcher forms.

A request whose estimate is over either limit can never run: 413, naming the model, the
estimate and the limit.  One that fits the limits but not what is free now: 503 at once (never
queued, never allocated), so that a client retries or a load balancer sends it elsewhere.
Everything here runs on the event loop: no locks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from normport.runtime.serve.errors import PayloadTooLarge, ServerBusy

__all__ = ["Budget", "Hold", "format_bytes", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_UNITS |= {"k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_SIZE = re.compile(r"\s*([0-9]{1,15})(?:\.([0-9]{1,6}))?\s*([a-zA-Z]{0,3})\s*")


def parse_bytes(text: str) -> int:
    """``"512MiB"``, ``"4GiB"``, ``"1.5G"``, ``"1048576"`` -> bytes.

    Raises:
        ValueError: not a size, or not > 0 (the message quotes the text and the units).
    """
    match = _SIZE.fullmatch(text)
    unit = match.group(3).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"{text[:40]!r} is not a size: a number and an optional unit "
            "(B, KiB, MiB, GiB, TiB, kB, MB, GB)"
        )
    whole, fraction = match.group(1), match.group(2) or ""
    value = (int(whole + fraction) * _UNITS[unit]) // 10 ** len(fraction)
    if value <= 0:
        raise ValueError(f"a memory size must be > 0 bytes, got {text[:40]!r}")
    return value


def format_bytes(n: int) -> str:
    """``1536 MiB``-style, for messages."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class Budget:
    """``limit`` bytes shared by holders; ``used`` is what they hold now.

    Args:
        what: how messages name it ("the server's memory budget", "model 'm''s ...").
        limit: bytes.
        setting: how to change it, for messages (a flag or a config parameter).
    """

    def __init__(self, what: str, limit: int, setting: str) -> None:
        self.what = what
        self.limit = limit
        self.setting = setting
        self.used = 0
        self.peak = 0

    def check_limit(self, need: int, model: str, detail: str) -> None:
        """Raises PayloadTooLarge when ``need`` is over the limit itself."""
        if need > self.limit:
            raise PayloadTooLarge(
                f"model '{model}': {detail} needs an estimated {format_bytes(need)}, over "
                f"{self.what} of {format_bytes(self.limit)} (set by {self.setting})"
            )

    def take(self, need: int, model: str, detail: str) -> None:
        """Hold ``need`` more bytes.

        Raises:
            PayloadTooLarge: over the limit itself (it can never fit).
            ServerBusy: it fits the limit, but not what the requests in flight leave free.
        """
        self.check_limit(need, model, detail)
        if self.used + need > self.limit:
            raise ServerBusy(
                f"model '{model}': {detail} needs an estimated {format_bytes(need)}; "
                f"{self.what} has {format_bytes(self.limit - self.used)} of "
                f"{format_bytes(self.limit)} free now; retry later"
            )
        self.used += need
        self.peak = max(self.peak, self.used)

    def give(self, n: int) -> None:
        self.used -= n


@dataclass
class Hold:
    """What one request holds of some budgets; :meth:`release` gives it all back."""

    held: list[tuple[Budget, int]]

    @classmethod
    def empty(cls) -> Hold:
        return cls([])

    def take(self, budget: Budget, need: int, model: str, detail: str) -> None:
        budget.take(need, model, detail)
        self.held.append((budget, need))

    def release(self) -> None:
        for budget, n in self.held:
            budget.give(n)
        self.held.clear()
