"""Offline conversion: NIfTI volume + liver mask pairs -> sharded TFRecords + manifest.

Three phases, so a bad input or a killed run never leaves a half-written dataset:

1. discover pairs, assign splits (by patient) and check every header (shape, affine,
   voxel sizes, dimensionality) before reading any voxel; plan shards by bytes;
2. workers write whole shards under temporary names (`.tmp-*`), validating each case's
   voxels (NaN/Inf, mask labels, truncated data) before any of its slices is written;
3. only when every shard is complete: rename shards to `{split}-{i:05d}-of-{n:05d}.tfrecord`,
   then write `dataset.json` (temp name, then rename). The manifest is the commit point.

Output is deterministic: cases are sorted, records are encoded byte-for-byte the same
(`records`), so a re-run with the same inputs and options produces identical shards.
"""

from __future__ import annotations

import json
import os
import random
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from liverseg import LiversegError, nifti_io, records
from liverseg.manifest import (MANIFEST, SPLITS, CaseInfo, ConvertOptions, HUStats, Manifest, RegionHU, ShardInfo,
                               SkippedCase, SourceFile, SplitInfo)
from liverseg.nifti_io import InputError

TMP_PREFIX = ".tmp-"
PERCENTILES = (0.5, 5, 25, 50, 75, 95, 99.5)
STAT_SAMPLES = 1_000_000  # HU statistics from a strided subsample of about this many voxels
BODY_HU = -500  # voxels above this are "body" for the body HU statistics


def _ircad_split(number: int) -> str:
    """3D-IRCADb-01 customary split: 1-10 train, 11-15 val, 16-20 test."""
    return "train" if number <= 10 else "val" if number <= 15 else "test"


SPLIT_PRESETS = {"ircad": _ircad_split}


@dataclass
class Case:
    case_id: str
    split: str
    image: Path
    mask: Path
    index: int = -1
    geometry: nifti_io.Geometry | None = None
    error: str | None = None


@dataclass
class ShardJob:
    split: str
    ordinal: int
    tmp: Path
    cases: list[Case] = field(default_factory=list)


@dataclass
class ShardResult:
    """A shard written under its temporary name: what the manifest needs to list it."""

    split: str
    ordinal: int
    tmp: Path
    num_examples: int
    bytes: int
    sha256: str
    cases: list[CaseInfo]
    skipped: list[SkippedCase]


# ------------------------------------------------------------------------- discovery


def _pattern_regex(pattern: str) -> re.Pattern:
    if pattern.count("{case}") != 1:
        raise LiversegError(f"pattern {pattern!r} must contain {{case}} exactly once, e.g. '{{case}}_orig'")
    head, tail = pattern.split("{case}")
    return re.compile(re.escape(head) + r"(?P<case>.+?)" + re.escape(tail) + r"\.nii(\.gz)?$")


def discover(src: Path, opts: ConvertOptions) -> list[Case]:
    """Pair images with masks; the split comes from subfolders, a split file, a preset or seeded fractions."""
    if not src.is_dir():
        raise LiversegError(f"{src}: source folder does not exist")
    img_re, mask_re = _pattern_regex(opts.image_pattern), _pattern_regex(opts.mask_pattern)
    folders = [src / s for s in SPLITS if (src / s).is_dir()]
    loose = [p for p in src.iterdir() if p.is_file() and (img_re.match(p.name) or mask_re.match(p.name))]
    if folders and loose:
        raise LiversegError(
            f"{src}: has both split subfolders ({', '.join(f.name for f in folders)}) and loose volumes "
            f"({loose[0].name}, ...); keep one layout"
        )
    found: dict[str, Case] = {}
    unpaired: list[str] = []
    for folder in folders or [src]:
        split = folder.name if folders else ""
        images, masks = {}, {}
        for p in sorted(folder.iterdir()):
            m_img, m_mask = img_re.match(p.name), mask_re.match(p.name)
            if m_img:
                images[m_img["case"]] = p
            elif m_mask:
                masks[m_mask["case"]] = p
        unpaired += [str(images[c]) for c in sorted(set(images) - set(masks))]
        unpaired += [str(masks[c]) for c in sorted(set(masks) - set(images))]
        for c in sorted(set(images) & set(masks)):
            if c in found:
                raise LiversegError(f"case {c!r} appears in two split folders: {found[c].image} and {images[c]}")
            found[c] = Case(c, split, images[c], masks[c])
    if unpaired:
        raise LiversegError(
            f"{src}: {len(unpaired)} file(s) without a partner ({opts.image_pattern} <-> {opts.mask_pattern}): "
            + ", ".join(unpaired)
        )
    if not found:
        raise LiversegError(
            f"{src}: no image/mask pairs named {opts.image_pattern}.nii[.gz] / {opts.mask_pattern}.nii[.gz] "
            "(set --image-pattern/--mask-pattern)"
        )
    cases = [found[c] for c in sorted(found)]
    _assign_splits(cases, opts, from_folders=bool(folders))
    order = {s: i for i, s in enumerate(SPLITS)}
    cases.sort(key=lambda c: (order[c.split], c.case_id))
    for i, c in enumerate(cases):
        c.index = i
    return cases


def _assign_splits(cases: list[Case], opts: ConvertOptions, from_folders: bool) -> None:
    chosen = [x for x in (opts.split_file, opts.split_preset, (opts.val or opts.test) or None) if x]
    if len(chosen) > 1:
        raise LiversegError("choose one of --split-file, --split-preset or --val/--test")
    if from_folders and chosen:
        raise LiversegError("the source already has train/val/test subfolders; drop --split-file/--split-preset/--val/--test")
    ids = [c.case_id for c in cases]
    if opts.split_file:
        path = Path(opts.split_file)
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise LiversegError(f"{path}: cannot read split file ({e})") from None
        if not isinstance(spec, dict) or set(spec) - set(SPLITS):
            raise LiversegError(f"{path}: must map some of {SPLITS} to lists of case ids")
        where: dict[str, str] = {}
        for split, members in spec.items():
            for c in members:
                if c in where:
                    raise LiversegError(f"{path}: case {c!r} is in both {where[c]} and {split}")
                where[c] = split
        missing = sorted(set(where) - set(ids))
        extra = sorted(set(ids) - set(where))
        if missing or extra:
            raise LiversegError(
                f"{path}: split file and source disagree; "
                + (f"not in source: {', '.join(missing)}; " if missing else "")
                + (f"not in split file: {', '.join(extra)}" if extra else "")
            )
        for c in cases:
            c.split = where[c.case_id]
    elif opts.split_preset:
        if opts.split_preset not in SPLIT_PRESETS:
            raise LiversegError(f"--split-preset {opts.split_preset!r}: choose one of {', '.join(SPLIT_PRESETS)}")
        for c in cases:
            m = re.search(r"(\d+)$", c.case_id)
            if not m:
                raise LiversegError(f"case {c.case_id!r} has no trailing number for --split-preset {opts.split_preset}")
            c.split = SPLIT_PRESETS[opts.split_preset](int(m.group(1)))
    elif not from_folders:
        if not (0 <= opts.val < 1 and 0 <= opts.test < 1 and opts.val + opts.test < 1):
            raise LiversegError(f"--val {opts.val} / --test {opts.test}: fractions in [0, 1) that sum below 1")
        order = sorted(ids)
        random.Random(opts.seed).shuffle(order)
        n = len(order)
        n_test = max(1, round(opts.test * n)) if opts.test else 0
        n_val = max(1, round(opts.val * n)) if opts.val else 0
        if n_test + n_val >= n:
            raise LiversegError(f"{n} cases cannot give {n_val} val + {n_test} test cases and keep one for training")
        split_of = {c: "test" for c in order[:n_test]} | {c: "val" for c in order[n_test:n_test + n_val]}
        for c in cases:
            c.split = split_of.get(c.case_id, "train")


# ------------------------------------------------------------------------- planning


def check_headers(cases: list[Case], opts: ConvertOptions) -> None:
    """Fill each case's stored geometry, or its error, from headers alone."""
    for c in cases:
        try:
            image, mask = nifti_io.read_header(c.image), nifti_io.read_header(c.mask)
            nifti_io.check_pair(image, mask, opts.affine_tol)
            c.geometry = nifti_io.stored_geometry(image, opts.size)
        except InputError as e:
            c.error = str(e)


def _slice_bytes(c: Case) -> int:
    z, h, w = c.geometry.stored_shape
    return z * (3 * h * w + 160)  # int16 image + uint8 mask + features and framing


def plan_shards(cases: list[Case], opts: ConvertOptions, out: Path) -> list[ShardJob]:
    """Whole cases per shard, in case order; by size (shard_mb) or by count (num_shards)."""
    jobs: list[ShardJob] = []
    for split in SPLITS:
        members = [c for c in cases if c.split == split and c.error is None]
        if not members:
            continue
        sizes = np.array([_slice_bytes(c) for c in members], np.float64)
        if opts.num_shards:
            n = min(opts.num_shards, len(members))  # a case never spans shards
            cum = np.cumsum(sizes)
            cuts, prev = [], 0
            for k in range(1, n):  # cut where the running size is closest to k/n of the total
                hi = len(members) - (n - k)
                i = prev + 1 + int(np.argmin(np.abs(cum[prev:hi] - k * cum[-1] / n)))
                cuts.append(i)
                prev = i
            groups = np.split(np.arange(len(members)), cuts)
        else:
            limit = opts.shard_mb * 2**20
            groups, current, acc = [], [], 0.0
            for i, s in enumerate(sizes):
                if current and acc + s > limit:
                    groups.append(current)
                    current, acc = [], 0.0
                current.append(i)
                acc += s
            groups.append(current)
        for g in groups:
            ordinal = len([j for j in jobs if j.split == split])
            jobs.append(ShardJob(split, ordinal, out / f"{TMP_PREFIX}{split}-{ordinal:05d}.tfrecord", [members[i] for i in g]))
    return jobs


# ------------------------------------------------------------------------- writing (workers)


def _prime_at_least(n: int) -> int:
    n = max(2, n)
    while any(n % d == 0 for d in range(2, int(n**0.5) + 1)):
        n += 1
    return n


def _hu_stats(sample: np.ndarray, count: int) -> HUStats:
    """Statistics of `count` voxels estimated from `sample` (HU values)."""
    if sample.size == 0:
        return HUStats(int(count))
    sample = sample.astype(np.float32)
    pct = np.percentile(sample, PERCENTILES, method="linear")
    return HUStats(int(count), round(float(sample.mean()), 3), round(float(sample.std()), 3),
                   {str(p): round(float(v), 3) for p, v in zip(PERCENTILES, pct)})


def _case_stats(image: np.ndarray, mask: np.ndarray, liver_voxels: int) -> RegionHU:
    """Liver and body HU statistics from one strided subsample of the volume.

    The stride is prime, so it never aliases with the row length. The liver count is exact
    (from the per-slice sums), the body count is estimated from the sample.
    """
    step = _prime_at_least(image.size // STAT_SAMPLES)
    img = image.ravel()[::step]
    liver = mask.ravel()[::step].astype(bool)
    body = img > BODY_HU
    body_count = int(body.sum()) * image.size // img.size  # estimated from the sample
    return RegionHU(_hu_stats(img[liver], liver_voxels), _hu_stats(img[body], body_count))


def _load_case(c: Case, opts: ConvertOptions) -> tuple[np.ndarray, np.ndarray, CaseInfo, np.ndarray]:
    """Read, check and reorient one case: (stored image, stored mask, its CaseInfo, liver voxels per slice)."""
    raw_img, sha_img = nifti_io.read_file(c.image)
    raw_mask, sha_mask = nifti_io.read_file(c.mask)
    image, h_img = nifti_io.load_image(c.image, raw_img)
    mask, h_mask = nifti_io.load_mask(c.mask, raw_mask, opts.merge_tumour)
    nifti_io.check_pair(h_img, h_mask, opts.affine_tol)  # the data-time header must match the planned one
    image = nifti_io.to_stored(image, c.geometry, "image")
    mask = nifti_io.to_stored(mask, c.geometry, "mask")
    per_slice = mask.reshape(mask.shape[0], -1).sum(axis=1, dtype=np.int64)
    liver = int(per_slice.sum())
    info = CaseInfo(c.case_id, c.index, c.split, SourceFile(str(c.image), sha_img, len(raw_img)),
                    SourceFile(str(c.mask), sha_mask, len(raw_mask)), c.geometry, int(mask.shape[0]), liver,
                    int(np.count_nonzero(per_slice)), _case_stats(image, mask, liver))
    return image, mask, info, per_slice


def write_shard(job: ShardJob, opts: ConvertOptions) -> "ShardResult":
    """Write one shard (temp name). Returns counts, bytes, sha256, case infos and skipped cases."""
    writer = records.ShardWriter(job.tmp, opts.compression)
    infos, skipped = [], []
    try:
        for c in job.cases:
            try:
                image, mask, info, per_slice = _load_case(c, opts)
            except InputError as e:
                if not opts.skip_bad:
                    raise
                skipped.append(SkippedCase(c.case_id, c.split, str(e)))
                continue
            z, h, w = image.shape
            spacing = c.geometry.stored_spacing
            image = image.astype("<i2", copy=False)  # little-endian on any host; stored arrays are C-contiguous
            for s in range(z):
                writer.write(records.encode_parts(image[s], mask[s], h, w, c.case_id, c.index, s, z,
                                                  int(per_slice[s]), spacing))
            infos.append(info)
    except BaseException:
        writer.abort()
        job.tmp.unlink(missing_ok=True)
        raise
    n, nbytes, sha = writer.close()
    return ShardResult(job.split, job.ordinal, job.tmp, n, nbytes, sha, infos, skipped)


def _write_shard_args(args) -> dict:  # picklable entry point for the process pool
    return write_shard(*args)


# ------------------------------------------------------------------------- the run


def _check_out(out: Path, opts: ConvertOptions, src: Path) -> Manifest | None:
    """Refuse to clobber a different dataset or unrelated files; return the old manifest, if any."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise LiversegError(f"{out}: exists and is not a folder")
    for p in out.glob(f"{TMP_PREFIX}*"):  # leftovers of a killed run
        p.unlink()
    ours = re.compile(r"^(train|val|test)-\d{5}-of-\d{5}\.tfrecord$|^" + re.escape(MANIFEST) + "$")
    foreign = sorted(p.name for p in out.iterdir() if not ours.match(p.name))
    if foreign and not opts.overwrite:
        raise LiversegError(f"{out}: holds files that are not a liverseg dataset ({', '.join(foreign[:5])}); "
                            "choose an empty or new folder")
    if not (out / MANIFEST).is_file():
        return None
    try:
        old = Manifest.load(out, check_shards=False)
    except LiversegError:
        old = None
    same = old is not None and old.options.creation() == opts.creation() and old.source == str(src.resolve())
    if not same and not opts.overwrite:
        raise LiversegError(f"{out}: already holds a different dataset (see {out / MANIFEST}); "
                            "pass --overwrite to replace it or choose another folder")
    return old


def _aggregate_hu(infos: list[CaseInfo], region: str) -> HUStats:
    stats = [getattr(i.hu, region) for i in infos if getattr(i.hu, region).count > 0]
    if not stats:
        return HUStats(0)
    w = np.array([s.count for s in stats], np.float64)
    means = np.array([s.mean for s in stats])
    var = np.array([s.std ** 2 for s in stats])
    mean = float((w * means).sum() / w.sum())
    std = float(np.sqrt((w * (var + (means - mean) ** 2)).sum() / w.sum()))
    pct = {p: float(sum(wi * s.percentiles[p] for wi, s in zip(w, stats)) / w.sum()) for p in stats[0].percentiles}
    return HUStats(int(w.sum()), round(mean, 3), round(std, 3), {k: round(v, 3) for k, v in pct.items()},
                   "pooled mean/std; percentiles are the voxel-weighted mean of per-case percentiles")


def convert(src: str | Path, out: str | Path, opts: ConvertOptions = ConvertOptions(), progress: bool = True) -> Manifest:
    """Convert SRC to a sharded dataset in OUT. Returns the manifest (also written to OUT/dataset.json)."""
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    cases, jobs, old = prepare(src, out, opts)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    results: list[ShardResult] = []
    total = sum(c.geometry.stored_shape[0] for j in jobs for c in j.cases)
    bar = tqdm(total=total, desc="convert", unit="slice", disable=not progress)
    try:
        if opts.workers == 1 or len(jobs) == 1:
            for j in jobs:
                results.append(write_shard(j, opts))
                bar.update(sum(c.geometry.stored_shape[0] for c in j.cases))
        else:
            # spawn: never fork a process that may hold TensorFlow's threads.
            with ProcessPoolExecutor(min(opts.workers, len(jobs)), mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(_write_shard_args, (j, opts)): j for j in jobs}
                try:
                    for f in as_completed(futures):
                        results.append(f.result())
                        bar.update(sum(c.geometry.stored_shape[0] for c in futures[f].cases))
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # running shards finish, queued ones never start
                    raise
        bar.close()
        manifest = assemble(src, opts, cases, results)
        check_same_sources(out, old, manifest, opts)
        return commit(out, manifest, results)
    except BaseException:
        bar.close()
        for j in jobs:
            j.tmp.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


def prepare(src: Path, out: Path, opts: ConvertOptions) -> tuple[list[Case], list[ShardJob], Manifest | None]:
    """Everything before any voxel is read: option checks, discovery, splits, header checks,
    the output folder's state and the shard plan. Raises on the first problem."""
    if opts.compression not in records.COMPRESSIONS:
        raise LiversegError(f"--compression {opts.compression!r}: choose none, GZIP or ZLIB")
    if opts.size is not None and not 16 <= opts.size <= 4096:
        raise LiversegError(f"--size {opts.size}: choose a slice size between 16 and 4096")
    if opts.shard_mb <= 0 or opts.workers < 1 or (opts.num_shards is not None and opts.num_shards < 1):
        raise LiversegError("--shard-mb must be > 0, --workers >= 1, --num-shards >= 1")
    cases = discover(src, opts)
    old = _check_out(out, opts, src)
    check_headers(cases, opts)
    bad = [c for c in cases if c.error]
    if bad and not opts.skip_bad:
        raise InputError(f"{len(bad)} case(s) failed header checks, nothing written (--skip-bad converts the rest):\n  "
                         + "\n  ".join(c.error for c in bad))
    return cases, plan_shards(cases, opts, out), old


def assemble(src: Path, opts: ConvertOptions, cases: list[Case], results: list[ShardResult],
             runner: str = "local") -> Manifest:
    """The manifest of a conversion from its written shards (any order) and the header-failed cases."""
    results = sorted(results, key=lambda r: (SPLITS.index(r.split), r.ordinal))
    skipped = [SkippedCase(c.case_id, c.split, c.error) for c in cases if c.error]
    skipped += [s for r in results for s in r.skipped]
    kept = [r for r in results if r.num_examples > 0]
    splits: dict[str, SplitInfo] = {}
    infos: list[CaseInfo] = []
    for split in SPLITS:
        shards = [r for r in kept if r.split == split]
        if not shards:
            continue
        named = [(records.shard_name(split, k, len(shards)), r) for k, r in enumerate(shards)]
        members = [replace(i, shard=name) for name, r in named for i in r.cases]
        shapes = {tuple(i.geometry.stored_shape[1:]) for i in members}
        splits[split] = SplitInfo(
            num_examples=sum(r.num_examples for r in shards), num_cases=len(members),
            liver_slices=sum(i.liver_slices for i in members), bytes=sum(r.bytes for r in shards),
            slice_shape=shapes.pop() if len(shapes) == 1 else None,
            hu=RegionHU(_aggregate_hu(members, "liver"), _aggregate_hu(members, "body")),
            shards=tuple(ShardInfo(name, r.num_examples, r.bytes, r.sha256, tuple(i.case_id for i in r.cases))
                         for name, r in named))
        infos += members
    return Manifest(source=str(src.resolve()), options=ConvertOptions.from_creation(opts.creation()), splits=splits,
                    cases=tuple(sorted(infos, key=lambda i: i.index)), skipped=tuple(skipped), runner=runner)


def check_same_sources(out: Path, old: Manifest | None, new: Manifest, opts: ConvertOptions) -> None:
    """Re-running into a dataset with the same options must also mean the same source bytes."""
    if old is None or opts.overwrite:
        return
    before = {c.case_id: (c.image.sha256, c.mask.sha256) for c in old.cases}
    if before != {c.case_id: (c.image.sha256, c.mask.sha256) for c in new.cases}:
        raise LiversegError(f"{out}: already holds a dataset converted from different source files; "
                            "pass --overwrite to replace it or choose another folder")


def commit(out: Path, manifest: Manifest, results: list[ShardResult]) -> Manifest:
    """Make a complete conversion final: old manifest out, shards to their final names, new manifest in.

    A crash from the first step on leaves no manifest, i.e. an incomplete dataset that a
    re-run completes; a shard under its final name is always complete.
    """
    (out / MANIFEST).unlink(missing_ok=True)
    ordered = sorted(results, key=lambda r: (SPLITS.index(r.split), r.ordinal))
    for r in ordered:
        if r.num_examples == 0:  # every case of the shard was skipped
            Path(r.tmp).unlink(missing_ok=True)
    final = set()
    for split, info in manifest.splits.items():
        for r, s in zip([r for r in ordered if r.split == split and r.num_examples > 0], info.shards):
            os.replace(r.tmp, out / s.file)
            final.add(s.file)
    for p in out.glob("*-of-*.tfrecord"):
        if p.name not in final:
            p.unlink()
    tmp = out / f"{TMP_PREFIX}{MANIFEST}"
    tmp.write_text(manifest.dumps())
    os.replace(tmp, out / MANIFEST)
    return manifest


__all__ = ["ConvertOptions", "SPLIT_PRESETS", "assemble", "commit", "convert", "discover", "plan_shards", "prepare"]
