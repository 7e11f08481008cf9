"""Geometry by round trip on asymmetric shapes; header and label checks."""

import nibabel as nib
import numpy as np
import pytest

from conftest import load_image, load_mask, write_nifti
from liverseg import geometry, nifti_io
from liverseg.files import atomic_path
from liverseg.nifti_io import InputError

ORIENTATIONS = ["LAS", "RAS", "LPS", "PIR", "SAL"]


def _asymmetric(shape=(7, 5, 3)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_same_anatomy_in_any_orientation_gives_the_same_stored_volume(tmp_path, orientation):
    ras = _asymmetric()
    ref_arr, ref_aff = geometry.from_canonical_ras(ras, (0.7, 0.8, 2.5), "RAS")
    arr, aff = geometry.from_canonical_ras(ras, (0.7, 0.8, 2.5), orientation)
    p_ref = write_nifti(tmp_path / "ref.nii.gz", ref_arr, ref_aff, np.int16)
    p = write_nifti(tmp_path / "x.nii.gz", arr, aff, np.int16)
    g_ref = geometry.stored_geometry(nifti_io.read_header(p_ref))
    g = geometry.stored_geometry(nifti_io.read_header(p))
    assert g.orientation == orientation
    stored = geometry.to_stored(load_image(p)[0], g, "image")
    assert np.array_equal(stored, geometry.to_stored(load_image(p_ref)[0], g_ref, "image"))
    assert g.stored_spacing == g_ref.stored_spacing
    assert np.allclose(g.stored_spacing, (2.5, 0.8, 0.7))  # (slice, row=A/P, col=R/L)
    # Stored layout: [Z=S, H=P, W=L]; RAS index (x, y, z) -> stored (z, Y-1-y, X-1-x).
    assert stored[2, 0, 0] == ras[6, 4, 2]
    back = geometry.from_stored(stored, g, "mask")
    assert back.shape == arr.shape and np.array_equal(back, arr)


def test_world_positions_agree_across_orientations():
    ras = _asymmetric()
    for o in ORIENTATIONS:
        arr, aff = geometry.from_canonical_ras(ras, (0.7, 0.8, 2.5), o, origin=(10, -20, 30))
        # the voxel holding value v sits at the same world point whatever the orientation
        idx = np.argwhere(arr == 17)[0]
        world = aff @ np.r_[idx, 1]
        ras_idx = np.argwhere(ras == 17)[0]
        assert np.allclose(world[:3], np.array([10, -20, 30]) + ras_idx * [0.7, 0.8, 2.5])


def test_resize_round_trip_and_spacing(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1000, (4, 40, 30)).astype(np.int16)  # already stored layout (SPL)
    arr = np.ascontiguousarray(vol.transpose(2, 1, 0)[::-1, ::-1, :])  # -> RAS [x, y, z]
    p = write_nifti(tmp_path / "a.nii.gz", arr, np.diag([0.5, 0.6, 2.0, 1]), np.int16)
    h = nifti_io.read_header(p)
    g = geometry.stored_geometry(h, size=16)
    assert g.stored_shape == (4, 16, 16) and g.native_hw == (40, 30) and g.resized
    assert np.allclose(g.stored_spacing, (2.0, 0.6 * 40 / 16, 0.5 * 30 / 16))
    small = geometry.to_stored(arr, g, "image")
    assert small.dtype == np.int16 and small.shape == (4, 16, 16)
    # area-like shrinking preserves the mean closely
    assert abs(small.astype(float).mean() - vol.astype(float).mean()) < 25
    # a liver-like blob survives the round trip source -> 16x16 stored -> source grid
    x, y = np.meshgrid(np.arange(30), np.arange(40), indexing="ij")
    blob = (x - 14) ** 2 / 81 + (y - 22) ** 2 / 144 < 1
    mask = np.repeat(blob[:, :, None], 4, axis=2).astype(np.uint8)  # RAS [x, y, z]
    small_mask = geometry.to_stored(mask, g, "mask")
    assert set(np.unique(small_mask)) == {0, 1}
    back = geometry.from_stored(small_mask, g, "mask")
    assert back.shape == arr.shape and back.dtype == mask.dtype
    dice = 2 * np.sum(back & mask) / (back.sum() + mask.sum())
    assert dice > 0.9, dice
    assert np.array_equal(back[..., 0], back[..., 3])  # slices stay slices: no mixing along z


def test_constant_image_survives_resize_exactly():
    vol = np.full((3, 37, 29), 123, np.int16)
    out = geometry.resize_hw(vol, (64, 16), "image")
    assert out.shape == (3, 64, 16) and np.all(out == 123)


def _hdr(tmp_path, arr, affine=None, name="x.nii.gz", dtype=np.int16):
    return nifti_io.read_header(write_nifti(tmp_path / name, arr, affine, dtype))


def test_header_rejects_2d_and_multichannel_but_squeezes_singleton(tmp_path):
    with pytest.raises(InputError, match=r"x\.nii\.gz: image is 2D"):
        _hdr(tmp_path, np.zeros((8, 8)))
    with pytest.raises(InputError, match="only 3D volumes"):
        _hdr(tmp_path, np.zeros((8, 8, 4, 3)))
    assert _hdr(tmp_path, np.zeros((8, 8, 4, 1))).shape == (8, 8, 4)


def test_header_rejects_bad_pixdim_and_absurd_size(tmp_path):
    p = write_nifti(tmp_path / "z.nii", np.zeros((4, 4, 4)), dtype=np.int16)
    img = nib.load(str(p))
    img.header["pixdim"][3] = 0.0
    nib.save(img, str(tmp_path / "pix.nii"))
    with pytest.raises(InputError, match=r"pix\.nii: voxel sizes"):
        nifti_io.read_header(tmp_path / "pix.nii")
    raw = bytearray((tmp_path / "z.nii").read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw)))
    hdr.set_data_shape((30000, 30000, 30000))
    raw[:348] = hdr.binaryblock
    (tmp_path / "huge.nii").write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"huge\.nii: header claims shape"):
        nifti_io.read_header(tmp_path / "huge.nii")


def test_pair_checks(tmp_path):
    a = _hdr(tmp_path, np.zeros((8, 8, 4)), name="a.nii.gz")
    with pytest.raises(InputError, match="mask shape"):
        geometry.check_pair(a, _hdr(tmp_path, np.zeros((8, 8, 5)), name="b.nii.gz"))
    shifted = np.diag([0.8, 0.8, 2.5, 1.0])
    shifted[0, 3] = 5.0
    with pytest.raises(InputError, match="affine differs"):
        geometry.check_pair(a, _hdr(tmp_path, np.zeros((8, 8, 4)), shifted, name="c.nii.gz"))
    with pytest.raises(InputError, match="voxel sizes"):
        geometry.check_pair(a, _hdr(tmp_path, np.zeros((8, 8, 4)), np.diag([0.9, 0.8, 2.5, 1]), name="d.nii.gz"))
    nudged = np.diag([0.8, 0.8, 2.5, 1.0])
    nudged[0, 3] = 1e-5  # header rounding passes
    geometry.check_pair(a, _hdr(tmp_path, np.zeros((8, 8, 4)), nudged, name="e.nii.gz"))


def test_mask_labels_judged_on_stored_values(tmp_path):
    base = np.zeros((6, 6, 3), np.uint8)
    base[2:4, 2:4, 1] = 1
    ok, _ = load_mask(write_nifti(tmp_path / "m01.nii.gz", base, dtype=np.uint8))
    assert np.array_equal(ok, base)
    m255, _ = load_mask(write_nifti(tmp_path / "m255.nii.gz", base * 255, dtype=np.uint8))
    assert np.array_equal(m255, base)
    # stored {0, 255} with scl_slope 1/255 reads back as 1.00000006 when scaled; stored values decide
    sl = write_nifti(tmp_path / "slope.nii.gz", base * 255, dtype=np.uint8, slope=1 / 255)
    assert np.asanyarray(nib.load(str(sl)).dataobj).max() != 1.0
    assert np.array_equal(load_mask(sl)[0], base)
    lits = base.copy()
    lits[3, 3, 1] = 2
    p = write_nifti(tmp_path / "lits.nii.gz", lits, dtype=np.uint8)
    with pytest.raises(InputError, match=r"lits\.nii\.gz: .*--merge-tumour"):
        load_mask(p)
    assert load_mask(p, merge_tumour=True)[0].sum() == base.sum()
    with pytest.raises(InputError, match=r"bad\.nii\.gz: mask labels \[0, 1, 3\]"):
        load_mask(write_nifti(tmp_path / "bad.nii.gz", np.where(lits == 2, 3, lits), dtype=np.uint8))


def test_image_nan_and_truncation_name_the_file(tmp_path):
    vol = np.zeros((6, 6, 3), np.float32)
    vol[1, 1, 1] = np.nan
    with pytest.raises(InputError, match=r"nan\.nii\.gz: 1 voxels are NaN"):
        load_image(write_nifti(tmp_path / "nan.nii.gz", vol, dtype=np.float32))
    good = write_nifti(tmp_path / "t.nii.gz", np.random.default_rng(0).integers(-999, 999, (32, 32, 8)), dtype=np.int16)
    (tmp_path / "trunc.nii.gz").write_bytes(good.read_bytes()[:-300])
    with pytest.raises(InputError, match=r"trunc\.nii\.gz: truncated or corrupt"):
        load_image(tmp_path / "trunc.nii.gz")
    raw = write_nifti(tmp_path / "t.nii", np.zeros((32, 32, 8)), dtype=np.int16).read_bytes()
    (tmp_path / "short.nii").write_bytes(raw[:-100])
    with pytest.raises(InputError, match=r"short\.nii: voxel data is shorter than the header"):
        load_image(tmp_path / "short.nii")


def test_hu_scaling_and_clipping(tmp_path):
    vol = np.array([[[-2000, 0, 1000, 5000]]], np.int16).reshape(1, 2, 2)
    p = write_nifti(tmp_path / "hu.nii.gz", vol, dtype=np.int16, slope=1.0)
    arr, _ = load_image(p)
    assert arr.dtype == np.int16 and arr.min() == -1024 and arr.max() == 3071


def test_save_like_restores_source_header(tmp_path):
    arr, aff = geometry.from_canonical_ras(_asymmetric(), (0.7, 0.8, 2.5), "LPS", origin=(5, 6, 7))
    p = write_nifti(tmp_path / "src.nii.gz", arr, aff, np.int16)
    g = geometry.stored_geometry(nifti_io.read_header(p))
    out = tmp_path / "out.nii.gz"
    nifti_io.save_like(out, (arr > 50).astype(np.uint8), g)
    img = nib.load(str(out))
    assert img.shape == arr.shape and np.allclose(img.affine, aff) and img.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert not list(tmp_path.glob(".partial-*"))


def test_atomic_path_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    folder = tmp_path / "export"
    (folder / "stale").mkdir(parents=True)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "saved_model").write_text("x")
    assert sorted(p.name for p in folder.iterdir()) == ["saved_model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "export"]
