"""The case list: a CSV `case,image,mask[,split,source,mask_label]` or the Decathlon's JSON
"training" list, each image a NIfTI or NRRD file or a DICOM series (folder or zip), each mask a
NIfTI or NRRD file, a DICOM SEG file or a DICOM series, paths relative to the list. Every
refusal names the list and the row."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from liverseg import InputError, LiversegError, dicom_io, volumes
from liverseg.records import SPLITS
from liverseg.source import Found, Pair, Source

_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # also a file name: overlays, outputs
_SOURCE = re.compile(r"^[A-Za-z0-9_-]+$")
LIST_COLUMNS = ("case", "image", "mask", "split", "source", "mask_label")


def list_cases(path: Path, mask_segment: str = "liver") -> tuple[Found, bool]:
    """The cases of a case list, and whether it gives their splits (a `split` column).

    CSV: a header row naming `case,image,mask` and optionally `split`, `source` and
    `mask_label` (which label of a multi-label mask is the liver: a value, or a segment's
    name in a DICOM SEG or a .seg.nrrd; mask_segment where the row gives none). JSON: {"training":
    [{"image": ..., "label": ...}]} as the Decathlon's dataset.json writes it ("label" is the
    mask there; `case`, `split`, `source`, `mask_label` optional: the case id defaults to the
    image's name). Every refusal names the list and the row."""
    path = Path(path)
    if not path.is_file():
        raise LiversegError(f"{path}: --layout list needs a case list file (CSV or JSON), not a folder")
    rows = _json_rows(path) if path.suffix.lower() == ".json" else _csv_rows(path)
    found: Found = {}
    where_of: dict[str, str] = {}
    splits = set()
    for where, row in rows:
        case = row.get("case") or _image_name(row.get("image", ""))
        if not _CASE_ID.match(case or ""):
            raise LiversegError(f"{where}: case id {case!r}: use letters, digits, '_', '.' and '-' (it names files)")
        if case in found:
            raise LiversegError(
                f"{where}: case {case!r} is named twice (also at {where_of[case]}); give every case its own id"
            )
        split, source = (row.get("split") or "").strip(), (row.get("source") or "").strip()
        if split and split not in SPLITS:
            raise LiversegError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        if source and not _SOURCE.match(source):
            raise LiversegError(f"{where}: source {source!r}: use letters, digits, '_' and '-' (e.g. real, phantom)")
        splits.add(bool(split))
        image = _image_source(path.parent, row.get("image", ""), where)
        found[case] = Pair(
            image,
            _mask_source(path.parent, row.get("mask", ""), image, row.get("mask_label") or "", where, mask_segment),
            split,
            source,
            where,
        )
        where_of[case] = where
    if not found:
        raise LiversegError(f"{path}: the case list holds no cases")
    if splits == {True, False}:
        raise LiversegError(
            f"{path}: some rows give a split and others do not; give every row one, or none (then "
            "--val/--test or --split-file split them)"
        )
    return found, splits == {True}


def _csv_rows(path: Path) -> list[tuple[str, dict]]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [
                (f"{path} row {i + 2}", {k.strip(): (v or "").strip() for k, v in r.items() if k})
                for i, r in enumerate(reader)
                if any((v or "").strip() for v in r.values())
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LiversegError(f"{path}: cannot read the case list ({e})") from None
    missing = [c for c in ("case", "image", "mask") if c not in columns]
    unknown = [c for c in columns if c not in LIST_COLUMNS]
    if missing or unknown:
        raise LiversegError(
            f"{path}: the header row must name case,image,mask (and optionally split, source, "
            f"mask_label): "
            + "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else [])
                + ([f"unknown {', '.join(unknown)}"] if unknown else [])
            )
        )
    return rows


def _json_rows(path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LiversegError(f"{path}: cannot read the case list ({e})") from None
    entries = data.get("training") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise LiversegError(
            f'{path}: expected {{"training": [{{"image": ..., "label": ...}}, ...]}} (or a list of such entries)'
        )
    rows = []
    for i, e in enumerate(entries):
        row = {k: str(v) for k, v in e.items() if v is not None}
        if "mask" not in row and "label" in row:  # the Decathlon's name for the mask file
            row["mask"] = row.pop("label")
        unknown = sorted(set(row) - set(LIST_COLUMNS))
        if unknown:
            raise LiversegError(
                f"{path} entry {i + 1}: unknown key(s) {', '.join(unknown)} (known: image, label or "
                f"mask, {', '.join(c for c in LIST_COLUMNS if c not in ('image', 'mask'))})"
            )
        rows.append((f"{path} entry {i + 1}", row))
    return rows


def _image_name(image: str) -> str:
    name = Path(image.rstrip("/")).name
    for suffix in (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".nhdr", ".zip"):
        name = name.removesuffix(suffix)
    return name.removesuffix("_0000")  # nnU-Net's channel suffix


def _resolve(base: Path, value: str, what: str, where: str) -> Path:
    if not value:
        raise LiversegError(f"{where}: no {what} given")
    p = (base / value).resolve() if not Path(value).is_absolute() else Path(value)
    if not p.exists():
        raise LiversegError(
            f"{where}: {what} {value} does not exist ({p}); fix the path (relative to the list's folder)"
        )
    return p


def _image_source(base: Path, value: str, where: str) -> Source:
    p = _resolve(base, value, "image", where)
    kind = volumes.kind_by_name(p)
    if kind is not None:
        return Source(kind, p)
    try:
        ct = [s for s in dicom_io.find_series(p) if s.modality in ("CT", "")]
    except InputError as e:
        raise LiversegError(f"{where}: image {value}: {e}") from None
    if len(ct) != 1:
        raise LiversegError(
            f"{where}: image {value} holds {len(ct)} CT series; point the image at one (a NIfTI or NRRD "
            "file, or a DICOM series' folder or zip)"
        )
    return Source.dicom(ct[0])


def _mask_source(base: Path, value: str, image: Source, label: str, where: str, segment: str = "liver") -> Source:
    p = _resolve(base, value, "mask", where)
    kind = volumes.kind_by_name(p)
    if kind is not None:
        return volumes.READERS[kind].mask_source(p, label, segment)
    if p.is_file() and not p.name.lower().endswith(".zip"):  # one DICOM file: a Segmentation object
        if not dicom_io.is_segmentation(p):
            raise LiversegError(f"{where}: mask {value} is neither NIfTI, NRRD nor a DICOM Segmentation (SEG) file")
        return Source.seg(p, image, label or segment)
    try:
        series = dicom_io.find_series(p)
    except InputError as e:
        raise LiversegError(f"{where}: mask {value}: {e}") from None
    if len(series) != 1:
        raise LiversegError(f"{where}: mask {value} holds {len(series)} DICOM series; point the mask at one")
    return Source.dicom(series[0])


__all__ = ["LIST_COLUMNS", "list_cases"]
