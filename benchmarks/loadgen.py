"""A closed-loop HTTP load generator for infer requests (aiohttp), used by the benchmark.

``concurrency`` workers each send one request, read and decode the whole response, and send the
next, for ``duration`` seconds after a ``warmup``; each latency is measured around one request.
Request bodies are built once, up front, from numpy inputs: JSON (``data`` lists, JSON outputs)
or binary (``binary_data_size`` blobs, binary outputs).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson

__all__ = ["Body", "LoadResult", "build_body", "decode_output", "run_load"]


@dataclass(frozen=True)
class Body:
    """A prebuilt request: bytes and headers."""

    content: bytes
    headers: dict[str, str]


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    elapsed_s: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.latencies_s) / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3) if self.latencies_s else float("nan")


_DATATYPE = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


def build_body(name: str, array: np.ndarray, output: str, *, binary: bool) -> Body:
    """One infer request for a single-input model (FP32 or INT64 input)."""
    entry: dict[str, Any] = {
        "name": name,
        "shape": list(array.shape),
        "datatype": _DATATYPE[array.dtype],
    }
    wanted = [{"name": output, "parameters": {"binary_data": binary}}]
    if not binary:
        entry["data"] = array.reshape(-1).tolist()
        doc = orjson.dumps({"inputs": [entry], "outputs": wanted})
        return Body(doc, {"Content-Type": "application/json"})
    blob = np.ascontiguousarray(array).tobytes()
    entry["parameters"] = {"binary_data_size": len(blob)}
    header = orjson.dumps({"inputs": [entry], "outputs": wanted})
    return Body(
        header + blob,
        {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )


def decode_output(content: bytes, header_length: str | None) -> np.ndarray:
    """The first output of a response, as float32 (the benchmark models' outputs are FP32)."""
    if header_length is None:
        output = orjson.loads(content)["outputs"][0]
        return np.array(output["data"], dtype=np.float32).reshape(output["shape"])
    n = int(header_length)
    output = orjson.loads(content[:n])["outputs"][0]
    return np.frombuffer(content, dtype=np.float32, offset=n).reshape(output["shape"])


async def run_load(
    url: str,
    bodies: list[Body],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 0.3,
    timeout_s: float = 30.0,
) -> LoadResult:
    """Drive ``url`` with ``concurrency`` closed-loop workers cycling through ``bodies``."""
    result = LoadResult()
    counter = itertools.count()
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        start = time.perf_counter()
        measure_from = start + warmup_s
        stop_at = measure_from + duration_s

        async def worker() -> None:
            while (now := time.perf_counter()) < stop_at:
                body = bodies[next(counter) % len(bodies)]
                try:
                    async with session.post(url, data=body.content, headers=body.headers) as r:
                        content = await r.read()
                        if r.status != 200:
                            raise RuntimeError(f"HTTP {r.status}: {content[:200]!r}")
                        decode_output(content, r.headers.get("Inference-Header-Content-Length"))
                except Exception as e:  # counted, and the first one is reported
                    result.errors += 1
                    result.first_error = result.first_error or f"{type(e).__name__}: {e}"
                    continue
                if now >= measure_from:
                    result.latencies_s.append(time.perf_counter() - now)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.elapsed_s = max(time.perf_counter(), stop_at) - measure_from
    return result
