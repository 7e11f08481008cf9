"""NIfTI files: read and check headers and voxels, write volumes. No geometry lives here.

Headers are checked before any voxel is read (`read_header`); voxels are read straight from
the decompressed bytes (`read_voxels`), which also catches truncated files that nibabel
would read lazily. What the values mean (HU, mask labels) is `volumes`' rule (which loads
images and masks from any source); every flip, transpose and resampling is `geometry`'s.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from liverseg import InputError, geometry
from liverseg.files import atomic_path, check_readable
from liverseg.geometry import Header
from liverseg.source import Reader, Source, Volume

try:  # Intel ISA-L inflate: ~1.5x faster than zlib on CT volumes, same output
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover - isal has wheels for the common platforms
    _inflate = zlib

MAX_DIM = 8192  # larger than any CT axis; a header claiming more is corrupt
MAX_VOXELS = 2**31


# ------------------------------------------------------------------------- headers


def read_header(path: str | Path) -> Header:
    """Load only the header and reject what cannot be a CT volume or mask.

    Rejects: unreadable files, 2D images, multi-channel images (a trailing singleton 4th
    axis is accepted), absurd sizes, non-positive or non-finite voxel sizes, a singular
    affine, non-real voxel types. Raises InputError naming the file.
    """
    path = Path(path)
    check_readable(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        _check_gzip(path, head)
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            block = f.read(540)
        img = _nifti_class(path, block).from_filename(str(path))
    except InputError:
        raise
    except Exception as e:  # nibabel raises several types for unreadable headers
        raise InputError(f"{path}: not a readable NIfTI file ({e}); re-export it as .nii or .nii.gz") from None
    return _check_header(path, img, block)


def _check_gzip(path: Path, head: bytes) -> None:
    if path.name.endswith(".gz") and head[:2] != b"\x1f\x8b":
        hint = (
            "rename it to .nii"
            if head[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c", b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")
            else "re-export it"
        )
        raise InputError(f"{path}: named .gz but not gzip-compressed (it starts with {head[:4].hex()}); {hint}")


def _nifti_class(path: Path, block: bytes):
    """Nifti1Image or Nifti2Image from sizeof_hdr (348 or 540, either byte order), so nibabel
    is never asked to parse one as the other (it logs errors when it is)."""
    for order in "<>":
        size = int.from_bytes(block[:4], "little" if order == "<" else "big") if len(block) >= 4 else 0
        if size == 348:
            return nib.Nifti1Image
        if size == 540:
            return nib.Nifti2Image
    raise InputError(
        f"{path}: not a NIfTI-1 or NIfTI-2 file (header size field {block[:4].hex()}); re-export it as .nii or .nii.gz"
    )


def _raw_zooms(img, block: bytes) -> tuple[float, ...]:
    """pixdim[1:4] as stored. nibabel's checked header silently turns pixdim 0 into 1 mm."""
    size = 348 if img.header_class is nib.Nifti1Header else 540
    try:  # from the header's own bytes: reading extensions (after them) would need more of the file
        endian = "<" if int.from_bytes(block[:4], "little") == size else ">"
        return tuple(
            float(z) for z in img.header_class(binaryblock=block[:size], endianness=endian, check=False)["pixdim"][1:4]
        )
    except Exception:
        return ()


def _check_header(path: Path, img, block: bytes) -> Header:
    dtype = img.get_data_dtype()
    if dtype.kind not in "iuf" or dtype.fields is not None:
        kind = {"c": "complex", "V": "structured (e.g. RGB)", "b": "boolean"}.get(dtype.kind, dtype.kind)
        raise InputError(
            f"{path}: voxels are {kind} ({dtype}), not real numbers; a CT or mask must hold integer or "
            "float values (export the magnitude or the label volume)"
        )
    shape = tuple(int(s) for s in img.header.get_data_shape())
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) < 3:
        raise InputError(f"{path}: image is {len(shape)}D {shape}; liverseg needs a 3D CT volume")
    if len(shape) > 3:
        raise InputError(
            f"{path}: image has shape {shape}; only 3D volumes (or 4D with a singleton 4th axis) "
            "are supported; split multi-channel/time series into one file per volume"
        )
    if any(s < 1 or s > MAX_DIM for s in shape) or math.prod(shape) > MAX_VOXELS:
        raise InputError(
            f"{path}: header claims shape {shape}, which is not a plausible CT volume; the header is corrupt"
        )
    raw = _raw_zooms(img, block)
    if not raw or not all(math.isfinite(z) and z > 0 for z in raw):
        raise InputError(f"{path}: voxel sizes (pixdim) {raw} must be positive; fix the header's pixdim")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: affine {affine.tolist()} is singular or not finite; fix the header's sform/qform")
    return Header(path, shape, affine, zooms, img.get_data_dtype())


# ------------------------------------------------------------------------- voxel data


def read_file(path: Path) -> tuple[bytes, str]:
    """The file's bytes and their sha256 (one read serves hashing and decoding)."""
    check_readable(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    return raw, hashlib.sha256(raw).hexdigest()


def _image_from_bytes(path: Path, raw: bytes):
    """(nibabel image, uncompressed file bytes)."""
    if path.name.endswith(".gz"):
        _check_gzip(path, raw[:4])
        try:
            # The gzip trailer holds the uncompressed size (mod 2**32): allocate it once.
            size = int.from_bytes(raw[-4:], "little") if len(raw) >= 18 else 0
            raw = _inflate.decompress(raw, zlib.MAX_WBITS | 32, max(size, 2**16))  # gzip or zlib header
        except (zlib.error, _inflate.error) as e:
            raise InputError(f"{path}: truncated or corrupt gzip data ({e}); re-copy or re-export the file") from None
    try:
        return _nifti_class(path, raw[:4]).from_bytes(raw), raw
    except InputError:
        raise
    except Exception as e:  # nibabel raises several types for unreadable headers
        raise InputError(
            f"{path}: not a readable NIfTI-1/NIfTI-2 file ({e}); re-export it as .nii or .nii.gz"
        ) from None


def _voxels(path: Path, img, raw: bytes, scaled: bool) -> np.ndarray:
    """Voxels straight from the uncompressed file bytes (zero-copy, read-only), F-ordered.

    Scaling uses nibabel's effective slope/intercept (a NaN or zero slope means none).
    """
    proxy = img.dataobj
    count = math.prod(proxy.shape)
    if proxy.offset + count * proxy.dtype.itemsize > len(raw):
        raise InputError(
            f"{path}: voxel data is shorter than the header's shape {proxy.shape}; the file is truncated or corrupt"
        )
    arr = np.frombuffer(raw, proxy.dtype, count, proxy.offset).reshape(proxy.shape, order="F")
    if arr.ndim == 4:
        arr = arr[..., 0]
    slope, inter = float(proxy.slope), float(proxy.inter)
    if scaled and (slope, inter) != (1.0, 0.0):
        arr = arr * np.float32(slope) + np.float32(inter) if arr.dtype.itemsize <= 2 else arr * slope + inter
    return arr


def read_voxels(path: Path, raw: bytes | None, scaled: bool) -> tuple[np.ndarray, Header]:
    """Decompress (unless given the bytes), check the raw header, then read the voxels
    (scaled: through scl_slope/scl_inter, for a CT; a mask's stored values are its labels)."""
    if raw is None:
        raw, _ = read_file(path)
    img, raw = _image_from_bytes(path, raw)
    header = _check_header(path, img, raw[:540])
    return _voxels(path, img, raw, scaled=scaled), header


# ------------------------------------------------------------------------- writing


def write(path: str | Path, arr: np.ndarray, affine: np.ndarray, dtype=np.uint8, description: str = "") -> None:
    """Write a NIfTI-1 file atomically (temp name, then rename): voxels as `dtype`, the
    affine as both sform and qform (code 1, scanner), millimetres, no intensity scaling
    for integer types; `description` in the header's descrip field (what wrote it: an
    output that a later run may replace is recognised by it, `description_of`)."""
    arr = np.asarray(arr).astype(dtype, copy=False)
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(arr, affine)
    img.header["descrip"] = description.encode()[:79]
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    if np.issubdtype(dtype, np.integer):
        img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def save_like(
    path: str | Path, arr: np.ndarray, geom: geometry.Geometry, dtype=np.uint8, description: str = ""
) -> None:
    """Write a source-grid array with the source affine, atomically."""
    if tuple(np.shape(arr)) != tuple(geom.shape):
        raise ValueError(f"array shape {np.shape(arr)} does not match source shape {geom.shape}")
    write(path, arr, np.asarray(geom.affine), dtype, description)


def description_of(path: str | Path) -> str:
    """The descrip field of a NIfTI file's header ("" when it is not a readable NIfTI file)."""
    try:
        return bytes(nib.load(str(path)).header["descrip"]).rstrip(b"\0").decode(errors="replace")
    except Exception:  # noqa: BLE001 - nibabel raises several types for what is not NIfTI
        return ""


class NiftiReader(Reader):
    """NIfTI files (.nii, .nii.gz): the header checked first, the voxels from the decompressed bytes."""

    kind, suffixes = "nifti", (".nii", ".nii.gz")

    def read_header(self, src: Source, ct: bool = False) -> Header:
        return read_header(src.path)

    def read(self, src: Source, ct: bool = False) -> Volume:
        raw, sha = read_file(src.path)
        arr, header = read_voxels(src.path, raw, scaled=ct)
        return Volume(arr, header, sha, len(raw))


READER = NiftiReader()
