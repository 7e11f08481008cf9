"""Where a volume comes from, and what reading one gives: the contract every format's reader keeps.

A `Source` is a NIfTI or NRRD file, a DICOM series (files in a folder or a zip) or a DICOM
SEG drawn on an image; a `Pair` is a case's image and mask sources as a layout finds them.
Each format module (`nifti_io`, `nrrd_io`, `dicom_io`, `dicom_seg`) has one `Reader`:
`read_header(src, ct)` (the grid, checked before any voxel is read) and `read(src, ct) ->
Volume` (the voxels as stored, HU-scaled for a CT). `volumes` maps a source's kind to its
reader (`volumes.READERS`, the one table) and applies the value rules on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

if TYPE_CHECKING:  # geometry (nibabel, scipy) is imported by the readers, when a volume is read
    from liverseg.geometry import Header

NESTED = "!/"  # separates the levels of a zip inside a zip in a DICOM member's name


@dataclass(frozen=True)
class Source:
    """Where a volume comes from: `path` is a NIfTI or NRRD file, the folder/zip holding a
    DICOM series (`series`: its SeriesInstanceUID; `members`: its files, relative to `path`,
    or empty: found again by the UID), or a DICOM SEG file drawn on `image`. `label`: which
    label of a multi-label mask is the liver (a value, or a segment's name in a SEG or Slicer
    .seg.nrrd; empty: the value rules of `volumes`)."""

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
        common = common_folder(self.members)
        return self.path / common if common else self.path


def common_folder(members: tuple[str, ...]) -> str:
    """The folders a DICOM series' files share inside their container (zips named as folders)."""
    parts = [m.replace(NESTED, "/").split("/")[:-1] for m in members]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/".join(common)


def member_parts(member: str) -> list[str]:
    """The folders and file of a file inside a folder or zip, zips named as folders
    (`PATIENT_DICOM.zip!/PATIENT_DICOM/image_0` -> PATIENT_DICOM, PATIENT_DICOM, image_0)."""
    return [p.removesuffix(".zip") for p in member.replace(NESTED, "/").split("/")]


@dataclass(frozen=True)
class Volume:
    """A loaded source volume: voxels on the source's grid (in its own axis order), the grid,
    and the sha256 and size in bytes of the file(s) read. Read by name, never unpacked."""

    voxels: np.ndarray
    header: Header
    sha256: str
    nbytes: int


class Reader:
    """One format's reader (a class per format, in its module; `volumes.READERS` lists them).

    kind: the Source kind it reads; suffixes: the file names it claims (DICOM is found by its
    content instead)."""

    kind: str = ""
    suffixes: tuple[str, ...] = ()
    liver_only = False  # its mask voxels are already the liver {0, 1}: the value rules do not apply

    def read_header(self, src: Source, ct: bool = False) -> Header:
        """The grid a source promises, checked before its voxels are read (ct: the source is a
        case's CT, e.g. a DICOM series' Modality must say so)."""
        raise NotImplementedError

    def read(self, src: Source, ct: bool = False) -> Volume:
        """The voxels as stored (HU-scaled for a CT) on the source's grid, with its header."""
        raise NotImplementedError

    def label_value(self, src: Source) -> int | None:
        """The value of the label `src.label` names when it is not a number (a segment's name),
        or None where the format names no labels."""
        return None

    def mask_source(self, path: Path, label: str, segment: str) -> Source:
        """The Source of a mask file of this format (`segment`: a case list's default segment name)."""
        return Source(self.kind, path, label=label)  # type: ignore[arg-type]


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


__all__ = ["NESTED", "Found", "Pair", "Reader", "Source", "Volume", "common_folder", "member_parts"]
