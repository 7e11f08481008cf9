"""Whole-volume inference, prediction and export: one inference path.

`infer_volume` turns a stored-geometry CT volume into liver probabilities with the run's
2.5D context, intensity normalisation and optional flip TTA; `postprocess` thresholds
and keeps the largest 3D component (holes filled). `predict_image` brings a source CT
(NIfTI or DICOM) into the run's stored geometry, infers, and maps the probabilities back
to the source's own grid through `geometry` (one way in, one way out); `evaluate` scores
exactly what it returns.

A run's model is rebuilt in code from its saved config and only its *weights* are
loaded (`*.weights.h5`): no user-supplied `.keras`/`.h5` model or pickle is ever
deserialised.
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from scipy import ndimage

from liverseg import InputError, LiversegError, atomic_path, dicom_io, geometry, layouts, nifti_io, pipeline, rundir, unet, volumes
from liverseg.config import Config
from liverseg.volumes import Source

log = logging.getLogger(__name__)


@dataclass
class Run:
    """A trained run: its config, input contract and the network with its weights loaded."""

    root: Path
    cfg: Config
    spec: rundir.InputSpec
    model: object
    weights: Path
    forward: object = None  # sigmoid(model(x)) as a tf.function, set by load_run

    @property
    def context(self) -> int:
        return self.spec.context

    @property
    def norm(self) -> rundir.Normalization:
        return self.spec.normalization

    @property
    def size(self) -> int | None:
        """Slices were resized (or with spacing windowed) to size x size for training (None: native)."""
        return self.spec.size

    @property
    def spacing(self) -> float | None:
        """Slices were resampled to this in-plane pixel size (mm) for training (None: native)."""
        return self.spec.spacing


def load_run(root: str | Path, weights: str | Path | None = None) -> Run:
    """Rebuild the network from RUN/config.yaml and load best.weights.h5 (else final.weights.h5)."""
    root, paths = Path(root), rundir.RunDir(root)
    cfg = rundir.load_config(root)
    spec = rundir.RunInfo.load(root).input
    if weights is None:
        weights = next((p for p in (paths.best_weights, paths.final_weights) if p.is_file()), None)
        if weights is None:
            raise LiversegError(f"{root}: no {paths.best_weights.name} or {paths.final_weights.name} yet; train longer "
                                "or pass --weights")
    weights = Path(weights)
    if not weights.name.endswith(".weights.h5"):
        raise LiversegError(f"{weights}: only Keras weight files (*.weights.h5) are loaded, never whole models")
    model = unet.build(cfg.model, spec.channels)
    try:
        model.load_weights(str(weights))
    except Exception as e:  # a weights file of another architecture or a corrupt file: Keras dumps the tensors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LiversegError(f"{weights}: cannot load into this run's {cfg.model.name} ({first}); pass the weights of "
                            f"this run ({rundir.RunDir(root).best_weights.name} or "
                            f"{rundir.RunDir(root).final_weights.name})") from None
    forward = tf.function(lambda x: tf.sigmoid(model(x, training=False)), reduce_retracing=True)
    return Run(root, cfg, spec, model, weights, forward)


# ------------------------------------------------------------------------- inference


def infer_volume(run: Run, image: np.ndarray, batch_size: int | None = None, tta_flip: bool | None = None) -> np.ndarray:
    """Stored-geometry CT [Z, H, W] int16 -> liver probability [Z, H, W] float32."""
    e = run.cfg.eval
    batch_size = batch_size or e.batch_size
    tta_flip = e.tta_flip if tta_flip is None else tta_flip
    z, h, w = image.shape
    d = unet.divisor(run.cfg.model)
    ph, pw = -h % d, -w % d
    s = np.arange(z, dtype=np.int64)[:, None]
    rows = pipeline.context_rows(s, np.int64(z), s, run.context).numpy()  # [Z, 2k+1], as in training
    forward = run.forward
    out = np.empty((z, h, w), np.float32)
    for i in range(0, z, batch_size):
        stack = np.ascontiguousarray(image[rows[i:i + batch_size]].transpose(0, 2, 3, 1))  # [b, H, W, 2k+1]
        x = pipeline.normalize(tf.constant(stack, tf.float32), run.norm)
        x = tf.pad(x, [[0, 0], [0, ph], [0, pw], [0, 0]], mode="REFLECT")
        prob = forward(x)
        if tta_flip:
            prob = (prob + tf.reverse(forward(tf.reverse(x, [2])), [2])) / 2
        out[i:i + batch_size] = prob.numpy()[:, :h, :w, 0]
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


def predict_source(run: Run, src: Source) -> tuple[np.ndarray, np.ndarray, geometry.Geometry]:
    """(mask uint8, probability float32) on the source's own grid (a NIfTI file or DICOM series), and its geometry."""
    image, header = volumes.load_image(src)[:2]
    return predict_image(run, image, header)


def predict_image(run: Run, image: np.ndarray, header: geometry.Header) -> tuple[np.ndarray, np.ndarray, geometry.Geometry]:
    """A source-grid CT (int16 HU) -> (mask, probability) on the same grid, and its geometry."""
    stored, geom = geometry.to_stored_image(image, header, run.size, run.spacing)
    prob = geometry.from_stored(infer_volume(run, stored), geom, "prob")
    e = run.cfg.eval
    return postprocess(prob, e.threshold, e.largest_component, e.min_component_fraction), prob, geom


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
        niftis = sorted(f for f in p.iterdir() if f.name.endswith((".nii", ".nii.gz"))
                        and not f.name.endswith(("_liver.nii", "_liver.nii.gz", "_liver_prob.nii.gz")))
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
        common = Path(*[parts[0] for parts in itertools.takewhile(lambda parts: len(set(parts)) == 1,
                                                                  zip(*(r.parts for r in resolved)))])
        for i, r in zip(clashing, resolved):
            rel = r.relative_to(common) if r != common else Path(r.name)
            stems[i] = "_".join([*rel.parent.parts, name]) if rel.parent.parts else name
    shared = [stems.count(stem) > 1 for stem in stems]
    return [f"{stem}_{src.series.rsplit('.', 1)[-1]}" if clash and src.series else stem
            for stem, clash, (src, _) in zip(stems, shared, scans)]


def _nifti_stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii").removesuffix("_orig")


def predict(run: Run, paths, out: str | Path, force: bool = False, probabilities: bool = False) -> tuple[list[Path], list[str]]:
    """Write `<case>_liver.nii.gz` for every input scan, on that scan's own grid (a DICOM
    series: a NIfTI whose affine puts every voxel where the DICOM does).

    A bad input (unreadable, corrupt, existing output without force) is reported by name
    and does not stop the others. Returns (written files, failure messages).
    """
    out = Path(out)
    written = []
    scans, failures = inputs(paths)
    if not scans:
        raise LiversegError("; ".join(failures) or f"no .nii/.nii.gz inputs or DICOM series in {', '.join(map(str, paths))}")
    for msg in failures:
        log.error("%s", msg)
    out.mkdir(parents=True, exist_ok=True)
    for src, stem in scans:
        target, prob_target = out / f"{stem}_liver.nii.gz", out / f"{stem}_liver_prob.nii.gz"
        try:
            if target.exists() and not force:
                raise LiversegError(f"{target} exists; pass --force to overwrite")
            mask, prob, geom = predict_source(run, src)
            nifti_io.save_like(target, mask, geom, np.uint8)
            written.append(target)
            if probabilities:
                nifti_io.save_like(prob_target, prob, geom, np.float32)
                written.append(prob_target)
            log.info("%s -> %s (%.0f ml)", src.name, target, mask.sum() * math.prod(geom.spacing) / 1000)
        except (LiversegError, OSError) as err:
            msg = str(err) if str(src.name) in str(err) else f"{src.name}: {err}"
            failures.append(msg)
            log.error("%s", msg)
    return written, failures


# ------------------------------------------------------------------------- export


class _Serving(tf.Module):
    def __init__(self, model, norm: rundir.Normalization, channels: int, divisor: int):
        super().__init__()
        self.model, self.norm, self.divisor = model, norm, divisor
        self.serve = tf.function(self._serve, input_signature=[
            tf.TensorSpec([None, None, None, channels], tf.int16, name="slices_hu")])

    def _serve(self, slices_hu):
        """int16 HU slices [N, H, W, 2k+1] (stored geometry) -> liver probability [N, H, W, 1]."""
        h, w = tf.shape(slices_hu)[1], tf.shape(slices_hu)[2]
        x = pipeline.normalize(tf.cast(slices_hu, tf.float32), self.norm)
        x = tf.pad(x, [[0, 0], [0, -h % self.divisor], [0, -w % self.divisor], [0, 0]], mode="REFLECT")
        return {"liver_probability": tf.sigmoid(self.model(x, training=False))[:, :h, :w, :]}


def export(run: Run, out: str | Path, overwrite: bool = False) -> Path:
    """OUT/saved_model (serving_default: int16 HU slices -> probabilities) + OUT/<weights> + config."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LiversegError(f"{out} is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        module = _Serving(run.model, run.norm, 2 * run.context + 1, unet.divisor(run.cfg.model))
        tf.saved_model.save(module, str(tmp / "saved_model"), signatures={"serving_default": module.serve})
        shutil.copy2(run.weights, tmp / run.weights.name)
        for path in (rundir.RunDir(run.root).config, rundir.RunDir(run.root).info):
            shutil.copy2(path, tmp / path.name)
    return out
