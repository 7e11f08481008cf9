"""The owners of dataset.json and run.json (round trips, versions), the serialiser, and what
conversion measures: HU statistics against numpy, scl_inter applied."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import load_image, write_nifti
from liverseg import LiversegError, records, rundir
from liverseg.convert import ConvertOptions, convert
from liverseg.manifest import MANIFEST, Manifest


def test_manifest_round_trips_and_refuses_a_newer_version(dataset, tmp_path):
    text = (dataset / MANIFEST).read_text()
    m = Manifest.load(dataset)
    assert json.loads(m.dumps()) == json.loads(text)  # every key owned: nothing lost or added
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    older = json.loads(text)
    del older["manifest_version"]  # written before the field existed: version 1
    (copy / MANIFEST).write_text(json.dumps(older))
    assert Manifest.load(copy).manifest_version == 1
    (copy / MANIFEST).write_text(json.dumps({**older, "manifest_version": 99}))
    with pytest.raises(records.RecordsError, match=r"dataset.json: manifest version 99 is newer .* upgrade liverseg"):
        Manifest.load(copy)


def test_run_info_round_trips_and_refuses_a_newer_version(tmp_path):
    spec = rundir.InputSpec(64, 48, 5, 2, None, rundir.Normalization(-200.0, 250.0, -200.0, 450.0))
    info = rundir.RunInfo("/data/records", "ab" * 32, spec)
    info.save(tmp_path)
    assert rundir.RunInfo.load(tmp_path) == info
    d = json.loads(rundir.RunDir(tmp_path).info.read_text())
    rundir.RunDir(tmp_path).info.write_text(json.dumps({**d, "version": 7}))
    with pytest.raises(LiversegError, match=r"run.json.*7"):
        rundir.RunInfo.load(tmp_path)


def _pair(folder, case, image, mask, affine):
    img = write_nifti(folder / f"{case}_orig.nii.gz", image, affine, np.int16)
    write_nifti(folder / f"{case}_liver.nii.gz", mask, affine, np.uint8)
    return img


def test_hu_statistics_agree_with_numpy(tmp_path):
    rng = np.random.default_rng(3)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    images, masks = [], []
    for i in range(3):
        image = rng.normal(-300, 200, (40, 40, 12)).astype(np.int16)
        mask = np.zeros((40, 40, 12), np.uint8)
        mask[8:30, 10:28, 2:10] = 1
        image[mask > 0] = rng.normal(60 + 10 * i, 15, int(mask.sum())).astype(np.int16)
        _pair(tmp_path / "src", f"c{i}", image, mask, affine)
        images.append(image)
        masks.append(mask)
    m = convert(tmp_path / "src", tmp_path / "rec", ConvertOptions(val=0.0, test=0.0), progress=False)
    for case in m.cases:
        i = int(case.case_id[-1])
        liver = images[i][masks[i] > 0].astype(np.float64)
        assert case.liver_voxels == liver.size
        assert case.hu.liver.mean == pytest.approx(liver.mean(), abs=2.0)  # a subsample: within 2 HU
        assert case.hu.liver.std == pytest.approx(liver.std(), rel=0.1)
        assert case.hu.liver.percentiles["50"] == pytest.approx(np.percentile(liver, 50), abs=3.0)


def test_uint16_ct_with_intercept_minus_1024_is_stored_as_hu(tmp_path):
    """Many scanners store HU + 1024 as uint16 with scl_inter = -1024: the records hold HU."""
    hu = np.random.default_rng(1).integers(-1024, 1500, (24, 24, 6)).astype(np.int16)
    img = nib.Nifti1Image((hu.astype(np.int32) + 1024).astype(np.uint16), np.diag([0.8, 0.8, 2.5, 1.0]))
    img.header.set_data_dtype(np.uint16)
    img.header.set_slope_inter(1.0, -1024.0)
    (tmp_path / "src").mkdir()
    nib.save(img, str(tmp_path / "src" / "c0_orig.nii.gz"))
    write_nifti(
        tmp_path / "src" / "c0_liver.nii.gz", (hu > 200).astype(np.uint8), np.diag([0.8, 0.8, 2.5, 1.0]), np.uint8
    )
    loaded, _ = load_image(tmp_path / "src" / "c0_orig.nii.gz")
    assert loaded.dtype == np.int16 and int(loaded.min()) >= -1024
    np.testing.assert_array_equal(np.sort(loaded.ravel()), np.sort(hu.ravel()))  # the same values, HU
    convert(tmp_path / "src", tmp_path / "rec", ConvertOptions(val=0.0, test=0.0), progress=False)
    m = Manifest.load(tmp_path / "rec")
    image, _ = records.read_case(m.records_of(m.cases[0].case_id))
    np.testing.assert_array_equal(np.sort(image.ravel()), np.sort(hu.ravel()))


def test_overlay_png_decodes_to_the_drawn_contours(tmp_path):
    import tensorflow as tf

    from liverseg import overlay

    ct = np.full((5, 20, 24), 50, np.int16)
    truth = np.zeros((5, 20, 24), np.uint8)
    truth[1:4, 4:14, 5:15] = 1  # most liver on slices 1-3; slice 1 is the first with the maximum
    pred = np.zeros_like(truth)
    pred[1:4, 6:16, 8:18] = 1
    panel = overlay.case_panel(ct, (2.0, 1.0, 1.0), truth, pred)
    overlay.write_png(tmp_path / "p.png", panel)
    decoded = tf.io.decode_png((tmp_path / "p.png").read_bytes(), channels=3).numpy()
    np.testing.assert_array_equal(decoded, panel)  # our PNG encoder, read back by another decoder
    axial = decoded[:20, :24]
    green = np.all(axial == overlay.GREEN, axis=-1)
    red = np.all(axial == overlay.RED, axis=-1)
    # the prediction is drawn last, so it wins where the two contours cross
    np.testing.assert_array_equal(red, overlay.contour(pred[1]))
    np.testing.assert_array_equal(green, overlay.contour(truth[1]) & ~overlay.contour(pred[1]))
    grey = int(overlay.window(np.int16(50)))
    assert np.all(axial[~(green | red)] == grey)


def test_a_version_3_manifest_with_its_cases_inline_reads_as_version_4(dataset, tmp_path):
    """Version 4 keeps the cases in cases.jsonl; a version 3 file holding them (and each shard's
    case list) inline reads to the same cases, shard members and record positions."""
    m = Manifest.load(dataset)
    v3 = json.loads((dataset / MANIFEST).read_text())
    v3["manifest_version"], v3["cases"] = 3, [c.to_json() for c in m.cases]
    for split in v3["splits"].values():
        split.pop("min_slices")
        for s in split["shards"]:
            s["cases"] = list(m.cases_of(s["file"]))
    copy = tmp_path / "v3"
    shutil.copytree(dataset, copy)
    (copy / "cases.jsonl").unlink()
    (copy / MANIFEST).write_text(json.dumps(v3))
    old = Manifest.load(copy)
    assert tuple(old.cases) == tuple(m.cases) and old.manifest_version == 3
    for split in m.splits:
        for s in m.shards(split):
            assert old.cases_of(s) == m.cases_of(s)
    c = m.cases[-1].case_id
    assert (old.records_of(c).first, old.records_of(c).count) == (m.records_of(c).first, m.records_of(c).count)


def test_a_truncated_manifest_or_cases_file_is_named_not_half_read(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    cases = (copy / "cases.jsonl").read_bytes()
    (copy / "cases.jsonl").write_bytes(cases[: len(cases) // 2])
    m = Manifest.load(copy)  # the summary loads; the cases are read when asked for
    assert m.num_cases == len(Manifest.load(dataset).cases)
    with pytest.raises(
        records.RecordsError,
        match=r"cases.jsonl: its sha256 is not the one .*dataset.json records "
        r"\(truncated or replaced\); re-run liverseg convert",
    ):
        m.case(Manifest.load(dataset).cases[0].case_id)
    text = (dataset / MANIFEST).read_text()
    (copy / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(records.RecordsError, match=r"dataset.json: unreadable manifest"):
        Manifest.load(copy)


def test_the_serialiser_writes_and_reads_every_field_spelling():
    """serial.key: a renamed key, a group, a default left out, a field not in the file;
    nested dataclasses, tuples, optionals and dicts read back by their type hints."""
    import dataclasses

    from liverseg import serial

    @dataclasses.dataclass(frozen=True)
    class Inner:
        values: tuple[float, ...]
        pair: tuple[int, int] | None = serial.key(omit=True, default=None)

    @dataclasses.dataclass(frozen=True)
    class Outer:
        inner: Inner = serial.key("nested")
        limit: float = serial.key(group="post")
        on: bool = serial.key(group="post", default=False)
        tag: str = serial.key(omit=True, default="")
        where: str = serial.key(skip=True, default="set by the loader")
        parts: dict[str, Inner] = dataclasses.field(default_factory=dict)

    o = Outer(Inner((1.0, 2.5), (3, 4)), 0.5, True, "x", "here", {"a": Inner((0.0,))})
    d = serial.to_json(o)
    assert d == {
        "nested": {"values": [1.0, 2.5], "pair": [3, 4]},
        "post": {"limit": 0.5, "on": True},
        "tag": "x",
        "parts": {"a": {"values": [0.0]}},
    }
    back = serial.from_json(Outer, json.loads(json.dumps(d)))
    assert back == dataclasses.replace(o, where="set by the loader")
    plain = serial.to_json(Outer(Inner((1.0,)), 2.0))
    assert "tag" not in plain and serial.from_json(Outer, plain).tag == ""
    with pytest.raises(KeyError, match="limit"):
        serial.from_json(Outer, {"nested": {"values": []}, "post": {}})
