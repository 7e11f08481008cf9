"""Synthetic phantoms: deterministic, realistic HU ranges, real geometry around real masks."""

import nibabel as nib
import numpy as np

from liverseg import geometry, nifti_io, synth


def test_deterministic_for_a_seed(tmp_path):
    a = synth.synthesize(tmp_path / "a", cases=2, size=32, slices=(8, 10), seed=3, progress=False)[0]
    b = synth.synthesize(tmp_path / "b", cases=2, size=32, slices=(8, 10), seed=3, progress=False)[0]
    c = synth.synthesize(tmp_path / "c", cases=2, size=32, slices=(8, 10), seed=4, progress=False)[0]
    names = sorted(p.name for p in a.iterdir())
    assert names == [
        "phantom_001_liver.nii.gz",
        "phantom_001_orig.nii.gz",
        "phantom_002_liver.nii.gz",
        "phantom_002_orig.nii.gz",
    ]
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert (a / names[1]).read_bytes() != (c / names[1]).read_bytes()


def test_a_real_segmentation_problem():
    """Air, fat, soft tissue and bone are present; the spleen mimics liver HU; the mask is binary."""
    rng = np.random.default_rng(0)
    ct, mask = synth.render(rng, (96, 96, 24), (3.5, 3.5, 8.0))
    assert ct.dtype == np.int16 and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert 0.01 < mask.mean() < 0.15
    assert (ct < -900).mean() > 0.1  # air around the body
    assert ((ct > -140) & (ct < -60)).mean() > 0.01  # subcutaneous fat ring
    assert (ct > 300).sum() > 50  # bone: spine and ribs
    liver_hu = np.median(ct[mask == 1])
    assert 40 < liver_hu < 130
    # a liver-like distractor on the patient's left (RAS: low x): the spleen
    left = np.zeros_like(mask, bool)
    left[: 96 // 2] = True
    assert (left & (mask == 0) & (np.abs(ct - liver_hu) < 25)).sum() > 0.1 * mask.sum()
    # the liver is on the patient's right (RAS: higher x)
    xs = np.nonzero(mask)[0]
    assert xs.mean() > 96 / 2


def test_seed_layout_and_orientations(tmp_path):
    folders = synth.synthesize(tmp_path, cases=8, size=24, slices=(6, 6), seed=1, layout="seed", progress=False)
    assert [f.name for f in folders] == ["test", "train"]
    assert len(list((tmp_path / "test").glob("*_orig.nii.gz"))) == 2
    orients = {nib.aff2axcodes(nib.load(str(p)).affine) for p in tmp_path.rglob("*_orig.nii.gz")}
    assert ("L", "A", "S") in orients
    for p in tmp_path.rglob("*_orig.nii.gz"):
        h = nifti_io.read_header(p)
        assert h.shape[:2] == (24, 24) and h.shape[2] == 6
        assert 0.55 * 512 / 24 - 0.01 <= h.spacing[0] <= 0.9 * 512 / 24 + 0.01


def test_real_mask_keeps_real_geometry(shared_masks, tmp_path):
    src = tmp_path / "masks"
    src.mkdir()
    real = shared_masks / "ircad_e18_liver.nii.gz"  # the smallest case: 512 x 512 x 74
    (src / real.name).write_bytes(real.read_bytes())
    synth.synthesize(tmp_path / "out", masks=src, seed=0, progress=False)
    ct = nib.load(str(tmp_path / "out" / "ircad_e18_orig.nii.gz"))
    liver = nib.load(str(tmp_path / "out" / "ircad_e18_liver.nii.gz"))
    ref = nib.load(str(real))
    assert ct.shape == liver.shape == ref.shape == (512, 512, 74)
    assert np.allclose(ct.affine, ref.affine) and nib.aff2axcodes(ct.affine) == ("L", "A", "S")
    assert np.array_equal(np.asanyarray(liver.dataobj), np.asanyarray(ref.dataobj))
    hu = np.asanyarray(ct.dataobj)
    assert 40 < np.median(hu[np.asanyarray(ref.dataobj) == 1]) < 130
    _borders_a_chest(*(geometry.to_ras(a, ct.affine)[0] for a in (hu, np.asanyarray(liver.dataobj))))


def _borders_a_chest(ct: np.ndarray, mask: np.ndarray) -> None:
    """RAS arrays of a phantom: at the liver's dome (its top quarter) lungs take much of the body
    beside and behind it (not only a stomach's air: under a fifth to under a third before the
    chest was drawn, half with it), and no voxel of the mask is lung."""
    z = np.nonzero(mask.any(axis=(0, 1)))[0]
    dome = slice(z.max() - max(1, (z.max() - z.min()) // 4), z.max() + 1)
    body = ct[:, :, dome] > -990
    lung = (ct[:, :, dome] < -600) & body
    assert lung.sum() > 0.4 * body.sum(), lung.sum() / body.sum()
    assert (mask.astype(bool) & (ct < -600)).sum() < 1e-3 * mask.sum()  # the diaphragm keeps them apart


def test_the_liver_dome_borders_the_chest():
    """Above and beside the liver's dome the lungs and the heart, as on real CT (the dome was
    missed where a model had seen only abdomen above the liver)."""
    for seed in (0, 1, 2):
        ct, mask = synth.render(np.random.default_rng(seed), (96, 96, 40), (4.0, 4.0, 6.0))
        _borders_a_chest(ct, mask)
