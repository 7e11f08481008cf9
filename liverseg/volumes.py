"""A case's volumes, wherever they come from, and the one set of rules for their values.

`READERS` is the one table that maps a source's kind to its format's reader (`source.Reader`:
`nifti_io`, `nrrd_io`, `dicom_io`, `dicom_seg`); `read_header`, `load_image` and `load_mask`
read any source through it into source-grid arrays with a `geometry.Header`, then apply the
same rules:

* a CT becomes int16 Hounsfield units, clipped to [-1024, 3071] (the record format);
  NaN or Inf voxels are refused;
* a mask is judged on its stored values: {0, 1} as is, {0, 255} -> {0, 1}, LiTS/MSD
  {0, 1, 2} (liver, tumour) -> liver + tumour = 1 only with merge_tumour; anything
  else is refused; a label the source names (a value, or a segment's name) picks one.

Adding a format is a reader class in its own module and one entry here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from liverseg import InputError, dicom_io, dicom_seg, nifti_io, nrrd_io
from liverseg.geometry import Header
from liverseg.source import Reader, Source, Volume

HU_MIN, HU_MAX = -1024, 3071  # int16 storage range (12-bit CT)


def read_header(src: Source, ct: bool = False) -> Header:
    """The grid a source promises, checked before its voxels are read (DICOM: tags only;
    ct: the series must be a CT)."""
    return READERS[src.kind].read_header(src, ct)


# The readers, by the Source kind each reads (a SEG reads its image's grid through this table).
READERS: dict[str, Reader] = {
    r.kind: r for r in (nifti_io.READER, nrrd_io.READER, dicom_io.READER, dicom_seg.SegReader(read_header))
}
KINDS = tuple(READERS)


def kind_by_name(path: str | Path) -> str | None:
    """The kind of a file its name says (NIfTI, NRRD); None for DICOM, found by its content."""
    name = Path(path).name.lower()
    return next((r.kind for r in READERS.values() if name.endswith(r.suffixes)), None) if name else None


def load_image(src: Source) -> Volume:
    """A CT: voxels in Hounsfield units as int16 (`hounsfield`)."""
    vol = READERS[src.kind].read(src, ct=True)
    return dataclasses.replace(vol, voxels=hounsfield(vol.voxels, src.name))


def load_mask(src: Source, merge_tumour: bool = False) -> Volume:
    """A liver mask: voxels uint8 {0, 1}: the label `src.label` of a multi-label mask, a SEG's
    segment, or the stored values judged by `liver`."""
    reader = READERS[src.kind]
    vol = reader.read(src, ct=False)
    if reader.liver_only:  # placed on the image's grid, segment chosen: already {0, 1}
        return vol
    if src.label:
        return dataclasses.replace(vol, voxels=selected_label(vol.voxels, src))
    return dataclasses.replace(vol, voxels=liver(vol.voxels, src.name, merge_tumour))


def selected_label(arr: np.ndarray, src: Source) -> np.ndarray:
    """The voxels of one label of a multi-label mask (a value, or a segment's name the format knows)."""
    value = int(src.label) if src.label.lstrip("-").isdigit() else READERS[src.kind].label_value(src)
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
    "KINDS",
    "READERS",
    "Source",
    "Volume",
    "hounsfield",
    "kind_by_name",
    "liver",
    "load_image",
    "load_mask",
    "read_header",
]
