"""`dataset.json`, the manifest of a converted dataset: typed, frozen, with one owner.

Every key of the file is spelled here and nowhere else: the converters build a
`Manifest` and call `to_json`; the pipeline, trainer, verifier, evaluator and benchmarks
read it through `Manifest.load` and typed attributes. `ConvertOptions` (how a dataset
was made) lives here too, because the manifest records it and the CLI builds the
`convert` flags from its fields.

Versions: `schema_version` is the record schema (`records.SCHEMA_VERSION`);
`manifest_version` is the layout of this file. A manifest without `manifest_version`
was written before the field existed and is version 1. Version 2 adds DICOM sources
(`series`), the `layout` and `spacing` options and a case geometry's `resampled_hw` and
`window`; version 3 a case's `source` tag and sources of other kinds (`kind`: nrrd, seg;
`label`); version 4 keeps the cases in `cases.jsonl` beside it (one per line, its sha256
and count in `dataset.json`), read only when a case is asked for, and no longer lists each
shard's cases (they follow from the cases), so `dataset.json` and its load stay small
whatever the number of cases; older files read as before. A reader meeting a newer version
says so instead of guessing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from liverseg import __version__, records, serial, storage
from liverseg.geometry import Geometry
from liverseg.records import COMPRESSIONS, RecordsError
from liverseg.source import Source

MANIFEST = "dataset.json"
CASES = "cases.jsonl"  # version 4: one CaseInfo per line, read on first use, checked by its sha256
FORMAT = "liverseg-slices"
MANIFEST_VERSION = 4
LAYOUT = (
    "one example per axial slice in stored geometry: canonical RAS, slice-major [Z, H, W] with rows "
    "anterior->posterior and columns patient right->left (see geometry)"
)


def _opt(default, help: str, **cli):
    """A ConvertOptions field: its default, and the help (and CLI hints) of its `convert` flag."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class ConvertOptions:
    """Options of `liverseg convert`; each field is the flag `--field-name`.

    `creation()` is the subset that determines the output bytes (recorded in the manifest).
    """

    layout: str = _opt(
        "pattern",
        "Source layout: pattern (NIfTI pairs named by --image-pattern/--mask-pattern), "
        "ircad (3D-IRCADb-01 DICOM: 3Dircadb1.N/PATIENT_DICOM + MASKS_DICOM/liver, zipped or not), "
        "msd (Decathlon imagesTr/labelsTr), lits (volume-N/segmentation-N), list (a case list).",
    )
    size: int | None = _opt(
        None,
        "Resize slices in-plane to SIZE x SIZE (default: native); with --spacing, "
        "the SIZE x SIZE window cropped or padded around the body.",
    )
    spacing: float | None = _opt(
        None,
        "Resample slices in-plane to SPACING mm pixels (image: antialiased linear, "
        "mask: nearest), then crop/pad to --size around the body's centre (needs --size).",
    )
    image_pattern: str = _opt("{case}_orig", "Image file name without .nii[.gz].")
    mask_pattern: str = _opt("{case}_liver", "Mask file name without .nii[.gz].")
    split_file: str | None = _opt(None, 'JSON {"train": [...], "val": [...], "test": [...]} of case ids.', exists=True)
    split_preset: str | None = _opt(None, "ircad: cases 1-10 train, 11-15 val, 16-20 test.", choices={"ircad": "ircad"})
    val: float = _opt(0.0, "Fraction of cases for validation (seeded).")
    test: float = _opt(0.0, "Fraction of cases for test (seeded).")
    seed: int = _opt(0, "Seed of the --val/--test split.")
    shard_mb: float = _opt(128.0, "Target shard size in MB (whole cases per shard).")
    num_shards: int | None = _opt(None, "Shards per split (overrides --shard-mb).")
    compression: str = _opt("", "Shard compression.", choices={c or "none": c for c in COMPRESSIONS})
    merge_tumour: bool = _opt(False, "LiTS masks: count tumour (label 2) as liver.")
    mask_segment: str = _opt(
        "liver",
        "--layout list: the segment of a DICOM SEG or .seg.nrrd mask that is the liver, "
        "where the row's mask_label is empty (matched to SegmentLabel or the code meaning).",
    )
    exclude_ircad_overlap: bool = _opt(
        False,
        "Drop the LiTS and Decathlon (MSD) cases that are 3D-IRCADb-01 "
        "patients (LiTS 28-48, MSD liver_28-48: sources number IRCAD's 20 as 28-47 or 28-44 and 46-48).",
    )
    affine_tol: float = _opt(1e-3, "Image/mask affine tolerance in mm.")
    workers: int = _opt(1, "Parallel processes (with --runner direct: Beam's worker processes).")
    runner: str = _opt(
        "local",
        "local: processes on this machine; direct: Apache Beam's DirectRunner; or a Beam runner "
        "name (FlinkRunner, SparkRunner, ...) with its pipeline options after --. Needs liverseg[beam].",
    )
    skip_bad: bool = _opt(False, "Convert the good cases and list the bad ones in the manifest.")
    overwrite: bool = _opt(False, "Replace a different dataset already in OUT.")

    RUN_ONLY = ("workers", "overwrite", "runner")  # how to run, not what is produced

    def creation(self) -> dict:
        """The options that determine the output bytes (recorded in the manifest)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUN_ONLY}

    @classmethod
    def from_creation(cls, d: dict) -> ConvertOptions:
        known = {f.name for f in dataclasses.fields(cls)} - set(cls.RUN_ONLY)
        return cls(**{k: v for k, v in d.items() if k in known})


# ------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class HUStats(serial.Record):
    """HU statistics of a region (liver or body): count, and when it is not empty mean, std
    and percentiles ({"0.5": ..., "99.5": ...}); pooled statistics carry a note."""

    count: int
    mean: float | None = serial.key(omit=True, default=None)
    std: float | None = serial.key(omit=True, default=None)
    percentiles: dict[str, float] | None = serial.key(omit=True, default=None)
    note: str | None = serial.key(omit=True, default=None)


@dataclass(frozen=True)
class RegionHU(serial.Record):
    liver: HUStats
    body: HUStats


def pooled_hu(infos, region: str) -> HUStats:
    """The HU statistics of `region` ("liver" or "body") over cases: pooled mean and std,
    percentiles the voxel-weighted mean of the cases' percentiles."""
    import numpy as np

    stats = [getattr(i.hu, region) for i in infos if getattr(i.hu, region).count > 0]
    if not stats:
        return HUStats(0)
    w = np.array([s.count for s in stats], np.float64)
    means = np.array([s.mean for s in stats])
    var = np.array([s.std**2 for s in stats])
    mean = float((w * means).sum() / w.sum())
    std = float(np.sqrt((w * (var + (means - mean) ** 2)).sum() / w.sum()))
    pct = {p: float(sum(wi * s.percentiles[p] for wi, s in zip(w, stats)) / w.sum()) for p in stats[0].percentiles}
    return HUStats(
        int(w.sum()),
        round(mean, 3),
        round(std, 3),
        {k: round(v, 3) for k, v in pct.items()},
        "pooled mean/std; percentiles are the voxel-weighted mean of per-case percentiles",
    )


@dataclass(frozen=True)
class SourceFile(serial.Record):
    """A source as converted: a NIfTI file, or a DICOM series (`path` its folder or zip,
    `series` its SeriesInstanceUID); sha256 and size in bytes of its file(s)."""

    path: str
    sha256: str
    bytes: int
    series: str | None = serial.key(omit=True, default=None)
    kind: str | None = serial.key(omit=True, default=None)  # "nrrd" or "seg" (None: NIfTI, or DICOM when series is set)
    label: str | None = serial.key(
        omit=True, default=None
    )  # the liver's label in a multi-label mask, or the SEG's segment

    @classmethod
    def of(cls, src: Source, sha256: str, nbytes: int) -> SourceFile:
        """How the manifest records a Source (its kind where the series does not say it)."""
        kind = None if src.kind in ("nifti", "dicom") else src.kind
        return cls(str(src.path), sha256, nbytes, src.series, kind, src.label or None)

    def source(self, image: SourceFile | None = None) -> Source:
        """The Source this entry was converted from (a DICOM series found again by its UID when
        read; a SEG placed on its case's `image`)."""
        kind = self.kind or ("dicom" if self.series else "nifti")
        drawn_on = image.source() if kind == "seg" and image is not None else None
        return Source(kind, Path(self.path), self.series, label=self.label or "", image=drawn_on)


@dataclass(frozen=True)
class CaseInfo(serial.Record):
    """One converted case: where it came from, its geometry, its liver and HU statistics,
    and the shard that holds its slices (contiguous, in slice order)."""

    case_id: str
    index: int  # position in the manifest's cases; the records' case_index
    split: str
    image: SourceFile
    mask: SourceFile
    geometry: Geometry
    num_slices: int
    liver_voxels: int
    liver_slices: int
    hu: RegionHU
    shard: str = ""  # file name, set when shards are named
    source: str = serial.key(
        omit=True, default=""
    )  # the case list's source tag ("real", "phantom", ...; "" when untagged)


@dataclass(frozen=True)
class ShardInfo(serial.Record):
    """A shard file: its records, bytes and sha256 (its cases: `Manifest.cases_of`; versions
    1-3 also listed them here, which reading ignores: they follow from the cases)."""

    file: str
    num_examples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo(serial.Record):
    num_examples: int
    num_cases: int
    liver_slices: int
    bytes: int
    slice_shape: tuple[int, int] | None  # None when cases of the split differ in slice size
    hu: RegionHU
    shards: tuple[ShardInfo, ...]
    min_slices: int | None = serial.key(omit=True, default=None)  # its shortest case's slices (version 4)

    @classmethod
    def of(cls, members, shards) -> SplitInfo:
        """A split's summary from its cases (CaseInfo) and the shards (ShardInfo) that hold them."""
        shapes = {tuple(c.geometry.stored_shape[1:]) for c in members}
        return cls(
            num_examples=sum(c.num_slices for c in members),
            num_cases=len(members),
            liver_slices=sum(c.liver_slices for c in members),
            bytes=sum(s.bytes for s in shards),
            slice_shape=shapes.pop() if len(shapes) == 1 else None,
            hu=RegionHU(pooled_hu(members, "liver"), pooled_hu(members, "body")),
            shards=tuple(shards),
            min_slices=min((c.num_slices for c in members), default=None),
        )

    @property
    def liver_fraction(self) -> float:
        return self.liver_slices / max(1, self.num_examples)


@dataclass(frozen=True)
class SkippedCase(serial.Record):
    case_id: str
    split: str
    error: str


# ------------------------------------------------------------------------- the manifest


class LazyCases(Sequence):
    """The cases of a version-4 manifest: `cases.jsonl`, read and checked (count, sha256) the
    first time a case is asked for. A truncated or replaced file is named, never half-read."""

    def __init__(self, path: Path, sha256: str, count: int):
        self.path, self.sha256, self.count = path, sha256, count

    @functools.cached_property
    def _items(self) -> tuple[CaseInfo, ...]:
        try:
            raw = self.path.read_bytes()
        except OSError as e:
            raise RecordsError(
                f"{self.path}: cannot read the dataset's cases ({e.strerror}); re-run liverseg convert"
            ) from None
        if hashlib.sha256(raw).hexdigest() != self.sha256:
            raise RecordsError(
                f"{self.path}: its sha256 is not the one {self.path.parent / MANIFEST} records (truncated "
                "or replaced); re-run liverseg convert"
            )
        try:
            cases = tuple(CaseInfo.from_json(json.loads(line)) for line in raw.splitlines() if line.strip())
        except (KeyError, TypeError, ValueError) as e:
            raise RecordsError(
                f"{self.path}: malformed case ({type(e).__name__}: {e}); re-run liverseg convert"
            ) from None
        if len(cases) != self.count:
            raise RecordsError(
                f"{self.path}: {len(cases)} cases, {MANIFEST} says {self.count}; re-run liverseg convert"
            )
        return cases

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        return self._items[i]

    def __iter__(self):
        return iter(self._items)

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, Sequence) else NotImplemented

    __hash__ = None


def cases_lines(cases) -> str:
    """The content of `cases.jsonl`: one case per line, in index order."""
    return "".join(json.dumps(c.to_json(), separators=(",", ":")) + "\n" for c in cases)


@dataclass(frozen=True)
class Manifest:
    """The content of `dataset.json`. `root` (the dataset folder) and `sha256` (of the file's
    bytes) are set by `load` and are not part of the file."""

    source: str
    options: ConvertOptions
    splits: dict[str, SplitInfo]
    cases: Sequence[CaseInfo]  # a tuple, or `LazyCases` (version 4, read on first use)
    skipped: tuple[SkippedCase, ...] = ()
    runner: str = "local"  # which converter wrote it: "local" or "beam:<Runner>"
    schema_version: int = records.SCHEMA_VERSION
    manifest_version: int = MANIFEST_VERSION
    liverseg_version: str = __version__
    root: Path | None = field(default=None, compare=False)
    sha256: str | None = field(default=None, compare=False)

    # -- the file

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "schema_version": self.schema_version,
            "manifest_version": self.manifest_version,
            "liverseg_version": self.liverseg_version,
            "creation": {"source": self.source, "options": self.options.creation(), "runner": self.runner},
            "record": {"keys": records.KEY_DOC, "layout": LAYOUT, "compression": self.options.compression or "none"},
            "splits": {name: s.to_json() for name, s in self.splits.items()},
            "cases": {
                "file": CASES,
                "count": len(self.cases),
                "sha256": hashlib.sha256(cases_lines(self.cases).encode()).hexdigest(),
            },
            "skipped": [s.to_json() for s in self.skipped],
        }

    def dumps(self) -> str:
        """dataset.json's content (the cases' file: `cases_lines(manifest.cases)`)."""
        return json.dumps(self.to_json(), indent=1) + "\n"

    @classmethod
    def from_json(cls, d: dict, where: str | Path = MANIFEST) -> Manifest:
        """Parse a manifest dict, refusing other formats and versions this liverseg cannot read
        (version 4's cases are read from CASES beside `where`, when first asked for)."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise RecordsError(f"{where}: not a liverseg dataset manifest (format {got!r})")
        if d.get("schema_version") != records.SCHEMA_VERSION:
            raise RecordsError(
                f"{where}: record schema version {d.get('schema_version')} cannot be read by this "
                f"liverseg (reads version {records.SCHEMA_VERSION}); re-convert the dataset with this version"
            )
        version = d.get("manifest_version", 1)
        if not isinstance(version, int) or not 1 <= version <= MANIFEST_VERSION:
            raise RecordsError(
                f"{where}: manifest version {version!r} is newer than this liverseg reads "
                f"(1..{MANIFEST_VERSION}); upgrade liverseg or re-convert the dataset"
            )
        try:
            creation = d["creation"]
            return cls(
                source=creation["source"],
                options=ConvertOptions.from_creation(creation["options"]),
                splits={k: SplitInfo.from_json(v) for k, v in d["splits"].items()},
                cases=_cases_of(d["cases"], storage.path(where).parent / CASES),
                skipped=tuple(SkippedCase.from_json(s) for s in d.get("skipped", [])),
                runner=creation.get("runner", "local"),
                schema_version=d["schema_version"],
                manifest_version=version,
                liverseg_version=d.get("liverseg_version", "?"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RecordsError(
                f"{where}: malformed manifest ({type(e).__name__}: {e}); re-run liverseg convert"
            ) from None

    @classmethod
    def load(cls, root: str | Path, check_shards: bool = True) -> Manifest:
        """Read ROOT/dataset.json; with check_shards, every listed shard must exist at its size."""
        root = storage.path(root)
        path = root / MANIFEST
        if not path.is_file():
            hint = (
                "the conversion did not finish; re-run liverseg convert"
                if root.is_dir()
                else "the folder does not exist"
            )
            raise RecordsError(f"{root}: no {MANIFEST} manifest ({hint})")
        try:
            raw = path.read_bytes()
            data = json.loads(raw)
        except (OSError, ValueError) as e:
            raise RecordsError(f"{path}: unreadable manifest ({e}); re-run liverseg convert") from None
        m = dataclasses.replace(cls.from_json(data, path), root=root, sha256=hashlib.sha256(raw).hexdigest())
        if check_shards:
            for split in m.splits:
                for s in m.shards(split):
                    p = m.path(s)
                    if not p.is_file():
                        raise RecordsError(f"{p}: shard listed in {path} is missing; re-run liverseg convert")
                    if p.stat().st_size != s.bytes:
                        raise RecordsError(
                            f"{p}: {p.stat().st_size} bytes on disk, manifest says {s.bytes}; "
                            f"the shard is truncated or was replaced (run liverseg verify {root})"
                        )
        return m

    @classmethod
    def shards_listed(cls, path: Path) -> set[str] | None:
        """The shard file names the manifest file `path` lists (any name: a pending or retired
        one too), or None when it is not a readable liverseg manifest. Its cases are not read."""
        try:
            m = cls.from_json(json.loads(storage.path(path).read_bytes()), path)
        except (OSError, ValueError, RecordsError):
            return None
        return {s.file for split in m.splits.values() for s in split.shards}

    # -- reading it

    @functools.cached_property
    def _shard_cases(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for c in self.cases:  # index order: cases are contiguous in their shard, in this order
            out.setdefault(c.shard, []).append(c.case_id)
        return {k: tuple(v) for k, v in out.items()}

    def cases_of(self, shard: ShardInfo | str) -> tuple[str, ...]:
        """The case ids a shard holds, in record order."""
        return self._shard_cases.get(shard if isinstance(shard, str) else shard.file, ())

    @property
    def num_cases(self) -> int:
        """The number of cases (from the summary: reads no case)."""
        return len(self.cases)

    @property
    def compression(self) -> str:
        """ "", "GZIP" or "ZLIB", as TFRecordDataset takes it."""
        return self.options.compression

    @property
    def size(self) -> int | None:
        """The in-plane size slices were resized (or, with spacing, windowed) to (None: native)."""
        return self.options.size

    @property
    def spacing(self) -> float | None:
        """The in-plane pixel size slices were resampled to, in mm (None: native)."""
        return self.options.spacing

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise RecordsError(
                f"{self.root or MANIFEST}: no split {name!r} (splits: {', '.join(self.splits) or 'none'})"
            )
        return self.splits[name]

    def shards(self, split: str) -> tuple[ShardInfo, ...]:
        return self.split(split).shards

    def path(self, shard: ShardInfo | str) -> Path:
        return storage.path(self.root or ".") / (shard if isinstance(shard, str) else shard.file)

    def shard_paths(self, split: str) -> list[Path]:
        return [self.path(s) for s in self.shards(split)]

    def cases_in(self, split: str | None = None) -> list[CaseInfo]:
        return [c for c in self.cases if split is None or c.split == split]

    @functools.cached_property
    def _by_id(self) -> dict[str, CaseInfo]:  # built once per manifest: a lookup is O(1) at any size
        return {c.case_id: c for c in self.cases}

    @functools.cached_property
    def _placement(self) -> dict[str, tuple[ShardInfo, int]]:
        """Each case's shard and its first record there (cases are contiguous in their shard,
        in the shard's order), for every case at once: one pass over the shards."""
        out = {}
        for info in self.splits.values():
            for shard in info.shards:
                first = 0
                for case_id in self.cases_of(shard):
                    out[case_id] = (shard, first)
                    first += self._by_id[case_id].num_slices
        return out

    def case(self, case_id: str) -> CaseInfo:
        try:
            return self._by_id[case_id]
        except KeyError:
            raise RecordsError(f"{self.root or MANIFEST}: no case {case_id!r}") from None

    def records_of(self, case_id: str) -> records.CaseRecords:
        """Where a case's records are (for `records.read_case`): its shard and its first record
        there."""
        case = self.case(case_id)
        shard, first = self._placement[case_id]
        return records.CaseRecords(
            case_id, self.path(shard), first, case.num_slices, self.compression, storage.path(self.root or ".")
        )


def _cases_of(d, path: Path) -> Sequence[CaseInfo]:
    """The cases as a version's file holds them: inline (1-3) or in CASES (4)."""
    if isinstance(d, list):
        return tuple(CaseInfo.from_json(c) for c in d)
    return LazyCases(path, d["sha256"], int(d["count"]))


__all__ = [
    "CASES",
    "CaseInfo",
    "ConvertOptions",
    "HUStats",
    "LazyCases",
    "MANIFEST",
    "Manifest",
    "cases_lines",
    "RegionHU",
    "ShardInfo",
    "SkippedCase",
    "SourceFile",
    "SplitInfo",
]
