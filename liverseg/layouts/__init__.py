"""Case layouts: where the image and the mask of each case are, in the layouts users hold.

Rooms: this module (`find`, the folder layouts, DICOM series names), `case_list` (the
case-list format) and `overlap` (public datasets that hold the same patients).

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

import re
from pathlib import Path

from liverseg import InputError, LiversegError, dicom_io
from liverseg.layouts.case_list import LIST_COLUMNS, list_cases
from liverseg.layouts.overlap import LITS_FROM_IRCAD, ircad_overlap, public_origin
from liverseg.records import SPLITS
from liverseg.source import Found, Pair, Source, member_parts

LAYOUTS = ("pattern", "ircad", "msd", "lits", "list")
# What `liverseg synth` writes: "flat" and "seed" (train/ + test/ folders) are the pattern
# layout, "ircad" the ircad layout
SYNTH_LAYOUTS = ("flat", "seed", "ircad")
MERGES_TUMOUR = ("msd", "lits")  # layouts whose masks label tumour 2 inside the liver


def find(
    src: Path,
    layout: str = "pattern",
    image_pattern: str = "{case}_orig",
    mask_pattern: str = "{case}_liver",
    mask_segment: str = "liver",
) -> tuple[Found, bool]:
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
        lone += [images[c] for c in sorted(set(images) - set(masks))] + [
            masks[c] for c in sorted(set(masks) - set(images))
        ]
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
                raise InputError(
                    f"{p}: no {where} series (3D-IRCADb-01 keeps the CT in PATIENT_DICOM/ and the "
                    "liver mask in MASKS_DICOM/liver/)"
                )
        found[case] = Pair(Source.dicom(series["image"]), Source.dicom(series["mask"]))
    if not found:
        _none_found(src, "--layout ircad expects 3Dircadb1.N folders or zips")
    return found


def _ircad_series(patient: Path) -> dict:
    """The CT series (PATIENT_DICOM) and the liver mask series (MASKS_DICOM/liver) of a patient."""

    def role(member: str) -> str | None:
        parts = member_parts(member)
        if "PATIENT_DICOM" in parts[:-1]:
            return "image"
        if "MASKS_DICOM" in parts[:-1] and parts[-2] == "liver":
            return "mask"
        return None

    out = {}
    for r in ("image", "mask"):  # one search per folder: a derived mask series may reuse the CT's UID
        found = dicom_io.find_series(patient, select=lambda m, r=r: role(m) == r)
        if len(found) > 1:
            raise InputError(
                f"{patient}: {len(found)} series in {'PATIENT_DICOM' if r == 'image' else 'MASKS_DICOM/liver'}"
                "; expected one"
            )
        if found:
            out[r] = found[0]
    return out


IRCAD_LABEL_FOLDERS = ("MASKS_DICOM", "LABELLED_DICOM")  # 3D-IRCADb-01's label series, beside PATIENT_DICOM


def is_label_series(series) -> bool:
    """A DICOM series that holds labels, not a scan: 3D-IRCADb-01's MASKS_DICOM/... and LABELLED_DICOM."""
    parts = member_parts(str(series.path))
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
        return {
            _nifti_name(p): p
            for p in sorted(folder.iterdir())
            if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith(".")
        }

    images, labels = volumes(images_dir), volumes(labels_dir)
    _unpaired(
        src,
        "imagesTr <-> labelsTr",
        [images[c] for c in sorted(set(images) - set(labels))] + [labels[c] for c in sorted(set(labels) - set(images))],
    )
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
    _unpaired(
        src,
        "volume-N <-> segmentation-N",
        [vol[n] for n in sorted(set(vol) - set(seg))] + [seg[n] for n in sorted(set(seg) - set(vol))],
    )
    found = {f"lits_{n:03d}": Pair(Source.nifti(vol[n]), Source.nifti(seg[n])) for n in sorted(set(vol) & set(seg))}
    if not found:
        _none_found(src, "--layout lits expects volume-N.nii / segmentation-N.nii files")
    return found


__all__ = [
    "LAYOUTS",
    "LIST_COLUMNS",
    "MERGES_TUMOUR",
    "LITS_FROM_IRCAD",
    "Pair",
    "SYNTH_LAYOUTS",
    "find",
    "ircad_overlap",
    "list_cases",
    "public_origin",
]
