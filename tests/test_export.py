"""Export and TensorFlow-free inference: each format's own runtime against the Keras forward
pass, `predict --model` against `predict --run`, a process without TensorFlow, DICOM SEG
output read back in world coordinates, and the refusals (one line, nothing written)."""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import REAL_CT, WITHOUT_TENSORFLOW, liverseg_run, write_nifti
from liverseg import LiversegError, dicom_io, engines, geometry, models, predict, rundir, synth, volumes
from liverseg.volumes import Source

FORMATS = ("savedmodel", "onnx", "openvino", "litert")


@pytest.fixture(scope="module")
def run(trained_run):
    return models.load_run(trained_run)


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    from liverseg import export

    root = tmp_path_factory.mktemp("exports")
    return {fmt: export.export(run, root / fmt, fmt)[0] for fmt in FORMATS}


def _real_slices(run, n=3, size=64):
    """n slices of real CT (the TotalSegmentator scan; a phantom where ../shared is absent),
    stacked with the run's context, normalised and cropped to size x size around the body."""
    path = REAL_CT / "totalsegmentator" / "example_ct.nii.gz"
    if path.is_file():
        ct = volumes.load_image(Source.nifti(path)).voxels.transpose(2, 1, 0)  # [z, y, x]
    else:
        ct = synth.render(np.random.default_rng(0), (80, 80, 12), (3.0, 3.0, 3.0))[0].transpose(2, 1, 0)
    z0, y0, x0 = ct.shape[0] // 2, (ct.shape[1] - size) // 2, (ct.shape[2] - size) // 2
    k = run.contract.spec.context
    rows = predict.context_rows(ct.shape[0], k)[z0 : z0 + n]
    stack = ct[rows][:, :, y0 : y0 + size, x0 : x0 + size].transpose(0, 2, 3, 1)
    return predict.normalize(stack, run.contract.spec.normalization)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_in_its_own_runtime_gives_the_networks_probabilities(run, exports, fmt):
    x = _real_slices(run)
    want = engines.sigmoid(np.asarray(run.model(x, training=False)))
    got = engines.sigmoid(models.load_export(exports[fmt]).logits(x))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4
    contract = json.loads((exports[fmt] / models.CONTRACT_FILE).read_text())
    assert contract["format"] == fmt and contract["weights"] == run.contract.weights
    assert contract["input"] == run.spec.to_json() and contract["parity"]["max_abs_probability_difference"] <= 1e-4


def test_openvino_also_runs_the_onnx_export(run, exports):
    x = _real_slices(run)
    a = models.load_export(exports["onnx"], "openvino").logits(x)
    np.testing.assert_allclose(a, models.load_export(exports["onnx"]).logits(x), atol=1e-4)
    bf16 = engines.sigmoid(models.load_export(exports["openvino"], "openvino-bf16").logits(x))
    assert np.abs(bf16 - engines.sigmoid(a)).max() < 0.05  # bfloat16 (float32 where the CPU lacks it)
    with pytest.raises(
        LiversegError,
        match=r"engine litert cannot run a onnx export \(it runs onnxruntime, openvino or openvino-bf16\)",
    ):
        models.load_export(exports["onnx"], "litert")


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A small phantom CT as NIfTI, in an oblique-free but flipped axis order (LPS)."""
    root = tmp_path_factory.mktemp("vol")
    ct, _ = synth.render(np.random.default_rng(3), (40, 36, 6), (8.0, 8.0, 12.0))
    arr, affine = geometry.from_canonical_ras(ct, (8.0, 8.0, 12.0), "LPS", origin=(-160, -140, 30))
    write_nifti(root / "vol_orig.nii.gz", arr, affine, np.int16)
    return root / "vol_orig.nii.gz"


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_predict_from_an_export_equals_predict_from_the_run(run, exports, volume, tmp_path, fmt):
    predict.predict(run, [volume], tmp_path / "run", probabilities=True)
    predict.predict(models.load_export(exports[fmt]), [volume], tmp_path / "model", probabilities=True)
    (a, a_affine), (b, b_affine) = (_nii(tmp_path / d / "vol_liver.nii.gz") for d in ("run", "model"))
    np.testing.assert_array_equal(a_affine, b_affine)
    assert (a == b).mean() >= 0.999
    pa, pb = (_nii(tmp_path / d / "vol_liver_prob.nii.gz")[0] for d in ("run", "model"))
    assert np.abs(pa - pb).max() <= 1e-4


def _nii(path):
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def _without_tensorflow(tmp_path) -> dict:
    """An environment in which TensorFlow and Keras cannot be found, in every process
    (a sitecustomize that installs conftest's finder)."""
    blocked = tmp_path / "blocked"
    blocked.mkdir(exist_ok=True)
    (blocked / "sitecustomize.py").write_text(WITHOUT_TENSORFLOW.replace('"tf_keras"', '"tf_keras", "tf2onnx"'))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), *filter(None, [os.environ.get("PYTHONPATH")])])}


def test_predict_model_runs_where_tensorflow_is_not_installed(run, exports, volume, tmp_path):
    predict.predict(models.load_export(exports["onnx"]), [volume], tmp_path / "here")
    env = _without_tensorflow(tmp_path)
    r = liverseg_run("predict", "--model", exports["onnx"], volume, "--out", tmp_path / "there", env=env)
    assert r.returncode == 0 and all(" INFO liverseg.predict: " in line for line in r.stderr.splitlines()), r.stderr
    np.testing.assert_array_equal(
        _nii(tmp_path / "there" / "vol_liver.nii.gz")[0], _nii(tmp_path / "here" / "vol_liver.nii.gz")[0]
    )
    # what needs TensorFlow says so in one line
    r = liverseg_run("predict", "--run", run.root, volume, "--out", tmp_path / "nope", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "TensorFlow" in r.stderr, r.stderr
    assert not (tmp_path / "nope").exists()


# ------------------------------------------------------------------------- DICOM SEG output


class Thresholder:
    """A stand-in network, TensorFlow-free: liver wherever the normalised HU is above 0.55
    (soft tissue of the phantoms), on native geometry."""

    def __init__(self, threshold=0.55, weights="0123456789abcdef"):
        norm = rundir.Normalization(-200.0, 250.0, -200.0, 450.0)
        self.contract = models.Contract(
            rundir.InputSpec(0, 0, 1, 0, None, norm), 1, 0.5, False, True, 0.1, 4, weights=weights
        )
        self.threshold = threshold

    name = "thresholder"

    def logits(self, x):
        return (x[..., :1] - self.threshold) * 50.0


@pytest.fixture
def series(tmp_path):
    """A phantom CT written as a DICOM series in a flipped axis order, files shuffled."""
    ct, _ = synth.render(np.random.default_rng(4), (48, 40, 7), (7.0, 7.0, 10.0))
    arr, affine = geometry.from_canonical_ras(ct, (7.0, 7.0, 10.0), "RPI", origin=(-150, 120, 80))
    dicom_io.write_series(tmp_path / "ct", arr, affine, "CT", 3, shuffle=True)
    return tmp_path / "ct"


def test_a_dicom_seg_holds_the_nifti_mask_on_the_source_slices(series, tmp_path):
    import highdicom as hd

    model = Thresholder()
    predict.predict(model, [series], tmp_path / "nifti")
    predict.predict(model, [series], tmp_path / "seg", fmt="dicom-seg")
    [seg_path] = list((tmp_path / "seg").iterdir())
    assert seg_path.name == "ct_liver.dcm"
    src = Source.dicom(dicom_io.find_series(series)[0])
    image = volumes.load_image(src)
    nifti = volumes.load_mask(Source.nifti(tmp_path / "nifti" / "ct_liver.nii.gz"))
    geometry.check_pair(image.header, nifti.header)
    want = geometry.onto_grid(nifti.voxels, nifti.header, image.header)
    assert 0 < want.sum() < want.size
    got = volumes.load_mask(Source.seg(seg_path, src)).voxels  # frames placed by their positions (our reader)
    np.testing.assert_array_equal(got, want)

    seg = hd.seg.segread(seg_path)
    slices = {str(ds.SOPInstanceUID): ds for ds in dicom_io.slice_datasets(dicom_io.series_of(src))}
    first = next(iter(slices.values()))
    assert seg.SegmentationType == "BINARY" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert (seg.FrameOfReferenceUID, seg.StudyInstanceUID) == (first.FrameOfReferenceUID, first.StudyInstanceUID)
    [segment] = seg.SegmentSequence
    assert segment.SegmentLabel == "Liver"
    code = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (code.CodingSchemeDesignator, code.CodeValue) == ("SCT", "10200004")
    assert "liverseg" in str(segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName)
    assert "0123456789abcdef" in str(segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion)
    holding = {k for k in range(want.shape[2]) if want[:, :, k].any()}
    assert seg.NumberOfFrames == len(holding)  # one frame per slice that holds liver
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in slices[ref].ImagePositionPatient], atol=1e-3)


def test_our_seg_has_the_structure_of_a_reference_seg(series, tmp_path, real_ct):
    """dcmqi's liver.dcm is a standard SEG over CT: ours has its class, type, segment coding
    and per-frame references and positions."""
    import pydicom

    predict.predict(Thresholder(), [series], tmp_path / "seg", fmt="dicom-seg")
    ours = pydicom.dcmread(tmp_path / "seg" / "ct_liver.dcm")
    ref = pydicom.dcmread(real_ct / "dcmqi-ct-3slice" / "liver.dcm")
    for keyword in ("SOPClassUID", "Modality", "SegmentationType", "BitsAllocated", "SamplesPerPixel"):
        assert ours[keyword].value == ref[keyword].value, keyword
    codes = [
        (
            s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
            s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning.lower(),
        )
        for s in (ours.SegmentSequence[0], ref.SegmentSequence[0])
    ]
    assert codes[0] == ("SCT", "liver") and codes[1] in {
        ("SCT", "liver"),
        ("SRT", "liver"),
    }  # SRT: SNOMED's old designator
    for ds in (ours, ref):
        frame = ds.PerFrameFunctionalGroupsSequence[0]
        assert "PlanePositionSequence" in frame and "DerivationImageSequence" in frame
        assert "ReferencedSeriesSequence" in ds and "DimensionIndexSequence" in ds


def test_dicom_seg_refusals_write_nothing(series, volume, tmp_path):
    with pytest.raises(
        LiversegError,
        match=r"--format dicom-seg needs DICOM series as inputs .*vol_orig\.nii\.gz is "
        r"not DICOM; use --format nifti",
    ):
        predict.predict(Thresholder(), [volume], tmp_path / "out", fmt="dicom-seg")
    assert not (tmp_path / "out").exists()
    written, failures = predict.predict(Thresholder(threshold=5.0), [series], tmp_path / "empty", fmt="dicom-seg")
    assert written == [] and len(failures) == 1 and "no liver found" in failures[0]
    assert not (tmp_path / "empty").exists()  # a folder it made for nothing is removed again


# ------------------------------------------------------------------------- ensembles and refusals


def test_an_ensembles_probability_is_the_mean_of_its_members(volume, tmp_path):
    members = [Thresholder(0.5), Thresholder(0.6), Thresholder(0.7)]
    image = volumes.load_image(Source.nifti(volume))
    probs = [predict.predict_image(m, image.voxels, image.header)[1] for m in members]
    mask, prob, _ = predict.predict_image(members, image.voxels, image.header)
    np.testing.assert_allclose(prob, np.mean(probs, axis=0), atol=1e-6)
    np.testing.assert_array_equal(mask, predict.postprocess(np.mean(probs, axis=0), 0.5, True, 0.1))
    other = Thresholder()
    other.contract = dataclasses.replace(other.contract, labels="liver+tumour")
    with pytest.raises(LiversegError, match=r"these models segment different labels .*liver\+tumour"):
        predict.predict([members[0], other], [volume], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_exports_are_refused_in_one_line(exports, tmp_path, monkeypatch):
    import shutil

    (tmp_path / "empty").mkdir()
    with pytest.raises(LiversegError, match=r"empty: not a liverseg export \(no liverseg-model\.json\)"):
        models.load_export(tmp_path / "empty")
    old = tmp_path / "old"
    shutil.copytree(exports["onnx"], old)
    contract = json.loads((old / models.CONTRACT_FILE).read_text())
    (old / models.CONTRACT_FILE).write_text(json.dumps({**contract, "version": 0}))
    with pytest.raises(
        LiversegError, match=r"export format version 0, this liverseg .* reads versions 1, 2; export the run again"
    ):
        models.load_export(old)
    # a contract edited to another input: the slice size (this export takes any), the context
    for edit, said in (
        (
            {"size": 64, "height": 64, "width": 64},
            r"64x64x3: .* does not match the network in model\.onnx "
            r"\(anyxanyx3\)",
        ),
        (
            {"context": 2, "channels": 5},
            r"anyxanyx5: .* does not match the network in model\.onnx "
            r"\(anyxanyx3\)",
        ),
    ):
        edited = {**contract, "input": {**contract["input"], **edit}}
        (old / models.CONTRACT_FILE).write_text(json.dumps(edited))
        with pytest.raises(LiversegError, match=rf"liverseg-model\.json: its input \({said}; the contract was edited"):
            models.load_export(old)
    # values inference cannot use: each named in one line (not an ONNX Runtime dump, not an empty mask)
    for edit, said in (
        ({"divisor": 0}, r"divisor=0 is not valid \(a power of 2\)"),
        ({"batch_size": 0}, r"batch_size=0 is not valid \(in \[1, 4096\]\)"),
        ({"input": {**contract["input"], "size": 64}}, r"input\.size=64 is not valid \(the slice size, equal to"),
        (
            {"input": {**contract["input"], "intensity": {**contract["input"]["intensity"], "scale": 0}}},
            r"input\.intensity=.* is not valid \(finite, lo < hi and scale > 0\)",
        ),
        ({"postprocess": {**contract["postprocess"], "threshold": 2}}, r"postprocess\.threshold=2\.0 is not valid"),
    ):
        (old / models.CONTRACT_FILE).write_text(json.dumps({**contract, **edit}))
        with pytest.raises(LiversegError, match=rf"liverseg-model\.json: {said}.*; export the run again"):
            models.load_export(old)
    (old / models.CONTRACT_FILE).write_text(json.dumps(contract))
    (old / "model.onnx").unlink()
    with pytest.raises(LiversegError, match=r"old: its onnx artifact model\.onnx is missing; export the run again"):
        models.load_export(old)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(
        LiversegError,
        match=r"engine onnxruntime: its runtime \(onnxruntime\) is not installed; pip install "
        r"'liverseg\[onnx\]'",
    ):
        models.load_export(exports["onnx"])


def test_export_of_a_run_without_weights_writes_nothing(trained_run, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(trained_run, bare, ignore=shutil.ignore_patterns("*.weights.h5"))
    r = liverseg_run("export", "--run", bare, tmp_path / "out", "--format", "onnx")
    assert r.returncode == 2 and "no best.weights.h5 or final.weights.h5 yet" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_export_cli_is_quiet_and_says_its_parity(trained_run, tmp_path):
    r = liverseg_run("export", "--run", trained_run, tmp_path / "out", "--format", "onnx")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr
    assert "exported onnx to" in r.stdout and "probabilities within" in r.stdout
    assert sorted(p.name for p in Path(tmp_path / "out").iterdir()) == [
        "best.weights.h5",
        "config.yaml",
        "liverseg-model.json",
        "model.onnx",
        "run.json",
    ]


def test_an_exported_ensemble_predicts_as_its_runs_do(run, volume, tmp_path):
    from liverseg import export

    out, diff = export.export_ensemble([run, run], tmp_path / "ens", "onnx")
    assert diff <= 1e-4 and sorted(p.name for p in out.iterdir()) == ["liverseg-model.json", "member-0", "member-1"]
    members = models.load_exports(out)
    assert len(members) == 2 and all(m.contract.weights == run.contract.weights for m in members)
    predict.predict([run, run], [volume], tmp_path / "runs", probabilities=True)
    predict.predict(members, [volume], tmp_path / "models", probabilities=True)
    a, b = (_nii(tmp_path / d / "vol_liver_prob.nii.gz")[0] for d in ("runs", "models"))
    assert np.abs(a - b).max() <= 1e-4


def test_a_seg_of_the_real_ircad_series_without_frame_of_reference(real_ct, tmp_path, caplog):
    """3D-IRCADb-01's de-identified slices carry no FrameOfReferenceUID: the SEG gets one
    derived from the series UID (said once), and its frames still reference their slices."""
    import pydicom

    series = real_ct / "ircad-01" / "PATIENT_DICOM"
    written, failures = predict.predict(Thresholder(), [series], tmp_path / "out", fmt="dicom-seg")
    assert failures == [] and [p.name for p in written] == ["ircad-01_liver.dcm"]
    assert caplog.text.count("derived from the series UID") == 1
    seg = pydicom.dcmread(written[0])
    slices = {
        str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in series.iterdir())
    }
    assert seg.FrameOfReferenceUID and not any("FrameOfReferenceUID" in ds for ds in slices.values())
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = slices[str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in ref.ImagePositionPatient],
            atol=1e-3,
        )


@pytest.mark.slow
def test_predict_to_dicom_seg_prints_only_liversegs_lines(exports, real_ct, tmp_path):
    series = real_ct / "ircad-01" / "PATIENT_DICOM"
    r = liverseg_run(
        "predict",
        "--model",
        exports["onnx"],
        series,
        "--out",
        tmp_path / "out",
        "--format",
        "dicom-seg",
        env=_without_tensorflow(tmp_path),
    )
    assert r.returncode in (0, 1), r.stderr  # 1: the smoke model finding no liver on real CT, reported by name
    assert all(" liverseg." in line or line.startswith("Error: 1 input(s) failed") for line in r.stderr.splitlines()), (
        r.stderr
    )


@pytest.mark.parametrize("z, k", [(1, 0), (5, 2), (3, 4)])
def test_the_numpy_stacks_and_normalisation_are_the_pipelines(z, k):
    """predict's TensorFlow-free twins of pipeline.context_rows and pipeline.normalize."""
    import tensorflow as tf

    from liverseg import pipeline

    s = np.arange(z, dtype=np.int64)[:, None]
    np.testing.assert_array_equal(predict.context_rows(z, k), pipeline.context_rows(s, np.int64(z), s, k).numpy())
    hu = np.random.default_rng(k).integers(-1024, 3071, (2, 7, 5, 3)).astype(np.int16)
    for norm in (rundir.Normalization(-200.0, 250.0, -200.0, 450.0), rundir.Normalization(-35.5, 210.25, 96.3, 41.7)):
        np.testing.assert_array_equal(
            predict.normalize(hu, norm), pipeline.normalize(tf.constant(hu, tf.float32), norm).numpy()
        )
