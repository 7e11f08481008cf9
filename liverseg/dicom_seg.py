"""DICOM Segmentation objects (SEG): the one owner of the format, read and written through highdicom.

Writing (`write`, for `predict --format dicom-seg`): a BINARY SEG with one segment "Liver"
(SNOMED CT: category Organ 123037004, type Liver 10200004), in the source series' study and
frame of reference, one frame per source slice that holds liver, each referring to its
source image; the algorithm (liverseg, its version and the weights' fingerprint) named.

Reading a SEG as a case's mask (`read_header`, `read_mask`): the segment is chosen by its
label ("liver" by default, case-insensitive; its SegmentedPropertyType code meaning counts
too) and each of its frames is placed by its own ImagePositionPatient onto the image's
grid (`geometry.frame_voxels`), never by frame order; slices without a frame hold no
liver. Refused, naming the file: not a SEG, no such segment (the segments it has are
listed), a SEG over another series than the image (by SeriesInstanceUID, when the image is
a DICOM series), or of another frame of reference, frames off the image's voxel grid.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from liverseg import InputError, dicom_io, geometry
from liverseg.files import atomic_path, check_readable
from liverseg.geometry import Header
from liverseg.source import Reader, Source, Volume

log = logging.getLogger(__name__)

DEFAULT_SEGMENT = "liver"
SERIES_DESCRIPTION = "liverseg liver segmentation"  # what `write` names its series, and `written_here` recognises
# Patient and study attributes a SEG copies from its source images, which must be present (type 2)
TYPE_2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _read(path: Path, header_only: bool = False):
    import highdicom as hd

    check_readable(path)
    try:
        return hd.seg.segread(str(path)) if not header_only else _dataset(path)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - highdicom and pydicom raise several types
        raise InputError(f"{path}: not a readable DICOM Segmentation ({type(e).__name__}: {str(e)[:200]})") from None


def _dataset(path: Path):
    import pydicom

    ds = pydicom.dcmread(str(path))  # pixels too (a SEG's are small): a truncated file is found here, in phase 1
    if str(getattr(ds, "SOPClassUID", "")) != "1.2.840.10008.5.1.4.1.1.66.4":
        raise ValueError(
            f"SOP class {getattr(ds.SOPClassUID, 'name', ds.get('SOPClassUID'))}, not Segmentation Storage"
        )
    _check_pixel_data(ds, path)
    return ds


def _check_pixel_data(ds, path: Path) -> None:
    """A native (uncompressed) SEG must hold the bytes its frames need: BINARY frames are bit-packed."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed:
        return  # encapsulated frames: their decoder checks them
    frames, rows, cols = int(getattr(ds, "NumberOfFrames", 1)), int(ds.Rows), int(ds.Columns)
    need = (frames * rows * cols * int(ds.BitsAllocated) + 7) // 8
    have = len(ds.PixelData) if "PixelData" in ds else 0
    if have < need:
        raise InputError(
            f"{path}: truncated or damaged DICOM SEG: its pixel data holds {have:,} of the {need:,} bytes "
            f"its {frames} frame(s) of {rows}x{cols} need; copy or export the SEG again"
        )


def _segment_number(ds, name: str, path: Path) -> int:
    found = {}
    for seg in ds.SegmentSequence:
        labels = {str(seg.SegmentLabel).lower()}
        if "SegmentedPropertyTypeCodeSequence" in seg:
            labels.add(str(seg.SegmentedPropertyTypeCodeSequence[0].CodeMeaning).lower())
        found[int(seg.SegmentNumber)] = (str(seg.SegmentLabel), labels)
    for number, (_, labels) in found.items():
        if name.lower() in labels:
            return number
    raise InputError(
        f"{path}: no segment labelled {name!r} (segments: "
        f"{', '.join(f'{n} {label!r}' for n, (label, _) in sorted(found.items()))}); pass the liver's "
        "label as the row's mask_label (or convert --mask-segment NAME)"
    )


def _check_references(ds, path: Path, image: Header, image_series: str | None, frame_of_reference: str | None) -> None:
    referenced = {str(r.SeriesInstanceUID) for r in getattr(ds, "ReferencedSeriesSequence", [])}
    if image_series and referenced and image_series not in referenced:
        raise InputError(
            f"{path}: this SEG segments series {', '.join(sorted(referenced))}, but the image "
            f"{image.path} is series {image_series}; pair it with the series it was drawn on"
        )
    if frame_of_reference and str(getattr(ds, "FrameOfReferenceUID", frame_of_reference)) != frame_of_reference:
        raise InputError(
            f"{path}: frame of reference {ds.FrameOfReferenceUID} differs from the image's "
            f"{frame_of_reference} ({image.path}): it was not drawn in the image's space"
        )


def _frames(ds, segment: int, path: Path) -> list[tuple[int, np.ndarray]]:
    """(frame index, its RAS affine) of every frame of `segment`, placed by its own position."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    out = []
    for i, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ident = frame if "SegmentIdentificationSequence" in frame else shared  # shared when there is one segment
        if ident is None or int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != segment:
            continue

        def tag(seq: str, name: str, frame=frame, i=i):
            for group in (frame, shared):
                if group is not None and seq in group and name in group[seq][0]:
                    return [float(v) for v in group[seq][0][name].value]
            raise InputError(f"{path}: frame {i + 1} has no {seq} {name}; the SEG cannot be placed")

        iop = tag("PlaneOrientationSequence", "ImageOrientationPatient")
        ipp = tag("PlanePositionSequence", "ImagePositionPatient")
        spacing = tag("PixelMeasuresSequence", "PixelSpacing")
        normal = np.cross(iop[:3], iop[3:])
        out.append((i, geometry.dicom_affine(iop[:3], iop[3:], ipp, normal, spacing)))
    return out


def read_header(
    path: str | Path,
    image: Header,
    image_series: str | None = None,
    frame_of_reference: str | None = None,
    segment: str = DEFAULT_SEGMENT,
) -> Header:
    """The image's grid, once the SEG is checked against it (tags only)."""
    path = Path(path)
    ds = _read(path, header_only=True)
    _check_references(ds, path, image, image_series, frame_of_reference)
    number = _segment_number(ds, segment, path)
    for i, affine in _frames(ds, number, path):
        where = geometry.frame_voxels(affine, (int(ds.Rows), int(ds.Columns)), image.affine, image.shape)
        if isinstance(where, str):
            raise InputError(
                f"{path}: frame {i + 1} of segment {segment!r} does not lie on the image {image.path}: {where}"
            )
    return Header(path, image.shape, image.affine, image.spacing, np.dtype(np.uint8))


def read_mask(
    path: str | Path,
    image: Header,
    image_series: str | None = None,
    frame_of_reference: str | None = None,
    segment: str = DEFAULT_SEGMENT,
) -> tuple[np.ndarray, Header, str, int]:
    """(liver uint8 {0, 1} on the image's grid, that grid as the SEG's Header, sha256, bytes)."""
    path = Path(path)
    header = read_header(path, image, image_series, frame_of_reference, segment)
    ds = _read(path)
    number = _segment_number(ds, segment, path)
    try:
        pixels = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - pydicom's decoders raise several types
        raise InputError(
            f"{path}: the SEG's frames cannot be decoded ({type(e).__name__}: {str(e)[:160]}); copy or "
            "export the SEG again"
        ) from None
    if pixels.ndim == 2:
        pixels = pixels[None]
    out = np.zeros(image.shape, np.uint8)
    fractional = str(getattr(ds, "SegmentationType", "BINARY")) == "FRACTIONAL"
    scale = float(getattr(ds, "MaximumFractionalValue", 255)) if fractional else 1.0
    for i, affine in _frames(ds, number, path):
        i_idx, j_idx, k_idx = geometry.frame_voxels(affine, pixels.shape[1:], image.affine, image.shape)
        on = pixels[i] >= 0.5 * scale if fractional else pixels[i] > 0
        out[i_idx, j_idx, k_idx] = np.maximum(out[i_idx, j_idx, k_idx], on.astype(np.uint8))
    raw = path.read_bytes()
    return out, header, hashlib.sha256(raw).hexdigest(), len(raw)


def write(
    path: str | Path, mask: np.ndarray, series, version: str, weights_fingerprint: str, series_number: int = 901
) -> Path:
    """Write `mask` (uint8 [i, j, k] on `series`' grid, as `dicom_io.read_series` lays it out)
    as a SEG over the DICOM series `series` (a dicom_io.Series), atomically. Returns `path`."""
    import warnings

    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = dicom_io.slice_datasets(series)
    frames_of_reference = {str(ds.get("FrameOfReferenceUID", "")) for ds in sources}
    if len(frames_of_reference) > 1:
        raise InputError(
            f"{series.path}: its slices carry {len(frames_of_reference)} Frames of Reference; a DICOM SEG "
            "shares one with its source series (write NIfTI instead: --format nifti)"
        )
    if frames_of_reference == {""}:  # de-identified series (3D-IRCADb-01's) drop it although CT requires it
        from pydicom.uid import generate_uid

        derived = generate_uid(entropy_srcs=[series.uid, "liverseg frame of reference"])
        log.warning(
            "%s: its slices carry no FrameOfReferenceUID; the SEG's is %s, derived from the series UID (each "
            "frame still references its source slice)",
            series.path,
            derived,
        )
        for ds in sources:
            ds.FrameOfReferenceUID = derived
    for ds in sources:
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:  # highdicom copies and refuses it empty
            del ds.SpecificCharacterSet
        for keyword in TYPE_2_COPIED:  # the standard lets them be empty, not absent: de-identified files drop them
            if keyword not in ds:
                setattr(ds, keyword, "")
    if mask.shape != (int(sources[0].Columns), int(sources[0].Rows), len(sources)):
        raise ValueError(f"mask of shape {mask.shape} is not on the grid of series {series.uid}")
    frames = np.stack([mask[:, :, k].T for k in range(mask.shape[2])]).astype(bool)  # [slice, row, column]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="liverseg", version=f"{version} (weights {weights_fingerprint})", family=codes.DCM.ArtificialIntelligence
    )
    liver = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Liver",
        segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Liver,
        algorithm_identification=algorithm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
    )
    with warnings.catch_warnings():  # highdicom's notes on the source's patient name and the like
        warnings.simplefilter("ignore")
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[liver],
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="liverseg",
            manufacturer_model_name="liverseg U-Net",
            software_versions=version,
            device_serial_number=weights_fingerprint,
            series_description=SERIES_DESCRIPTION,
            omit_empty_frames=True,
        )
    path = Path(path)
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path


def written_here(path: str | Path) -> bool:
    """Whether `path` is a SEG that `write` wrote (a later `predict --force` may replace it)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - pydicom raises several types for what is not DICOM
        return False
    return str(ds.get("Manufacturer", "")) == "liverseg" and str(ds.get("SeriesDescription", "")) == SERIES_DESCRIPTION


class SegReader(Reader):
    """DICOM Segmentation files, each drawn on its image (`Source.image`): the segment named
    by the source's label (default "liver") placed on the image's grid, {0, 1} already.
    `image_header` reads the image's grid (the readers' table, which lists this reader too)."""

    kind = "seg"
    liver_only = True  # its voxels are the chosen segment: no label rule applies after it

    def __init__(self, image_header):
        self.image_header = image_header

    def _image(self, src: Source) -> tuple[Header, str | None]:
        return self.image_header(src.image, ct=True), src.image.series

    def read_header(self, src: Source, ct: bool = False) -> Header:
        image, series = self._image(src)
        return read_header(src.path, image, series, segment=src.label or DEFAULT_SEGMENT)

    def read(self, src: Source, ct: bool = False) -> Volume:
        image, series = self._image(src)
        return Volume(*read_mask(src.path, image, series, segment=src.label or DEFAULT_SEGMENT))


__all__ = ["DEFAULT_SEGMENT", "SegReader", "read_header", "read_mask", "write", "written_here"]
