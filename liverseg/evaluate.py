"""Evaluation: per-case metrics in millimetres on a records split or on a folder of scans.

Every case is predicted by `predict` (one inference path) and scored on the source's own
grid: cases of a folder (NIfTI pairs or DICOM series, by `--layout`) always; cases of a
records split in stored geometry when that *is* the source grid up to reorientation, and
otherwise (records resized with --size or resampled with --spacing) on the source grid too,
the probabilities mapped back and the reference mask read from the source files recorded in
the manifest. When those files are gone or changed (sha256), the case is scored in stored
geometry, with a warning naming it.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from liverseg import InputError, LiversegError, folds, geometry, layouts, metrics, overlay, rundir, storage, volumes
from liverseg.files import atomic_path, new_folder
from liverseg.manifest import CaseInfo, Manifest
from liverseg.models import Run, check_ensemble, load_run
from liverseg.outputs import check_output
from liverseg.predict import infer_volume, members, postprocess, predict_image
from liverseg.records import read_cases

log = logging.getLogger(__name__)


class Scored(NamedTuple):
    """A case to score: its prediction and reference on one grid, that grid's spacing in mm
    (z, y, x of the arrays), and `panel()`, the overlay's (stored CT, stored spacing, stored
    reference, stored prediction)."""

    case_id: str
    prediction: np.ndarray
    reference: np.ndarray
    spacing: tuple
    panel: Callable[[], tuple]


def evaluate(
    run: Run,
    records: str | Path | None = None,
    split: str = "test",
    data: str | Path | None = None,
    out: str | Path | None = None,
    pngs: bool = True,
    layout: str = "pattern",
) -> tuple[list[dict], dict, Path]:
    """Per-case metrics (+ summary) on a records split or on the scans of a folder in `layout`.
    Writes CSV, JSON, overlay PNGs and TensorBoard scalars into `out` (default
    RUN/eval/<split or folder>)."""
    name = split if data is None else Path(data).name
    models, run = members(run), members(run)[0]  # an ensemble is reported under its first run
    check_ensemble(models)
    if data is None:
        m = split_manifest(run, records)
        _warn_overlap(run, {c.case_id: Path(c.image.path) for c in m.cases_in(split)})
        cases = record_cases(models, records, split, m)
    else:
        found, _ = layouts.find(Path(data), layout)  # raises naming the folder when it holds no pairs
        _warn_overlap(run, {c: pair.image.name for c, pair in found.items()})
        cases = folder_cases(models, found, layout)
    inputs = [model.root for model in models] + [
        Path(data) if data is not None else storage.path(records or run.cfg.data.records)
    ]
    return write_report(
        run, cases, storage.path(out) if out else rundir.RunDir(run.root).report(name), name, pngs, inputs
    )


def _warn_overlap(run: Run, scored: dict) -> None:
    """A warning when the cases scored (case id -> image path) are patients the run trained
    on under another public dataset's name (3D-IRCADb-01 inside LiTS and the Decathlon)."""
    try:
        trained_on = Manifest.load(run.cfg.data.records)
    except LiversegError:
        return  # the run's records are gone: nothing to compare with
    trained = {c.case_id: Path(c.image.path) for s in ("train", "val") for c in trained_on.cases_in(s)}
    why = layouts.ircad_overlap(trained, scored)
    if why:
        log.warning("the cases scored overlap the run's training cases: %s; these scores are not held out", why)


def split_manifest(run: Run, records: str | Path | None = None) -> Manifest:
    """The manifest of `records` (default: the run's) as the run sees it: a run of a fold
    (data.folds) sees its fold's patients as the val split."""

    return folds.view(Manifest.load(records or run.cfg.data.records), run.cfg.data)


def record_cases(run, records: str | Path | None, split: str, m: Manifest | None = None):
    """Cases of a records split (`m`: its `split_manifest`, when already loaded), predicted
    from their stored slices (checked before the first case)."""
    models, run = members(run), members(run)[0]  # an ensemble: the members' probabilities averaged
    grids = {(model.contract.spec.size, model.contract.spec.spacing) for model in models}
    if len(grids) > 1:
        raise LiversegError(
            "an ensemble scored on records needs members trained at one size and spacing (these: "
            + "; ".join(
                f"{model.name}: size {model.contract.spec.size}, spacing {model.contract.spec.spacing}"
                for model in models
            )
            + "); score it on the source scans with --data"
        )
    m = m or split_manifest(run, records)
    m.split(split)  # names the folder and its splits when the split is not there
    e = run.contract

    def cases():
        listed = m.cases_in(split)
        for case, (_, image, ref) in zip(listed, read_cases([m.records_of(c.case_id) for c in listed])):
            prob = sum(infer_volume(model, image) for model in models) / np.float32(len(models))
            on_source = _source_reference(case, m.options.merge_tumour) if case.geometry.resized else None
            pred_stored = postprocess(prob, e.threshold, e.largest_component, e.min_component_fraction)
            spacing = case.geometry.stored_spacing
            panel = lambda image=image, ref=ref, pred=pred_stored, spacing=spacing: (image, spacing, ref, pred)
            if on_source is None:
                yield Scored(case.case_id, pred_stored, ref, spacing, panel)
                continue
            pred = postprocess(
                geometry.from_stored(prob, case.geometry, "prob"),
                e.threshold,
                e.largest_component,
                e.min_component_fraction,
            )
            yield Scored(case.case_id, pred, on_source, case.geometry.spacing, panel)

    return cases()


def _one_run_per_fold(roots: list[Path], infos: list) -> dict[int, Path]:
    """{fold: run} of runs that are the K folds of one dataset and fold setting, each fold once,
    their validation patients disjoint; else the refusal naming the runs."""
    plain = [str(r) for r, i in zip(roots, infos) if not i.folds]
    if plain:
        raise LiversegError(
            f"not runs of a fold (no data.folds): {', '.join(plain)}; train each fold with --set "
            "data.folds=K --set data.fold=k"
        )
    datasets = {i.manifest_sha256 for i in infos}
    if len(datasets) > 1:
        raise LiversegError(
            "runs of different datasets: "
            + "; ".join(f"{r}: dataset.json sha256 {i.manifest_sha256[:12]}" for r, i in zip(roots, infos))
        )
    settings = {(i.folds["folds"], i.folds.get("fold_seed", 0)) for i in infos}
    if len(settings) > 1:
        raise LiversegError(
            "runs of different fold settings: "
            + "; ".join(
                f"{r}: data.folds={i.folds['folds']}, fold_seed={i.folds.get('fold_seed', 0)}"
                for r, i in zip(roots, infos)
            )
        )
    k = infos[0].folds["folds"]
    by_fold: dict[int, Path] = {}
    for r, i in zip(roots, infos):
        if i.folds["fold"] in by_fold:
            raise LiversegError(
                f"{by_fold[i.folds['fold']]} and {r} are both fold {i.folds['fold']}: give one run per fold"
            )
        by_fold[i.folds["fold"]] = r
    missing = sorted(set(range(k)) - set(by_fold))
    if missing:
        raise LiversegError(
            f"fold(s) {', '.join(map(str, missing))} of data.folds={k} missing: give one run per fold "
            f"(given: {', '.join(f'fold {f} {r}' for f, r in sorted(by_fold.items()))})"
        )
    seen: dict[str, int] = {}
    for i in infos:
        for case in i.folds["val"]:
            if case in seen:
                raise LiversegError(
                    f"{case} is validated by folds {seen[case]} and {i.folds['fold']}: these runs' folds overlap"
                )
            seen[case] = i.folds["fold"]
    return by_fold


def cross_validate(run_dirs, out: str | Path | None = None) -> tuple[list[dict], dict, Path]:
    """Out-of-fold scores of the runs of one dataset's K folds (one run per fold): each run
    predicts its own validation patients, scored in mm on the source grid as `evaluate`
    does. Writes OUT/cases.csv (a row per patient, with its fold) and OUT/metrics.json (mean,
    sd, median per metric, overall and per fold); default OUT: cv/ beside the first run.
    Refused, naming them: runs without folds, of different datasets or fold settings, two
    runs of one fold, a fold missing."""
    roots = [storage.path(r) for r in run_dirs]
    out = storage.path(out) if out else roots[0].parent / "cv"
    check_output(out, roots, replaces="report", flag="--out")
    by_fold = _one_run_per_fold(roots, [rundir.RunInfo.load(r) for r in roots])
    rows = []
    for fold, root in sorted(by_fold.items()):
        run = load_run(root)
        for case in record_cases(run, None, "val"):
            rows.append(
                {
                    "case": case.case_id,
                    "fold": fold,
                    **metrics.case_metrics(case.prediction, case.reference, case.spacing),
                }
            )
    summary = {
        "overall": metrics.summarize(rows),
        "folds": {str(f): metrics.summarize([row for row in rows if row["fold"] == f]) for f in sorted(by_fold)},
    }
    with new_folder(out, last=("metrics.json",)) as tmp:
        _write_table(tmp / "cases.csv", rows)
        (tmp / "metrics.json").write_text(
            json.dumps(
                {"cases": rows, "summary": summary, "runs": {str(f): str(r) for f, r in sorted(by_fold.items())}},
                indent=1,
                default=_json_number,
            )
            + "\n"
        )
    return rows, summary, out


def _source_reference(case: CaseInfo, merge_tumour: bool) -> np.ndarray | None:
    """The case's reference mask on its image's source grid, read from the source files, or
    None (with a warning) when they are gone or changed since conversion."""
    try:
        vol = volumes.load_mask(case.mask.source(case.image), merge_tumour)
    except InputError as e:
        log.warning("%s: scored in stored geometry: its source mask cannot be read (%s)", case.case_id, e)
        return None
    if vol.sha256 != case.mask.sha256:
        log.warning("%s: scored in stored geometry: %s changed since conversion (sha256)", case.case_id, case.mask.path)
        return None
    image_grid = geometry.Header(
        Path(case.image.path),
        tuple(case.geometry.shape),
        np.asarray(case.geometry.affine),
        tuple(case.geometry.spacing),
        np.dtype(np.int16),
    )
    geometry.check_pair(image_grid, vol.header)
    return geometry.onto_grid(vol.voxels, vol.header, image_grid)


def folder_cases(run, found: layouts.Found, layout: str = "pattern"):
    """The cases of a folder as `layouts.find` found them in `layout`, each predicted and
    scored on its own source grid."""

    def cases():
        for case_id, (image_src, mask_src, *_) in sorted(found.items()):
            ct = volumes.load_image(image_src)
            image, header = ct.voxels, ct.header
            pred, _, geom = predict_image(run, image, header)
            truth = volumes.load_mask(mask_src, layout in layouts.MERGES_TUMOUR)
            geometry.check_pair(header, truth.header)
            ref = geometry.onto_grid(truth.voxels, truth.header, header)

            def panel(image=image, geom=geom, ref=ref, pred=pred):  # overlays are drawn in stored geometry
                return (
                    geometry.to_stored(image, geom, "image"),
                    geom.stored_spacing,
                    geometry.to_stored(ref, geom, "mask"),
                    geometry.to_stored(pred, geom, "mask"),
                )

            yield Scored(case_id, pred, ref, geom.spacing, panel)

    return cases()


def write_report(run: Run, cases, out: Path, name: str, pngs: bool = True, inputs=()) -> tuple[list[dict], dict, Path]:
    """The evaluation report of scored cases: cases.csv, metrics.json, one overlay PNG per case
    and the means in TensorBoard (RUN/evaluation). `out` is checked first (it may replace
    only an earlier report, and holds none of `inputs`), then written into a temporary folder
    renamed onto `out` at the end, so a failure part-way leaves no folder."""
    rows = []
    check_output(out, [run.root, *inputs], replaces="report", flag="--out")
    with new_folder(out, last=("metrics.json",)) as tmp:
        for case in cases:
            rows.append({"case": case.case_id, **metrics.case_metrics(case.prediction, case.reference, case.spacing)})
            if pngs:
                overlay.write_png(tmp / f"{case.case_id}.png", overlay.case_panel(*case.panel()))
        if not rows:
            raise LiversegError(f"{name}: no cases to evaluate")
        summary = metrics.summarize(rows)
        _write_table(tmp / "cases.csv", rows)
        (tmp / "metrics.json").write_text(
            json.dumps({"cases": rows, "summary": summary, "weights": str(run.weights)}, indent=1, default=_json_number)
            + "\n"
        )
    writer = tf.summary.create_file_writer(str(rundir.RunDir(run.root).board("evaluation")))
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
