"""NRRD files (`.nrrd`, `.seg.nrrd`): read through pynrrd, checked; no geometry lives here.

A volume needs a world frame: the header's `space` (LPS for files derived from DICOM, RAS,
LAS), `space directions` (one orthogonal step per axis) and `space origin`; the affine is
built in `geometry.nrrd_affine`. 3D Slicer's segmentation files (`.seg.nrrd`) name their
segments (`Segment0_Name`, `Segment0_LabelValue`): `label_value` finds a segment's label by
name. Refused, naming the file: no space or origin, a space liverseg does not know,
non-orthogonal or degenerate directions, not 3D (a 4D multi-layer segmentation included),
non-real voxels, truncated data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from liverseg import InputError, geometry
from liverseg.files import check_readable
from liverseg.geometry import Header
from liverseg.source import Reader, Source, Volume


def _header(path: Path) -> dict:
    import nrrd

    check_readable(path)
    try:
        return nrrd.read_header(str(path))
    except Exception as e:  # noqa: BLE001 - pynrrd raises several types for bad headers
        raise InputError(f"{path}: not a readable NRRD file ({e}); re-export it") from None


def read_header(path: str | Path) -> Header:
    """The grid the header promises, checked before any voxel is read."""
    path = Path(path)
    h = _header(path)
    sizes = tuple(int(s) for s in h.get("sizes", ()))
    if len(sizes) != 3:
        raise InputError(
            f"{path}: NRRD of {len(sizes)} dimensions {sizes}; liverseg reads 3D volumes (export one "
            "label layer, or the segmentation as a labelmap)"
        )
    space = str(h.get("space", "")).lower()
    if space not in geometry.NRRD_SPACES:
        raise InputError(
            f"{path}: NRRD without a known 'space' ({space or 'none'}): it cannot be placed in the "
            f"world; re-export it with a space ({', '.join(sorted(geometry.NRRD_SPACES))})"
        )
    directions = np.asarray(h.get("space directions", np.full((3, 3), np.nan)), np.float64)
    origin = np.asarray(h.get("space origin", np.full(3, np.nan)), np.float64)
    if (
        directions.shape != (3, 3)
        or not np.all(np.isfinite(directions))
        or origin.shape != (3,)
        or not np.all(np.isfinite(origin))
    ):
        raise InputError(f"{path}: NRRD 'space directions' / 'space origin' missing or not 3D; re-export it with them")
    spacing = np.linalg.norm(directions, axis=1)
    unit = directions / np.maximum(spacing[:, None], 1e-12)
    if np.any(spacing <= 0) or np.abs(unit @ unit.T - np.eye(3)).max() > 1e-4:
        raise InputError(
            f"{path}: NRRD space directions {directions.tolist()} are not orthogonal (a sheared grid); "
            "resample it to an orthogonal grid first"
        )
    return Header(
        path, sizes, geometry.nrrd_affine(space, directions, origin), tuple(float(s) for s in spacing), _dtype(h, path)
    )


# NRRD's type names (the format's own list) and their NumPy kinds
_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t"), "i1"),
    **dict.fromkeys(("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
    **dict.fromkeys(("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t"), "i4"),
    **dict.fromkeys(("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    **dict.fromkeys(
        ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"), "i8"
    ),
    **dict.fromkeys(("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"),
    "float": "f4",
    "double": "f8",
}


def _dtype(h: dict, path: Path) -> np.dtype:
    name = str(h.get("type", "")).lower()
    if name not in _TYPES:
        raise InputError(f"{path}: NRRD type {name!r} is not a number type liverseg reads; re-export it")
    return np.dtype(_TYPES[name])


def read_file(path: str | Path) -> tuple[np.ndarray, Header, dict, str, int]:
    """(voxels [i, j, k] as stored, header, the raw NRRD header, sha256, bytes) of one file."""
    import nrrd

    path = Path(path)
    header = read_header(path)
    raw = path.read_bytes()
    try:
        data, fields = nrrd.read(str(path), index_order="F")
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise InputError(f"{path}: NRRD data cannot be read ({e}); the file is truncated or corrupt") from None
    if tuple(data.shape) != header.shape:
        raise InputError(f"{path}: NRRD data of shape {data.shape}, header says {header.shape}")
    return data, header, fields, hashlib.sha256(raw).hexdigest(), len(raw)


def label_value(fields: dict, name: str, path: Path) -> int | None:
    """The label value of segment `name` (case-insensitive) in a Slicer `.seg.nrrd`, or None
    when the file names no segments."""
    names = {k[: -len("_Name")]: str(v) for k, v in fields.items() if k.startswith("Segment") and k.endswith("_Name")}
    if not names:
        return None
    for key, segment in names.items():
        if segment.lower() == name.lower():
            value = fields.get(f"{key}_LabelValue", 1)
            layer = int(fields.get(f"{key}_Layer", 0))
            if layer:
                raise InputError(
                    f"{path}: segment {segment!r} is on layer {layer}; export it as a single-layer labelmap"
                )
            return int(value)
    raise InputError(
        f"{path}: no segment named {name!r} (segments: {', '.join(sorted(names.values()))}); pass the "
        "liver's name as the row's mask_label (or convert --mask-segment NAME)"
    )


class NrrdReader(Reader):
    """NRRD files (.nrrd, .nhdr; a Slicer .seg.nrrd's segments by name)."""

    kind, suffixes = "nrrd", (".nrrd", ".nhdr")

    def read_header(self, src: Source, ct: bool = False) -> Header:
        return read_header(src.path)

    def read(self, src: Source, ct: bool = False) -> Volume:
        arr, header, _, sha, nbytes = read_file(src.path)
        return Volume(arr, header, sha, nbytes)

    def label_value(self, src: Source) -> int | None:
        import nrrd

        return label_value(nrrd.read_header(str(src.path)), src.label, src.path)

    def mask_source(self, path: Path, label: str, segment: str) -> Source:
        """A Slicer .seg.nrrd names its segments: the case list's segment where a row gives no label."""
        return Source.nrrd(path, label or (segment if path.name.lower().endswith(".seg.nrrd") else ""))


READER = NrrdReader()


__all__ = ["READER", "NrrdReader", "label_value", "read_file", "read_header"]
