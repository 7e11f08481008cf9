"""Offline conversion: CT volume + liver mask pairs -> sharded TFRecords + manifest.

Three phases (one module each), so a bad input or a killed run never leaves a
half-written dataset:

1. `discover`: find pairs, assign splits (by patient) and check every header (shape,
   affine, voxel sizes, dimensionality) before reading any voxel;
2. `shards`: plan shards by bytes; workers write whole shards under temporary names
   (`.liverseg-tmp-*`), validating each case's voxels (NaN/Inf, mask labels, truncated data)
   before any of its slices is written;
3. `output`: only when every shard is complete, the manifest is written under a
   temporary name, shards are renamed to `{split}-{i:05d}-of-{n:05d}.tfrecord`, then the
   manifest is renamed into place. The manifest is the commit point. OUT may hold only
   what convert can prove it wrote; nothing else is ever removed.

Output is deterministic: cases are sorted, records are encoded byte-for-byte the same
(`records`), so a re-run with the same inputs and options produces identical shards,
whichever runner wrote them (local processes here, Apache Beam in `convert.beam`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import threading
import time
from multiprocessing import get_context
from pathlib import Path

from liverseg import InputError, LiversegError, records, storage
from liverseg.convert.discover import SPLIT_PRESETS, Case, check_headers, discover
from liverseg.convert.output import assemble, check_out, check_same_sources, commit, locked
from liverseg.convert.shards import (
    TMP_PREFIX,
    ShardJob,
    ShardResult,
    estimated_bytes,
    full_disk_named,
    plan_shards,
    write_shard,
)
from liverseg.layouts import MERGES_TUMOUR
from liverseg.manifest import ConvertOptions, Manifest


def resolve(opts: ConvertOptions) -> ConvertOptions:
    """Check the options and fill what the layout implies (msd and lits: tumour is liver)."""
    if opts.compression not in records.COMPRESSIONS:
        raise LiversegError(f"--compression {opts.compression!r}: choose none, GZIP or ZLIB")
    if opts.size is not None and not 16 <= opts.size <= 4096:
        raise LiversegError(f"--size {opts.size}: choose a slice size between 16 and 4096")
    if opts.spacing is not None and (opts.size is None or not 0.05 <= opts.spacing <= 20):
        raise LiversegError(
            f"--spacing {opts.spacing}: needs --size (the window slices are cropped or padded to) "
            "and a pixel size between 0.05 and 20 mm"
        )
    if (
        not (0 < opts.shard_mb <= 2**20)
        or not 1 <= opts.workers <= 1024
        or (opts.num_shards is not None and not 1 <= opts.num_shards <= 100_000)
    ):
        raise LiversegError(
            f"--shard-mb {opts.shard_mb:g}, --workers {opts.workers}, --num-shards {opts.num_shards}: "
            "--shard-mb must be in (0, 1048576], --workers in [1, 1024], --num-shards in [1, 100000]"
        )
    if not 0 <= opts.affine_tol <= 10:  # also refuses nan: a nan tolerance would accept any grid
        raise LiversegError(f"--affine-tol {opts.affine_tol}: choose a tolerance in mm between 0 and 10")
    if not (0 <= opts.val < 1 and 0 <= opts.test < 1):  # nan included
        raise LiversegError(f"--val {opts.val} / --test {opts.test}: fractions in [0, 1) that sum below 1")
    if opts.layout in MERGES_TUMOUR and not opts.merge_tumour:
        opts = dataclasses.replace(opts, merge_tumour=True)
    return opts


def prepare(src: Path, out: Path, opts: ConvertOptions) -> tuple[list[Case], list[ShardJob], Manifest | None]:
    """Everything before any voxel is read: discovery, splits, header checks, the output
    folder's state, the shard plan and the space it needs (opts: `resolve`d). Raises on the
    first problem."""
    cases = discover(src, opts)
    old = check_out(out, opts, src, cases)
    check_headers(cases, opts)
    bad = [c for c in cases if c.error]
    if bad and not opts.skip_bad:
        raise InputError(
            f"{len(bad)} case(s) failed header checks, nothing written (--skip-bad converts the rest):\n  "
            + "\n  ".join(c.error for c in bad)
        )
    jobs = plan_shards(cases, opts, out)
    _check_space(out, jobs, opts)
    return cases, jobs, old


def _check_space(out: Path, jobs: list[ShardJob], opts: ConvertOptions) -> None:
    """Uncompressed shards have a size known from the headers: refuse to start a conversion
    that cannot fit (compressed sizes are unknown; a full disk is then reported when met)."""
    if opts.compression:
        return
    need = sum(estimated_bytes(c) for j in jobs for c in j.cases)
    free = storage.free_bytes(out)  # None: a bucket
    if free is not None and need > free:
        raise LiversegError(
            f"{out}: the dataset needs about {need / 2**20:,.0f} MB but its disk has "
            f"{free / 2**20:,.0f} MB free; free space or choose another output folder"
        )


def convert(
    src: str | Path, out: str | Path, opts: ConvertOptions = ConvertOptions(), progress: bool = True
) -> Manifest:
    """Convert SRC to a sharded dataset in OUT. Returns the manifest (also written to OUT/dataset.json)."""
    with locked(storage.path(out), Path(src)):
        return _convert(Path(src), storage.path(out), resolve(opts), progress)


def _convert(src: Path, out: Path, opts: ConvertOptions, progress: bool) -> Manifest:
    from tqdm import tqdm

    cases, jobs, old = prepare(src, out, opts)
    bar = tqdm(
        total=sum(c.geometry.stored_shape[0] for j in jobs for c in j.cases),
        desc="convert",
        unit="slice",
        disable=not progress,
    )
    try:
        with full_disk_named(out):
            results = _write_all(jobs, opts, lambda job: bar.update(sum(c.geometry.stored_shape[0] for c in job.cases)))
            manifest = assemble(src, opts, cases, results)
            check_same_sources(out, old, manifest, opts)
            return commit(out, manifest, results)
    finally:
        bar.close()
        for j in jobs:  # gone already when committed (the lock removes a folder it made)
            with contextlib.suppress(OSError, LiversegError):  # what made the run fail is what it reports
                j.tmp.unlink(missing_ok=True)


def _write_all(jobs: list[ShardJob], opts: ConvertOptions, done) -> list[ShardResult]:
    """Write every shard: in this process, or in `opts.workers` spawned processes that die
    with this one (a killed convert leaves no worker behind) and are stopped on any failure."""
    if opts.workers == 1 or len(jobs) == 1:
        results = []
        for j in jobs:
            results.append(write_shard(j, opts))
            done(j)
        return results
    by_name = {(j.split, j.ordinal): j for j in jobs}
    # spawn: never fork a process that may hold TensorFlow's threads.
    pool = get_context("spawn").Pool(
        min(opts.workers, len(jobs)), initializer=_die_with_parent, initargs=(os.getpid(),)
    )
    try:
        results = []
        for r in pool.imap_unordered(_write_shard_args, [(j, opts) for j in jobs]):
            results.append(r)
            done(by_name[(r.split, r.ordinal)])
        pool.close()
        return results
    except BaseException:
        pool.terminate()  # a failed case, Ctrl-C or SIGTERM: stop the other shards now
        raise
    finally:
        pool.join()


def _write_shard_args(args) -> ShardResult:  # picklable entry point for the process pool
    return write_shard(*args)


def _die_with_parent(parent: int) -> None:
    """Worker start-up: end when the converting process ends, however it ends (SIGKILL included).

    Linux delivers SIGKILL on the parent's death (PR_SET_PDEATHSIG); elsewhere, or if the
    parent died before this ran, a thread notices the worker was re-parented.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it terminates the pool)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


__all__ = [
    "ConvertOptions",
    "SPLIT_PRESETS",
    "TMP_PREFIX",
    "assemble",
    "commit",
    "convert",
    "discover",
    "plan_shards",
    "prepare",
    "resolve",
    "write_shard",
]
