"""Whole-volume inference, evaluation, NIfTI prediction and export: one inference path.

`infer_volume` turns a stored-geometry CT volume into liver probabilities with the run's
2.5D context, intensity normalisation and optional flip TTA; `postprocess` thresholds
and keeps the largest 3D component (holes filled). `evaluate` and `predict` both go
through these two functions with the run's saved settings, so the masks `predict` writes
are exactly the masks `evaluate` scores. NIfTI inputs are brought into stored geometry
and the prediction back to each input's own grid by `nifti_io` (one way in, one way out).

A run's model is rebuilt in code from its saved config and only its *weights* are
loaded (`*.weights.h5`): no user-supplied `.keras`/`.h5` model or pickle is ever
deserialised.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from scipy import ndimage

from liverseg import LiversegError, atomic_path, metrics, nifti_io, overlay, pipeline, rundir, unet
from liverseg.config import Config
from liverseg.manifest import ConvertOptions, Manifest
from liverseg.records import read_case

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
    def norm(self) -> rundir.Intensity:
        return self.spec.intensity

    @property
    def size(self) -> int | None:
        """Slices were resized to size x size for training (None: native)."""
        return self.spec.size


def load_run(root: str | Path, weights: str | Path | None = None) -> Run:
    """Rebuild the network from RUN/config.yaml and load best.weights.h5 (else final.weights.h5)."""
    root = Path(root)
    cfg = rundir.load_config(root)
    spec = rundir.RunInfo.load(root).input
    if weights is None:
        weights = next((root / n for n in ("best.weights.h5", "final.weights.h5") if (root / n).is_file()), None)
        if weights is None:
            raise LiversegError(f"{root}: no best.weights.h5 or final.weights.h5 yet; train longer or pass --weights")
    weights = Path(weights)
    if not weights.name.endswith(".weights.h5"):
        raise LiversegError(f"{weights}: only Keras weight files (*.weights.h5) are loaded, never whole models")
    model = unet.build(cfg.model, spec.channels)
    try:
        model.load_weights(str(weights))
    except Exception as e:  # a weights file of another architecture or a corrupt file
        raise LiversegError(f"{weights}: cannot load into this run's {cfg.model.name} ({e})") from None
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
        x = run.norm(tf.constant(stack, tf.float32))
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


def predict_nifti(run: Run, path: str | Path) -> tuple[np.ndarray, np.ndarray, nifti_io.Geometry]:
    """(mask uint8, probability float32) on the input file's own grid, and its geometry."""
    return predict_image(run, *nifti_io.load_image(path))


def predict_image(run: Run, image: np.ndarray, header) -> tuple[np.ndarray, np.ndarray, nifti_io.Geometry]:
    """predict_nifti for a CT already loaded with `nifti_io.load_image`."""
    geom = nifti_io.stored_geometry(header, run.size)
    prob_stored = infer_volume(run, nifti_io.to_stored(image, geom, "image"))
    prob = nifti_io.from_stored(prob_stored, geom, "prob")
    e = run.cfg.eval
    return postprocess(prob, e.threshold, e.largest_component, e.min_component_fraction), prob, geom


# ------------------------------------------------------------------------- evaluate


def evaluate(run: Run, records: str | Path | None = None, split: str = "test", data: str | Path | None = None,
             out: str | Path | None = None, pngs: bool = True) -> tuple[list[dict], dict, Path]:
    """Per-case metrics (+ summary) on a records split (stored geometry) or on NIfTI pairs
    (each case on its own source grid, exactly what `predict` writes). Writes CSV, JSON,
    overlay PNGs and TensorBoard scalars into `out` (default RUN/eval/<split or folder>)."""
    name = split if data is None else Path(data).name
    cases = record_cases(run, records, split) if data is None else folder_cases(run, data)
    return write_report(run, cases, Path(out) if out else run.root / "eval" / name, name, pngs)


# A scored case: (case id, prediction, reference, spacing in mm of their grid, a function
# returning the overlay panel's (stored CT, stored spacing, stored reference, stored prediction)).
Scored = tuple


def record_cases(run: Run, records: str | Path | None, split: str):
    """Cases of a records split, predicted and scored in stored geometry (checked before the first case)."""
    m = Manifest.load(Path(records or run.cfg.data.records))
    m.split(split)  # names the folder and its splits when the split is not there
    e = run.cfg.eval

    def cases():
        for case in m.cases_in(split):
            image, ref = read_case(m, case.case_id)
            pred = postprocess(infer_volume(run, image), e.threshold, e.largest_component, e.min_component_fraction)
            spacing = case.geometry.stored_spacing
            yield case.case_id, pred, ref, spacing, lambda image=image, ref=ref, pred=pred: (image, spacing, ref, pred)

    return cases()


def folder_cases(run: Run, data: str | Path):
    """NIfTI pairs in a folder, each predicted and scored on its own source grid."""
    from liverseg.convert import discover

    found = discover(Path(data), ConvertOptions())  # raises naming the folder when it holds no pairs

    def cases():
        for case in found:
            image, header = nifti_io.load_image(case.image)
            pred, _, geom = predict_image(run, image, header)
            ref, mask_header = nifti_io.load_mask(case.mask)
            nifti_io.check_pair(header, mask_header)
            ref = nifti_io.onto_grid(ref, mask_header, header)

            def panel(image=image, geom=geom, ref=ref, pred=pred):  # overlays are drawn in stored geometry
                return (nifti_io.to_stored(image, geom, "image"), geom.stored_spacing,
                        nifti_io.to_stored(ref, geom, "mask"), nifti_io.to_stored(pred, geom, "mask"))

            yield case.case_id, pred, ref, geom.spacing, panel

    return cases()


def write_report(run: Run, cases, out: Path, name: str, pngs: bool = True) -> tuple[list[dict], dict, Path]:
    """The evaluation report of scored cases: cases.csv, metrics.json, one overlay PNG per case
    and the means in TensorBoard (RUN/evaluation). Written into a temporary folder renamed
    onto `out` at the end, so a failure part-way leaves no folder."""
    rows = []
    new_parents = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(out) as tmp:
            tmp.mkdir()
            for case_id, pred, ref, spacing, panel in cases:
                rows.append({"case": case_id, **metrics.case_metrics(pred, ref, spacing)})
                if pngs:
                    overlay.write_png(tmp / f"{case_id}.png", overlay.case_panel(*panel()))
            if not rows:
                raise LiversegError(f"{name}: no cases to evaluate")
            summary = metrics.summarize(rows)
            _write_table(tmp / "cases.csv", rows)
            (tmp / "metrics.json").write_text(json.dumps({"cases": rows, "summary": summary, "weights": str(run.weights)},
                                                         indent=1, default=_json_number) + "\n")
    except BaseException:
        for p in new_parents:  # innermost first: folders this call created, left empty by the failure
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    writer = tf.summary.create_file_writer(str(run.root / "evaluation"))
    with writer.as_default(step=0):
        for k, v in summary.items():
            tf.summary.scalar(f"{name}/{k}_mean", v["mean"])
    writer.flush()
    return rows, summary, out


def _json_number(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _write_table(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# ------------------------------------------------------------------------- predict


def _inputs(paths) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.name.endswith((".nii", ".nii.gz"))
                            and not f.name.endswith(("_liver.nii", "_liver.nii.gz", "_liver_prob.nii.gz")))
        else:
            files.append(p)
    return files


def output_name(path: Path, suffix: str = "_liver") -> str:
    stem = path.name.removesuffix(".gz").removesuffix(".nii")
    return f"{stem.removesuffix('_orig')}{suffix}.nii.gz"


def predict(run: Run, inputs, out: str | Path, force: bool = False, probabilities: bool = False) -> tuple[list[Path], list[str]]:
    """Write `<case>_liver.nii.gz` for every input, in that input's geometry.

    A bad input (unreadable, corrupt, existing output without force) is reported by name
    and does not stop the others. Returns (written files, failure messages).
    """
    out = Path(out)
    written, failures = [], []
    files = _inputs(inputs)
    if not files:
        raise LiversegError(f"no .nii/.nii.gz inputs in {', '.join(map(str, inputs))}")
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = out / output_name(f)
        prob_target = out / output_name(f, "_liver_prob")
        try:
            if target.exists() and not force:
                raise LiversegError(f"{target} exists; pass --force to overwrite")
            mask, prob, geom = predict_nifti(run, f)
            nifti_io.save_like(target, mask, geom, np.uint8)
            written.append(target)
            if probabilities:
                nifti_io.save_like(prob_target, prob, geom, np.float32)
                written.append(prob_target)
            log.info("%s -> %s (%.0f ml)", f, target, mask.sum() * math.prod(geom.spacing) / 1000)
        except (LiversegError, OSError) as err:
            msg = str(err) if str(err).startswith(str(f)) or str(f) in str(err) else f"{f}: {err}"
            failures.append(msg)
            log.error("%s", msg)
    return written, failures


# ------------------------------------------------------------------------- export


class _Serving(tf.Module):
    def __init__(self, model, norm: rundir.Intensity, channels: int, divisor: int):
        super().__init__()
        self.model, self.norm, self.divisor = model, norm, divisor
        self.serve = tf.function(self._serve, input_signature=[
            tf.TensorSpec([None, None, None, channels], tf.int16, name="slices_hu")])

    def _serve(self, slices_hu):
        """int16 HU slices [N, H, W, 2k+1] (stored geometry) -> liver probability [N, H, W, 1]."""
        h, w = tf.shape(slices_hu)[1], tf.shape(slices_hu)[2]
        x = self.norm(tf.cast(slices_hu, tf.float32))
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
        for name in ("config.yaml", "run.json"):
            shutil.copy2(run.root / name, tmp / name)
    return out
