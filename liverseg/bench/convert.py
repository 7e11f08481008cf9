"""`liverseg bench convert`: a plain nibabel load against `convert` (local, Beam, DICOM)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from liverseg import LiversegError
from liverseg.bench.measure import MB, warm
from liverseg.convert import ConvertOptions, convert, discover
from liverseg.convert.beam import convert_beam


def bench_convert(
    src: str | Path, workers: int = 2, opts=None, dicom: str | Path | None = None, beam: bool = False
) -> list[dict]:
    """Plain nibabel load of every volume vs `convert` with 1 and `workers` processes; with
    `dicom` (the same volumes as 3D-IRCADb-01 DICOM trees), the same conversions from DICOM;
    with `beam`, the same conversions on Apache Beam's DirectRunner ("x local": its time over
    the local converter's with as many workers)."""

    src = Path(src)
    opts = opts or ConvertOptions()
    cases = discover(src, opts)
    files = [p.path for c in cases for p in (c.image, c.mask)]
    warm(files)
    t0 = time.perf_counter()
    slices = voxel_bytes = 0
    for c in cases:
        image = np.asanyarray(nib.load(str(c.image.path)).dataobj)
        mask = np.asanyarray(nib.load(str(c.mask.path)).dataobj)
        slices += image.shape[2]
        voxel_bytes += image.nbytes + mask.nbytes
    rows = [{"run": "nibabel load (image+mask)", "seconds": time.perf_counter() - t0}]
    runs = [(f"convert --workers {n}", src, _with(opts, workers=n)) for n in sorted({1, workers})]
    if beam:
        runs += [
            (f"beam direct --workers {n}", src, _with(opts, workers=n, runner="direct")) for n in sorted({1, workers})
        ]
    if dicom is not None:
        dicom_cases = discover(Path(dicom), _with(opts, layout="ircad"))
        if len(dicom_cases) != len(cases):
            raise LiversegError(
                f"{dicom}: {len(dicom_cases)} DICOM cases, {src} has {len(cases)}; give the same volumes"
            )
        warm(
            [Path(c.image.path) / m for c in dicom_cases for m in c.image.members]
            + [Path(c.mask.path) / m for c in dicom_cases for m in c.mask.members]
        )
        runs += [
            (f"convert DICOM --workers {n}", Path(dicom), _with(opts, workers=n, layout="ircad"))
            for n in sorted({1, workers})
        ]
    tmp = Path(tempfile.mkdtemp(prefix="liverseg-bench-"))
    try:
        for name, source, o in runs:
            t0 = time.perf_counter()
            convert_beam(source, tmp / "out", o) if o.runner != "local" else convert(
                source, tmp / "out", o, progress=False
            )
            rows.append({"run": name, "seconds": time.perf_counter() - t0})
            shutil.rmtree(tmp / "out")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t_load, t_one = rows[0]["seconds"], {}
    for r in rows:
        kind = r["run"].rsplit(" --workers", 1)[0]
        t_one.setdefault(kind, r["seconds"])
        r["s/volume"] = round(r["seconds"] / len(cases), 3)
        r["slices/s"] = round(slices / r["seconds"], 1)
        r["MB/s"] = round(voxel_bytes / MB / r["seconds"], 2)
        r["x load time"] = round(r["seconds"] / t_load, 2)
        r["speedup vs 1 worker"] = round(t_one[kind] / r["seconds"], 2) if r["run"] != rows[0]["run"] else ""
    local = {
        r["run"].rsplit("--workers ", 1)[1]: r["seconds"] for r in rows if r["run"].startswith("convert --workers")
    }
    for r in rows:
        r["x local"] = (
            round(r["seconds"] / local[r["run"].rsplit("--workers ", 1)[1]], 2) if "--workers" in r["run"] else ""
        )
        r["seconds"] = round(r["seconds"], 2)
    return rows


def _with(opts, **kw):
    from dataclasses import replace

    return replace(opts, **kw)
