"""NIfTI reading, validation and geometry: the only module that flips, transposes or resamples.

Stored geometry (what records, the pipeline and the model see)
-----------------------------------------------------------------
Every volume is reoriented to canonical RAS (nibabel's closest-canonical axes) and laid
out slice-major as an array `[Z, H, W]`:

* axis 0 (Z): axial slices, index increasing towards Superior;
* axis 1 (H): image rows, index increasing towards Posterior (anterior at the top);
* axis 2 (W): image columns, index increasing towards the patient's Left (patient right
  on the image's left: the radiological display convention).

In nibabel axis codes that is ("S", "P", "L"): RAS axes permuted to slice-major and the
two in-plane axes mirrored so a stored slice *is* the standard axial view. Each slice is
contiguous in memory, so writing records needs no copy, and a PNG of a stored slice needs
no transform. `Geometry` keeps everything needed to put a stored-geometry array back onto
the source file's grid (`from_stored`), so there is exactly one way in and one way out.

Spacing tuples are always in millimetres. In stored geometry they are ordered
(slice, row, column).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import sparse

from liverseg import LiversegError, atomic_path

try:  # Intel ISA-L inflate: ~1.5x faster than zlib on CT volumes, same output
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover - isal has wheels for the common platforms
    _inflate = zlib

STORED_AXCODES = ("S", "P", "L")
HU_MIN, HU_MAX = -1024, 3071  # int16 storage range (12-bit CT)
MAX_DIM = 8192  # larger than any CT axis; a header claiming more is corrupt
MAX_VOXELS = 2**31


class InputError(LiversegError):
    """A bad input file. The message starts with the file's path."""


@dataclass(frozen=True)
class Geometry:
    """Source grid of a volume and how it maps to stored geometry.

    shape/affine/orientation/spacing describe the source file (3D, after squeezing a
    trailing singleton 4th axis). stored_shape is [Z, H, W] after reorientation and the
    optional in-plane resize; native_hw is (H, W) before the resize.
    """

    shape: tuple[int, int, int]
    affine: tuple[tuple[float, ...], ...]
    orientation: str
    spacing: tuple[float, float, float]
    native_hw: tuple[int, int]
    stored_shape: tuple[int, int, int]
    stored_spacing: tuple[float, float, float]

    @property
    def resized(self) -> bool:
        return tuple(self.stored_shape[1:]) != tuple(self.native_hw)

    def to_json(self) -> dict:
        return {
            "shape": list(self.shape),
            "affine": [list(r) for r in self.affine],
            "orientation": self.orientation,
            "spacing": list(self.spacing),
            "native_hw": list(self.native_hw),
            "stored_shape": list(self.stored_shape),
            "stored_spacing": list(self.stored_spacing),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Geometry":
        return cls(
            shape=tuple(d["shape"]),
            affine=tuple(tuple(float(v) for v in r) for r in d["affine"]),
            orientation=d["orientation"],
            spacing=tuple(d["spacing"]),
            native_hw=tuple(d["native_hw"]),
            stored_shape=tuple(d["stored_shape"]),
            stored_spacing=tuple(d["stored_spacing"]),
        )


@dataclass(frozen=True)
class Header:
    """What a header promises, checked before any voxel is read."""

    path: Path
    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    dtype: np.dtype


# ------------------------------------------------------------------------- headers


def read_header(path: str | Path) -> Header:
    """Load only the header and reject what cannot be a CT volume or mask.

    Rejects: unreadable files, 2D images, multi-channel images (a trailing singleton 4th
    axis is accepted), absurd sizes, non-positive or non-finite voxel sizes, a singular
    affine. Raises InputError naming the file.
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


def check_readable(path: Path) -> None:
    """Raise InputError saying why `path` cannot be opened (missing, a dangling or looping
    symbolic link, no permission), rather than a generic "not found"."""
    try:
        os.stat(path)
        if not os.access(path, os.R_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"{path}: symbolic link loop ({path} -> {os.readlink(path)} -> ...); "
                             "point the link at the real file") from None
        if e.errno == errno.ENOENT and path.is_symlink():
            raise InputError(f"{path}: symbolic link to {os.readlink(path)}, which does not exist; "
                             "fix or remove the link") from None
        if e.errno == errno.ENOENT:
            raise InputError(f"{path}: file not found") from None
        raise InputError(f"{path}: cannot read ({e.strerror}); check its permissions") from None


def _check_gzip(path: Path, head: bytes) -> None:
    if path.name.endswith(".gz") and head[:2] != b"\x1f\x8b":
        hint = "rename it to .nii" if head[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c",
                                                 b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c") else "re-export it"
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
    raise InputError(f"{path}: not a NIfTI-1 or NIfTI-2 file (header size field {block[:4].hex()}); "
                     "re-export it as .nii or .nii.gz")


def _raw_zooms(img, block: bytes) -> tuple[float, ...]:
    """pixdim[1:4] as stored. nibabel's checked header silently turns pixdim 0 into 1 mm."""
    try:
        return tuple(float(z) for z in img.header_class.from_fileobj(io.BytesIO(block), check=False)["pixdim"][1:4])
    except Exception:
        return ()


def _check_header(path: Path, img, block: bytes) -> Header:
    dtype = img.get_data_dtype()
    if dtype.kind not in "iuf" or dtype.fields is not None:
        kind = {"c": "complex", "V": "structured (e.g. RGB)", "b": "boolean"}.get(dtype.kind, dtype.kind)
        raise InputError(f"{path}: voxels are {kind} ({dtype}), not real numbers; a CT or mask must hold integer or "
                         "float values (export the magnitude or the label volume)")
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
        raise InputError(f"{path}: header claims shape {shape}, which is not a plausible CT volume; the header is corrupt")
    raw = _raw_zooms(img, block)
    if not raw or not all(math.isfinite(z) and z > 0 for z in raw):
        raise InputError(f"{path}: voxel sizes (pixdim) {raw} must be positive; fix the header's pixdim")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: affine {affine.tolist()} is singular or not finite; fix the header's sform/qform")
    return Header(path, shape, affine, zooms, img.get_data_dtype())


def stored_grid(header: Header) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of the header's grid once reoriented to stored axes: the same physical
    grid whatever the file's axis order (an RAS and an LAS file of one grid give the same)."""
    t = _transform_to_stored(header.affine)
    shape = [0, 0, 0]
    for src_axis, (dst_axis, _flip) in enumerate(t):
        shape[int(dst_axis)] = header.shape[src_axis]
    return tuple(shape), header.affine @ nio.inv_ornt_aff(t, header.shape)


def check_pair(image: Header, mask: Header, atol_mm: float = 1e-3) -> None:
    """Image and mask must share a grid: the same voxels at the same world positions, within
    atol_mm on every affine entry (direction cosines scaled by voxel size, and the origin).

    Compared after both are brought to stored axes, so a mask written in another axis order
    (image RAS, mask LAS) over the same grid is accepted; rounding in a header rewrite passes,
    a mask from another series does not.
    """
    (img_shape, img_affine), (mask_shape, mask_affine) = stored_grid(image), stored_grid(mask)
    if img_shape != mask_shape:
        raise InputError(
            f"{mask.path}: mask shape {mask.shape} differs from image {image.path.name} shape {image.shape} "
            f"(compared in one axis order: mask {orientation_of(mask.affine)}, image {orientation_of(image.affine)}); "
            "image and mask must be on the same voxel grid"
        )
    if not np.allclose(nib.affines.voxel_sizes(img_affine), nib.affines.voxel_sizes(mask_affine), atol=atol_mm, rtol=0):
        raise InputError(
            f"{mask.path}: voxel sizes {mask.spacing} differ from image {image.path.name} {image.spacing} "
            f"by more than {atol_mm} mm"
        )
    diff = float(np.max(np.abs(img_affine - mask_affine)))
    if diff > atol_mm:
        raise InputError(
            f"{mask.path}: affine differs from image {image.path.name} by {diff:.4g} mm (tolerance {atol_mm} mm); "
            "the mask is not on the image's grid (resample it, or raise --affine-tol if this is header rounding)"
        )


def onto_grid(arr: np.ndarray, src: Header, dst: Header) -> np.ndarray:
    """An array on `src`'s grid in `dst`'s axis order (the grids must agree: `check_pair`)."""
    t = nio.ornt_transform(nio.io_orientation(src.affine), nio.io_orientation(dst.affine))
    return np.ascontiguousarray(nio.apply_orientation(arr, t))


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
        raise InputError(f"{path}: not a readable NIfTI-1/NIfTI-2 file ({e}); re-export it as .nii or .nii.gz") from None


def _voxels(path: Path, img, raw: bytes, scaled: bool) -> np.ndarray:
    """Voxels straight from the uncompressed file bytes (zero-copy, read-only), F-ordered.

    Scaling uses nibabel's effective slope/intercept (a NaN or zero slope means none).
    """
    proxy = img.dataobj
    count = math.prod(proxy.shape)
    if proxy.offset + count * proxy.dtype.itemsize > len(raw):
        raise InputError(f"{path}: voxel data is shorter than the header's shape {proxy.shape}; "
                         "the file is truncated or corrupt")
    arr = np.frombuffer(raw, proxy.dtype, count, proxy.offset).reshape(proxy.shape, order="F")
    if arr.ndim == 4:
        arr = arr[..., 0]
    slope, inter = float(proxy.slope), float(proxy.inter)
    if scaled and (slope, inter) != (1.0, 0.0):
        arr = arr * np.float32(slope) + np.float32(inter) if arr.dtype.itemsize <= 2 else arr * slope + inter
    return arr


def _read_checked(path: Path, raw: bytes | None, scaled: bool) -> tuple[np.ndarray, Header]:
    """Decompress (unless given the bytes), check the raw header, then read the voxels."""
    if raw is None:
        raw, _ = read_file(path)
    img, raw = _image_from_bytes(path, raw)
    header = _check_header(path, img, raw[:540])
    return _voxels(path, img, raw, scaled=scaled), header


def load_image(path: str | Path, raw: bytes | None = None) -> tuple[np.ndarray, Header]:
    """CT voxels in Hounsfield units as int16 (clipped to [-1024, 3071]), source orientation."""
    path = Path(path)
    arr, header = _read_checked(path, raw, scaled=True)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise InputError(f"{path}: {bad} voxels are NaN or Inf; fix the source volume")
        arr = np.rint(arr)
    if arr.dtype != np.int16 or arr.min() < HU_MIN or arr.max() > HU_MAX:
        arr = np.clip(arr, HU_MIN, HU_MAX).astype(np.int16)
    return arr, header


def load_mask(path: str | Path, raw: bytes | None = None, merge_tumour: bool = False) -> tuple[np.ndarray, Header]:
    """Liver mask as uint8 {0, 1}, judged on the *stored* (unscaled) values.

    {0, 1} is taken as is; {0, 255} is mapped to {0, 1}; LiTS-style {0, 1, 2} (liver,
    tumour) becomes liver+tumour = 1 only with merge_tumour; anything else is rejected.
    A scl_slope is ignored on purpose: a uint8 mask saved with slope 1/255 reads back
    as 1.00000006 after scaling, but its stored values are the labels.
    """
    path = Path(path)
    arr, header = _read_checked(path, raw, scaled=False)
    labels = _labels(path, arr)
    if labels <= {0, 1}:
        out = arr.astype(np.uint8, copy=False)
    elif labels <= {0, 255}:
        out = (arr == 255).astype(np.uint8)
    elif labels <= {0, 1, 2}:
        if not merge_tumour:
            raise InputError(
                f"{path}: mask labels {sorted(labels)} look like LiTS (1 liver, 2 tumour); "
                "pass --merge-tumour to count tumour as liver"
            )
        out = (arr > 0).astype(np.uint8)
    else:
        shown = sorted(labels)[:8]
        raise InputError(
            f"{path}: mask labels {shown}{'...' if len(labels) > 8 else ''} are not a liver mask; "
            "expected {0,1}, {0,255} or LiTS {0,1,2} with --merge-tumour"
        )
    return out, header


def _labels(path: Path, arr: np.ndarray) -> set[int]:
    """Distinct stored values of a mask; fast for the usual uint8 (bincount, no copy)."""
    flat = arr.ravel(order="K")  # memory order: a view, whatever the array's layout
    lo, hi = flat.min(), flat.max()
    if lo >= 0 and hi <= 1 and (arr.dtype.kind != "f" or np.all((flat == 0) | (flat == 1))):
        return {int(lo), int(hi)}  # the usual binary mask: two vectorised passes, no copy
    if arr.dtype.kind == "f" and not np.all(np.isfinite(flat)):
        raise InputError(f"{path}: mask holds NaN or Inf values; a mask must hold integer labels")
    values = np.unique(flat)
    if arr.dtype.kind == "f" and not np.all(values == np.round(values)):
        raise InputError(f"{path}: mask holds non-integer values {values[:6].tolist()}; a mask must hold labels")
    return set(int(v) for v in values)


# ------------------------------------------------------------------------- orientation


def _transform_to_stored(affine: np.ndarray) -> np.ndarray:
    return nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(STORED_AXCODES))


def orientation_of(affine: np.ndarray) -> str:
    return "".join(nio.aff2axcodes(affine))


def stored_geometry(header: Header, size: int | None = None) -> Geometry:
    """Geometry of `header`'s volume once stored (reoriented, optionally resized to size x size)."""
    t = _transform_to_stored(header.affine)
    stored = [0, 0, 0]
    spacing = [0.0, 0.0, 0.0]
    for src_axis, (dst_axis, _flip) in enumerate(t):
        stored[int(dst_axis)] = header.shape[src_axis]
        spacing[int(dst_axis)] = header.spacing[src_axis]
    z, h, w = stored
    native_hw = (h, w)
    if size is not None:
        spacing[1] *= h / size
        spacing[2] *= w / size
        h = w = size
    return Geometry(
        shape=header.shape,
        affine=tuple(tuple(float(v) for v in row) for row in header.affine),
        orientation=orientation_of(header.affine),
        spacing=header.spacing,
        native_hw=native_hw,
        stored_shape=(z, h, w),
        stored_spacing=tuple(spacing),
    )


def to_stored(arr: np.ndarray, geom: Geometry, kind: str) -> np.ndarray:
    """Source-grid array -> C-contiguous stored array [Z, H, W] (kind: "image" or "mask").

    The optional resize is in-plane only: images use an antialiased linear filter (area
    averaging when shrinking), masks nearest neighbour so they stay binary.
    """
    t = _transform_to_stored(np.asarray(geom.affine))
    out = nio.apply_orientation(arr, t)
    if geom.resized:
        out = _resize_hw(out, geom.stored_shape[1:], kind)
    return np.ascontiguousarray(out)


def from_stored(arr: np.ndarray, geom: Geometry, kind: str) -> np.ndarray:
    """Stored-geometry array [Z, H, W] -> the source file's grid (shape and axis order).

    kind "prob": float probabilities, resized back linearly (threshold afterwards);
    kind "mask": labels, resized back by nearest neighbour.
    """
    if tuple(arr.shape) != tuple(geom.stored_shape):
        raise ValueError(f"array shape {arr.shape} does not match stored shape {geom.stored_shape}")
    if geom.resized:
        arr = _resize_hw(arr, geom.native_hw, "image" if kind == "prob" else "mask")
    back = nio.ornt_transform(nio.axcodes2ornt(STORED_AXCODES), nio.io_orientation(np.asarray(geom.affine)))
    return np.ascontiguousarray(nio.apply_orientation(arr, back))


def from_canonical_ras(ras: np.ndarray, spacing: tuple[float, float, float], orientation: str,
                       origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """A RAS-ordered array [x, y, z] and voxel sizes -> (array, affine) in `orientation` (e.g. "LAS").

    Used to write the same anatomy in different orientations; the affine maps every voxel
    to the same world position whatever the orientation.
    """
    ras_affine = np.diag([*spacing, 1.0])
    ras_affine[:3, 3] = origin
    t = nio.ornt_transform(nio.axcodes2ornt(("R", "A", "S")), nio.axcodes2ornt(tuple(orientation)))
    arr = nio.apply_orientation(ras, t)
    affine = ras_affine @ nio.inv_ornt_aff(t, ras.shape)
    return np.ascontiguousarray(arr), affine


def to_ras(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Source array -> (RAS-ordered array [x, y, z], its voxel sizes in mm along x, y, z).

    For building anatomy around a real mask in millimetres; `from_ras` is the inverse.
    """
    ornt = nio.io_orientation(affine)
    zooms = nib.affines.voxel_sizes(affine)
    spacing = [0.0, 0.0, 0.0]
    for src_axis, (dst_axis, _flip) in enumerate(ornt):
        spacing[int(dst_axis)] = float(zooms[src_axis])
    ras = nio.apply_orientation(arr, nio.ornt_transform(ornt, nio.axcodes2ornt(("R", "A", "S"))))
    return np.ascontiguousarray(ras), tuple(spacing)


def from_ras(ras: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS-ordered array [x, y, z] -> the axis order of the file whose affine is given (inverse of to_ras)."""
    t = nio.ornt_transform(nio.axcodes2ornt(("R", "A", "S")), nio.io_orientation(affine))
    return np.ascontiguousarray(nio.apply_orientation(ras, t))


def coronal(vol: np.ndarray, row: int, spacing: tuple[float, float, float]) -> np.ndarray:
    """Stored [Z, H, W] -> the coronal plane at stored row `row`, superior at the top, its
    slices repeated (nearest) so that pixels are square: a display view, not data."""
    plane = vol[::-1, row, :]  # stored Z runs inferior -> superior; images draw top-down
    stretch = spacing[0] / spacing[2]
    rows = max(1, int(round(plane.shape[0] * stretch)))
    idx = np.minimum((np.arange(rows) / stretch).astype(int), plane.shape[0] - 1)
    return plane[idx]


# ------------------------------------------------------------------------- resampling


def _resize_weights(n_in: int, n_out: int) -> sparse.csr_matrix:
    """(n_out, n_in) triangle-filter weights with half-pixel centres.

    When shrinking, the filter widens by the scale factor (antialiasing, close to area
    averaging); when enlarging it is plain linear interpolation. Edges replicate.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    taps = int(math.ceil(2 * support)) + 2
    first = np.floor(centres - support).astype(np.int64) + 1
    j = first[:, None] + np.arange(taps)[None, :]
    w = np.maximum(0.0, 1.0 - np.abs(j - centres[:, None]) / support)
    w /= w.sum(axis=1, keepdims=True)
    rows = np.repeat(np.arange(n_out), taps)
    m = sparse.csr_matrix((w.ravel(), (rows, np.clip(j, 0, n_in - 1).ravel())), shape=(n_out, n_in))
    m.sum_duplicates()
    return m


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def _resize_hw(vol: np.ndarray, hw: tuple[int, int], kind: str) -> np.ndarray:
    """Resize axes 1 and 2 of [Z, H, W]. "image": linear/area (dtype kept, ints rounded); "mask": nearest."""
    z, h, w = vol.shape
    nh, nw = int(hw[0]), int(hw[1])
    if kind == "mask":
        return vol[:, _nearest_index(h, nh)][:, :, _nearest_index(w, nw)]
    x = np.asarray(vol, dtype=np.float32)
    a_h = _resize_weights(h, nh).astype(np.float32)
    a_w = _resize_weights(w, nw).astype(np.float32)
    x = (a_h @ x.transpose(1, 0, 2).reshape(h, z * w)).reshape(nh, z, w).transpose(1, 0, 2)
    x = (a_w @ x.reshape(z * nh, w).T).T.reshape(z, nh, nw)
    if np.issubdtype(vol.dtype, np.integer):
        info = np.iinfo(vol.dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(vol.dtype)
    return x.astype(vol.dtype, copy=False)


# ------------------------------------------------------------------------- writing


def write(path: str | Path, arr: np.ndarray, affine: np.ndarray, dtype=np.uint8) -> None:
    """Write a NIfTI-1 file atomically (temp name, then rename): voxels as `dtype`, the
    affine as both sform and qform (code 1, scanner), millimetres, no intensity scaling
    for integer types."""
    arr = np.asarray(arr).astype(dtype, copy=False)
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(arr, affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    if np.issubdtype(dtype, np.integer):
        img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def save_like(path: str | Path, arr: np.ndarray, geom: Geometry, dtype=np.uint8) -> None:
    """Write a source-grid array with the source affine, atomically."""
    if tuple(np.shape(arr)) != tuple(geom.shape):
        raise ValueError(f"array shape {np.shape(arr)} does not match source shape {geom.shape}")
    write(path, arr, np.asarray(geom.affine), dtype)
