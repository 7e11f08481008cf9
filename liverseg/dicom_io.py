"""DICOM series: find them in a folder or a zip, read them with pydicom, check them.

A series is the set of files sharing a SeriesInstanceUID (several series in one folder
are told apart by it). Its slices are ordered by their position along the slice normal
(ImagePositionPatient projected on the cross product of the two ImageOrientationPatient
cosines), never by file name or InstanceNumber; the modality LUT (RescaleSlope /
RescaleIntercept) turns stored values into Hounsfield units. The voxel array and its RAS
affine come from `geometry.dicom_voxels` and `geometry.dicom_affine` (the one place DICOM's LPS becomes RAS), so a
series is handled downstream exactly like a NIfTI volume.

Refused, naming the series: multi-frame files, a non-CT series where a CT is expected,
missing geometry tags, mixed slice sizes, orientations or pixel spacings, duplicate or
missing slice positions and uneven spacing beyond a tolerance, sheared (gantry-tilted)
stacks, compressed pixel data without a decoder, and a zip that is not a zip.

Files inside zips (also a zip inside a zip, as in 3D-IRCADb-01's PATIENT_DICOM.zip) are
named `inner/path` with `!/` between zip levels, and read without unpacking to disk.
"""

from __future__ import annotations

import functools
import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liverseg import InputError, geometry
from liverseg.source import NESTED, Reader, Source, Volume, common_folder

MAX_FILE_BYTES = 256 * 2**20  # one DICOM slice file inside a zip, uncompressed (a 512x512 slice is ~0.5 MB)
MAX_INNER_ZIP_BYTES = 2 * 2**30  # a zip inside a zip is inflated into memory
POSITION_TOL_MM = 0.01  # two slices closer than this along the normal are duplicates
SPACING_TOL = 0.02  # a gap may differ from the median gap by this fraction (plus the position tolerance)
COSINE_TOL = 1e-4  # orientation cosines that differ by more are a different orientation
MAX_SHEAR = 0.01  # |sin| of the angle between the slice step and the normal (~0.6 degrees)


@dataclass(frozen=True)
class Series:
    """One DICOM series: its container (a folder or a .zip), its files (relative names,
    sorted), and its SeriesInstanceUID."""

    container: str
    members: tuple[str, ...]
    uid: str
    modality: str = ""

    @property
    def path(self) -> Path:
        """The folder (or zip) holding the series, for messages and output names."""
        common = common_folder(self.members)
        return Path(self.container) / common if common else Path(self.container)


# ------------------------------------------------------------------------- files


def _zip(container, where: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(container)
    except zipfile.BadZipFile:
        raise InputError(f"{where}: not a zip archive (or a damaged one); re-download or re-create it") from None
    except OSError as e:
        raise InputError(f"{where}: cannot read ({e.strerror})") from None


def _open_level(zip_path: Path, chain: tuple[str, ...]) -> tuple[zipfile.ZipFile, str]:
    """(the zip at the end of `chain` inside `zip_path`, how messages name it): `zip_path`
    itself for an empty chain; a zip inside a zip is inflated once (`_inner_zip`, cached)."""
    where = NESTED.join([str(zip_path), *chain])
    if not chain:
        return _zip(zip_path, where), where
    stat = zip_path.stat()
    return _zip(io.BytesIO(_inner_zip(str(zip_path), chain, (stat.st_mtime_ns, stat.st_size))), where), where


def _zip_members(root: Path, chain: tuple[str, ...] = ()) -> list[str]:
    """The files of a zip (`chain`: the zips inside it leading to this one), zips inside it
    expanded. Directory entries and hidden files (macOS `__MACOSX/._*`) are not files."""
    out = []
    z, _ = _open_level(root, chain)
    with z:
        for info in z.infolist():
            parts = info.filename.rstrip("/").split("/")
            if info.is_dir() or any(p.startswith(".") or p == "__MACOSX" for p in parts):
                continue
            if info.filename.lower().endswith(".zip"):  # inflated once, kept for reading its files next
                out += _zip_members(root, (*chain, info.filename))
            else:
                out.append(NESTED.join([*chain, info.filename]))
    return out


def list_files(root: Path) -> list[str]:
    """Every file under a folder, or inside a zip, as names relative to it; a zip (in the
    folder, or inside the zip) is expanded: `PATIENT_DICOM.zip!/PATIENT_DICOM/image_0`."""
    if not root.is_dir():
        return sorted(_zip_members(root))
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if p.name.lower().endswith(".zip"):
            out += [f"{rel}{NESTED}{m}" for m in _zip_members(p)]
        else:
            out.append(str(rel))
    return sorted(out)


def _split_member(container: Path, member: str) -> tuple[Path, tuple[str, ...], str]:
    """(the zip file, the zips inside it leading to the file, the file's name in the last one)
    of a member of `container`; for a plain file of a folder, (its path, (), "")."""
    *chain, name = member.split(NESTED)
    if container.is_dir():
        if not chain:
            return container / member, (), ""
        return container / chain[0], tuple(chain[1:]), name
    return container, tuple(chain), name


def read_member(container: str | Path, member: str) -> bytes:
    """The bytes of one file of a folder or a zip, through the zips on the way (`!/`)."""
    zip_path, chain, name = _split_member(Path(container), member)
    if not name:
        try:
            return zip_path.read_bytes()
        except OSError as e:
            raise InputError(f"{zip_path}: cannot read ({e.strerror})") from None
    z, where = _open_level(zip_path, chain)
    with z:
        try:
            info = z.getinfo(name)
        except KeyError:
            raise InputError(f"{where}: has no {name}") from None
        _check_size(info, MAX_FILE_BYTES, f"{where}{NESTED}{name}")
        return z.read(info)


def _check_size(info: zipfile.ZipInfo, limit: int, where: str) -> None:
    """Refuse a member whose declared size is past `limit` before inflating it (zipfile never
    inflates past the declared size): a small zip of a huge member would fill the memory."""
    if info.file_size > limit:
        raise InputError(
            f"{where}: {info.file_size / 2**20:,.0f} MB uncompressed ({info.compress_size / 2**20:,.1f} MB "
            f"in the zip), more than the {limit / 2**20:,.0f} MB liverseg reads from inside a zip; "
            "unzip it and point liverseg at the folder, or check the archive"
        )


def member_path(container: str | Path, member: str) -> str:
    """How messages name a member: the file's path (through zips: `a.zip!/b/c`)."""
    return f"{container}/{member}" if Path(container).is_dir() else f"{container}{NESTED}{member}"


@functools.lru_cache(maxsize=4)
def _inner_zip(container: str, chain: tuple[str, ...], stamp: tuple[int, int]) -> bytes:
    """The bytes of a zip inside a zip (`chain`: the members leading to it), kept for the
    series' next file: without it, every file would inflate its whole inner zip again.
    `stamp` (mtime, size) makes a rewritten container read anew."""
    data, where = None, container
    for level in chain:
        with _zip(container if data is None else io.BytesIO(data), where) as z:
            try:
                info = z.getinfo(level)
            except KeyError:
                raise InputError(f"{where}: has no {level}") from None
            _check_size(info, MAX_INNER_ZIP_BYTES, f"{where}{NESTED}{level}")
            data = z.read(info)
        where = f"{where}{NESTED}{level}"
    return data


# ------------------------------------------------------------------------- finding series


def find_series(root: str | Path, select=None) -> list[Series]:
    """The DICOM series in a folder or zip, by SeriesInstanceUID (optionally only the files
    whose member name `select(name)` accepts). Files that are not DICOM images (a DICOMDIR,
    a readme) are ignored."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: not found")
    groups: dict[str, list[str]] = {}
    modality: dict[str, str] = {}
    for member in list_files(root):
        if select is not None and not select(member):
            continue
        source = _source(root, member)  # a damaged or oversized zip fails here, naming it
        try:
            ds = _parse(source, member_path(root, member), header_only=True)
        except InputError:
            if _preamble(source) == b"DICM":  # a DICOM file that is damaged, not a readme: say so
                raise
            continue
        if "SeriesInstanceUID" not in ds or "Rows" not in ds:  # not an image (a DICOMDIR, a report), or cut short
            _check_not_truncated(ds, member_path(root, member))
            continue
        uid = str(ds.SeriesInstanceUID)
        groups.setdefault(uid, []).append(member)
        modality.setdefault(uid, str(getattr(ds, "Modality", "")))
    return [Series(str(root), tuple(sorted(m)), uid, modality[uid]) for uid, m in sorted(groups.items())]


def is_segmentation(path: Path) -> bool:
    """Is this file a DICOM Segmentation object (SOP class Segmentation Storage)?"""
    try:
        ds = _parse(Path(path), str(path), header_only=True)
    except InputError:
        return False
    return str(getattr(ds, "SOPClassUID", "")) == "1.2.840.10008.5.1.4.1.1.66.4"


# ------------------------------------------------------------------------- reading a series


def _float_tuple(ds, tag: str, n: int, where: str) -> tuple[float, ...]:
    value = getattr(ds, tag, None)
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != n or not all(np.isfinite(out)):
        raise InputError(f"{where}: {tag} is missing or malformed ({value!r}); the series has no usable geometry")
    return out


def _source(container: str | Path, member: str):
    """What pydicom reads a member from: the file itself when it is a plain file of a folder
    (so a header-only read stops before the pixel data), else its bytes."""
    path, _, name = _split_member(Path(container), member)
    return path if not name else io.BytesIO(read_member(container, member))


def _open(container: str, member: str, header_only: bool):
    """One file's tags (header_only: pydicom stops before the pixel data)."""
    return _parse(_source(container, member), member_path(container, member), header_only)


def _parse(source, where: str, header_only: bool = False):
    import pydicom

    try:
        return pydicom.dcmread(source, stop_before_pixels=header_only)
    except Exception as e:  # noqa: BLE001 - pydicom raises several types for damaged files
        raise InputError(
            f"{where}: not a readable DICOM file ({type(e).__name__}: {e}); it is damaged or "
            "truncated: re-copy it, or remove it from the series"
        ) from None


def _preamble(source) -> bytes:
    """Bytes 128-131 of a file: b"DICM" for a DICOM Part-10 file."""
    if isinstance(source, io.BytesIO):
        return source.getvalue()[128:132]
    try:
        with open(source, "rb") as f:
            return f.read(132)[128:132]
    except OSError:
        return b""


def _check_not_truncated(ds, where: str) -> None:
    """A file that says it is an image (its SOP class) but stops before the image's tags
    (SeriesInstanceUID, Rows) was cut short: refused, not mistaken for a non-image file."""
    sop = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    if sop is not None and "Image Storage" in str(getattr(sop, "name", "")):
        missing = [t for t in ("SeriesInstanceUID", "Rows") if t not in ds]
        raise InputError(
            f"{where}: a {sop.name} file without {' or '.join(missing)}: it is damaged or truncated; "
            "re-copy it, or remove it from the series"
        )


@dataclass(frozen=True)
class _Stack:
    """The checked geometry of a series: slice order, cosines, pixel spacing, first position, step."""

    order: list[int]
    cosines: np.ndarray
    spacing: tuple[float, float]
    first: np.ndarray
    step: np.ndarray
    size: tuple[int, int]


def _stack(series: Series, datasets: list, ct: bool) -> _Stack:
    where = str(series.path)  # the series' folder; its files are named by file name below
    if ct:
        modalities = {str(getattr(ds, "Modality", "")) for ds in datasets}
        if modalities != {"CT"}:
            raise InputError(
                f"{where}: a {'/'.join(sorted(modalities)) or 'no-modality'} series, not CT; "
                "point the image at the CT series"
            )
    frames = max(int(getattr(ds, "NumberOfFrames", 1) or 1) for ds in datasets)
    if frames > 1:
        raise InputError(
            f"{where}: multi-frame DICOM ({frames} frames in one file) is not supported; convert it to "
            "NIfTI (e.g. with dcm2niix) or to one file per slice"
        )
    first = datasets[0]
    cosines = np.array(_float_tuple(first, "ImageOrientationPatient", 6, where))
    spacing = _float_tuple(first, "PixelSpacing", 2, where)
    size = (int(first.Rows), int(first.Columns))
    names = [m.replace(NESTED, "/").rsplit("/", 1)[-1] for m in series.members]  # file names, for messages
    for member, ds in zip(names[1:], datasets[1:]):
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise InputError(
                f"{where}: mixed slice sizes ({member} is {ds.Rows}x{ds.Columns}, others "
                f"{size[0]}x{size[1]}); a series must hold one image size"
            )
        if np.max(np.abs(np.array(_float_tuple(ds, "ImageOrientationPatient", 6, where)) - cosines)) > COSINE_TOL:
            raise InputError(
                f"{where}: mixed orientations ({member} differs in ImageOrientationPatient); "
                "one series must have one orientation"
            )
        if not np.allclose(_float_tuple(ds, "PixelSpacing", 2, where), spacing, atol=1e-4, rtol=0):
            raise InputError(f"{where}: mixed pixel spacings ({member}); one series must have one pixel spacing")
    normal = np.cross(cosines[:3], cosines[3:])
    positions = np.array([_float_tuple(ds, "ImagePositionPatient", 3, where) for ds in datasets])
    order = [int(i) for i in np.argsort(positions @ normal, kind="stable")]
    step = _check_positions(where, [names[i] for i in order], positions[order], normal)
    return _Stack(order, cosines, spacing, positions[order[0]], step, size)


def _header(series: Series, stack: _Stack, dtype) -> geometry.Header:
    n = len(stack.order)
    shape = (
        stack.size[1],
        stack.size[0],
        n,
    )  # [i = column, j = row, k = slice], as geometry.dicom_voxels lays voxels out
    affine = geometry.dicom_affine(stack.cosines[:3], stack.cosines[3:], stack.first, stack.step, stack.spacing)
    return geometry.Header(
        series.path,
        shape,
        affine,
        (stack.spacing[1], stack.spacing[0], float(np.linalg.norm(stack.step))),
        np.dtype(dtype),
    )


def read_header(series: Series, ct: bool = False) -> geometry.Header:
    """The series' grid from its tags alone (no pixel data is decoded), every check applied."""
    stack = _stack(series, [_open(series.container, m, True) for m in series.members], ct)
    return _header(series, stack, np.float32 if ct else np.uint16)


def slice_datasets(series: Series) -> list:
    """The series' files' tags (no pixel data), in slice order: slice k of the voxels
    [i, j, k] `read_series` returns is the k-th (what a SEG over the series refers to)."""
    datasets = [_open(series.container, m, True) for m in series.members]
    return [datasets[i] for i in _stack(series, datasets, ct=False).order]


def read_series(series: Series, ct: bool) -> tuple[np.ndarray, geometry.Header, str, int]:
    """(voxels [i, j, k] on the series' grid, its Header, sha256 of its files in member order, their bytes).

    ct: the image of a case (Modality must be CT; values through the modality LUT: HU, as
    float32); otherwise a mask (stored values, unscaled).
    """
    sha, nbytes, datasets = hashlib.sha256(), 0, []
    for member in series.members:
        raw = read_member(series.container, member)
        sha.update(raw)
        nbytes += len(raw)
        datasets.append(_parse(io.BytesIO(raw), member_path(series.container, member)))
    stack = _stack(series, datasets, ct)
    voxels = geometry.dicom_voxels(
        [_pixels(datasets[i], ct, member_path(series.container, series.members[i])) for i in stack.order]
    )
    return voxels, _header(series, stack, voxels.dtype), sha.hexdigest(), nbytes


def _check_positions(where: str, members: list[str], positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The step between consecutive slices, once positions are unique, evenly spaced and along the normal."""
    if len(positions) == 1:
        return normal * 1.0  # a single slice: no step to measure; 1 mm along the normal
    along = positions @ normal
    gaps = np.diff(along)
    dup = np.flatnonzero(gaps < POSITION_TOL_MM)
    if dup.size:
        i = dup[0]
        raise InputError(
            f"{where}: duplicate slice position {along[i]:.3f} mm ({members[i]} and {members[i + 1]}); "
            "remove the duplicate files or split the series"
        )
    median = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - median) > POSITION_TOL_MM + SPACING_TOL * median)
    if bad.size:
        i = bad[0]
        missing = f", about {round(gaps[i] / median) - 1} slice(s) missing" if gaps[i] > 1.5 * median else ""
        raise InputError(
            f"{where}: uneven slice spacing: {gaps[i]:.3f} mm between {members[i]} and {members[i + 1]}, "
            f"{median:.3f} mm elsewhere{missing}; the series must be complete and evenly spaced"
        )
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    if np.linalg.norm(np.cross(step / np.linalg.norm(step), normal)) > MAX_SHEAR:
        raise InputError(
            f"{where}: slices are offset sideways along the stack (gantry tilt); resample the series "
            "to an orthogonal grid first"
        )
    return step


def _pixels(ds, ct: bool, where: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - no decoder for a compressed transfer syntax, or damaged pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise InputError(
            f"{where}: cannot decode its pixel data (transfer syntax {name}: {' '.join(str(e).split())}); "
            "liverseg's decoders for "
            "compressed DICOM are missing or broken: reinstall them (pip install pylibjpeg "
            "pylibjpeg-openjpeg pylibjpeg-libjpeg) or decompress the series (e.g. gdcmconv --raw)"
        ) from None
    if arr.ndim != 2:
        raise InputError(f"{where}: pixel data of shape {arr.shape} is not one greyscale slice")
    if not ct:
        return arr
    if "ModalityLUTSequence" in ds:  # a lookup table instead of a linear rescale: pydicom applies it
        return np.asarray(apply_modality_lut(arr, ds), np.float32)
    slope, intercept = _rescale(ds, where)
    if slope == 1 and intercept.is_integer():  # the usual CT: integer HU, exactly, in integer arithmetic
        return arr.astype(np.int32) + np.int32(intercept)
    return arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _rescale(ds, where: str) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept): absent means (1, 0); a slope of 0 (every voxel the
    intercept) or a non-finite value is a broken header, refused."""
    try:
        slope = float(ds.RescaleSlope) if "RescaleSlope" in ds and ds.RescaleSlope not in ("", None) else 1.0
        intercept = (
            float(ds.RescaleIntercept) if "RescaleIntercept" in ds and ds.RescaleIntercept not in ("", None) else 0.0
        )
    except (TypeError, ValueError):
        slope = intercept = float("nan")
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise InputError(
            f"{where}: RescaleSlope {getattr(ds, 'RescaleSlope', None)!r} / RescaleIntercept "
            f"{getattr(ds, 'RescaleIntercept', None)!r} cannot map stored values to HU (a slope of 0 "
            "makes every voxel the intercept); fix the header"
        )
    return slope, intercept


# ------------------------------------------------------------------------- writing (phantoms, tests)


WRITER = "liverseg"  # the Manufacturer of the series `write_series` writes


def write_series(
    folder: str | Path,
    voxels: np.ndarray,
    affine: np.ndarray,
    modality: str = "CT",
    seed: int = 0,
    shuffle: bool = False,
    patient: str = "phantom",
) -> str:
    """Write voxels [i, j, k] with an RAS affine as a DICOM series, one uncompressed file per
    slice named `image_0`, `image_1`, ... (3D-IRCADb-01's naming). Returns its SeriesInstanceUID.

    modality "CT": HU stored as uint16 HU + 1024 with RescaleIntercept -1024 (as many scanners
    do); otherwise a mask stored as 8-bit values, unscaled. shuffle: file names and
    InstanceNumbers in a random order unrelated to position (a reader must sort by position).
    UIDs derive from `seed`, so the same call writes the same bytes.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    slices, row_c, col_c, positions, (dr, dc) = geometry.to_dicom_slices(voxels, affine)
    uid = lambda *what: generate_uid(entropy_srcs=[patient, str(seed), modality, *map(str, what)])  # noqa: E731
    study, series = uid("study"), uid("series")
    names = np.arange(len(slices))
    if shuffle:
        names = np.random.default_rng(seed).permutation(len(slices))
    ct = modality == "CT"
    sop_class = CTImageStorage if ct else SecondaryCaptureImageStorage
    thickness = float(np.linalg.norm(positions[1] - positions[0])) if len(positions) > 1 else 1.0
    for k, pixels in enumerate(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, uid("sop", k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.PatientID = ds.PatientName = patient
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, uid("frame of reference")
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName, ds.SeriesNumber = "", "O", "", 1
        ds.Modality, ds.InstanceNumber, ds.Manufacturer = modality, int(names[k]) + 1, WRITER
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_c, *col_c)]
        ds.ImagePositionPatient = [round(float(v), 6) for v in positions[k]]
        ds.PixelSpacing = [round(dr, 6), round(dc, 6)]
        ds.SliceThickness = round(thickness, 6)
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        if ct:
            stored = (np.asarray(pixels, np.int32) + 1024).clip(0, 65535).astype("<u2")
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        else:
            stored = np.asarray(pixels).astype(np.uint8)
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"image_{int(names[k])}", enforce_file_format=True)
    return series


def series_of(src: Source) -> Series:
    """The DICOM series a source is; a source that does not list its files (read back from a
    manifest) is found again in its folder by its SeriesInstanceUID."""
    if src.members:
        return Series(str(src.path), src.members, src.series or "")
    match = [s for s in find_series(src.path) if s.uid == src.series]
    if not match:
        raise InputError(f"{src.path}: no DICOM series {src.series} any more")
    return match[0]


class DicomReader(Reader):
    """DICOM series, in a folder or a zip (found by their content, not by a suffix)."""

    kind = "dicom"

    def read_header(self, src: Source, ct: bool = False) -> geometry.Header:
        return read_header(series_of(src), ct)

    def read(self, src: Source, ct: bool = False) -> Volume:
        return Volume(*read_series(series_of(src), ct))


READER = DicomReader()


__all__ = [
    "READER",
    "DicomReader",
    "Series",
    "find_series",
    "list_files",
    "read_header",
    "read_member",
    "read_series",
    "series_of",
    "write_series",
]
