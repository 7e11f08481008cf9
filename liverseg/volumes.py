"""A case's volumes, wherever they come from, and the one set of rules for their values.

A `Source` is a NIfTI file or a DICOM series (files in a folder or a zip). `read_header`,
`load_image` and `load_mask` read either kind into source-grid arrays with a
`geometry.Header` (`nifti_io` and `dicom_io` do the reading), then apply the same rules:

* a CT becomes int16 Hounsfield units, clipped to [-1024, 3071] (the record format);
  NaN or Inf voxels are refused;
* a mask is judged on its stored values: {0, 1} as is, {0, 255} -> {0, 1}, LiTS/MSD
  {0, 1, 2} (liver, tumour) -> liver + tumour = 1 only with merge_tumour; anything
  else is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from liverseg import InputError

if TYPE_CHECKING:  # geometry (nibabel, scipy) is imported by the readers, when a volume is read
    from liverseg.geometry import Header

HU_MIN, HU_MAX = -1024, 3071  # int16 storage range (12-bit CT)


KINDS = ("nifti", "nrrd", "dicom", "seg")
SUFFIXES = {".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd"}  # files by name; DICOM by content


@dataclass(frozen=True)
class Source:
    """Where a volume comes from: `path` is a NIfTI or NRRD file, the folder/zip holding a
    DICOM series (`series`: its SeriesInstanceUID; `members`: its files, relative to `path`),
    or a DICOM SEG file drawn on `image`. `label`: which label of a multi-label mask is the
    liver (a value, or a segment's name in a SEG or Slicer .seg.nrrd; empty: the rules below)."""

    kind: Literal["nifti", "nrrd", "dicom", "seg"]
    path: Path
    series: str | None = None
    members: tuple[str, ...] = ()
    label: str = ""
    image: Source | None = None

    @classmethod
    def nifti(cls, path: str | Path, label: str = "") -> Source:
        return cls("nifti", Path(path), label=label)

    @classmethod
    def nrrd(cls, path: str | Path, label: str = "") -> Source:
        return cls("nrrd", Path(path), label=label)

    @classmethod
    def dicom(cls, s) -> Source:  # s: dicom_io.Series
        return cls("dicom", Path(s.container), s.uid, s.members)

    @classmethod
    def seg(cls, path: str | Path, image: Source, label: str = "") -> Source:
        return cls("seg", Path(path), label=label, image=image)

    @property
    def name(self) -> Path:
        """The file, or the series' own folder: what messages name."""
        if self.kind != "dicom":
            return self.path
        return self.dicom_series().path

    def dicom_series(self):
        """The DICOM series this source is (kind "dicom")."""
        from liverseg.dicom_io import Series

        return Series(str(self.path), self.members, self.series or "")


@dataclass(frozen=True)
class Volume:
    """A loaded source volume: voxels on the source's grid (in its own axis order), the grid,
    and the sha256 and size in bytes of the file(s) read. Read by name, never unpacked."""

    voxels: np.ndarray
    header: Header
    sha256: str
    nbytes: int


def dicom_series(path: str | Path, select=None) -> list:
    """The DICOM series in a folder or zip (`dicom_io.Series`; `select(member)` picks files)."""
    from liverseg import dicom_io

    return dicom_io.find_series(path, select)


def is_dicom_seg(path: str | Path) -> bool:
    """Is this file a DICOM Segmentation object?"""
    from liverseg import dicom_io

    return dicom_io.is_segmentation(Path(path))


def member_parts(member: str) -> list[str]:
    """The folders and file of a file inside a folder or zip, zips named as folders
    (`PATIENT_DICOM.zip!/PATIENT_DICOM/image_0` -> PATIENT_DICOM, PATIENT_DICOM, image_0)."""
    from liverseg.dicom_io import NESTED

    return [p.removesuffix(".zip") for p in member.replace(NESTED, "/").split("/")]


def read_header(src: Source, ct: bool = False) -> Header:
    """The grid a source promises, checked before its voxels are read (DICOM: tags only;
    ct: the series must be a CT)."""
    if src.kind == "nifti":
        from liverseg import nifti_io

        return nifti_io.read_header(src.path)
    if src.kind == "nrrd":
        from liverseg import nrrd_io

        return nrrd_io.read_header(src.path)
    if src.kind == "seg":
        from liverseg import dicom_seg

        return dicom_seg.read_header(
            src.path, read_header(src.image, ct=True), src.image.series, segment=src.label or dicom_seg.DEFAULT_SEGMENT
        )
    from liverseg import dicom_io

    return dicom_io.read_header(src.dicom_series(), ct)


def _read(src: Source, ct: bool) -> Volume:
    """The voxels as stored (HU-scaled for a CT) of a source."""
    if src.kind == "nifti":
        from liverseg import nifti_io

        raw, sha = nifti_io.read_file(src.path)
        arr, header = nifti_io.read_voxels(src.path, raw, scaled=ct)
        return Volume(arr, header, sha, len(raw))
    if src.kind == "nrrd":
        from liverseg import nrrd_io

        arr, header, _, sha, nbytes = nrrd_io.read_file(src.path)
        return Volume(arr, header, sha, nbytes)
    if src.kind == "seg":
        from liverseg import dicom_seg

        return Volume(
            *dicom_seg.read_mask(
                src.path,
                read_header(src.image, ct=True),
                src.image.series,
                segment=src.label or dicom_seg.DEFAULT_SEGMENT,
            )
        )
    from liverseg import dicom_io

    return Volume(*dicom_io.read_series(src.dicom_series(), ct))


def load_image(src: Source) -> Volume:
    """A CT: voxels in Hounsfield units as int16 (`hounsfield`)."""
    vol = _read(src, ct=True)
    return dataclasses.replace(vol, voxels=hounsfield(vol.voxels, src.name))


def load_mask(src: Source, merge_tumour: bool = False) -> Volume:
    """A liver mask: voxels uint8 {0, 1}: the label `src.label` of a multi-label mask, a SEG's
    segment, or the stored values judged by `liver`."""
    if src.kind == "seg":  # placed on the image's grid, segment chosen: already {0, 1}
        return _read(src, ct=False)
    vol = _read(src, ct=False)
    if src.label:
        return dataclasses.replace(vol, voxels=selected_label(vol.voxels, src, vol))
    return dataclasses.replace(vol, voxels=liver(vol.voxels, src.name, merge_tumour))


def selected_label(arr: np.ndarray, src: Source, vol: Volume) -> np.ndarray:
    """The voxels of one label of a multi-label mask (a value, or a .seg.nrrd segment's name)."""
    value: int | None = int(src.label) if src.label.lstrip("-").isdigit() else None
    if value is None and src.kind == "nrrd":
        import nrrd

        from liverseg import nrrd_io

        value = nrrd_io.label_value(nrrd.read_header(str(src.path)), src.label, src.path)
    if value is None:
        raise InputError(
            f"{src.path}: label {src.label!r} is not a label value (an integer such as 5) and the file "
            "names no segments; give the liver's value"
        )
    out = (arr == value).astype(np.uint8)
    if not out.any():
        present = np.unique(arr)
        raise InputError(
            f"{src.path}: no voxel has label {value} (labels present: {present[:12].tolist()}"
            f"{'...' if present.size > 12 else ''}); give the liver's label value"
        )
    return out


# ------------------------------------------------------------------------- the value rules


def hounsfield(arr: np.ndarray, path: Path) -> np.ndarray:
    """Scaled CT values -> int16 HU clipped to [HU_MIN, HU_MAX]; NaN/Inf refused naming the file."""
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise InputError(f"{path}: {bad} voxels are NaN or Inf; fix the source volume")
        arr = np.rint(arr)
    if arr.dtype != np.int16 or arr.min() < HU_MIN or arr.max() > HU_MAX:
        arr = np.clip(arr, HU_MIN, HU_MAX).astype(np.int16)
    return arr


def liver(arr: np.ndarray, path: Path, merge_tumour: bool = False) -> np.ndarray:
    """Stored mask labels -> uint8 {0, 1} liver (see the module docstring for the conventions).

    A scale factor is never applied first: a uint8 mask saved with slope 1/255 reads back as
    1.00000006 after scaling, but its stored values are the labels.
    """
    labels = _labels(path, arr)
    if labels <= {0, 1}:
        return arr.astype(np.uint8, copy=False)
    if labels <= {0, 255}:
        return (arr == 255).astype(np.uint8)
    if labels <= {0, 1, 2}:
        if not merge_tumour:
            raise InputError(
                f"{path}: mask labels {sorted(labels)} look like LiTS (1 liver, 2 tumour); "
                "pass --merge-tumour to count tumour as liver"
            )
        return (arr > 0).astype(np.uint8)
    shown = sorted(labels)[:8]
    raise InputError(
        f"{path}: mask labels {shown}{'...' if len(labels) > 8 else ''} are not a liver mask; "
        "expected {0,1}, {0,255} or LiTS {0,1,2} with --merge-tumour"
    )


def _labels(path: Path, arr: np.ndarray) -> set[int]:
    """Distinct stored values of a mask; fast for the usual uint8 (two passes, no copy)."""
    flat = arr.ravel(order="K")  # memory order: a view, whatever the array's layout
    lo, hi = flat.min(), flat.max()
    if lo >= 0 and hi <= 1 and (arr.dtype.kind != "f" or np.all((flat == 0) | (flat == 1))):
        return {int(lo), int(hi)}
    if arr.dtype.kind == "f" and not np.all(np.isfinite(flat)):
        raise InputError(f"{path}: mask holds NaN or Inf values; a mask must hold integer labels")
    values = np.unique(flat)
    if arr.dtype.kind == "f" and not np.all(values == np.round(values)):
        raise InputError(f"{path}: mask holds non-integer values {values[:6].tolist()}; a mask must hold labels")
    return set(int(v) for v in values)


__all__ = [
    "HU_MAX",
    "HU_MIN",
    "Source",
    "Volume",
    "dicom_series",
    "hounsfield",
    "is_dicom_seg",
    "liver",
    "load_image",
    "load_mask",
    "member_parts",
    "read_header",
]
