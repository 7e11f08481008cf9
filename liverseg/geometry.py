"""Geometry: the only module that flips, transposes, reorients or resamples a volume.

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
the source's grid (`from_stored`), so there is exactly one way in and one way out.

In-plane, a stored slice is optionally (a) resized to `size` x `size`, or (b) resampled to
`spacing` mm pixels and then cropped/padded to a `size` x `size` window centred on the
body. Both are undone by `from_stored`.

Sources: NIfTI files carry an RAS affine. DICOM series carry patient coordinates in LPS;
`dicom_voxels` and `dicom_affine` turn a series into a voxel array and an RAS affine (the one place LPS
becomes RAS), after which a DICOM volume is handled exactly like a NIfTI one.

Spacing tuples are always in millimetres. In stored geometry they are ordered
(slice, row, column).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import sparse

from liverseg import InputError, serial

STORED_AXCODES = ("S", "P", "L")
AIR_HU = -1024  # what a CT window is padded with
BODY_HU = -500  # voxels above this are body (air is about -1000 HU)


@dataclass(frozen=True)
class Header:
    """A source volume's grid as its header (or DICOM tags) promise it, checked before any voxel is read.

    shape and affine (voxel index -> RAS mm) are in the source's own axis order."""

    path: Path
    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    dtype: np.dtype


@dataclass(frozen=True)
class Geometry(serial.Record):
    """Source grid of a volume and how it maps to stored geometry.

    shape/affine/orientation/spacing describe the source (3D). native_hw is the stored
    (H, W) before any in-plane change; stored_shape is [Z, H, W] as stored. resampled_hw
    (with `--spacing`) is the in-plane size after resampling to the target spacing, and
    window the (row, column) of the stored window's top-left corner in that resampled plane
    (negative where the window reaches past it: padded with air).
    """

    shape: tuple[int, int, int]
    affine: tuple[tuple[float, ...], ...]
    orientation: str
    spacing: tuple[float, float, float]
    native_hw: tuple[int, int]
    stored_shape: tuple[int, int, int]
    stored_spacing: tuple[float, float, float]
    resampled_hw: tuple[int, int] | None = serial.key(omit=True, default=None)
    window: tuple[int, int] | None = serial.key(omit=True, default=None)

    @property
    def plane_hw(self) -> tuple[int, int]:
        """In-plane size after the resize or resampling, before the window."""
        return tuple(self.resampled_hw or self.stored_shape[1:])

    @property
    def resized(self) -> bool:
        return tuple(self.plane_hw) != tuple(self.native_hw) or self.window is not None


# ------------------------------------------------------------------------- grids and orientation


def _transform_to_stored(affine: np.ndarray) -> np.ndarray:
    return nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(STORED_AXCODES))


def orientation_of(affine: np.ndarray) -> str:
    return "".join(nio.aff2axcodes(affine))


def stored_grid(header: Header) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of the header's grid once reoriented to stored axes: the same physical
    grid whatever the source's axis order (an RAS and an LAS file of one grid give the same)."""
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
        offset = float(np.linalg.norm(img_affine[:3, 3] - mask_affine[:3, 3]))
        raise InputError(
            f"{mask.path}: affine differs from image {image.path} by {diff:.4g} mm (its first voxel is {offset:.4g} mm "
            f"from the image's; tolerance {atol_mm} mm); the mask is not on the image's grid (resample it onto the "
            "image, or raise --affine-tol if this is header rounding)"
        )


def onto_grid(arr: np.ndarray, src: Header, dst: Header) -> np.ndarray:
    """An array on `src`'s grid in `dst`'s axis order (the grids must agree: `check_pair`)."""
    t = nio.ornt_transform(nio.io_orientation(src.affine), nio.io_orientation(dst.affine))
    return np.ascontiguousarray(nio.apply_orientation(arr, t))


# ------------------------------------------------------------------------- DICOM (LPS) to RAS


def dicom_affine(row_cosine, column_cosine, first_position, step, pixel_spacing) -> np.ndarray:
    """The RAS affine of a DICOM series' voxels [i, j, k] (see `dicom_voxels`).

    From the standard (PS3.3 C.7.6.2.1.1): the position of column i, row j of a slice is
    ImagePositionPatient + i * dc * row_cosine + j * dr * column_cosine, where PixelSpacing
    = (dr, dc) = (between rows, between columns) and row_cosine (the first three
    ImageOrientationPatient values) is the direction along a row, i.e. of increasing column
    index. `step` is the position difference of consecutive slices, first_position that of
    slice 0.

    DICOM patient coordinates are LPS (+x to the patient's left, +y posterior, +z superior);
    RAS negates x and y. This is the only LPS -> RAS conversion in liverseg.
    """
    dr, dc = (float(v) for v in pixel_spacing)
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(row_cosine, np.float64) * dc
    lps[:3, 1] = np.asarray(column_cosine, np.float64) * dr
    lps[:3, 2] = np.asarray(step, np.float64)
    lps[:3, 3] = np.asarray(first_position, np.float64)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def dicom_voxels(slices) -> np.ndarray:
    """Pixel arrays [Rows, Columns] (a sequence, ordered along the slice normal) -> voxels
    [i, j, k]: column i, row j of slice k, the layout a NIfTI file of the series holds.

    Filled in place, Fortran-ordered: voxel (i, j, k) then sits where a NIfTI file stores
    it, and each slice is one contiguous copy (a C-ordered [Rows, Columns] slice is its own
    transpose in Fortran order)."""
    out = None
    for k, pixels in enumerate(slices):
        if out is None:
            out = np.empty((pixels.shape[1], pixels.shape[0], len(slices)), pixels.dtype, order="F")
        out[:, :, k] = pixels.T
    return out


# NRRD "space" names and the signs that turn each into RAS (x, y, z)
NRRD_SPACES = {
    "right-anterior-superior": (1, 1, 1),
    "left-anterior-superior": (-1, 1, 1),
    "left-posterior-superior": (-1, -1, 1),
    "ras": (1, 1, 1),
    "las": (-1, 1, 1),
    "lps": (-1, -1, 1),
    "scanner-xyz": (-1, -1, 1),
}  # scanner-xyz: DICOM patient coordinates, LPS


def nrrd_affine(space: str, directions, origin) -> np.ndarray:
    """The RAS affine of NRRD voxels [i, j, k]: column a of `directions` ("space directions",
    one row per axis in pynrrd) is the step of axis a in `space`, `origin` the position of
    voxel 0. The NRRD space (LPS for DICOM-derived files, RAS, LAS) becomes RAS here."""
    flip = np.diag([*NRRD_SPACES[space], 1.0])
    a = np.eye(4)
    a[:3, :3] = np.asarray(directions, np.float64).T
    a[:3, 3] = np.asarray(origin, np.float64)
    return flip @ a


def frame_voxels(
    frame_affine: np.ndarray, shape_rc: tuple[int, int], grid_affine: np.ndarray, grid_shape, tol: float = 0.1
) -> tuple[np.ndarray, ...] | str:
    """Where the pixels of a 2D frame fall on a 3D grid: the grid's voxel indices (i, j, k
    arrays over the frame's [rows, columns]), or why they do not fall on voxel centres.

    `frame_affine` maps (column, row, 0) to RAS mm (as `dicom_affine` builds one for a single
    slice); the frame is placed by its position, whatever the order frames come in, and may
    run along any axis of the grid (flipped or not). tol: in voxels.
    """
    rows, cols = shape_rc
    to_grid = np.linalg.inv(np.asarray(grid_affine, np.float64)) @ np.asarray(frame_affine, np.float64)
    r, c = np.mgrid[0:rows, 0:cols]
    pts = to_grid[:3, 0, None, None] * c + to_grid[:3, 1, None, None] * r + to_grid[:3, 3, None, None]
    idx = np.rint(pts)
    off = float(np.abs(pts - idx).max())
    if off > tol:
        return f"its pixels lie {off:.2f} voxels off the image's voxel centres (not on its grid)"
    idx = idx.astype(np.int64)
    for axis, n in enumerate(grid_shape):
        if idx[axis].min() < 0 or idx[axis].max() >= n:
            mm = float(
                np.abs(
                    np.asarray(grid_affine)[:3, :3]
                    @ (np.clip(pts[:, 0, 0], 0, np.array(grid_shape) - 1) - pts[:, 0, 0])
                ).max()
            )
            return (
                f"it lies outside the image (voxel axis {axis}: {idx[axis].min()}..{idx[axis].max()} of 0..{n - 1}, "
                f"{mm:.1f} mm off)"
            )
    return idx[0], idx[1], idx[2]


def to_dicom_slices(
    voxels: np.ndarray, affine: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, list[np.ndarray], tuple[float, float]]:
    """The inverse of `dicom_voxels` + `dicom_affine`, for writing a volume as a DICOM series:
    (pixel arrays [Rows, Columns] per slice k, row cosine, column cosine, ImagePositionPatient
    per slice, PixelSpacing (between rows, between columns)), all in LPS."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, np.float64)
    dc, dr = float(np.linalg.norm(lps[:3, 0])), float(np.linalg.norm(lps[:3, 1]))
    positions = [lps[:3, 3] + k * lps[:3, 2] for k in range(voxels.shape[2])]
    slices = [np.ascontiguousarray(voxels[:, :, k].T) for k in range(voxels.shape[2])]
    return slices, lps[:3, 0] / dc, lps[:3, 1] / dr, positions, (dr, dc)


# ------------------------------------------------------------------------- stored geometry


def stored_geometry(header: Header, size: int | None = None, spacing: float | None = None) -> Geometry:
    """Geometry of `header`'s volume once stored: reoriented; resized to size x size; or
    (with spacing) resampled to spacing-mm pixels and windowed to size x size (the window's
    position is set from the voxels, by `to_stored_image`)."""
    t = _transform_to_stored(header.affine)
    stored = [0, 0, 0]
    sp = [0.0, 0.0, 0.0]
    for src_axis, (dst_axis, _flip) in enumerate(t):
        stored[int(dst_axis)] = header.shape[src_axis]
        sp[int(dst_axis)] = header.spacing[src_axis]
    z, h, w = stored
    native_hw, resampled = (h, w), None
    if spacing is not None:
        resampled = (max(1, round(h * sp[1] / spacing)), max(1, round(w * sp[2] / spacing)))
        sp[1], sp[2] = sp[1] * h / resampled[0], sp[2] * w / resampled[1]  # exact for the rounded size
        h, w = (size, size) if size is not None else resampled
    elif size is not None:
        sp[1], sp[2] = sp[1] * h / size, sp[2] * w / size
        h = w = size
    return Geometry(
        shape=header.shape,
        affine=tuple(tuple(float(v) for v in row) for row in header.affine),
        orientation=orientation_of(header.affine),
        spacing=header.spacing,
        native_hw=native_hw,
        stored_shape=(z, h, w),
        stored_spacing=tuple(sp),
        resampled_hw=resampled,
        window=(0, 0) if resampled is not None and size is not None else None,  # placeholder until fitted
    )


def _to_plane(arr: np.ndarray, geom: Geometry, kind: str) -> np.ndarray:
    out = nio.apply_orientation(arr, _transform_to_stored(np.asarray(geom.affine)))
    if tuple(geom.plane_hw) != tuple(geom.native_hw):
        out = resize_hw(out, geom.plane_hw, kind)
    return out


def to_stored(arr: np.ndarray, geom: Geometry, kind: str) -> np.ndarray:
    """Source-grid array -> C-contiguous stored array [Z, H, W] (kind: "image" or "mask").

    The in-plane resize is in-plane only: images use an antialiased linear filter (area
    averaging when shrinking), masks nearest neighbour so they stay binary. With a window,
    the plane is then cropped (or padded: air for images, 0 for masks).
    """
    out = _to_plane(arr, geom, kind)
    if geom.window is not None:
        out = _crop_or_pad(out, geom.window, geom.stored_shape[1:], AIR_HU if kind == "image" else 0)
    return np.ascontiguousarray(out)


def to_stored_image(
    image: np.ndarray, header: Header, size: int | None = None, spacing: float | None = None
) -> tuple[np.ndarray, Geometry]:
    """A source CT -> (stored image, its geometry), placing a `--spacing` window on the body:
    the centre of the bounding box of voxels above BODY_HU over all slices (the plane's
    centre when there are none). Masks then go through `to_stored` with that geometry."""
    geom = stored_geometry(header, size, spacing)
    plane = _to_plane(image, geom, "image")
    if geom.window is not None:
        h, w = geom.stored_shape[1:]
        body = (plane > BODY_HU).any(axis=0)
        rows, cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
        ch = (rows[0] + rows[-1] + 1) // 2 if rows.size else plane.shape[1] // 2
        cw = (cols[0] + cols[-1] + 1) // 2 if cols.size else plane.shape[2] // 2
        geom = dataclasses.replace(geom, window=(int(ch - h // 2), int(cw - w // 2)))
        plane = _crop_or_pad(plane, geom.window, (h, w), AIR_HU)
    return np.ascontiguousarray(plane), geom


def from_stored(arr: np.ndarray, geom: Geometry, kind: str) -> np.ndarray:
    """Stored-geometry array [Z, H, W] -> the source's grid (shape and axis order).

    kind "prob": float probabilities, resized back linearly (threshold afterwards), 0 outside
    a window; kind "mask": labels, resized back by nearest neighbour, 0 outside a window.
    """
    if tuple(arr.shape) != tuple(geom.stored_shape):
        raise ValueError(f"array shape {arr.shape} does not match stored shape {geom.stored_shape}")
    if geom.window is not None:  # the window back into the resampled plane
        top, left = geom.window
        arr = _crop_or_pad(arr, (-top, -left), geom.plane_hw, 0)
    if tuple(geom.plane_hw) != tuple(geom.native_hw):
        arr = resize_hw(arr, geom.native_hw, "image" if kind == "prob" else "mask")
    back = nio.ornt_transform(nio.axcodes2ornt(STORED_AXCODES), nio.io_orientation(np.asarray(geom.affine)))
    return np.ascontiguousarray(nio.apply_orientation(arr, back))


def _crop_or_pad(vol: np.ndarray, corner: tuple[int, int], hw: tuple[int, int], fill) -> np.ndarray:
    """vol[:, r:r+h, c:c+w] for corner (r, c), where out-of-range rows/columns read `fill`."""
    (r, c), (h, w) = corner, hw
    out = np.full((vol.shape[0], h, w), fill, vol.dtype)
    r0, c0 = max(r, 0), max(c, 0)
    r1, c1 = min(r + h, vol.shape[1]), min(c + w, vol.shape[2])
    if r1 > r0 and c1 > c0:
        out[:, r0 - r : r1 - r, c0 - c : c1 - c] = vol[:, r0:r1, c0:c1]
    return out


# ------------------------------------------------------------------------- RAS arrays (phantoms, tests)


def from_canonical_ras(
    ras: np.ndarray,
    spacing: tuple[float, float, float],
    orientation: str,
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray]:
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


def resize_hw(vol: np.ndarray, hw: tuple[int, int], kind: str) -> np.ndarray:
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


__all__ = [
    "AIR_HU",
    "BODY_HU",
    "Geometry",
    "Header",
    "STORED_AXCODES",
    "check_pair",
    "coronal",
    "dicom_affine",
    "dicom_voxels",
    "to_dicom_slices",
    "from_canonical_ras",
    "from_ras",
    "from_stored",
    "onto_grid",
    "orientation_of",
    "resize_hw",
    "stored_geometry",
    "stored_grid",
    "to_ras",
    "to_stored",
    "to_stored_image",
]
