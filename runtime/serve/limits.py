"""The time and connection bounds of the HTTP layer: one settings object, its defaults, and the
connection cap derived from the file-descriptor limit.

Each field is a flag of ``python -m runtime serve`` (same name, dashes); seconds are wall-clock.

=====================  ===========================  =========  ================================
field                  flag                          default    bounds
=====================  ===========================  =========  ================================
header_timeout         ``--header-timeout``         10 s       connection open, or first byte
                                                                of a later request -> end of
                                                                the headers (else 408 / close)
body_timeout           ``--body-timeout``           30 s       longest wait for the next body
                                                                bytes (else 408)
body_deadline          ``--body-deadline``          300 s      end of headers -> end of body
                                                                (else 408)
keep_alive_timeout     ``--keep-alive-timeout``     75 s       end of a response -> first byte
                                                                of the next request (else close)
max_header_bytes       ``--max-header-bytes``       65536      request line + headers (else 431)
max_connections        ``--max-connections``        0 (auto)   open connections (else 503);
                                                                auto = soft RLIMIT_NOFILE - 64
exit_timeout           ``--exit-timeout``           30 s       SIGTERM/SIGINT -> requests in
                                                                flight cancelled; the process
                                                                exits by 2 s later at the most
=====================  ===========================  =========  ================================

The body has two bounds because either alone lets a slow client hold a connection: a no-progress
timeout alone is beaten by one byte every ``body_timeout - 1`` seconds, a deadline alone makes a
stalled upload wait the whole deadline.  300 s moves the default 64 MiB body limit at 220 KB/s.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields

try:
    import resource
except ImportError:  # pragma: no cover  (not on Windows)
    resource = None  # type: ignore[assignment]

__all__ = ["FD_RESERVE", "HttpLimits", "connection_cap", "fd_soft_limit", "raise_fd_limit"]

log = logging.getLogger(__name__)

# File descriptors kept for everything that is not a client connection: stdio, the listening
# socket, the event loop's epoll and wakeup fds, model and config files while they load, logs.
FD_RESERVE = 64
_NO_RLIMIT_CAP = 1024 - FD_RESERVE  # where the limit cannot be read


@dataclass(frozen=True)
class HttpLimits:
    """Bounds on the time a request may take to arrive and on the connections held open.

    Raises:
        ValueError: a timeout or size that is not > 0, or ``max_connections < 0``.
    """

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    body_deadline: float = 300.0
    keep_alive_timeout: float = 75.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 0  # 0: derived from RLIMIT_NOFILE by connection_cap()
    exit_timeout: float = 30.0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            floor_ok = field.name == "max_connections"  # 0 is "automatic"
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and (value >= 0 if floor_ok else value > 0)):
                bound = ">= 0" if floor_ok else "> 0"
                raise ValueError(f"{field.name} must be a finite number {bound}, got {value!r}")


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one where the OS allows; returns (soft, hard).

    ``RLIM_INFINITY`` shows as -1.  A refused raise (a hard limit over the kernel's nr_open,
    macOS's OPEN_MAX) keeps the soft limit as it was.
    """
    if resource is None:
        return -1, -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("could not raise RLIMIT_NOFILE from %d to %d: %s", soft, hard, e)
    return soft, hard


def fd_soft_limit() -> int:
    """The soft RLIMIT_NOFILE; -1 when unlimited or unknown."""
    if resource is None:
        return -1
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return -1 if soft == resource.RLIM_INFINITY else soft


def connection_cap(max_connections: int) -> int:
    """The connection limit to enforce: ``max_connections``, or when 0 the soft RLIMIT_NOFILE
    less :data:`FD_RESERVE` (at least 1).  Past the descriptor limit ``accept`` fails with
    EMFILE and new clients wait in the listen backlog instead of getting a 503."""
    if max_connections > 0:
        return max_connections
    soft = fd_soft_limit()
    return max(1, soft - FD_RESERVE) if soft > 0 else _NO_RLIMIT_CAP
