"""`liverseg bench scale`: what each stage costs from 100 to 10,000 cases, and how it grows.

For each case count N it synthesises N tiny cases (`tiny_case`: a body, a liver and noise,
drawn in NumPy in about a millisecond), converts them (the local converter and Beam's
DirectRunner, 2 workers each), and measures every stage a growing dataset passes through:
records and manifest bytes, the manifest's load, `verify`, `inspect`, `train`'s start-up to
its first step and its peak RSS (a fresh process, the smoke recipe), the training
pipeline's slices/s after warm-up, `evaluate` per test case and the cross-validation
bookkeeping (folds dealt and recorded) per case. Each figure is shown per case, with its
growth exponent: the slope of log(total) against log(N) from the smallest N to the largest
(1: linear; a per-case cost that stays flat has slope 1 in its total).

GOALS are the slopes the totals must keep (and start-up's 15 s at the largest N); the
table says which hold.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from liverseg import LiversegError, config, folds, models, nifti_io, verify
from liverseg.bench.measure import batch_count, throughput
from liverseg.convert import ConvertOptions, convert
from liverseg.convert.beam import convert_beam
from liverseg.files import atomic_path, check_writable
from liverseg.manifest import CASES, MANIFEST, Manifest

# figure -> the slope its total must keep (None: a rate, which must stay flat). "manifest" is
# dataset.json, the summary every command loads; "cases file" is cases.jsonl, read when a
# command needs the cases themselves.
GOALS = {
    "synthesise": 1.1,
    "convert (local, 2 workers)": 1.1,
    "convert (Beam direct, 2 workers)": 1.1,
    "records bytes": 1.1,
    "manifest bytes": 1.1,
    "cases file bytes": 1.1,
    "manifest load": 0.3,
    "cases file read": 1.1,
    "verify": 1.1,
    "inspect": 1.1,
    "train start-up to first step": 0.3,
    "train peak RSS": 0.3,
    "pipeline slices/s": None,
    "evaluate per test case": 1.1,
    "cv bookkeeping": 1.1,
}
STARTUP_GOAL_S = 15.0  # train reaches its first step within this at the largest N


def tiny_case(rng: np.random.Generator, size: int, slices: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CT int16, liver mask uint8, affine) of a small synthetic case: an elliptic body of soft
    tissue in air, an ellipsoid liver (brighter) on the patient's right, Gaussian noise;
    random sizes and positions. About a millisecond at 32x32x8."""
    zz, yy, xx = np.meshgrid(
        np.linspace(-1, 1, slices), np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij"
    )
    body = (xx / rng.uniform(0.75, 0.95)) ** 2 + (yy / rng.uniform(0.6, 0.8)) ** 2 <= 1
    cx, cy, cz = rng.uniform(-0.5, -0.2), rng.uniform(-0.2, 0.2), rng.uniform(-0.3, 0.3)
    rx, ry, rz = rng.uniform(0.25, 0.4), rng.uniform(0.25, 0.4), rng.uniform(0.4, 0.8)
    liver = body & (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 + ((zz - cz) / rz) ** 2 <= 1)
    ct = np.where(body, 40.0, -1000.0) + np.where(liver, 60.0, 0.0) + rng.normal(0, 15, body.shape)
    affine = np.diag([1.5 * 256 / size, 1.5 * 256 / size, 5.0, 1.0])
    # volumes are [z, y, x] here; NIfTI's array axes are (i, j, k) = (x, y, z)
    return ct.astype(np.int16).transpose(2, 1, 0), liver.astype(np.uint8).transpose(2, 1, 0), affine


def synthesise(out: Path, n: int, size: int, slices: int, seed: int = 0) -> float:
    """Write n tiny cases as NIfTI pairs into `out`; returns seconds."""

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i in range(n):
        ct, mask, affine = tiny_case(rng, size, slices)
        nifti_io.write(out / f"case{i:05d}_orig.nii.gz", ct, affine, np.int16)
        nifti_io.write(out / f"case{i:05d}_liver.nii.gz", mask, affine, np.uint8)
    return time.perf_counter() - t0


def _timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    value = fn(*args, **kw)
    return time.perf_counter() - t0, value


FIRST_STEP = "liverseg-bench: first step done"
# A fresh process that trains one step of the smoke recipe as `liverseg train` does, saying
# when its first step has finished (imports, set-up, the compiled step, the step itself).
_TRAIN_ONE_STEP = f"""
import sys
from liverseg import config, train
cfg = config.load(config.preset("smoke"), [f"data.records={{sys.argv[1]}}", "train.steps=1", "train.eval_every=0"])
trainer = train.Trainer(cfg, sys.argv[2], progress=False)
try:
    trainer.run(1)
    print({FIRST_STEP!r}, flush=True)
    trainer.finish()
finally:
    trainer.close()
"""


def _startup(records: Path, run: Path) -> tuple[float, float]:
    """(seconds from the process's start to its first step's end, the process's peak RSS in
    bytes) for one step of the smoke recipe, in a process of its own."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", _TRAIN_ONE_STEP, str(records), str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    seconds, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == FIRST_STEP:
            seconds = time.perf_counter() - t0
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode or seconds is None:
        raise RuntimeError(f"one training step failed ({proc.returncode}):\n{''.join(lines)[-2000:]}")
    return seconds, usage.ru_maxrss * 1024.0


def _preset(name: str) -> Path:

    return config.preset(name)


def _pipeline_rate(records: Path, batches: int = 40) -> float:
    """The smoke recipe's training pipeline, slices/s after 10 warm-up batches."""
    from liverseg import pipeline

    cfg = config.load(_preset("smoke"), [f"data.records={records}"])
    return throughput(iter(pipeline.build_dataset(cfg, "train")), batches, 10, batch_count)[0]


def _cv_bookkeeping(records: Path) -> float:
    """Seconds to deal 5 folds and record each fold's patients (what every fold's run does)."""

    m = Manifest.load(records)
    t0 = time.perf_counter()
    for k in range(5):
        cfg = config.load(None, [f"data.records={records}", "data.folds=5", f"data.fold={k}"]).data
        folds.record(folds.view(m, cfg), cfg)
    return time.perf_counter() - t0


def measure(n: int, work: Path, size: int, slices: int, beam: bool = True) -> dict:
    """Every figure for n cases, as {figure: (total, per case)} (pipeline: slices/s, not a total)."""
    from liverseg import evaluate

    src, rec = work / "src", work / "records"
    got: dict[str, float] = {}
    got["synthesise"] = synthesise(src, n, size, slices)
    opts = ConvertOptions(val=0.1, test=0.02, workers=2)
    got["convert (local, 2 workers)"], _ = _timed(convert, src, rec, opts, progress=False)
    if beam:
        got["convert (Beam direct, 2 workers)"], _ = _timed(
            convert_beam, src, work / "records-beam", ConvertOptions(val=0.1, test=0.02, workers=2, runner="direct")
        )
        shutil.rmtree(work / "records-beam")
    got["records bytes"] = float(sum(p.stat().st_size for p in rec.glob("*.tfrecord")))
    got["manifest bytes"] = float((rec / MANIFEST).stat().st_size)
    got["cases file bytes"] = float((rec / CASES).stat().st_size)
    got["manifest load"] = min(_timed(Manifest.load, rec)[0] for _ in range(3))
    got["cases file read"] = min(_timed(lambda: len(tuple(Manifest.load(rec).cases)))[0] for _ in range(3))
    got["verify"], reports = _timed(verify.verify, rec)
    if not all(r.ok for r in reports):
        raise RuntimeError(f"verify failed at {n} cases: {[r.status for r in reports if not r.ok][:3]}")
    got["inspect"], _ = _timed(verify.inspect, rec)
    got["train start-up to first step"], got["train peak RSS"] = _startup(rec, work / "run")
    got["pipeline slices/s"] = _pipeline_rate(rec)
    run = models.load_run(work / "run")
    tests = len(Manifest.load(rec).cases_in("test"))
    seconds, _ = _timed(evaluate.evaluate, run, rec, "test", out=work / "eval", pngs=False)
    got["evaluate per test case"] = seconds / tests * n  # scaled to a total over n cases, for the slope
    got["cv bookkeeping"] = _cv_bookkeeping(rec)
    shutil.rmtree(src)
    return got


def slope(n0: int, v0: float, n1: int, v1: float) -> float:
    """The growth exponent of a total between n0 and n1 cases: d log(total) / d log(N)."""
    return math.log(v1 / v0) / math.log(n1 / n0)


def bench_scale(
    cases: tuple[int, ...] = (100, 1000, 10000),
    size: int = 32,
    slices: int = 8,
    beam: bool = True,
    work: str | Path | None = None,
) -> tuple[list[dict], list[str], dict]:
    """The table (a row per figure: per-case values at each N, the slope, the goal, whether it
    holds), the notes (wall time per N, the start-up goal) and the raw totals {N: {figure: value}}."""
    cases = tuple(sorted(cases))
    root = Path(tempfile.mkdtemp(prefix="liverseg-scale-", dir=work))
    results, notes = {}, []
    try:
        for n in cases:
            t0 = time.perf_counter()
            results[n] = measure(n, root / str(n), size, slices, beam)
            shutil.rmtree(root / str(n))
            notes.append(f"{n:,} cases: measured in {time.perf_counter() - t0:.0f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    lo, hi = cases[0], cases[-1]
    for figure, goal in GOALS.items():
        if figure not in results[lo]:
            continue
        row = {"figure": figure}
        for n in cases:
            v = results[n][figure]
            row[f"N={n:,}"] = _shown(
                figure,
                v if figure in ("pipeline slices/s", "train start-up to first step", "train peak RSS") else v / n,
            )
        s = slope(lo, results[lo][figure], hi, results[hi][figure]) if len(cases) > 1 else float("nan")
        row["slope"] = f"{s:.2f}"
        row["goal"] = f"<= {goal}" if goal is not None else "flat"
        row["holds"] = ("yes" if s <= goal else "NO") if goal is not None else ("yes" if s >= -0.3 else "NO")
        rows.append(row)
    start = results[hi]["train start-up to first step"]
    notes.append(
        f"train start-up at {hi:,} cases: {start:.1f} s (goal {STARTUP_GOAL_S:g} s: "
        f"{'holds' if start <= STARTUP_GOAL_S else 'MISSED'})"
    )
    return rows, notes, results


UNITS = {
    "records bytes": "B/case",
    "manifest bytes": "B/case",
    "cases file bytes": "B/case",
    "train peak RSS": "MB",
    "pipeline slices/s": "slices/s",
    "train start-up to first step": "s",
}


def _shown(figure: str, v: float) -> str:
    unit = UNITS.get(figure, "ms/case")
    if unit == "ms/case":
        return f"{1000 * v:.2f} ms" if v >= 1e-5 else f"{1e6 * v:.2f} us"
    if unit == "MB":
        return f"{v / 2**20:,.0f} MB"
    if unit == "s":
        return f"{v:.1f} s"
    return (
        f"{v:,.1f} {unit.split('/')[0] if unit != 'slices/s' else 'slices/s'}"
        if v < 100
        else f"{v:,.0f} {unit.split('/')[0] if unit != 'slices/s' else 'slices/s'}"
    )


WRITTEN_BY = "liverseg bench scale"  # the JSON's "written_by": the only file --json --force replaces
SIZES, SLICES, MOST_CASES = (16, 512), (4, 256), 10**7


def check_request(
    counts: tuple[int, ...], size: int, slices: int, work: Path | None, json_out: Path | None, force: bool
) -> str:
    """Refuse, before anything is written, what `bench scale` cannot do or may not write:
    sizes out of range, a --work folder that is missing or unwritable, temporary data that
    does not fit its free space, a --json file that is not an earlier bench scale JSON (or is
    one, without --force). Returns the line that says how much it will write where."""
    if not (SIZES[0] <= size <= SIZES[1] and SLICES[0] <= slices <= SLICES[1]):
        raise LiversegError(
            f"--size {size} / --slices {slices}: choose a size in [{SIZES[0]}, {SIZES[1]}] pixels and "
            f"[{SLICES[0]}, {SLICES[1]}] slices per case"
        )
    if not counts or min(counts) < 10 or max(counts) > MOST_CASES:
        raise LiversegError(f"--cases {','.join(map(str, counts))}: case counts in [10, {MOST_CASES:,}]")
    if work is not None and not Path(work).is_dir():
        raise LiversegError(f"--work {work}: no such folder; create it or choose another")
    where = Path(work) if work is not None else Path(tempfile.gettempdir())
    check_writable(where)
    need = max(counts) * temporary_bytes(size, slices)
    free = shutil.disk_usage(where).free
    if need > 0.9 * free:
        raise LiversegError(
            f"--cases {max(counts):,} at {size}x{size}x{slices}: about {need / 1e9:,.1f} GB of temporary data, but "
            f"{where} has {free / 1e9:,.1f} GB free; choose fewer cases or --work on a larger disk "
            "(nothing was written)"
        )
    if json_out is not None:
        json_out = Path(json_out)
        if json_out.is_dir() or not json_out.parent.is_dir():
            raise LiversegError(f"--json {json_out}: give a file in an existing folder")
        if json_out.exists():
            if _written_by(json_out) != WRITTEN_BY:
                raise LiversegError(
                    f"--json {json_out}: exists and is not an earlier bench scale JSON; choose another file "
                    "(nothing was written)"
                )
            if not force:
                raise LiversegError(f"--json {json_out}: exists; pass --force to replace that earlier bench scale JSON")
        check_writable(json_out.parent)
    return f"bench scale: at most about {need / 1e9:,.2f} GB of temporary data in {where} ({free / 1e9:,.0f} GB free)"


def temporary_bytes(size: int, slices: int) -> float:
    """Temporary bytes per case at the largest N: its NIfTI pair, its records twice (local and
    Beam: both exist until the Beam copy is measured), a run and reports (per case, small)."""
    voxels = size * size * slices
    return 3 * voxels + 2 * (3 * voxels + 160 * slices) + 4096


def _written_by(path: Path) -> str | None:
    try:
        d = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return d.get("written_by") if isinstance(d, dict) else None


def as_json(rows: list[dict], notes: list[str], totals: dict) -> str:
    return json.dumps(
        {"written_by": WRITTEN_BY, "rows": rows, "notes": notes, "totals": {str(n): v for n, v in totals.items()}},
        indent=1,
    )


def write_json(path: Path, rows: list[dict], notes: list[str], totals: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(as_json(rows, notes, totals))


__all__ = ["GOALS", "bench_scale", "check_request", "measure", "slope", "synthesise", "tiny_case", "write_json"]
