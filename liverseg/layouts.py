"""Case layouts: where the image and the mask of each case are, in the layouts users hold.

`find` returns the cases of a folder as {case id: (image Source, mask Source, split)}
(split "" unless the layout's folders say it), or raises naming what does not fit. The
converter, `evaluate --data` and the benchmarks pair cases through it.

pattern  NIfTI pairs named by patterns (`{case}_orig.nii.gz` / `{case}_liver.nii.gz`), loose
         in the folder or in train/val/test subfolders (the default)
ircad    3D-IRCADb-01 as IRCAD distributes it: per patient `3Dircadb1.N/` (or `3Dircadb1.N.zip`)
         holding the CT series in `PATIENT_DICOM/` and the liver mask series (0/255) in
         `MASKS_DICOM/liver/`, each folder possibly zipped (`PATIENT_DICOM.zip`, ...)
msd      Medical Segmentation Decathlon Task03_Liver: `imagesTr/liver_N.nii.gz` with
         `labelsTr/liver_N.nii.gz` (0 background, 1 liver, 2 tumour)
lits     LiTS: `volume-N.nii` with `segmentation-N.nii` anywhere below the folder (its
         "Training Batch" folders), labels 0/1/2
list     a case list (CSV `case,image,mask[,split,source,mask_label]`, or JSON like the
         Decathlon's dataset.json "training" list): each image a NIfTI or NRRD file or a DICOM
         series (folder or zip), each mask a NIfTI or NRRD file, a DICOM SEG file or a DICOM
         series, paths relative to the list (`list_cases`)
msd and lits masks hold tumour as label 2; conversion merges it into the liver.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import NamedTuple

from liverseg import InputError, LiversegError, volumes
from liverseg.records import SPLITS
from liverseg.volumes import Source

LAYOUTS = ("pattern", "ircad", "msd", "lits", "list")
# What `liverseg synth` writes: "flat" and "seed" (train/ + test/ folders) are the pattern
# layout, "ircad" the ircad layout
SYNTH_LAYOUTS = ("flat", "seed", "ircad")
MERGES_TUMOUR = ("msd", "lits")  # layouts whose masks label tumour 2 inside the liver


class Pair(NamedTuple):
    """A case as a layout finds it: its image and mask, its split ("" unless the layout says
    it), its source tag (a case list's `source` column: "real", "phantom", ...) and where it
    was listed (a case list's row: what a message about the case names)."""

    image: Source
    mask: Source
    split: str = ""
    source: str = ""
    origin: str = ""


Found = dict[str, Pair]


def find(src: Path, layout: str = "pattern", image_pattern: str = "{case}_orig",
         mask_pattern: str = "{case}_liver", mask_segment: str = "liver") -> tuple[Found, bool]:
    """The cases of `src` in `layout`, and whether splits came from its folders (the patterns
    name the files of the pattern layout; mask_segment a case list's segment where a row
    names none)."""
    if layout not in LAYOUTS:
        raise LiversegError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if layout == "pattern":
        return _pattern(src, image_pattern, mask_pattern)
    if layout == "list":
        return list_cases(src, mask_segment)
    return {"ircad": _ircad, "msd": _msd, "lits": _lits}[layout](src), False


def _unpaired(src: Path, what: str, lone: list[Path]) -> None:
    if lone:
        raise LiversegError(f"{src}: {len(lone)} file(s) without a partner ({what}): " + ", ".join(map(str, lone)))


def _none_found(src: Path, what: str) -> None:
    raise LiversegError(f"{src}: no cases found ({what}); check --layout and the folder")


# ------------------------------------------------------------------------- pattern (NIfTI)


def _pattern_regex(pattern: str) -> re.Pattern:
    if pattern.count("{case}") != 1:
        raise LiversegError(f"pattern {pattern!r} must contain {{case}} exactly once, e.g. '{{case}}_orig'")
    head, tail = pattern.split("{case}")
    return re.compile(re.escape(head) + r"(?P<case>.+?)" + re.escape(tail) + r"\.nii(\.gz)?$")


def _pattern(src: Path, image_pattern: str, mask_pattern: str) -> tuple[Found, bool]:
    img_re, mask_re = _pattern_regex(image_pattern), _pattern_regex(mask_pattern)
    folders = [src / s for s in SPLITS if (src / s).is_dir()]
    loose = [p for p in src.iterdir() if p.is_file() and (img_re.match(p.name) or mask_re.match(p.name))]
    if folders and loose:
        raise LiversegError(
            f"{src}: has both split subfolders ({', '.join(f.name for f in folders)}) and loose volumes "
            f"({loose[0].name}, ...); keep one layout"
        )
    found: Found = {}
    lone: list[Path] = []
    for folder in folders or [src]:
        split = folder.name if folders else ""
        images, masks = {}, {}
        for p in sorted(folder.iterdir()):
            m_img, m_mask = img_re.match(p.name), mask_re.match(p.name)
            if m_img:
                images[m_img["case"]] = p
            elif m_mask:
                masks[m_mask["case"]] = p
        lone += [images[c] for c in sorted(set(images) - set(masks))] + [masks[c] for c in sorted(set(masks) - set(images))]
        for c in sorted(set(images) & set(masks)):
            if c in found:
                raise LiversegError(f"case {c!r} appears in two split folders: {found[c][0].path} and {images[c]}")
            found[c] = Pair(Source.nifti(images[c]), Source.nifti(masks[c]), split)
    _unpaired(src, f"{image_pattern} <-> {mask_pattern}", lone)
    if not found:
        raise LiversegError(
            f"{src}: no image/mask pairs named {image_pattern}.nii[.gz] / {mask_pattern}.nii[.gz] "
            "(set --image-pattern/--mask-pattern, or --layout for ircad, msd or lits)"
        )
    return found, bool(folders)


# ------------------------------------------------------------------------- 3D-IRCADb-01 (DICOM)

_IRCAD = re.compile(r"^3Dircadb1\.(\d+)(\.zip)?$")


def _ircad(src: Path) -> Found:
    found: Found = {}
    for p in sorted(src.iterdir()):
        m = _IRCAD.match(p.name)
        if not m:
            continue
        case = p.name.removesuffix(".zip")
        series = _ircad_series(p)
        for role in ("image", "mask"):
            if role not in series:
                where = "PATIENT_DICOM/" if role == "image" else "MASKS_DICOM/liver/"
                raise InputError(f"{p}: no {where} series (3D-IRCADb-01 keeps the CT in PATIENT_DICOM/ and the "
                                 "liver mask in MASKS_DICOM/liver/)")
        found[case] = Pair(Source.dicom(series["image"]), Source.dicom(series["mask"]))
    if not found:
        _none_found(src, "--layout ircad expects 3Dircadb1.N folders or zips")
    return found


def _ircad_series(patient: Path) -> dict:
    """The CT series (PATIENT_DICOM) and the liver mask series (MASKS_DICOM/liver) of a patient."""
    from liverseg import dicom_io  # pydicom and geometry: only for DICOM layouts

    def role(member: str) -> str | None:
        parts = [p.removesuffix(".zip") for p in member.replace(dicom_io.NESTED, "/").split("/")]
        if "PATIENT_DICOM" in parts[:-1]:
            return "image"
        if "MASKS_DICOM" in parts[:-1] and parts[-2] == "liver":
            return "mask"
        return None

    out = {}
    for r in ("image", "mask"):  # one search per folder: a derived mask series may reuse the CT's UID
        found = dicom_io.find_series(patient, select=lambda m, r=r: role(m) == r)
        if len(found) > 1:
            raise InputError(f"{patient}: {len(found)} series in {'PATIENT_DICOM' if r == 'image' else 'MASKS_DICOM/liver'}"
                             "; expected one")
        if found:
            out[r] = found[0]
    return out


IRCAD_LABEL_FOLDERS = ("MASKS_DICOM", "LABELLED_DICOM")  # 3D-IRCADb-01's label series, beside PATIENT_DICOM


def is_label_series(series) -> bool:
    """A DICOM series that holds labels, not a scan: 3D-IRCADb-01's MASKS_DICOM/... and LABELLED_DICOM."""
    parts = [p.removesuffix(".zip") for p in Path(str(series.path).replace("!/", "/")).parts]
    return any(folder in parts for folder in IRCAD_LABEL_FOLDERS)


def series_name(series) -> Path:
    """The path that names a DICOM series (for output files): its folder, or for 3D-IRCADb-01's
    generic PATIENT_DICOM (every patient's CT is called so) the patient's folder."""
    path = Path(str(series.path).replace("!/", "/"))
    while path.name.removesuffix(".zip") == "PATIENT_DICOM" and len(path.parts) > 1:  # the folder, then its zip
        path = path.parent
    return path


# ------------------------------------------------------------------------- MSD Task03_Liver, LiTS (NIfTI)


def _nifti_name(p: Path) -> str:
    return p.name.removesuffix(".gz").removesuffix(".nii")


def _msd(src: Path) -> Found:
    images_dir, labels_dir = src / "imagesTr", src / "labelsTr"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise LiversegError(f"{src}: --layout msd expects imagesTr/ and labelsTr/ (the Decathlon's Task03_Liver)")

    def volumes(folder: Path) -> dict[str, Path]:  # "._liver_0.nii.gz" files are macOS metadata in the MSD tarball
        return {_nifti_name(p): p for p in sorted(folder.iterdir())
                if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith(".")}

    images, labels = volumes(images_dir), volumes(labels_dir)
    _unpaired(src, "imagesTr <-> labelsTr", [images[c] for c in sorted(set(images) - set(labels))]
              + [labels[c] for c in sorted(set(labels) - set(images))])
    found = {c: Pair(Source.nifti(images[c]), Source.nifti(labels[c])) for c in sorted(set(images) & set(labels))}
    if not found:
        _none_found(src, "imagesTr/ and labelsTr/ hold no NIfTI pairs")
    return found


_LITS = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$")


def _lits(src: Path) -> Found:
    files: dict[str, dict[int, Path]] = {"volume": {}, "segmentation": {}}
    for p in sorted(src.rglob("*")):
        m = _LITS.match(p.name)
        if m and p.is_file():
            kind, n = m.group(1), int(m.group(2))
            if n in files[kind]:
                raise LiversegError(f"{src}: {kind}-{n} appears twice ({files[kind][n]} and {p})")
            files[kind][n] = p
    vol, seg = files["volume"], files["segmentation"]
    _unpaired(src, "volume-N <-> segmentation-N", [vol[n] for n in sorted(set(vol) - set(seg))]
              + [seg[n] for n in sorted(set(seg) - set(vol))])
    found = {f"lits_{n:03d}": Pair(Source.nifti(vol[n]), Source.nifti(seg[n])) for n in sorted(set(vol) & set(seg))}
    if not found:
        _none_found(src, "--layout lits expects volume-N.nii / segmentation-N.nii files")
    return found


# ------------------------------------------------------------------------- a case list (any format)

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
            raise LiversegError(f"{where}: case {case!r} is named twice (also at {where_of[case]}); give every case its "
                                "own id")
        split, source = (row.get("split") or "").strip(), (row.get("source") or "").strip()
        if split and split not in SPLITS:
            raise LiversegError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        if source and not _SOURCE.match(source):
            raise LiversegError(f"{where}: source {source!r}: use letters, digits, '_' and '-' (e.g. real, phantom)")
        splits.add(bool(split))
        image = _image_source(path.parent, row.get("image", ""), where)
        found[case] = Pair(image, _mask_source(path.parent, row.get("mask", ""), image, row.get("mask_label") or "",
                                               where, mask_segment), split, source, where)
        where_of[case] = where
    if not found:
        raise LiversegError(f"{path}: the case list holds no cases")
    if splits == {True, False}:
        raise LiversegError(f"{path}: some rows give a split and others do not; give every row one, or none (then "
                            "--val/--test or --split-file split them)")
    return found, splits == {True}


def _csv_rows(path: Path) -> list[tuple[str, dict]]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [(f"{path} row {i + 2}", {k.strip(): (v or "").strip() for k, v in r.items() if k}) for i, r in
                    enumerate(reader) if any((v or "").strip() for v in r.values())]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LiversegError(f"{path}: cannot read the case list ({e})") from None
    missing = [c for c in ("case", "image", "mask") if c not in columns]
    unknown = [c for c in columns if c not in LIST_COLUMNS]
    if missing or unknown:
        raise LiversegError(f"{path}: the header row must name case,image,mask (and optionally split, source, "
                            f"mask_label): " + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                                         + ([f"unknown {', '.join(unknown)}"] if unknown else [])))
    return rows


def _json_rows(path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LiversegError(f"{path}: cannot read the case list ({e})") from None
    entries = data.get("training") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise LiversegError(f'{path}: expected {{"training": [{{"image": ..., "label": ...}}, ...]}} (or a list of such '
                            "entries)")
    rows = []
    for i, e in enumerate(entries):
        row = {k: str(v) for k, v in e.items() if v is not None}
        if "mask" not in row and "label" in row:  # the Decathlon's name for the mask file
            row["mask"] = row.pop("label")
        unknown = sorted(set(row) - set(LIST_COLUMNS))
        if unknown:
            raise LiversegError(f"{path} entry {i + 1}: unknown key(s) {', '.join(unknown)} (known: image, label or "
                                f"mask, {', '.join(c for c in LIST_COLUMNS if c not in ('image', 'mask'))})")
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
        raise LiversegError(f"{where}: {what} {value} does not exist ({p}); fix the path (relative to the list's folder)")
    return p


def _kind(p: Path) -> str | None:
    name = p.name.lower()
    return next((kind for suffix, kind in volumes.SUFFIXES.items() if name.endswith(suffix)), None)


def _image_source(base: Path, value: str, where: str) -> Source:
    p = _resolve(base, value, "image", where)
    kind = _kind(p)
    if kind == "nifti":
        return Source.nifti(p)
    if kind == "nrrd":
        return Source.nrrd(p)
    from liverseg import dicom_io

    try:
        ct = [s for s in dicom_io.find_series(p) if s.modality in ("CT", "")]
    except InputError as e:
        raise LiversegError(f"{where}: image {value}: {e}") from None
    if len(ct) != 1:
        raise LiversegError(f"{where}: image {value} holds {len(ct)} CT series; point the image at one (a NIfTI or NRRD "
                            "file, or a DICOM series' folder or zip)")
    return Source.dicom(ct[0])


def _mask_source(base: Path, value: str, image: Source, label: str, where: str, segment: str = "liver") -> Source:
    p = _resolve(base, value, "mask", where)
    kind = _kind(p)
    if kind == "nifti":
        return Source.nifti(p, label)
    if kind == "nrrd":
        return Source.nrrd(p, label or (segment if p.name.lower().endswith(".seg.nrrd") else ""))
    from liverseg import dicom_io

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


# ------------------------------------------------------------------------- public datasets that overlap

# LiTS volumes that are 3D-IRCADb-01's 20 patients; the Decathlon's Task03_Liver holds LiTS's
# training volumes under the same numbers (liver_N = volume-N). Which LiTS number is which
# IRCAD patient is not published, so each of them counts as overlapping every IRCAD patient.
LITS_FROM_IRCAD = frozenset((*range(28, 45), *range(46, 49)))
_IRCAD_NAMES = (re.compile(r"^3Dircadb1\.(\d+)(\.zip)?$"), re.compile(r"^ircad_e?(\d+)$"))
_LITS_NAMES = (re.compile(r"^lits_(\d+)$"), re.compile(r"^volume-(\d+)(\.nii(\.gz)?)?$"),
               re.compile(r"^liver_(\d+)(\.nii(\.gz)?)?$"))


def public_origin(case_id: str, image: Path | None = None) -> str | None:
    """"ircad" for a 3D-IRCADb-01 patient, "lits-ircad" for a LiTS or Decathlon case that is
    one (LITS_FROM_IRCAD), by its case id or the names on its image's path; else None."""
    names = [case_id, *(Path(image).parts[-3:] if image else ())]
    for name in names:
        if any(p.match(name) for p in _IRCAD_NAMES):
            return "ircad"
        for p in _LITS_NAMES:
            m = p.match(name)
            if m:
                return "lits-ircad" if int(m.group(1)) in LITS_FROM_IRCAD else None
    return None


def ircad_overlap(first: dict[str, Path | None], second: dict[str, Path | None] | None = None) -> str | None:
    """Why some of these cases are the same patients (case id -> image path), or None: IRCAD
    patients and LiTS/MSD cases that are IRCAD patients within `first`, or (with `second`)
    between the two sets, either way round."""
    def split(cases):
        origins = {c: public_origin(c, image) for c, image in cases.items()}
        return (sorted(c for c, o in origins.items() if o == "ircad"),
                sorted(c for c, o in origins.items() if o == "lits-ircad"))

    a_ircad, a_lits = split(first)
    b_ircad, b_lits = split(second) if second is not None else (a_ircad, a_lits)
    if a_ircad and b_lits:
        ircad, lits = a_ircad, b_lits
    elif a_lits and b_ircad:
        ircad, lits = b_ircad, a_lits
    else:
        return None

    def named(ids):
        return ", ".join(ids[:6]) + (f" and {len(ids) - 6} more" if len(ids) > 6 else "")

    return (f"{named(lits)} (LiTS/Decathlon) are 3D-IRCADb-01 scans, as are {named(ircad)} "
            "(LiTS volumes 28-44 and 46-48 are IRCAD's 20 patients)")


__all__ = ["LAYOUTS", "LIST_COLUMNS", "MERGES_TUMOUR", "LITS_FROM_IRCAD", "Pair", "SYNTH_LAYOUTS", "find", "ircad_overlap",
           "list_cases", "public_origin"]
