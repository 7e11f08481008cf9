"""Whole-volume inference and prediction, one path for every engine (TensorFlow-free).

A model (`models`: a trained run or an exported folder) has a `contract` and `logits(x)`.
`infer_volume` turns a stored-geometry CT volume into liver probabilities in NumPy: the
2.5D stacks, normalisation, padding to the network's divisor, optional flip TTA, sigmoid.
`predict_image` brings a source CT (NIfTI or DICOM) into the model's stored geometry and
maps the probabilities back to the source's own grid through `geometry` (one way in, one way
out); several models (an ensemble) are averaged there, each after its own TTA, then
thresholded and post-processed once (`postprocess`). `evaluate` scores exactly what it returns.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from liverseg import (
    InputError,
    LiversegError,
    __version__,
    dicom_io,
    dicom_seg,
    engines,
    geometry,
    layouts,
    nifti_io,
    rundir,
    storage,
    volumes,
)
from liverseg.files import folder_lock
from liverseg.models import check_ensemble
from liverseg.outputs import check_output
from liverseg.volumes import Source

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("nifti", "dicom-seg")
LOCK = ".liverseg-predict.lock"  # held in --out while a prediction writes there
PREDICTION = "liverseg prediction"  # the descrip of the NIfTI files predict writes (what --force may replace)


# ------------------------------------------------------------------------- inference


def context_rows(z: int, k: int) -> np.ndarray:
    """[Z, 2k+1] slice indices of each slice's 2.5D stack, clamped to the volume (as
    `pipeline.context_rows` stacks them in training)."""
    return np.clip(np.arange(z)[:, None] + np.arange(-k, k + 1)[None, :], 0, z - 1)


def normalize(hu: np.ndarray, norm: rundir.Normalization) -> np.ndarray:
    """`pipeline.normalize` in NumPy (float32): (clip(hu, lo, hi) - shift) / scale."""
    return (
        np.clip(hu.astype(np.float32), np.float32(norm.lo), np.float32(norm.hi)) - np.float32(norm.shift)
    ) / np.float32(norm.scale)


def infer_volume(model, image: np.ndarray, batch_size: int | None = None, tta_flip: bool | None = None) -> np.ndarray:
    """Stored-geometry CT [Z, H, W] int16 -> liver probability [Z, H, W] float32."""
    c = model.contract
    batch_size = batch_size or c.batch_size
    tta_flip = c.tta_flip if tta_flip is None else tta_flip
    z, h, w = image.shape
    ph, pw = -h % c.divisor, -w % c.divisor
    rows = context_rows(z, c.spec.context)
    out = np.empty((z, h, w), np.float32)
    for i in range(0, z, batch_size):
        x = normalize(image[rows[i : i + batch_size]].transpose(0, 2, 3, 1), c.spec.normalization)  # [b, H, W, 2k+1]
        x = np.ascontiguousarray(np.pad(x, [(0, 0), (0, ph), (0, pw), (0, 0)], mode="reflect"))
        prob = engines.sigmoid(model.logits(x))
        if tta_flip:
            prob = (prob + engines.sigmoid(model.logits(np.ascontiguousarray(x[:, :, ::-1])))[:, :, ::-1]) / 2
        out[i : i + batch_size] = prob[:, :h, :w, 0]
    return out


def postprocess(prob: np.ndarray, threshold: float, largest_component: bool, min_fraction: float = 1.0) -> np.ndarray:
    """Probabilities -> uint8 mask. With largest_component: keep the largest 26-connected
    component and any other of at least min_fraction of its size, then fill holes."""
    mask = prob >= threshold
    if largest_component and mask.any():
        labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        if n > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            mask = np.isin(labels, np.flatnonzero(sizes >= max(1, min_fraction * sizes.max())))
        mask = ndimage.binary_fill_holes(mask)
    return mask.astype(np.uint8)


def members(models) -> list:
    """A model or an ensemble as a list of models."""
    return list(models) if isinstance(models, (list, tuple)) else [models]


def predict_source(models, src: Source) -> tuple[np.ndarray, np.ndarray, geometry.Geometry]:
    """(mask uint8, probability float32) on the source's own grid (a NIfTI file or DICOM series), and its geometry."""
    ct = volumes.load_image(src)
    return predict_image(models, ct.voxels, ct.header)


def predict_image(
    models, image: np.ndarray, header: geometry.Header
) -> tuple[np.ndarray, np.ndarray, geometry.Geometry]:
    """A source-grid CT (int16 HU) -> (mask, probability) on the same grid, and the first
    model's geometry. An ensemble: each model's probability (after its own TTA) mapped back
    to the source grid, averaged, then thresholded and post-processed once with the first
    model's options."""
    models = members(models)
    total, geom = None, None
    for model in models:
        spec = model.contract.spec
        stored, g = geometry.to_stored_image(image, header, spec.size, spec.spacing)
        prob = geometry.from_stored(infer_volume(model, stored), g, "prob")
        total, geom = (prob if total is None else total + prob), geom or g
    prob = total / np.float32(len(models)) if len(models) > 1 else total
    c = models[0].contract
    return postprocess(prob, c.threshold, c.largest_component, c.min_component_fraction), prob, geom


# ------------------------------------------------------------------------- predict


def inputs(paths) -> tuple[list[tuple[Source, str]], list[str]]:
    """(source, output stem) of every scan to predict, and why any path gave none.

    A path is a `.nii`/`.nii.gz` file; a folder: its NIfTI files (not our own outputs) or,
    when it holds none, every CT DICOM series below it (zips in it included; label series
    such as 3D-IRCADb's MASKS_DICOM are not scans); or a `.zip` of DICOM series. A scan is
    named by its file, or its series' folder (`layouts.series_name`: 3D-IRCADb's PATIENT_DICOM
    by its patient). Scans whose names collide are named by their paths from the folder
    they share; the same scan given twice is refused."""
    found: list[tuple[Source, Path]] = []
    failures: list[str] = []
    for p in map(Path, paths):
        try:
            found += _scans_in(p)
        except InputError as e:
            failures.append(str(e))
    named, seen = [], {}
    for (src, where), stem in zip(found, _unique_stems(found)):
        key = (str(src.path), src.series, src.members)
        if key in seen:
            failures.append(f"{where}: given twice (also as {seen[key]}); predict it once")
            continue
        seen[key] = where
        named.append((src, stem))
    return named, failures


def _scans_in(p: Path) -> list[tuple[Source, Path]]:
    """(source, the path that names it) of every scan a path holds."""
    if p.is_file() and p.name.endswith((".nii", ".nii.gz")):
        return [(Source.nifti(p), p)]
    if p.is_dir():
        niftis = sorted(
            f
            for f in p.iterdir()
            if f.name.endswith((".nii", ".nii.gz"))
            and not f.name.endswith(("_liver.nii", "_liver.nii.gz", "_liver_prob.nii.gz"))
        )
        if niftis:
            return [(Source.nifti(f), f) for f in niftis]
    elif not p.name.lower().endswith(".zip"):
        raise InputError(f"{p}: not a NIfTI file (.nii, .nii.gz), a folder or a zip of DICOM series")
    series = [s for s in dicom_io.find_series(p) if s.modality in ("CT", "") and not layouts.is_label_series(s)]
    if not series:
        raise InputError(f"{p}: holds no NIfTI files and no CT DICOM series")
    return [(Source.dicom(s), layouts.series_name(s)) for s in series]


def _unique_stems(scans: list[tuple[Source, Path]]) -> list[str]:
    """Output stems: each scan's own name; where two share one, the path from their common
    folder; where two series share a folder too, the last part of each one's UID appended."""
    paths = [where for _, where in scans]
    base = [_nifti_stem(p) if p.name.endswith((".nii", ".nii.gz")) else p.name.removesuffix(".zip") for p in paths]
    stems = list(base)
    for name in {b for b in base if base.count(b) > 1}:
        clashing = [i for i, b in enumerate(base) if b == name]
        resolved = [paths[i].resolve() for i in clashing]
        common = Path(
            *[
                parts[0]
                for parts in itertools.takewhile(lambda parts: len(set(parts)) == 1, zip(*(r.parts for r in resolved)))
            ]
        )
        for i, r in zip(clashing, resolved):
            rel = r.relative_to(common) if r != common else Path(r.name)
            stems[i] = "_".join([*rel.parent.parts, name]) if rel.parent.parts else name
    shared = [stems.count(stem) > 1 for stem in stems]
    return [
        f"{stem}_{src.series.rsplit('.', 1)[-1]}" if clash and src.series else stem
        for stem, clash, (src, _) in zip(stems, shared, scans)
    ]


def _nifti_stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii").removesuffix("_orig")


def predict(
    models, paths, out: str | Path, force: bool = False, probabilities: bool = False, fmt: str = "nifti"
) -> tuple[list[Path], list[str]]:
    """Write `<case>_liver.nii.gz` (fmt "nifti") or `<case>_liver.dcm` (fmt "dicom-seg": a
    DICOM Segmentation over the input series; DICOM inputs only) for every input scan, on
    that scan's own grid (a DICOM series as NIfTI: an affine that puts every voxel where the
    DICOM does). `models`: one model or an ensemble (see `predict_image`).

    A bad input (unreadable, corrupt, existing output without force) is reported by name
    and does not stop the others. Returns (written files, failure messages).
    """
    if fmt not in OUTPUT_FORMATS:
        raise LiversegError(f"--format {fmt!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    models = members(models)
    check_ensemble(models)
    out = storage.path(out)
    written = []
    scans, failures = inputs(paths)
    if not scans:
        raise LiversegError(
            "; ".join(failures) or f"no .nii/.nii.gz inputs or DICOM series in {', '.join(map(str, paths))}"
        )
    if fmt == "dicom-seg":
        not_dicom = [str(src.name) for src, _ in scans if src.kind != "dicom"]
        if not_dicom:
            raise LiversegError(
                f"--format dicom-seg needs DICOM series as inputs (a SEG refers to the series' slices), "
                f"but {', '.join(not_dicom)} {'is' if len(not_dicom) == 1 else 'are'} not DICOM; use "
                "--format nifti for them"
            )
    sources = [m.root for m in models if getattr(m, "root", None)]  # a run or an export (a test model has none)
    check_output(out, [*paths, *sources], flag="--out")  # never over an input: a mask, a scan, a model
    for msg in failures:
        log.error("%s", msg)
    with folder_lock(out, LOCK, "a prediction", "wait for it to finish, or choose another --out", remove=True):
        written += _predict_all(models, scans, out, force, probabilities, fmt, failures)
    return written, failures


def _predict_all(models, scans, out: Path, force: bool, probabilities: bool, fmt: str, failures: list) -> list[Path]:
    """Predict every scan into `out` (held by this process), a failure reported and appended."""
    written = []
    suffix = "_liver.dcm" if fmt == "dicom-seg" else "_liver.nii.gz"
    for src, stem in scans:
        target, prob_target = out / f"{stem}{suffix}", out / f"{stem}_liver_prob.nii.gz"
        try:
            for path in (target, prob_target) if probabilities else (target,):
                _check_replaceable(path, force)
            mask, prob, geom = predict_source(models, src)
            if fmt == "dicom-seg":
                _write_seg(target, mask, src, models)
            else:
                nifti_io.save_like(target, mask, geom, np.uint8, PREDICTION)
            written.append(target)
            if probabilities:
                nifti_io.save_like(prob_target, prob, geom, np.float32, PREDICTION)
                written.append(prob_target)
            log.info("%s -> %s (%.0f ml)", src.name, target, mask.sum() * math.prod(geom.spacing) / 1000)
        except (LiversegError, OSError) as err:
            msg = str(err) if str(src.name) in str(err) else f"{src.name}: {err}"
            failures.append(msg)
            log.error("%s", msg)
    return written


def _check_replaceable(target: Path, force: bool) -> None:
    """An existing output is replaced with --force only when predict wrote it (NIfTI: its
    descrip field; SEG: its series description): never a label or scan of the same name."""
    if not target.exists():
        return
    if not force:
        raise LiversegError(f"{target} exists; pass --force to overwrite")
    with storage.local_copy(target) as local:
        ours = dicom_seg.written_here(local) if local.suffix == ".dcm" else nifti_io.description_of(local) == PREDICTION
    if not ours:
        raise LiversegError(
            f"{target} exists and was not written by liverseg predict (a label or scan of that name?); "
            "--force replaces only earlier predictions: choose another --out"
        )


def _write_seg(target: Path, mask: np.ndarray, src: Source, models: list) -> None:
    """A BINARY DICOM SEG of `mask` over the series `src`, the algorithm identified by
    liverseg's version and the weights' fingerprints (a SEG holds no frame for a mask with
    no liver: then it is not written, and the input is reported)."""
    if not mask.any():
        raise LiversegError(
            f"{src.name}: no liver found, and a DICOM SEG holds frames of the segment only; nothing "
            "written for it (--format nifti writes the empty mask)"
        )
    dicom_seg.write(target, mask, dicom_io.series_of(src), __version__, "+".join(m.contract.weights for m in models))


__all__ = [
    "OUTPUT_FORMATS",
    "infer_volume",
    "inputs",
    "postprocess",
    "predict",
    "predict_image",
    "predict_source",
]
