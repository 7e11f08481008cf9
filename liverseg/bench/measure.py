"""What every benchmark measures with: warm page cache, throughput over wall time, batch sizes, cores."""

from __future__ import annotations

import time
from pathlib import Path

MB = 2**20


def warm(paths: list[Path]) -> None:
    """Read every file once so all timed runs see the same (warm) page cache."""
    for p in paths:
        p.read_bytes()


def throughput(iterator, batches: int, warmup: int, count) -> tuple[float, float]:
    """(items/s, bytes/s) over `batches` items of `iterator` after `warmup` items; count(item) -> (n, bytes)."""
    for _ in range(warmup):
        next(iterator)
    n = nbytes = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        a, b = count(next(iterator))
        n, nbytes = n + a, nbytes + b
    dt = time.perf_counter() - t0
    return n / dt, nbytes / dt


def batch_count(b) -> tuple[int, int]:
    return int(b["mask"].shape[0]), int(sum(v.numpy().nbytes for v in b.values()))


def cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
