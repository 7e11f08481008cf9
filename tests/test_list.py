"""`convert --layout list`: a case list of images and masks in the formats users hold (NIfTI,
NRRD, DICOM series, DICOM SEG), matched in world coordinates; every bad row named, nothing
written."""

import numpy as np
import pytest

from conftest import write_nifti
from liverseg import InputError, LiversegError, dicom_io, geometry, records, synth
from liverseg.convert import ConvertOptions, convert
from liverseg.manifest import Manifest

SPACING = (9.5, 9.5, 22.5)
ORIGIN = (-150.0, -200.0, 40.0)


@pytest.fixture
def anatomy():
    ct, mask = synth.render(np.random.default_rng(5), (32, 32, 7), SPACING)
    return ct, mask


def _case(root, name, ct, mask, orientation="LPS", mask_orientation=None, origin=ORIGIN):
    arr_ct, affine = geometry.from_canonical_ras(ct, SPACING, orientation, origin)
    arr_mask, mask_affine = geometry.from_canonical_ras(mask, SPACING, mask_orientation or orientation, origin)
    return arr_ct, affine, arr_mask, mask_affine


def _write_list(path, rows, header="case,image,mask,split,source,mask_label"):
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def _convert_list(root, rows):
    """Convert a case list of `rows` written as root/cases.csv into root/out."""
    return convert(_write_list(root / "cases.csv", rows), root / "out", ConvertOptions(layout="list"), progress=False)


def _records(out, case):
    m = Manifest.load(out)
    return records.read_case(m.records_of(case))


def test_each_format_pair_converts_to_the_records_of_the_plain_nifti_pair(tmp_path, anatomy):
    """A DICOM series with a NIfTI mask flipped and reordered, a NIfTI image with an NRRD mask,
    a DICOM series with a DICOM SEG: all the same records as a NIfTI pair of one grid."""
    import nrrd

    ct, mask = anatomy
    arr_ct, affine, _, _ = _case(tmp_path, "a", ct, mask)
    write_nifti(tmp_path / "ref_orig.nii.gz", arr_ct, affine, np.int16)
    arr_mask, _ = geometry.from_canonical_ras(mask, SPACING, "LPS", ORIGIN)
    write_nifti(tmp_path / "ref_liver.nii.gz", arr_mask, affine, np.uint8)
    dicom_io.write_series(tmp_path / "series", arr_ct, affine, "CT", 1, shuffle=True)
    las, las_affine = geometry.from_canonical_ras(mask, SPACING, "LAS", ORIGIN)  # another axis order, one axis flipped
    write_nifti(tmp_path / "mask_las.nii.gz", las, las_affine, np.uint8)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # NRRD in LPS, DICOM's space
    nrrd.write(
        str(tmp_path / "mask.nrrd"),
        arr_mask.astype(np.uint8),
        {
            "space": "left-posterior-superior",
            "space directions": lps[:3, :3].T,
            "space origin": lps[:3, 3],
            "kinds": ["domain"] * 3,
        },
        index_order="F",
    )
    series = dicom_io.find_series(tmp_path / "series")[0]
    voxels = dicom_io.read_series(series, ct=False)[0] * 0 + geometry.onto_grid(
        arr_mask,
        geometry.Header(tmp_path, arr_mask.shape, affine, SPACING, np.dtype(np.uint8)),
        dicom_io.read_header(series),
    )
    from liverseg import dicom_seg

    dicom_seg.write(tmp_path / "liver_seg.dcm", voxels.astype(np.uint8), series, "test", "0" * 16)
    rows = [
        ("ref", "ref_orig.nii.gz", "ref_liver.nii.gz", "train", "real", ""),
        ("dicom_nifti", "series", "mask_las.nii.gz", "train", "real", ""),
        ("nifti_nrrd", "ref_orig.nii.gz", "mask.nrrd", "train", "phantom", ""),
        ("dicom_seg", "series", "liver_seg.dcm", "train", "phantom", ""),
    ]
    m = convert(
        _write_list(tmp_path / "cases.csv", rows), tmp_path / "out", ConvertOptions(layout="list"), progress=False
    )
    ref = _records(tmp_path / "out", "ref")
    assert ref[1].sum() == mask.sum() > 0
    for case in ("dicom_nifti", "nifti_nrrd", "dicom_seg"):
        got = _records(tmp_path / "out", case)
        np.testing.assert_array_equal(got[1], ref[1], err_msg=case)
        np.testing.assert_array_equal(got[0], ref[0], err_msg=case)
    assert {c.case_id: c.source for c in m.cases} == {
        "ref": "real",
        "dicom_nifti": "real",
        "nifti_nrrd": "phantom",
        "dicom_seg": "phantom",
    }
    assert m.case("dicom_seg").mask.kind == "seg" and m.case("nifti_nrrd").mask.kind == "nrrd"


@pytest.fixture
def pair(tmp_path, anatomy):
    ct, mask = anatomy
    arr_ct, affine, arr_mask, _ = _case(tmp_path, "a", ct, mask)
    write_nifti(tmp_path / "a_orig.nii.gz", arr_ct, affine, np.int16)
    write_nifti(tmp_path / "a_liver.nii.gz", arr_mask, affine, np.uint8)
    return tmp_path, arr_ct, arr_mask, affine


@pytest.mark.parametrize(
    "rows, message",
    [
        ([("a", "a_orig.nii.gz", "nope.nii.gz", "", "", "")], r"cases\.csv row 2: mask nope\.nii\.gz does not exist"),
        (
            [
                ("a", "a_orig.nii.gz", "a_liver.nii.gz", "", "", ""),
                ("a", "a_orig.nii.gz", "a_liver.nii.gz", "", "", ""),
            ],
            r"cases\.csv row 3: case 'a' is named twice \(also at .*cases\.csv row 2\)",
        ),
        (
            [("a", "a_orig.nii.gz", "a_liver.nii.gz", "training", "", "")],
            r"row 2: split 'training' is not one of train",
        ),
        ([("a", "a_orig.nii.gz", "a_liver.nii.gz", "", "real ct", "")], r"row 2: source 'real ct': use letters"),
        ([("a/b", "a_orig.nii.gz", "a_liver.nii.gz", "", "", "")], r"row 2: case id 'a/b': use letters"),
    ],
)
def test_a_bad_row_is_named_and_nothing_is_written(pair, rows, message):
    root = pair[0]
    with pytest.raises(LiversegError, match=message):
        convert(_write_list(root / "cases.csv", rows), root / "out", ConvertOptions(layout="list"), progress=False)
    assert not (root / "out").exists()


def test_a_list_missing_a_column_is_refused(pair):
    root = pair[0]
    (root / "cases.csv").write_text("case,image,label\na,a_orig.nii.gz,a_liver.nii.gz\n")
    with pytest.raises(
        LiversegError,
        match=r"cases\.csv: the header row must name case,image,mask .*missing mask; "
        r"unknown label",
    ):
        convert(root / "cases.csv", root / "out", ConvertOptions(layout="list"), progress=False)


def test_a_label_one_slice_off_the_image_grid_is_refused_naming_both_and_the_offset(pair):
    root, _, arr_mask, affine = pair
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, 2]  # one slice further along the stack
    write_nifti(root / "shifted.nii.gz", arr_mask, shifted, np.uint8)
    with pytest.raises(
        InputError,
        match=r"shifted\.nii\.gz: affine differs from image .*a_orig\.nii\.gz by 22\.5 mm "
        r"\(its first voxel is 22\.5 mm from the image's",
    ):
        _convert_list(root, [("a", "a_orig.nii.gz", "shifted.nii.gz", "", "", "")])
    assert not (root / "out").exists()


def test_a_seg_over_another_series_and_a_seg_without_liver_are_refused(tmp_path, anatomy):
    from liverseg import dicom_seg

    ct, mask = anatomy
    arr_ct, affine, arr_mask, _ = _case(tmp_path, "a", ct, mask)
    for name, seed in (("drawn_on", 1), ("other", 2)):  # two series of one grid: same positions, other UIDs
        dicom_io.write_series(tmp_path / name, arr_ct, affine, "CT", seed, patient=name)
    series = dicom_io.find_series(tmp_path / "drawn_on")[0]
    on_grid = geometry.onto_grid(
        arr_mask,
        geometry.Header(tmp_path, arr_mask.shape, affine, SPACING, np.dtype(np.uint8)),
        dicom_io.read_header(series),
    )
    dicom_seg.write(tmp_path / "seg.dcm", on_grid, series, "test", "0" * 16)
    with pytest.raises(
        InputError,
        match=r"seg\.dcm: this SEG segments series \S+, but the image .*other is series \S+; "
        r"pair it with the series it was drawn on",
    ):
        _convert_list(tmp_path, [("a", "other", "seg.dcm", "", "", "")])
    with pytest.raises(InputError, match=r"seg\.dcm: no segment labelled 'spleen' \(segments: 1 'Liver'\)"):
        _convert_list(tmp_path, [("a", "drawn_on", "seg.dcm", "", "", "spleen")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "header, message",
    [
        ({"space directions": np.eye(3)}, r"NRRD without a known 'space' \(none\): it cannot be placed in the world"),
        (
            {"space": "left-posterior-superior", "space directions": [[1, 0.5, 0], [0, 1, 0], [0, 0, 1]]},
            r"NRRD space directions .* are not orthogonal",
        ),
    ],
)
def test_a_nrrd_without_a_space_or_with_a_sheared_grid_is_refused(pair, header, message):
    import nrrd

    root, _, arr_mask, _ = pair
    nrrd.write(str(root / "m.nrrd"), arr_mask.astype(np.uint8), {"space origin": [0, 0, 0], **header}, index_order="F")
    with pytest.raises(InputError, match=message):
        _convert_list(root, [("a", "a_orig.nii.gz", "m.nrrd", "", "", "")])
    assert not (root / "out").exists()


def test_a_multilabel_mask_needs_its_liver_label(pair):
    root, _, arr_mask, affine = pair
    write_nifti(root / "labels.nii.gz", arr_mask * 5 + (arr_mask == 0) * 2, affine, np.uint8)  # liver 5, other 2
    with pytest.raises(InputError, match=r"labels\.nii\.gz: mask labels \[2, 5\] are not a liver mask"):
        _convert_list(root, [("a", "a_orig.nii.gz", "labels.nii.gz", "", "", "")])
    with pytest.raises(InputError, match=r"labels\.nii\.gz: no voxel has label 7 \(labels present: \[2, 5\]\)"):
        _convert_list(root, [("a", "a_orig.nii.gz", "labels.nii.gz", "", "", "7")])
    _convert_list(root, [("a", "a_orig.nii.gz", "labels.nii.gz", "", "", "5")])
    assert _records(root / "out", "a")[1].sum() == arr_mask.sum()


def test_the_decathlons_json_list_converts_too(pair):
    import json

    root = pair[0]
    (root / "dataset.json").write_text(
        json.dumps({"training": [{"image": "./a_orig.nii.gz", "label": "./a_liver.nii.gz"}]})
    )
    m = convert(root / "dataset.json", root / "out", ConvertOptions(layout="list"), progress=False)
    assert [c.case_id for c in m.cases] == ["a_orig"] and m.cases[0].liver_voxels == pair[2].sum()


def test_mask_segment_chooses_a_segs_segment_where_the_row_names_none(tmp_path, anatomy):
    from liverseg import dicom_seg

    ct, mask = anatomy
    arr_ct, affine, arr_mask, _ = _case(tmp_path, "a", ct, mask)
    dicom_io.write_series(tmp_path / "ct", arr_ct, affine, "CT", 1)
    series = dicom_io.find_series(tmp_path / "ct")[0]
    on_grid = geometry.onto_grid(
        arr_mask,
        geometry.Header(tmp_path, arr_mask.shape, affine, SPACING, np.dtype(np.uint8)),
        dicom_io.read_header(series),
    )
    dicom_seg.write(tmp_path / "seg.dcm", on_grid, series, "test", "0" * 16)
    listed = _write_list(tmp_path / "cases.csv", [("a", "ct", "seg.dcm", "", "", "")])
    with pytest.raises(InputError, match=r"seg\.dcm: no segment labelled 'spleen' .*convert --mask-segment NAME"):
        convert(listed, tmp_path / "out", ConvertOptions(layout="list", mask_segment="spleen"), progress=False)
    assert not (tmp_path / "out").exists()
    m = convert(listed, tmp_path / "out", ConvertOptions(layout="list", mask_segment="LIVER"), progress=False)
    assert m.cases[0].liver_voxels == mask.sum()


def test_lits_copies_of_ircad_patients_are_named_and_can_be_dropped(pair, caplog):
    """LiTS 28-48 (sources number IRCAD's 20 as 28-47 or 28-44 and 46-48; the Decathlon's
    liver_N of those numbers too) are 3D-IRCADb-01 patients: mixed with IRCAD cases they are
    named; --exclude-ircad-overlap drops them; 27 and 49 are not."""
    from liverseg import layouts

    root = pair[0]
    rows = [
        (c, "a_orig.nii.gz", "a_liver.nii.gz", "", "", "")
        for c in ("ircad_e05", "lits_030", "lits_045", "liver_46", "lits_027", "lits_049")
    ]
    listed = _write_list(root / "cases.csv", rows)
    m = convert(listed, root / "out", ConvertOptions(layout="list"), progress=False)
    assert len(m.cases) == 6
    assert "lits_030, lits_045, liver_46 (LiTS/Decathlon) are 3D-IRCADb-01 scans, as are ircad_e05" in caplog.text
    caplog.clear()
    m = convert(listed, root / "out2", ConvertOptions(layout="list", exclude_ircad_overlap=True), progress=False)
    assert [c.case_id for c in m.cases] == ["ircad_e05", "lits_027", "lits_049"]
    assert (
        "dropped 3 LiTS/Decathlon case(s) that are 3D-IRCADb-01 patients: lits_030, lits_045, liver_46" in caplog.text
    )
    only_copies = _write_list(root / "copies.csv", [("lits_030", "a_orig.nii.gz", "a_liver.nii.gz", "", "", "")])
    with pytest.raises(LiversegError, match=r"--exclude-ircad-overlap dropped every case; nothing to convert"):
        convert(only_copies, root / "out3", ConvertOptions(layout="list", exclude_ircad_overlap=True), progress=False)
    assert not (root / "out3").exists()
    # evaluation: the run's training set against the cases scored, either way round
    assert layouts.ircad_overlap({"x": root / "3Dircadb1.17" / "PATIENT_DICOM"}, {"volume-40": None}) is not None
    assert layouts.ircad_overlap({"lits_001": None, "lits_049": None}, {"3Dircadb1.3": None}) is None
