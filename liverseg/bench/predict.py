"""`liverseg bench predict` and `liverseg bench metrics`: whole-volume prediction and metric time."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np

from liverseg.bench.measure import warm


def bench_predict(run_dir: str | Path, data: str | Path, cases: int = 5) -> list[dict]:
    """Per NIfTI pair: whole-volume prediction seconds (read, infer, restore geometry) and
    slices/s, and metric seconds (Dice ... HD95/ASSD on the source grid)."""
    from liverseg import layouts, metrics, predict, volumes

    run = predict.load_run(run_dir)
    found, _ = layouts.find(Path(data))
    pairs = sorted(found.items())[:cases]
    warm([p.path for _, (image, mask, _) in pairs for p in (image, mask)])
    predict.predict_source(run, pairs[0][1][0])  # trace and warm up once
    rows = []
    for case_id, (image, mask, _) in pairs:
        t0 = time.perf_counter()
        pred, _, geom = predict.predict_source(run, image)
        t_pred = time.perf_counter() - t0
        ref = volumes.load_mask(mask).voxels
        t0 = time.perf_counter()
        m = metrics.case_metrics(pred, ref, geom.spacing)
        t_metric = time.perf_counter() - t0
        rows.append({"case": case_id, "shape": "x".join(map(str, geom.shape)), "predict s": round(t_pred, 2),
                     "slices/s": round(geom.stored_shape[0] / t_pred, 1), "metrics s": round(t_metric, 2),
                     "dice": round(m["dice"], 3)})
    return rows


def bench_metrics(masks: str | Path, shift: int = 2) -> list[dict]:
    """Metric time per case on real masks, scored against an imperfect 'prediction': the
    mask shifted by `shift` voxels along every axis and eroded once."""
    from scipy import ndimage

    from liverseg import metrics

    rows = []
    for p in sorted(Path(masks).glob("*_liver.nii*")):
        img = nib.load(str(p))
        ref = np.asanyarray(img.dataobj) > 0
        pred = ndimage.binary_erosion(np.roll(ref, shift, axis=(0, 1, 2)))
        t0 = time.perf_counter()
        m = metrics.case_metrics(pred, ref, img.header.get_zooms()[:3])
        rows.append({"case": p.name.split("_liver")[0], "shape": "x".join(map(str, ref.shape)),
                     "seconds": round(time.perf_counter() - t0, 2), "dice": round(m["dice"], 3),
                     "hd95 mm": round(m["hd95"], 2), "assd mm": round(m["assd"], 2)})
    return rows
