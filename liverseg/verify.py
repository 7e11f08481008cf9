"""Checking and looking at a converted dataset: `liverseg verify` and `liverseg inspect`."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liverseg import overlay, records
from liverseg.manifest import CaseInfo, Manifest
from liverseg.records import FramingError


@dataclass
class ShardReport:
    file: str
    split: str
    num_examples: int
    bytes: int
    status: str  # "ok" or what is wrong, naming the record and byte offset when known

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _check_contents(examples: list[dict], shard_cases: tuple[str, ...], cases: dict[str, CaseInfo]) -> str | None:
    """Cases contiguous and complete, slices in order, features consistent with the manifest."""
    expected = [(cid, s) for cid in shard_cases for s in range(cases[cid].num_slices)]
    if len(examples) != len(expected):
        return f"{len(examples)} records, manifest cases need {len(expected)}"
    for k, (ex, (cid, s)) in enumerate(zip(examples, expected)):
        c = cases[cid]
        got = (ex["case_id"], ex["slice_index"], ex["num_slices"], ex["case_index"])
        if got != (cid, s, c.num_slices, c.index):
            return (
                f"record {k}: is {got[0]} slice {got[1]}/{got[2]} (index {got[3]}), expected {cid} slice "
                f"{s}/{c.num_slices}"
            )
        if ex["liver_voxels"] != ex["mask_sum"] or ex["mask_max"] > 1:
            return f"record {k}: mask disagrees with its liver_voxels feature or is not binary"
        if tuple(ex["hw"]) != tuple(c.geometry.stored_shape[1:]):
            return f"record {k}: slice {tuple(ex['hw'])} but the case is stored at {tuple(c.geometry.stored_shape[1:])}"
    return None


def _summary(ex: dict) -> dict:
    """What `_check_contents` compares, from one parsed record."""
    h, w = ex[records.HEIGHT][0], ex[records.WIDTH][0]
    image, mask = ex[records.IMAGE][0], np.frombuffer(ex[records.MASK][0], np.uint8)
    if len(image) != 2 * h * w or mask.size != h * w:
        raise ValueError(f"its image or mask bytes do not hold a {h}x{w} slice")
    return {
        "case_id": ex[records.CASE_ID][0].decode(),
        "slice_index": ex[records.SLICE_INDEX][0],
        "num_slices": ex[records.NUM_SLICES][0],
        "case_index": ex[records.CASE_INDEX][0],
        "liver_voxels": ex[records.LIVER_VOXELS][0],
        "mask_sum": int(mask.sum(dtype=np.int64)),
        "mask_max": int(mask.max(initial=0)),
        "hw": (h, w),
    }


def verify(root: str | Path) -> list[ShardReport]:
    """Read every record of every shard: size, sha256, CRCs, counts and decodability vs the manifest."""
    m = Manifest.load(root, check_shards=False)
    cases = {c.case_id: c for c in m.cases}
    reports = []
    for split in m.splits:
        for shard in m.shards(split):
            path = m.path(shard)
            rep = ShardReport(shard.file, split, shard.num_examples, shard.bytes, "ok")
            reports.append(rep)
            if not path.is_file():
                rep.status = "missing"
                continue
            data = path.read_bytes()
            if len(data) != shard.bytes:
                rep.status = f"{len(data)} bytes, manifest says {shard.bytes} (truncated or replaced)"
            elif hashlib.sha256(data).hexdigest() != shard.sha256:
                rep.status = "sha256 differs from the manifest (corrupted or replaced)"
            del data
            try:
                raw = [r for _, _, r in records.iter_records(path, m.compression)]
            except FramingError as e:
                rep.status = f"record {e.index} at byte {e.offset}: {e.reason}"
                continue
            except Exception as e:  # noqa: BLE001 - decompression errors of many kinds
                rep.status = f"unreadable: {e}"
                continue
            if not rep.ok:
                continue
            examples = []
            try:
                for r in raw:
                    examples.append(_summary(records.parse_example(r)))
            except (ValueError, KeyError, IndexError, UnicodeDecodeError, struct.error) as e:
                rep.status = f"record {len(examples)} does not decode: {e or type(e).__name__}"
                continue
            problem = _check_contents(examples, m.cases_of(shard), cases)
            if problem:
                rep.status = problem
    return reports


def inspect(root: str | Path, png_dir: str | Path | None = None, max_cases: int = 3) -> list[dict]:
    """Per-split summary rows; with png_dir, an axial+coronal overlay PNG of up to max_cases cases per split."""

    m = Manifest.load(root)
    rows = []
    for split in m.splits:
        s = m.split(split)
        rows.append(
            {
                "split": split,
                "cases": s.num_cases,
                "slices": s.num_examples,
                "liver_slices": s.liver_slices,
                "shards": len(s.shards),
                "MB": round(s.bytes / 2**20, 1),
                "slice_shape": "x".join(map(str, s.slice_shape)) if s.slice_shape else "mixed",
            }
        )
        if png_dir is None:
            continue
        Path(png_dir).mkdir(parents=True, exist_ok=True)
        for case in m.cases_in(split)[:max_cases]:
            image, mask = records.read_case(m.records_of(case.case_id))
            panel = overlay.case_panel(image, case.geometry.stored_spacing, truth=mask)
            overlay.write_png(Path(png_dir) / f"{case.case_id}.png", panel)
    return rows
