"""Real scans no part of liverseg made (../shared/data/real-ct; skipped where absent), listed as
users hold them: a DICOM series with its label drawn elsewhere and saved as NIfTI, NRRD or
DICOM SEG. Compared in world coordinates and by the HU inside the liver (a label laid on
flipped rows gives far lower values)."""

import numpy as np
import pytest

from conftest import SHARED_MASKS, liverseg_run
from liverseg import InputError, LiversegError, dicom_io, geometry, records, volumes
from liverseg.convert import ConvertOptions, convert
from liverseg.volumes import Source


def _list(path, rows):
    path.write_text("case,image,mask,split,source,mask_label\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def _liver_hu(out, case_id):
    from liverseg.manifest import Manifest

    m = Manifest.load(out)
    image, mask = records.read_case(m.records_of(case_id))
    return float(image[mask > 0].mean()), m.case(case_id)


def test_real_ircad_patient_1_as_dicom_with_its_nifti_mask(real_ct, tmp_path):
    """IRCAD's DICOM series (LPS) and its manual mask as NIfTI (LAS): one in-plane axis flipped."""
    cases = _list(
        tmp_path / "cases.csv",
        [
            (
                "ircad_e01",
                real_ct / "ircad-01" / "PATIENT_DICOM",
                SHARED_MASKS / "ircad_e01_liver.nii.gz",
                "train",
                "real",
                "",
            )
        ],
    )
    convert(cases, tmp_path / "out", ConvertOptions(layout="list"), progress=False)
    hu, case = _liver_hu(tmp_path / "out", "ircad_e01")
    assert 100 < hu < 120, hu  # about 49 when the mask lands on flipped rows
    assert case.source == "real" and case.image.series and case.mask.path.endswith("ircad_e01_liver.nii.gz")


def test_real_dicom_seg_and_nrrd_of_the_same_label_give_the_same_records(real_ct, tmp_path):
    ct = real_ct / "dcmqi-ct-3slice"
    cases = _list(
        tmp_path / "cases.csv",
        [("seg", ct, ct / "liver.dcm", "train", "", ""), ("nrrd", ct, ct / "liver_seg.nrrd", "train", "", "")],
    )
    convert(cases, tmp_path / "out", ConvertOptions(layout="list"), progress=False)
    from liverseg.manifest import Manifest

    m = Manifest.load(tmp_path / "out")
    seg, nrrd = (records.read_case(m.records_of(c)) for c in ("seg", "nrrd"))
    np.testing.assert_array_equal(seg[1], nrrd[1])
    np.testing.assert_array_equal(seg[0], nrrd[0])
    assert seg[1].sum() == 107098 and m.case("seg").mask.kind == "seg" and m.case("nrrd").mask.kind == "nrrd"
    # ...and in world coordinates, read directly: the SEG's frames placed by their positions on the CT's grid
    image = Source.dicom(next(s for s in dicom_io.find_series(ct) if s.modality == "CT"))
    on_ct = volumes.load_mask(Source.seg(ct / "liver.dcm", image))
    as_nrrd = volumes.load_mask(Source.nrrd(ct / "liver_seg.nrrd"))
    geometry.check_pair(on_ct.header, as_nrrd.header)
    np.testing.assert_array_equal(geometry.onto_grid(as_nrrd.voxels, as_nrrd.header, on_ct.header), on_ct.voxels)


def test_a_truncated_real_seg_is_named_with_its_list_row_and_nothing_is_written(real_ct, tmp_path):
    """dcmqi's SEG cut short inside its pixel data, listed as the mask of row 3: refused in
    phase 1 (before any shard) naming the file and the row; the same for its voxels."""
    ct = real_ct / "dcmqi-ct-3slice"
    whole = (ct / "liver.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[: len(whole) - 2000])
    cases = _list(
        tmp_path / "cases.csv",
        [("good", ct, ct / "liver.dcm", "train", "", ""), ("cut", ct, tmp_path / "cut.dcm", "train", "", "")],
    )
    with pytest.raises(
        LiversegError,
        match=r"cut\.dcm: truncated or damaged DICOM SEG: its pixel data holds 96,304 of "
        r"the 98,304 bytes .* \(case cut, .*cases\.csv row 3\)",
    ):
        convert(cases, tmp_path / "out", ConvertOptions(layout="list"), progress=False)
    assert not (tmp_path / "out").exists()
    image = volumes.read_header(Source.dicom(next(s for s in dicom_io.find_series(ct) if s.modality == "CT")))
    from liverseg import dicom_seg

    with pytest.raises(InputError, match=r"cut\.dcm: truncated or damaged DICOM SEG"):
        dicom_seg.read_mask(tmp_path / "cut.dcm", image)


def test_real_jpeg2000_series_with_its_multilabel_nifti(real_ct, tmp_path):
    """20 JPEG 2000 lossless slices (InstanceNumber rising while z falls) with TotalSegmentator's
    labels as NIfTI (LAS, label 5 = liver)."""
    ts = real_ct / "totalsegmentator"
    cases = _list(
        tmp_path / "cases.csv",
        [("ts", ts / "example_ct_dicom", ts / "example_ct_dicom_seg.nii.gz", "train", "real", 5)],
    )
    convert(cases, tmp_path / "out", ConvertOptions(layout="list"), progress=False)
    hu, case = _liver_hu(tmp_path / "out", "ts")
    assert 80 < hu < 100, hu  # about -75 with a flipped axis
    assert case.mask.label == "5" and case.num_slices == 20


def test_a_seg_listed_over_a_series_it_was_not_drawn_on_is_refused(real_ct, tmp_path):
    """dcmqi's SEG over the JPEG 2000 series (whose files carry an empty SeriesInstanceUID, so
    only the frames' positions can tell): refused, naming both."""
    from liverseg import InputError

    cases = _list(
        tmp_path / "cases.csv",
        [
            (
                "x",
                real_ct / "totalsegmentator" / "example_ct_dicom",
                real_ct / "dcmqi-ct-3slice" / "liver.dcm",
                "",
                "",
                "",
            )
        ],
    )
    with pytest.raises(
        InputError,
        match=r"liver\.dcm: frame 1 of segment 'liver' does not lie on the image "
        r".*example_ct_dicom: its pixels lie .* off the image's voxel centres",
    ):
        convert(cases, tmp_path / "out", ConvertOptions(layout="list"), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_compressed_series_without_its_decoder_is_refused_naming_the_slice_and_the_fix(real_ct, tmp_path):
    """Where pylibjpeg's decoders are not importable (a broken install), the JPEG 2000 series
    is refused in one line naming a slice, the transfer syntax and what to install; nothing written."""
    import os

    ts = real_ct / "totalsegmentator"
    cases = _list(
        tmp_path / "cases.csv",
        [("ts", ts / "example_ct_dicom", ts / "example_ct_dicom_seg.nii.gz", "train", "real", 5)],
    )
    broken = tmp_path / "broken"  # modules that shadow the decoders in every process the converter starts
    broken.mkdir()
    for name in ("pylibjpeg", "openjpeg", "libjpeg", "gdcm", "PIL"):  # Pillow decodes JPEG 2000 too
        (broken / f"{name}.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken), *filter(None, [os.environ.get("PYTHONPATH")])])}
    r = liverseg_run("convert", cases, tmp_path / "out", "--layout", "list", env=env)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot decode its pixel data (transfer syntax JPEG 2000 Image Compression (Lossless Only)" in errors[0]
    assert "pip install pylibjpeg pylibjpeg-openjpeg" in errors[0]
    assert not (tmp_path / "out").exists()


def test_the_listed_patient_converts_as_the_ircad_tree_does_with_a_mask_series(real_ct, tmp_path):
    """IRCAD patient 1 as its DICOM series with its NIfTI mask (a list) gives, slice for slice,
    the records of the same patient as a 3D-IRCADb-01 tree whose MASKS_DICOM/liver series holds
    that mask (written here on the CT's grid, 255 inside, as IRCAD's mask series are)."""
    import shutil

    from liverseg.manifest import Manifest

    series = real_ct / "ircad-01" / "PATIENT_DICOM"
    ct = volumes.read_header(Source.dicom(dicom_io.find_series(series)[0]))
    mask = volumes.load_mask(Source.nifti(SHARED_MASKS / "ircad_e01_liver.nii.gz"))
    on_ct = geometry.onto_grid(mask.voxels, mask.header, ct)
    tree = tmp_path / "ircad" / "3Dircadb1.1"
    tree.mkdir(parents=True)
    shutil.copytree(series, tree / "PATIENT_DICOM")
    dicom_io.write_series(tree / "MASKS_DICOM" / "liver", (on_ct * 255).astype(np.uint8), ct.affine, "OT", 1)
    convert(tree.parent, tmp_path / "tree", ConvertOptions(layout="ircad"), progress=False)
    cases = _list(tmp_path / "cases.csv", [("ircad_e01", series, SHARED_MASKS / "ircad_e01_liver.nii.gz", "", "", "")])
    convert(cases, tmp_path / "list", ConvertOptions(layout="list"), progress=False)
    a, b = Manifest.load(tmp_path / "tree"), Manifest.load(tmp_path / "list")
    image_a, mask_a = records.read_case(a.records_of("3Dircadb1.1"))
    image_b, mask_b = records.read_case(b.records_of("ircad_e01"))
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(mask_a, mask_b)
    assert a.case("3Dircadb1.1").geometry == b.case("ircad_e01").geometry
