"""Scans as users hold them: DICOM series (made here with pydicom, never shipped), the
3D-IRCADb-01 tree zipped and unzipped, the MSD and LiTS layouts, spacing normalisation,
prediction on a DICOM series, and every bad series named with nothing written."""

import json
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import SMOKE, write_nifti
from liverseg import InputError, LiversegError, config, dicom_io, evaluate, geometry, models, predict, synth, train
from liverseg.convert import ConvertOptions, convert
from liverseg.manifest import Manifest
from liverseg.volumes import Source

SPACING = (9.5, 9.5, 22.5)  # a 300 mm field of view at 32 pixels, as the test phantoms use


def _anatomy(seed=5, shape=(32, 32, 7)):
    """A phantom CT and its liver mask, RAS-ordered [x, y, z]."""
    ct, mask = synth.render(np.random.default_rng(seed), shape, SPACING)
    assert mask.sum() > 50  # a liver to find
    return ct, mask


def _write_pair(root: Path, case: str, ct, mask, orientation="LPS", *, dicom: bool, shuffle=True, seed=0):
    """One case as NIfTI files (`<case>_orig/_liver.nii.gz`) or as 3D-IRCADb-01's DICOM tree."""
    arr_ct, affine = geometry.from_canonical_ras(ct, SPACING, orientation, origin=(-150.0, -200.0, 40.0))
    arr_mask, _ = geometry.from_canonical_ras(mask, SPACING, orientation, origin=(-150.0, -200.0, 40.0))
    if not dicom:
        write_nifti(root / f"{case}_orig.nii.gz", arr_ct, affine, np.int16)
        write_nifti(root / f"{case}_liver.nii.gz", arr_mask, affine, np.uint8)
        return
    dicom_io.write_series(root / case / "PATIENT_DICOM", arr_ct, affine, "CT", seed, shuffle=shuffle, patient=case)
    dicom_io.write_series(
        root / case / "MASKS_DICOM" / "liver",
        arr_mask * np.uint8(255),
        affine,
        "OT",
        seed,
        shuffle=shuffle,
        patient=case,
    )


def _shards(root: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(root.glob("*.tfrecord"))]


# ------------------------------------------------------------------------- DICOM = NIfTI


@pytest.mark.parametrize("dicom_axes", ["LPS", "RAS", "LAI"])
def test_a_dicom_series_converts_to_the_records_of_the_same_nifti(tmp_path, dicom_axes):
    """LPS as scanners write it, or flipped in-plane and along the stack: file names and
    InstanceNumbers shuffled, so only positions can order the slices."""
    ct, mask = _anatomy()
    _write_pair(tmp_path / "nifti", "3Dircadb1.1", ct, mask, "LAS", dicom=False)
    _write_pair(tmp_path / "dicom", "3Dircadb1.1", ct, mask, dicom_axes, dicom=True)
    a = convert(tmp_path / "nifti", tmp_path / "a", ConvertOptions(), progress=False)
    b = convert(tmp_path / "dicom", tmp_path / "b", ConvertOptions(layout="ircad"), progress=False)
    assert _shards(tmp_path / "a") == _shards(tmp_path / "b") and len(_shards(tmp_path / "a")) == 1
    case = b.cases[0]
    assert case.image.series and case.image.path.endswith("3Dircadb1.1") and case.geometry.orientation != "LAS"
    assert case.geometry.stored_shape == a.cases[0].geometry.stored_shape
    names = sorted(p.name for p in (tmp_path / "dicom" / "3Dircadb1.1" / "PATIENT_DICOM").iterdir())
    assert names == sorted(f"image_{k}" for k in range(7))


def test_the_ircad_tree_zipped_and_unzipped_converts_with_the_preset_split(tmp_path):
    ct, mask = _anatomy()
    for n in (1, 11, 16):  # one patient per split of the customary 3D-IRCADb split
        _write_pair(tmp_path / "plain", f"3Dircadb1.{n}", ct, mask, dicom=True, seed=n)
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    for patient in sorted((tmp_path / "plain").iterdir()):  # IRCAD's own packaging: folders zipped inside a zip
        inner = {}
        for folder in ("PATIENT_DICOM", "MASKS_DICOM"):
            inner[folder] = tmp_path / f"{folder}.zip"
            with zipfile.ZipFile(inner[folder], "w") as z:
                for f in sorted((patient / folder).rglob("*")):
                    if f.is_file():
                        z.write(f, str(f.relative_to(patient)))
        with zipfile.ZipFile(zipped / f"{patient.name}.zip", "w") as z:
            for folder, path in inner.items():
                z.write(path, f"{patient.name}/{folder}.zip")
    m = convert(
        tmp_path / "plain", tmp_path / "a", ConvertOptions(layout="ircad", split_preset="ircad"), progress=False
    )
    z = convert(zipped, tmp_path / "b", ConvertOptions(layout="ircad", split_preset="ircad"), progress=False)
    assert {c.case_id: c.split for c in m.cases} == {
        "3Dircadb1.1": "train",
        "3Dircadb1.11": "val",
        "3Dircadb1.16": "test",
    }
    assert _shards(tmp_path / "a") == _shards(tmp_path / "b") and len(_shards(tmp_path / "a")) == 3
    assert [c.liver_voxels for c in z.cases] == [int(mask.sum())] * 3  # the 0/255 masks read as liver = 1
    assert z.cases[0].image.path.endswith("3Dircadb1.1.zip")


def test_msd_and_lits_layouts_merge_tumour_into_liver(tmp_path):
    ct, mask = _anatomy()
    labels = mask.astype(np.uint8)
    inside = np.argwhere(mask > 0)[::7]
    labels[tuple(inside.T)] = 2  # tumour voxels inside the liver
    assert set(np.unique(labels)) == {0, 1, 2}
    aff = np.diag([*SPACING, 1.0])
    msd, lits = tmp_path / "Task03_Liver", tmp_path / "LiTS"
    for i in range(3):
        write_nifti(msd / "imagesTr" / f"liver_{i}.nii.gz", ct, aff, np.int16)
        write_nifti(msd / "labelsTr" / f"liver_{i}.nii.gz", labels, aff, np.uint8)
        write_nifti(lits / f"Training Batch {1 + i // 2}" / f"volume-{i}.nii", ct, aff, np.int16)
        write_nifti(lits / f"Training Batch {1 + i // 2}" / f"segmentation-{i}.nii", labels, aff, np.uint8)
    (msd / "imagesTr" / "._liver_0.nii.gz").write_bytes(
        b"\x00\x05\x16\x07 macOS resource fork"
    )  # the MSD tarball has these
    (msd / "dataset.json").write_text(
        json.dumps({"name": "Liver", "labels": {"0": "background", "1": "liver", "2": "cancer"}})
    )
    for src, layout, ids in (
        (msd, "msd", ["liver_0", "liver_1", "liver_2"]),
        (lits, "lits", ["lits_000", "lits_001", "lits_002"]),
    ):
        m = convert(src, tmp_path / f"{layout}-rec", ConvertOptions(layout=layout, val=0.34), progress=False)
        assert sorted(c.case_id for c in m.cases) == ids
        assert m.options.merge_tumour and [c.liver_voxels for c in m.cases] == [int((labels > 0).sum())] * 3
    with pytest.raises(LiversegError, match=r"look like LiTS .*--merge-tumour"):  # the pattern layout still asks
        write_nifti(tmp_path / "plain" / "c_orig.nii.gz", ct, aff, np.int16)
        write_nifti(tmp_path / "plain" / "c_liver.nii.gz", labels, aff, np.uint8)
        convert(tmp_path / "plain", tmp_path / "plain-rec", ConvertOptions(), progress=False)


# ------------------------------------------------------------------------- prediction on DICOM


def test_predict_on_a_dicom_series_writes_a_nifti_at_the_dicom_positions(trained_run, tmp_path):
    ct, mask = _anatomy(shape=(32, 32, 6))
    _write_pair(tmp_path / "scan", "3Dircadb1.4", ct, mask, "LPS", dicom=True)
    series = tmp_path / "scan" / "3Dircadb1.4" / "PATIENT_DICOM"
    written, failures = predict.predict(models.load_run(trained_run), [series], tmp_path / "out", probabilities=True)
    # 3D-IRCADb names every CT PATIENT_DICOM: the output is named by the patient
    assert not failures and [p.name for p in written] == ["3Dircadb1.4_liver.nii.gz", "3Dircadb1.4_liver_prob.nii.gz"]
    out = nib.load(str(written[0]))
    assert out.shape == (32, 32, 6) and out.get_data_dtype() == np.uint8  # columns, rows, slices
    for f in sorted(series.iterdir())[:3]:
        ds = pydicom.dcmread(f)
        ipp, iop, (dr, dc) = (
            np.array(ds.ImagePositionPatient, float),
            np.array(ds.ImageOrientationPatient, float),
            [float(v) for v in ds.PixelSpacing],
        )
        ijk = np.linalg.inv(out.affine) @ [-ipp[0], -ipp[1], ipp[2], 1.0]  # where this file's first pixel is
        k = int(round(ijk[2]))
        np.testing.assert_allclose(ijk[:3], [0, 0, k], atol=1e-4)
        for i, j in ((0, 0), (5, 0), (0, 7), (31, 31)):  # column i, row j of this file, in LPS, then RAS
            lps = ipp + i * dc * iop[:3] + j * dr * iop[3:]
            np.testing.assert_allclose(out.affine @ [i, j, k, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-4)
    prob = np.asanyarray(nib.load(str(written[1])).dataobj)
    assert prob.shape == out.shape and prob.std() > 0


# ------------------------------------------------------------------------- spacing normalisation


@pytest.mark.parametrize("spacing, resampled", [(13.0, (25, 26)), (5.5, (58, 61))])  # padded, cropped
def test_spacing_round_trip_returns_the_source_mask_within_a_voxel(tmp_path, spacing, resampled):
    ct, mask = synth.render(np.random.default_rng(2), (48, 40, 5), (7.0, 8.0, 25.0))
    assert mask.sum() > 50
    arr_ct, affine = geometry.from_canonical_ras(ct, (7.0, 8.0, 25.0), "LAS")
    arr_mask, _ = geometry.from_canonical_ras(mask, (7.0, 8.0, 25.0), "LAS")
    header = geometry.Header(tmp_path, arr_ct.shape, affine, (7.0, 8.0, 25.0), np.dtype(np.int16))
    stored, geom = geometry.to_stored_image(arr_ct, header, size=32, spacing=spacing)
    assert stored.shape == (5, 32, 32) and geom.resampled_hw == resampled and geom.stored_spacing[0] == 25.0
    assert np.allclose(geom.stored_spacing[1:], (8.0 * 40 / resampled[0], 7.0 * 48 / resampled[1]))
    if resampled[0] < 32:
        assert (stored == geometry.AIR_HU).any()  # padded to 32x32 with air
    else:  # cropped around the body: the liver is inside the window
        top, left = geom.window
        assert 0 < top and 0 < left and top + 32 < resampled[0] and left + 32 < resampled[1]
    stored_mask = geometry.to_stored(arr_mask, geom, "mask")
    back = geometry.from_stored(stored_mask.astype(np.float32), geom, "prob") >= 0.5
    wrong = back != (arr_mask > 0)
    assert back.shape == arr_mask.shape and wrong.mean() < 0.05
    from scipy import ndimage

    boundary = ndimage.binary_dilation(arr_mask > 0) & ~ndimage.binary_erosion(arr_mask > 0)
    near = ndimage.binary_dilation(boundary, np.ones((3, 3, 1), bool))  # within one voxel in-plane
    assert not (wrong & ~near).any()
    # the window follows the body, and the manifest keeps what undoes it
    assert geometry.Geometry.from_json(json.loads(json.dumps(geom.to_json()))) == geom


@pytest.mark.slow
def test_spacing_normalised_records_train_predict_and_score_on_the_source_grid(tmp_path):
    synth.synthesize(tmp_path / "src", cases=3, size=40, slices=(6, 6), seed=4, progress=False)
    m = convert(tmp_path / "src", tmp_path / "rec", ConvertOptions(size=32, spacing=9.0, val=0.34), progress=False)
    assert m.split("train").slice_shape == (32, 32) and all(c.geometry.window is not None for c in m.cases)
    assert all(abs(c.geometry.stored_spacing[1] - 9.0) < 0.5 for c in m.cases)
    run = tmp_path / "run"
    train.train(
        config.load(
            SMOKE,
            [f"data.records={tmp_path / 'rec'}", "train.steps=2", "train.eval_every=100"],
        ),
        run,
        progress=False,
    )
    r = models.load_run(run)
    assert (r.spec.size, r.spec.spacing) == (32, 9.0)
    val = m.cases_in("val")[0]
    mask, prob, geom = predict.predict_source(r, Source.nifti(val.image.path))
    assert mask.shape == prob.shape == nib.load(val.image.path).shape and geom.window is not None
    rows, _, _ = evaluate.evaluate(r, split="val", out=tmp_path / "eval", pngs=False)
    ref = nib.load(val.mask.path)
    expected = predict.postprocess(
        prob, r.cfg.eval.threshold, r.cfg.eval.largest_component, r.cfg.eval.min_component_fraction
    )
    from liverseg import metrics

    assert rows[0]["dice"] == pytest.approx(
        metrics.case_metrics(expected, np.asanyarray(ref.dataobj), geom.spacing)["dice"]
    )


def test_spacing_needs_size(tmp_path, phantoms):
    with pytest.raises(LiversegError, match=r"--spacing 1.0: needs --size"):
        convert(phantoms, tmp_path / "out", ConvertOptions(spacing=1.0), progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- bad series


def _series_files(root: Path, case="3Dircadb1.1", which="PATIENT_DICOM") -> list[Path]:
    files = [(pydicom.dcmread(p), p) for p in (root / case / which).iterdir()]
    return [p for ds, p in sorted(files, key=lambda x: float(x[0].ImagePositionPatient[2]))]


def _rewrite(path: Path, **tags):
    ds = pydicom.dcmread(path)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path)


def _defect_missing(files):
    files[3].unlink()


def _defect_duplicate(files):
    ds = pydicom.dcmread(files[2])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(files[2].with_name("image_dup"))


def _defect_uneven(files):
    ipp = [float(v) for v in pydicom.dcmread(files[4]).ImagePositionPatient]
    _rewrite(files[4], ImagePositionPatient=[ipp[0], ipp[1], ipp[2] + 1.5])


DEFECTS = {
    "missing slice": (_defect_missing, r"uneven slice spacing: 45\.000 mm between .*about 1 slice\(s\) missing"),
    "duplicate position": (_defect_duplicate, r"duplicate slice position"),
    "uneven spacing": (_defect_uneven, r"uneven slice spacing"),
    "mixed orientation": (
        lambda f: _rewrite(f[1], ImageOrientationPatient=[1, 0, 0, 0, 0.8, 0.6]),
        r"mixed orientations",
    ),
    "mixed size": (
        lambda f: _rewrite(f[1], Rows=16, PixelData=b"\0" * 16 * 32 * 2),
        r"mixed slice sizes \(image_\d+ is 16x32",
    ),
    "multi-frame": (lambda f: _rewrite(f[0], NumberOfFrames=2), r"multi-frame DICOM \(2 frames"),
    "not CT": (lambda f: [_rewrite(p, Modality="MR") for p in f], r"PATIENT_DICOM: a MR series, not CT"),
    "mask off the image's positions": (lambda f: None, r"liver: affine differs from image"),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_a_bad_series_is_named_and_nothing_is_written(tmp_path, defect):
    ct, mask = _anatomy()
    _write_pair(tmp_path / "src", "3Dircadb1.1", ct, mask, dicom=True)
    apply, match = DEFECTS[defect]
    if defect.startswith("mask"):  # a mask series one slice further up than its CT
        arr, affine = geometry.from_canonical_ras(mask, SPACING, "LPS", origin=(-150.0, -200.0, 62.5))
        shutil.rmtree(tmp_path / "src" / "3Dircadb1.1" / "MASKS_DICOM")
        dicom_io.write_series(
            tmp_path / "src" / "3Dircadb1.1" / "MASKS_DICOM" / "liver", arr * np.uint8(255), affine, "OT"
        )
    else:
        apply(_series_files(tmp_path / "src"))
    with pytest.raises(InputError, match=match):
        convert(tmp_path / "src", tmp_path / "out", ConvertOptions(layout="ircad"), progress=False)
    assert not (tmp_path / "out").exists()


def test_skip_bad_lists_the_bad_series_and_converts_the_rest(tmp_path):
    ct, mask = _anatomy()
    for n in (1, 2):
        _write_pair(tmp_path / "src", f"3Dircadb1.{n}", ct, mask, dicom=True, seed=n)
    _defect_missing(_series_files(tmp_path / "src", "3Dircadb1.2"))
    m = convert(tmp_path / "src", tmp_path / "out", ConvertOptions(layout="ircad", skip_bad=True), progress=False)
    assert [c.case_id for c in m.cases] == ["3Dircadb1.1"]
    assert [s.case_id for s in m.skipped] == ["3Dircadb1.2"] and "slice(s) missing" in m.skipped[0].error
    assert Manifest.load(tmp_path / "out").skipped == m.skipped


def test_a_zip_that_is_not_a_zip_is_named(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "3Dircadb1.3.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(InputError, match=r"3Dircadb1\.3\.zip: not a zip archive"):
        convert(tmp_path / "src", tmp_path / "out", ConvertOptions(layout="ircad"), progress=False)
    assert not (tmp_path / "out").exists()


def test_series_in_one_folder_are_told_apart_by_their_uid(trained_run, tmp_path):
    ct, mask = _anatomy()
    for n in (1, 2):
        _write_pair(tmp_path / "src", f"3Dircadb1.{n}", ct, mask, dicom=True, seed=n, shuffle=False)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for n in (1, 2):  # two series' files side by side, with clashing names made unique
        for f in (tmp_path / "src" / f"3Dircadb1.{n}" / "PATIENT_DICOM").iterdir():
            shutil.copy(f, mixed / f"s{n}_{f.name}")
    found = dicom_io.find_series(mixed)
    assert len(found) == 2 and [sorted(Path(m).name[:2] for m in s.members) for s in found] in (
        [["s1"] * 7, ["s2"] * 7],
        [["s2"] * 7, ["s1"] * 7],
    )
    written, failures = predict.predict(models.load_run(trained_run), [mixed], tmp_path / "out")
    assert not failures and len(written) == 2 and len({p.name for p in written}) == 2
    # in the ircad layout, PATIENT_DICOM must hold one series
    shutil.rmtree(tmp_path / "src" / "3Dircadb1.2")
    shutil.rmtree(tmp_path / "src" / "3Dircadb1.1" / "PATIENT_DICOM")
    shutil.copytree(mixed, tmp_path / "src" / "3Dircadb1.1" / "PATIENT_DICOM")
    with pytest.raises(InputError, match=r"3Dircadb1\.1: 2 series in PATIENT_DICOM; expected one"):
        convert(tmp_path / "src", tmp_path / "out-rec", ConvertOptions(layout="ircad"), progress=False)


def _zip_as_ircad(folder: Path) -> None:
    """Replace `folder` by `folder.zip` holding it as IRCAD ships it: the folder itself at the
    top, directory entries included (PATIENT_DICOM/, PATIENT_DICOM/image_0, ...)."""
    with zipfile.ZipFile(folder.with_name(folder.name + ".zip"), "w", zipfile.ZIP_DEFLATED) as z:
        z.write(folder, folder.name)
        for f in sorted(folder.rglob("*")):
            z.write(f, str(f.relative_to(folder.parent)))
    shutil.rmtree(folder)


def test_ircads_distributed_form_converts_predicts_and_evaluates_like_its_folders(trained_run, tmp_path):
    """3Dircadb1.N/PATIENT_DICOM.zip + MASKS_DICOM.zip (with other organs' masks beside the liver's)."""
    ct, mask = _anatomy()
    for n in (1, 2):
        _write_pair(tmp_path / "plain", f"3Dircadb1.{n}", ct, mask, dicom=True, seed=n)
        arr, affine = geometry.from_canonical_ras(
            np.roll(mask, 3, axis=0), SPACING, "LPS", origin=(-150.0, -200.0, 40.0)
        )
        dicom_io.write_series(
            tmp_path / "plain" / f"3Dircadb1.{n}" / "MASKS_DICOM" / "bone",
            arr * np.uint8(255),
            affine,
            "OT",
            n + 50,
            patient=f"3Dircadb1.{n}",
        )
    shutil.copytree(tmp_path / "plain", tmp_path / "shipped")
    for patient in sorted((tmp_path / "shipped").iterdir()):
        for folder in ("PATIENT_DICOM", "MASKS_DICOM"):
            _zip_as_ircad(patient / folder)
    assert sorted(p.name for p in (tmp_path / "shipped" / "3Dircadb1.1").iterdir()) == [
        "MASKS_DICOM.zip",
        "PATIENT_DICOM.zip",
    ]
    opts = ConvertOptions(layout="ircad")
    a = convert(tmp_path / "plain", tmp_path / "a", opts, progress=False)
    b = convert(tmp_path / "shipped", tmp_path / "b", opts, progress=False)
    assert _shards(tmp_path / "a") == _shards(tmp_path / "b")
    assert [c.liver_voxels for c in b.cases] == [c.liver_voxels for c in a.cases] == [int(mask.sum())] * 2
    run = models.load_run(trained_run)
    patients = sorted((tmp_path / "shipped").iterdir())
    written, failures = predict.predict(run, patients, tmp_path / "out")  # the CT series only, named by patient
    assert not failures and sorted(p.name for p in written) == ["3Dircadb1.1_liver.nii.gz", "3Dircadb1.2_liver.nii.gz"]
    rows, _, _ = evaluate.evaluate(run, data=tmp_path / "shipped", layout="ircad", out=tmp_path / "eval", pngs=False)
    plain_rows, _, _ = evaluate.evaluate(
        run, data=tmp_path / "plain", layout="ircad", out=tmp_path / "eval2", pngs=False
    )
    assert rows == plain_rows and [r["case"] for r in rows] == ["3Dircadb1.1", "3Dircadb1.2"]


def test_predict_names_outputs_so_they_cannot_collide_and_refuses_a_scan_given_twice(trained_run, tmp_path):
    ct, mask = _anatomy()
    for folder in ("a", "b"):  # the same file name in two folders
        _write_pair(tmp_path / folder, "x", ct, mask, dicom=False)
    run = models.load_run(trained_run)
    written, failures = predict.predict(
        run,
        [tmp_path / "a" / "x_orig.nii.gz", tmp_path / "b" / "x_orig.nii.gz", tmp_path / "a" / "x_orig.nii.gz"],
        tmp_path / "out",
    )
    assert sorted(p.name for p in written) == ["a_x_liver.nii.gz", "b_x_liver.nii.gz"]
    assert failures == [
        f"{tmp_path / 'a' / 'x_orig.nii.gz'}: given twice (also as {tmp_path / 'a' / 'x_orig.nii.gz'}); predict it once"
    ]


@pytest.mark.parametrize(
    "defect, match",
    [
        ("truncated", r"PATIENT_DICOM/image_3: a CT Image Storage file without SeriesInstanceUID or Rows: .*truncated"),
        ("slope 0", r"image_\d+: RescaleSlope .*0.* cannot map stored values to HU"),
    ],
)
def test_a_damaged_slice_is_named_not_blamed_on_the_spacing(tmp_path, defect, match):
    ct, mask = _anatomy()
    _write_pair(tmp_path / "src", "3Dircadb1.1", ct, mask, dicom=True, shuffle=False)
    files = _series_files(tmp_path / "src")
    if defect == "truncated":
        target = tmp_path / "src" / "3Dircadb1.1" / "PATIENT_DICOM" / "image_3"
        target.write_bytes(target.read_bytes()[:300])  # cut inside the header
    else:
        _rewrite(files[2], RescaleSlope=0)
    with pytest.raises(InputError, match=match) as e:
        convert(tmp_path / "src", tmp_path / "out", ConvertOptions(layout="ircad"), progress=False)
    assert "PATIENT_DICOM/PATIENT_DICOM" not in str(e.value) and not (tmp_path / "out").exists()


def test_a_zip_member_too_large_to_inflate_is_refused_before_reading(tmp_path):
    (tmp_path / "src" / "3Dircadb1.1").mkdir(parents=True)
    with zipfile.ZipFile(tmp_path / "src" / "3Dircadb1.1" / "PATIENT_DICOM.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("PATIENT_DICOM/image_0", b"\0" * (dicom_io.MAX_FILE_BYTES + 1))  # ~260 KB compressed
    with pytest.raises(InputError, match=r"PATIENT_DICOM\.zip!/PATIENT_DICOM/image_0: 256 MB uncompressed .* unzip it"):
        convert(tmp_path / "src", tmp_path / "out", ConvertOptions(layout="ircad"), progress=False)
    assert not (tmp_path / "out").exists()
