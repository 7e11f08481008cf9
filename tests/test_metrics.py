"""Metrics against hand-computed cases, an independent brute-force implementation, and the empty rules."""

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from liverseg import metrics


def _cube(shape=(20, 20, 20), lo=(4, 4, 4), side=10):
    m = np.zeros(shape, bool)
    m[lo[0] : lo[0] + side, lo[1] : lo[1] + side, lo[2] : lo[2] + side] = True
    return m


def _brute_force(pred, ref, spacing):
    """Surface distances by explicit pairwise distances between surface voxel centres."""
    cross = ndimage.generate_binary_structure(3, 1)
    sp = np.argwhere(pred & ~ndimage.binary_erosion(pred, cross)) * spacing
    sr = np.argwhere(ref & ~ndimage.binary_erosion(ref, cross)) * spacing
    d = cdist(sp, sr)
    return np.concatenate([d.min(axis=1), d.min(axis=0)])


def test_cube_against_a_shifted_cube():
    ref = _cube()
    pred = _cube(lo=(6, 4, 4))  # shifted by 2 voxels along axis 0
    m = metrics.case_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert m["dice"] == pytest.approx(0.8)  # overlap 8x10x10 of 1000 + 1000
    assert m["iou"] == pytest.approx(800 / 1200) and m["voe"] == pytest.approx(400 / 1200)
    assert m["rvd"] == 0.0 and m["pred_ml"] == m["ref_ml"] == pytest.approx(1.0)
    assert m["msd"] == pytest.approx(2.0)  # the far faces are 2 voxels apart
    d = _brute_force(pred, ref, np.ones(3))
    assert m["hd95"] == pytest.approx(np.percentile(d, 95)) and m["assd"] == pytest.approx(d.mean())


def test_parallel_plates_with_anisotropic_spacing():
    ref = np.zeros((8, 6, 6), bool)
    pred = np.zeros((8, 6, 6), bool)
    ref[1, 1:5, 1:5] = True
    pred[4, 1:5, 1:5] = True  # 3 slices apart
    m = metrics.case_metrics(pred, ref, (2.0, 0.5, 0.7))
    assert m["dice"] == 0.0
    assert m["hd95"] == m["assd"] == m["msd"] == pytest.approx(6.0)  # 3 slices x 2 mm, every point alike
    m = metrics.case_metrics(pred, ref, (1.0, 0.5, 0.7))
    assert m["msd"] == pytest.approx(3.0)


def test_shift_along_each_axis_is_scaled_by_that_axis_spacing():
    ref = _cube()
    spacing = (2.5, 0.7, 0.9)
    for axis in range(3):
        lo = [4, 4, 4]
        lo[axis] += 1
        m = metrics.case_metrics(_cube(lo=tuple(lo)), ref, spacing)
        assert m["msd"] == pytest.approx(spacing[axis])


def test_matches_brute_force_on_irregular_shapes_and_is_symmetric():
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.random((24, 30, 28)), 3) > 0.52
    b = ndimage.gaussian_filter(rng.random((24, 30, 28)), 3) > 0.52
    spacing = np.array([2.0, 0.8, 0.6])
    m = metrics.case_metrics(a, b, spacing)
    d = _brute_force(a, b, spacing)
    assert m["hd95"] == pytest.approx(np.percentile(d, 95)) and m["assd"] == pytest.approx(d.mean())
    assert m["msd"] == pytest.approx(d.max())
    r = metrics.case_metrics(b, a, spacing)
    assert (r["hd95"], r["assd"], r["msd"], r["dice"]) == pytest.approx((m["hd95"], m["assd"], m["msd"], m["dice"]))


def test_empty_mask_rules():
    empty, cube = np.zeros((10, 10, 10), bool), _cube((10, 10, 10), (2, 2, 2), 4)
    both = metrics.case_metrics(empty, empty, (1, 1, 1))
    assert (both["dice"], both["iou"], both["voe"], both["rvd"], both["hd95"], both["assd"], both["msd"]) == (
        1,
        1,
        0,
        0,
        0,
        0,
        0,
    )
    missed = metrics.case_metrics(empty, cube, (1, 1, 1))
    assert missed["dice"] == 0 and missed["rvd"] == -1 and all(math.isinf(missed[k]) for k in metrics.DISTANCES)
    spurious = metrics.case_metrics(cube, empty, (1, 1, 1))
    assert spurious["dice"] == 0 and math.isinf(spurious["rvd"]) and math.isinf(spurious["hd95"])


def test_summary_counts_infinite_values_instead_of_dropping_them():
    cube = _cube((10, 10, 10), (2, 2, 2), 4)
    rows = [metrics.case_metrics(cube, cube, (1, 1, 1)), metrics.case_metrics(np.zeros_like(cube), cube, (1, 1, 1))]
    s = metrics.summarize(rows)
    assert s["dice"] == {"mean": 0.5, "sd": pytest.approx(math.sqrt(0.5)), "median": 0.5, "n": 2, "n_inf": 0}
    assert s["hd95"]["n_inf"] == 1 and s["hd95"]["mean"] == 0.0 and s["hd95"]["n"] == 2


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        metrics.case_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), (1, 1, 1))
