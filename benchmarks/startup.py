"""Server start to ready, and idle memory, over a repository of the eight zoo models.

    python -m benchmarks.startup [--repository DIR] [--rounds 3] [--out reports/bench/startup.json]

Each round starts ``python -m runtime serve --port 0`` twice and times it from the process
start to the first ``200`` of ``/v2/health/ready``:

- **cold**: an empty probe cache: every model is loaded and calibrated in probe children;
- **warm**: the cache the cold start filled: unchanged models load without a probe (what
  every restart after the first does; see :mod:`runtime.serve.probe_cache`).

Idle RSS is the server's ``VmRSS`` one second after ready.  The two kinds alternate within a
round (the machine is shared; side by side is what is comparable).  Targets: warm start to
ready at most :data:`TARGETS` ``["warm_ready_s"]``, idle RSS at most ``["idle_rss_mb"]``.
The repository is ``--repository`` when given, else every zoo model exported by
``python -m export --all`` into a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import environment, verdict, write_report

TARGETS = {"warm_ready_s": 1.5, "idle_rss_mb": 150.0}
_DEADLINE_S = 300.0


def _export(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "export", "--all", "--out", os.fspath(folder)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return folder


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise OSError(f"/proc/{pid}/status has no VmRSS")


def _ready(port_file: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + _DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            port = int(port_file.read_text())
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5):
                return
        except (OSError, ValueError):
            time.sleep(0.005)
    raise RuntimeError(f"the server was not ready within {_DEADLINE_S:g} s")


def start_once(repository: Path, cache: Path, workdir: Path) -> dict[str, float]:
    """One start: seconds to ready, and the idle RSS (MiB) one second later."""
    port_file = workdir / "port"
    port_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "runtime", "serve", "--repository", os.fspath(repository),
               "--port", "0", "--port-file", os.fspath(port_file), "--probe-cache",
               os.fspath(cache), "--log-level", "warning"]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _ready(port_file, process)
        ready_s = time.perf_counter() - started
        time.sleep(1.0)
        return {"ready_s": ready_s, "idle_rss_mb": _rss_mb(process.pid)}
    finally:
        process.terminate()
        process.wait(timeout=60)


def run(repository: Path, rounds: int) -> dict[str, Any]:
    """``rounds`` cold and warm starts, interleaved; medians and targets."""
    samples: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="normport-startup-") as tmp:
        for r in range(rounds):
            cache = Path(tmp) / f"cache{r}"
            samples["cold"].append(start_once(repository, cache, Path(tmp)))
            samples["warm"].append(start_once(repository, cache, Path(tmp)))
            print(f"round {r + 1}/{rounds}: cold {samples['cold'][-1]['ready_s']:.2f} s, "
                  f"warm {samples['warm'][-1]['ready_s']:.2f} s", file=sys.stderr)  # fmt: skip
    rows = []
    for kind, runs in samples.items():
        rows.append({
            "start": kind,
            "ready_s": round(statistics.median(s["ready_s"] for s in runs), 3),
            "idle_rss_mb": round(statistics.median(s["idle_rss_mb"] for s in runs), 1),
            "runs": runs,
        })  # fmt: skip
    warm = rows[1]
    met = {
        "warm_ready_s": warm["ready_s"] <= TARGETS["warm_ready_s"],
        "idle_rss_mb": max(r["idle_rss_mb"] for r in rows) <= TARGETS["idle_rss_mb"],
    }
    models = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    return {"models": models, "rounds": rounds, "rows": rows, "targets": TARGETS, "met": met}


def _table(report: dict[str, Any]) -> str:
    lines = [f"{'start':<6} {'ready s':>8} {'idle RSS MiB':>13}"]
    for row in report["rows"]:
        lines.append(f"{row['start']:<6} {row['ready_s']:>8.2f} {row['idle_rss_mb']:>13.1f}")
    for name, ok in report["met"].items():
        lines.append(f"target {name} <= {TARGETS[name]:g}: {verdict(ok)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__)
    p.add_argument("--repository", type=Path, help="a model repository (default: export all)")
    p.add_argument("--rounds", type=int, default=3, help="cold+warm pairs (default: 3)")
    p.add_argument("--out", type=Path, default=Path("reports/bench/startup.json"))
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    with tempfile.TemporaryDirectory(prefix="normport-zoo-") as tmp:
        repository = args.repository or _export(Path(tmp) / "repo")
        report = run(repository, args.rounds)
    write_report(args.out, {"metadata": environment(), "startup": report})
    print(_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
