"""Per-case segmentation metrics for binary 3D volumes, distances in millimetres.

Definitions (prediction P, reference R, voxel sets; S(.) their surfaces):

* Dice = 2|P n R| / (|P| + |R|); IoU (Jaccard) = |P n R| / |P u R|; VOE = 1 - IoU;
  RVD = (|P| - |R|) / |R| (signed; positive = over-segmentation).
* Surfaces are the voxels of a mask with a 6-neighbour outside it (mask minus its
  erosion by the 3D cross). Distances are Euclidean between voxel centres scaled by the
  voxel spacing, so anisotropic voxels are measured in mm.
* The symmetric surface distances are d(p, S(R)) for p in S(P) together with
  d(r, S(P)) for r in S(R). HD95 is their 95th percentile, ASSD their mean and MSD
  (maximum surface distance, the Hausdorff distance) their maximum: the LiTS / SLIVER07
  definitions (medpy's hd95). Note: MONAI's HD95 takes the larger of the two directed
  95th percentiles and medpy's assd averages the two directed means; both can differ.

Empty-mask rule: both empty -> Dice 1, IoU 1, VOE 0, RVD 0, distances 0 (perfect
agreement on "no liver"). Exactly one empty -> Dice 0, IoU 0, VOE 1, RVD -1 (prediction
empty) or +inf (reference empty), and every distance +inf. `summarize` reports how many
values are infinite instead of dropping them silently.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

METRICS = ("dice", "iou", "voe", "rvd", "hd95", "assd", "msd")
DISTANCES = ("hd95", "assd", "msd")
_CROSS = ndimage.generate_binary_structure(3, 1)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def _bbox(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask plus `margin` voxels (per-axis any(): no index arrays)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(hit[0] - margin, 0), min(hit[-1] + 1 + margin, mask.shape[axis])))
    return tuple(box)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> np.ndarray:
    """All symmetric surface distances (mm) between two non-empty masks.

    Surfaces come from erosion on the masks' bounding box (+1 voxel, so the box edge is
    background as in the full volume); nearest-surface distances from a k-d tree over
    the surface voxels in mm: the same numbers as a distance transform, without
    transforming the whole box.
    """
    from scipy import spatial

    box = _bbox(pred | ref)
    scale = np.asarray(spacing, dtype=np.float64)
    points_p = np.argwhere(_surface(pred[box])) * scale
    points_r = np.argwhere(_surface(ref[box])) * scale
    to_ref = spatial.cKDTree(points_r).query(points_p)[0]
    to_pred = spatial.cKDTree(points_p).query(points_r)[0]
    return np.concatenate([to_ref, to_pred])


def dice_from_counts(tp: float, fp: float, fn: float) -> float:
    """Dice = 2 TP / (2 TP + FP + FN), with the empty rule: nothing predicted and nothing
    there (all counts 0) is perfect agreement, 1. Per-case metrics, validation's per-volume
    3D Dice and the training log's Dice use this function; validation's mean slice Dice is the
    same formula computed on the device (`validation`), over the slices with liver in the
    reference or the prediction."""
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else float(2 * tp / denom)


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """Dice, IoU, VOE, RVD, HD95, ASSD, MSD (mm) and both volumes (ml) for one case.

    pred, ref: 3D arrays (nonzero = liver) on the same grid; spacing: mm per voxel along
    the arrays' axes.
    """
    pred, ref = np.asarray(pred).astype(bool), np.asarray(ref).astype(bool)
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and ref {ref.shape} must be 3D volumes of the same shape")
    spacing = tuple(float(s) for s in spacing)
    n_p, n_r = int(pred.sum()), int(ref.sum())
    inter = int(np.count_nonzero(pred & ref))
    voxel_ml = math.prod(spacing) / 1000.0
    out = {"pred_ml": n_p * voxel_ml, "ref_ml": n_r * voxel_ml}
    if n_p == 0 and n_r == 0:
        return out | {"dice": 1.0, "iou": 1.0, "voe": 0.0, "rvd": 0.0, "hd95": 0.0, "assd": 0.0, "msd": 0.0}
    dice = dice_from_counts(inter, n_p - inter, n_r - inter)
    iou = inter / (n_p + n_r - inter)
    out |= {"dice": dice, "iou": iou, "voe": 1 - iou, "rvd": (n_p - n_r) / n_r if n_r else math.inf}
    if n_p == 0 or n_r == 0:
        return out | {d: math.inf for d in DISTANCES}
    dist = surface_distances(pred, ref, spacing)
    return out | {"hd95": float(np.percentile(dist, 95)), "assd": float(dist.mean()), "msd": float(dist.max())}


def summarize(rows: list[dict], keys=METRICS) -> dict:
    """{metric: {mean, sd, median, n, n_inf}} over cases; mean/sd/median over finite values,
    n_inf counts the infinite ones so they are never dropped silently."""
    out = {}
    for k in keys:
        v = np.array([r[k] for r in rows], dtype=np.float64)
        finite = v[np.isfinite(v)]
        out[k] = {
            "mean": float(finite.mean()) if finite.size else math.nan,
            "sd": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
            "median": float(np.median(finite)) if finite.size else math.nan,
            "n": int(v.size),
            "n_inf": int(np.count_nonzero(~np.isfinite(v))),
        }
    return out
