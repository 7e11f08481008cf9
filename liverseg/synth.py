"""Synthetic abdominal CT phantoms with liver masks: the embedded data for demos and tests.

Each case is rendered in canonical RAS millimetres by `anatomy.render` and written in a
clinical orientation as NIfTI (through `geometry` and `nifti_io`) or as 3D-IRCADb-01's
DICOM tree (`dicom_io`). It is meant to be a real segmentation problem, not a bright blob
(see `anatomy`).

Procedural livers are two deformed ellipsoid lobes; with `masks=DIR` a real liver mask is
used at its real geometry (shape, spacing, affine) and the anatomy is placed around it.
Everything is deterministic for a seed.
"""

from __future__ import annotations

import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from liverseg import LiversegError, anatomy, dicom_io, geometry, nifti_io, volumes
from liverseg.files import atomic_path
from liverseg.layouts import SYNTH_LAYOUTS as LAYOUTS
from liverseg.outputs import check_output
from liverseg.volumes import Source

ORIENTATIONS = (("LAS", 0.7), ("RAS", 0.15), ("LPS", 0.15))
PHANTOM = "liverseg phantom"  # the descrip of the NIfTI files synth writes (what a re-run may replace)
THICKNESSES = (1.0, 1.25, 1.6, 2.0, 2.5, 3.0, 4.0)


@dataclass(frozen=True)
class CaseSpec:
    name: str
    seed: int
    mask_path: Path | None = None  # real liver mask to build around
    size: int = 512
    slices: int = 100


# ------------------------------------------------------------------------- cases


def render(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    liver: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(CT int16 HU, mask uint8) in RAS order [x, y, z]: `anatomy.render`, its HU stored by
    the CT value rules (`volumes.hounsfield`: rounded, clipped to the record range)."""
    ct, mask = anatomy.render(rng, shape, spacing, liver)
    return volumes.hounsfield(ct, Path("phantom")), mask


def _procedural_case(spec: CaseSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    # Real CT keeps a 280-460 mm field of view whatever the matrix: 0.55-0.9 mm at 512,
    # proportionally coarser for small test images, so the anatomy keeps real sizes.
    sxy = round(rng.uniform(0.55, 0.9) * 512 / spec.size, 3)
    fitting = [t for t in THICKNESSES if 160 <= t * spec.slices <= 320]
    sz = float(rng.choice(fitting)) if fitting else round(max(160 / spec.slices, 1.0), 3)  # few slices: thicker
    orientation = rng.choice([o for o, _ in ORIENTATIONS], p=[p for _, p in ORIENTATIONS])
    ct, mask = render(rng, (spec.size, spec.size, spec.slices), (sxy, sxy, sz))
    # World origin like 3D-IRCADb headers: the array is centred laterally, table at y < 0.
    origin = (-(spec.size - 1) / 2 * sxy, -(spec.size - 1) * sxy, 0.0)
    ct_o, affine = geometry.from_canonical_ras(ct, (sxy, sxy, sz), str(orientation), origin)
    mask_o, _ = geometry.from_canonical_ras(mask, (sxy, sxy, sz), str(orientation), origin)
    return ct_o, mask_o, affine


def _masked_case(spec: CaseSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A phantom around a real liver mask, at the mask file's own shape, spacing and affine."""
    vol = volumes.load_mask(Source.nifti(spec.mask_path))  # checked: labels, header, truncation
    mask, header = vol.voxels, vol.header
    ras, spacing = geometry.to_ras(mask, header.affine)
    ct_ras, _ = render(np.random.default_rng(spec.seed), ras.shape, spacing, liver=ras)
    return geometry.from_ras(ct_ras, header.affine), mask, header.affine


def _write_case(spec: CaseSpec, out: Path, layout: str = "flat") -> str:
    ct, mask, affine = _masked_case(spec) if spec.mask_path else _procedural_case(spec)
    if layout == "ircad":  # 3D-IRCADb-01's DICOM tree: the CT series and the liver mask series (0/255)
        patient = out / ircad_folder(spec.name)
        with atomic_path(patient) as tmp:
            dicom_io.write_series(tmp / "PATIENT_DICOM", ct, affine, "CT", spec.seed, patient=patient.name)
            dicom_io.write_series(
                tmp / "MASKS_DICOM" / "liver", mask * np.uint8(255), affine, "OT", spec.seed, patient=patient.name
            )
        return spec.name
    nifti_io.write(out / f"{spec.name}_orig.nii.gz", ct, affine, np.int16, PHANTOM)
    nifti_io.write(out / f"{spec.name}_liver.nii.gz", mask, affine, np.uint8, PHANTOM)
    return spec.name


def _targets(spec: CaseSpec, out: Path, layout: str) -> list[Path]:
    if layout == "ircad":
        return [out / ircad_folder(spec.name)]
    return [out / f"{spec.name}_orig.nii.gz", out / f"{spec.name}_liver.nii.gz"]


def _is_phantom(path: Path) -> bool:
    """Whether an existing case file (or IRCAD patient folder) is a phantom synth wrote."""
    if path.is_dir():
        import pydicom

        first = next((f for f in sorted((path / "PATIENT_DICOM").glob("image_*")) if f.is_file()), None)
        try:
            return (
                first is not None
                and pydicom.dcmread(first, stop_before_pixels=True).get("Manufacturer") == dicom_io.WRITER
            )
        except Exception:  # noqa: BLE001 - pydicom raises several types for what is not DICOM
            return False
    return nifti_io.description_of(path) == PHANTOM


def _check_targets(specs: list[CaseSpec], folders: dict[str, Path], layout: str, masks: Path | None) -> None:
    """synth replaces its own earlier phantoms only: never a real scan or label that has a
    case's name, nor the folder of the masks it builds around."""
    for folder in set(folders.values()):
        check_output(folder, [masks] if masks is not None else [], flag="OUT")
    foreign = [t for s in specs for t in _targets(s, folders[s.name], layout) if t.exists() and not _is_phantom(t)]
    if foreign:
        raise LiversegError(
            f"{foreign[0]}: exists and is not a liverseg phantom ({len(foreign)} such file(s) or "
            "folder(s)); synth replaces only its own phantoms: choose an empty or new folder"
        )


def ircad_folder(name: str) -> str:
    """`3Dircadb1.N` for a case named with a trailing number N (ircad_e07, phantom_007)."""
    number = int(re.search(r"(\d+)$", name).group(1))
    return f"3Dircadb1.{number}"


def synthesize(
    out: str | Path,
    cases: int = 20,
    size: int = 512,
    slices: tuple[int, int] = (40, 200),
    masks: str | Path | None = None,
    seed: int = 0,
    layout: str = "flat",
    workers: int = 1,
    progress: bool = True,
) -> list[Path]:
    """Write `<case>_orig.nii.gz` (int16 HU) + `<case>_liver.nii.gz` (uint8) pairs into `out`.

    layout "flat": all pairs in `out`; "seed": the tutorial's `train/` + `test/` folders
    (the last quarter of the cases, at least one, are test); "ircad": DICOM series in
    3D-IRCADb-01's tree (`3Dircadb1.N/PATIENT_DICOM/image_k`, `MASKS_DICOM/liver/`). With `masks`, one case per
    `*_liver.nii*` file there, at its real geometry (`cases`, `size`, `slices` ignored).
    Returns the folders written.
    """
    from tqdm import tqdm

    out = Path(out)
    if layout not in LAYOUTS:
        raise LiversegError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if masks is not None:
        mask_files = sorted(Path(masks).glob("*_liver.nii*"))
        if not mask_files:
            raise LiversegError(f"{masks}: no *_liver.nii[.gz] files to build phantoms around")
        specs = [
            CaseSpec(re.sub(r"_liver\.nii(\.gz)?$", "", p.name), seed * 100003 + i, p) for i, p in enumerate(mask_files)
        ]
    else:
        if cases < 1 or not (16 <= size <= 2048) or not (4 <= slices[0] <= slices[1] <= 2000):
            raise LiversegError(
                "synth: need cases >= 1, 16 <= size <= 2048 and 4 <= slices[0] <= slices[1] "
                f"(got {cases}, {size}, {slices})"
            )
        rng = np.random.default_rng(seed)
        counts = rng.integers(slices[0], slices[1] + 1, size=cases)
        specs = [CaseSpec(f"phantom_{i + 1:03d}", seed * 100003 + i, None, size, int(n)) for i, n in enumerate(counts)]
    n_test = max(1, round(len(specs) / 4)) if layout == "seed" else 0
    folders = {
        s.name: out / ("test" if i >= len(specs) - n_test else "train") if layout == "seed" else out
        for i, s in enumerate(specs)
    }
    _check_targets(specs, folders, layout, Path(masks) if masks is not None else None)
    for f in set(folders.values()):
        f.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(specs), desc="synth", unit="case", disable=not progress)
    if workers <= 1:
        for s in specs:
            _write_case(s, folders[s.name], layout)
            bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for _ in pool.map(_write_case, specs, [folders[s.name] for s in specs], [layout] * len(specs)):
                bar.update()
    bar.close()
    return sorted(set(folders.values()))
