"""Conversion, phase 2: plan shards (whole cases, in case order) and write one shard.

`write_shard` is what a worker runs (a local process, or a Beam worker): it reads and
checks each case's voxels, reorients them to stored geometry, and writes the case's
slices in order under the shard's temporary name. It never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import errno
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from liverseg import InputError, LiversegError, geometry, records, volumes
from liverseg.convert.discover import Case
from liverseg.manifest import CaseInfo, ConvertOptions, HUStats, RegionHU, SkippedCase, SourceFile
from liverseg.records import SPLITS

# A conversion's temporary files in OUT carry this marker, and only names of exactly these
# forms are ever removed as a killed conversion's leftovers: a user's `.tmp-draft.txt` is not ours.
TMP_PREFIX = ".liverseg-tmp-"
_TEMPORARY = re.compile(
    r"^"
    + re.escape(TMP_PREFIX)
    + r"(?:(?:train|val|test)-\d{5}\.tfrecord|case-\d{6}\.records|dataset\.json|cases\.jsonl|ledger)$"
)


def is_temporary(name: str) -> bool:
    """Whether a file name in OUT is one of a conversion's temporary files (shards, Beam's
    case segments, the manifest, cases file and ledger before the commit)."""
    return bool(_TEMPORARY.match(name))


PERCENTILES = (0.5, 5, 25, 50, 75, 95, 99.5)
STAT_SAMPLES = 1_000_000  # HU statistics from a strided subsample of about this many voxels
BODY_HU = geometry.BODY_HU  # voxels above this are "body" for the body HU statistics


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

    @classmethod
    def of(cls, job: ShardJob, written: tuple[int, int, str], outcomes) -> ShardResult:
        """The result of `job` from what `writing` returned (examples, bytes, sha256) and its
        cases' outcomes in order (CaseInfo, or SkippedCase under --skip-bad)."""
        n, nbytes, sha = written
        return cls(
            job.split,
            job.ordinal,
            job.tmp,
            n,
            nbytes,
            sha,
            [o for o in outcomes if isinstance(o, CaseInfo)],
            [o for o in outcomes if isinstance(o, SkippedCase)],
        )


@contextlib.contextmanager
def full_disk_named(out):
    """A full disk while writing as one LiversegError naming the file (else OUT): nothing was
    made final. Beam passes its text on from a worker."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise LiversegError(
            f"{Path(e.filename or out)}: no space left on device; nothing was made final; free space "
            "(or choose another output folder) and re-run"
        ) from None


def estimated_bytes(c: Case) -> int:
    """Uncompressed bytes of a case's records (from its header): int16 image + uint8 mask + features and framing."""
    z, h, w = c.geometry.stored_shape
    return z * (3 * h * w + 160)


def plan_shards(cases: list[Case], opts: ConvertOptions, out: Path) -> list[ShardJob]:
    """Whole cases per shard, in case order, each shard one source's; by size (shard_mb) or by
    count (num_shards, per split and source)."""
    jobs: list[ShardJob] = []
    ordinals: dict[str, int] = {}  # shards planned so far per split
    groups_of = [
        (split, source) for split in SPLITS for source in sorted({c.source for c in cases if c.split == split})
    ]
    by_group: dict[tuple[str, str], list[Case]] = {}
    for c in cases:
        if c.error is None:
            by_group.setdefault((c.split, c.source), []).append(c)
    for split, source in groups_of:  # a shard holds one source's cases: sources can be read apart (source_weights)
        members = by_group.get((split, source), [])
        if not members:
            continue
        sizes = np.array([estimated_bytes(c) for c in members], np.float64)
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
            ordinal = ordinals.get(split, 0)
            ordinals[split] = ordinal + 1
            jobs.append(
                ShardJob(split, ordinal, out / f"{TMP_PREFIX}{split}-{ordinal:05d}.tfrecord", [members[i] for i in g])
            )
    return jobs


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
    return HUStats(
        int(count),
        round(float(sample.mean()), 3),
        round(float(sample.std()), 3),
        {str(p): round(float(v), 3) for p, v in zip(PERCENTILES, pct)},
    )


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
    img, msk = volumes.load_image(c.image), volumes.load_mask(c.mask, opts.merge_tumour)
    h_img, h_mask = img.header, msk.header
    geometry.check_pair(h_img, h_mask, opts.affine_tol)  # the data-time headers must agree too
    image, geom = geometry.to_stored_image(img.voxels, h_img, opts.size, opts.spacing)
    if geom.stored_shape != c.geometry.stored_shape:
        raise InputError(
            f"{c.image.name}: its voxels ({geom.stored_shape}) disagree with its header "
            f"({c.geometry.stored_shape}); the file changed during conversion"
        )
    mask = geometry.to_stored(geometry.onto_grid(msk.voxels, h_mask, h_img), geom, "mask")
    per_slice = mask.reshape(mask.shape[0], -1).sum(axis=1, dtype=np.int64)
    liver = int(per_slice.sum())
    info = CaseInfo(
        c.case_id,
        c.index,
        c.split,
        SourceFile.of(c.image, img.sha256, img.nbytes),
        SourceFile.of(c.mask, msk.sha256, msk.nbytes),
        geom,
        int(mask.shape[0]),
        liver,
        int(np.count_nonzero(per_slice)),
        _case_stats(image, mask, liver),
        source=c.source,
    )
    return image, mask, info, per_slice


def write_case(writer: records.ShardWriter, c: Case, opts: ConvertOptions) -> CaseInfo | SkippedCase:
    """Append one case's slices to `writer`, in slice order; or, with --skip-bad, return why
    it was skipped (nothing of it is written: its voxels are checked before its first slice)."""
    try:
        image, mask, info, per_slice = _load_case(c, opts)
    except InputError as e:
        if not opts.skip_bad:
            raise InputError(c.explain(e)) from None
        return SkippedCase(c.case_id, c.split, c.explain(e))
    z, h, w = image.shape
    spacing = c.geometry.stored_spacing
    image = image.astype("<i2", copy=False)  # little-endian on any host; stored arrays are C-contiguous
    for s in range(z):
        writer.write(
            records.encode_parts(image[s], mask[s], h, w, c.case_id, c.index, s, z, int(per_slice[s]), spacing)
        )
    return info


def writing(path: Path, compression: str, fill) -> tuple[int, int, str]:
    """Open a ShardWriter on `path`, let fill(writer) write, close it: (records, bytes, sha256).
    On any failure the file is removed; a full disk is reported naming it."""
    writer = records.ShardWriter(path, compression)
    try:
        fill(writer)
        return writer.close()
    except BaseException as e:
        writer.abort()
        with contextlib.suppress(OSError, LiversegError):  # the first failure is the one reported
            path.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and not e.filename:  # writes name no file: name it
            raise OSError(errno.ENOSPC, e.strerror, str(path)) from None
        raise


def write_shard(job: ShardJob, opts: ConvertOptions) -> ShardResult:
    """Write one shard (temp name), its cases in order. Returns counts, bytes, sha256, case infos and skipped cases."""
    done: list[CaseInfo | SkippedCase] = []
    written = writing(job.tmp, opts.compression, lambda w: done.extend(write_case(w, c, opts) for c in job.cases))
    return ShardResult.of(job, written, done)
