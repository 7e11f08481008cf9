"""Benchmarks (`liverseg bench ...`): throughput measured in one run, printed as a table.

Rates are totals over wall time (total slices / total seconds after warm-up), never
averages of per-step rates. Figures belong in docs/benchmarks.md with the command.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

MB = 2**20


def _warm(paths: list[Path]) -> None:
    """Read every file once so all timed runs see the same (warm) page cache."""
    for p in paths:
        p.read_bytes()


def bench_convert(src: str | Path, workers: int = 2, opts=None) -> list[dict]:
    """Plain nibabel load of every volume vs `convert` with 1 and `workers` processes."""
    from liverseg.convert import ConvertOptions, convert, discover

    src = Path(src)
    opts = opts or ConvertOptions()
    cases = discover(src, opts)
    files = [p for c in cases for p in (c.image, c.mask)]
    _warm(files)
    t0 = time.perf_counter()
    slices = voxel_bytes = 0
    for c in cases:
        image = np.asanyarray(nib.load(str(c.image)).dataobj)
        mask = np.asanyarray(nib.load(str(c.mask)).dataobj)
        slices += image.shape[2]
        voxel_bytes += image.nbytes + mask.nbytes
    t_load = time.perf_counter() - t0
    rows = [{"run": "nibabel load (image+mask)", "seconds": t_load}]
    tmp = Path(tempfile.mkdtemp(prefix="liverseg-bench-"))
    try:
        for n in sorted({1, workers}):
            out = tmp / f"w{n}"
            t0 = time.perf_counter()
            convert(src, out, _with(opts, workers=n), progress=False)
            rows.append({"run": f"convert --workers {n}", "seconds": time.perf_counter() - t0})
            shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t_one = rows[1]["seconds"]
    for r in rows:
        r["slices/s"] = round(slices / r["seconds"], 1)
        r["MB/s"] = round(voxel_bytes / MB / r["seconds"], 1)
        r["x load time"] = round(r["seconds"] / t_load, 2)
        r["speedup vs 1 worker"] = round(t_one / r["seconds"], 2) if r["run"].startswith("convert") else ""
        r["seconds"] = round(r["seconds"], 2)
    return rows


def _with(opts, **kw):
    from dataclasses import replace

    return replace(opts, **kw)
