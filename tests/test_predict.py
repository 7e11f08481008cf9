"""Inference in original geometry, post-processing, predict/evaluate agreement, export, the CLI."""

import dataclasses
import json
import threading

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from conftest import SMOKE, invoke, tree, write_nifti
from liverseg import LiversegError, config, evaluate, geometry, metrics, models, pipeline, predict, synth, train
from liverseg.volumes import Source


def _anatomy(tmp_path, orientation, name="case01"):
    ras_ct, ras_mask = synth.render(np.random.default_rng(3), (32, 32, 9), (11.0, 11.0, 18.0))
    paths = []
    for arr, kind, dtype in ((ras_ct, "orig", np.int16), (ras_mask, "liver", np.uint8)):
        a, aff = geometry.from_canonical_ras(arr, (11.0, 11.0, 18.0), orientation, origin=(-170, -340, 0))
        paths.append(write_nifti(tmp_path / orientation / f"{name}_{kind}.nii.gz", a, aff, dtype))
    return paths


def test_prediction_lands_on_each_inputs_own_grid(trained_run, tmp_path):
    run = models.load_run(trained_run)
    probs = {}
    for o in ("LAS", "RAS", "LPS"):
        image, _ = _anatomy(tmp_path, o)
        written, failures = predict.predict(run, [image], tmp_path / f"out-{o}", probabilities=True)
        assert not failures and [p.name for p in written] == ["case01_liver.nii.gz", "case01_liver_prob.nii.gz"]
        src, out = nib.load(str(image)), nib.load(str(written[0]))
        assert out.shape == src.shape and np.allclose(out.affine, src.affine) and out.get_data_dtype() == np.uint8
        assert nib.aff2axcodes(out.affine) == tuple(o)
        prob = nib.load(str(written[1]))
        probs[o] = geometry.to_ras(np.asanyarray(prob.dataobj), prob.affine)[0]
    assert probs["LAS"].std() > 0
    np.testing.assert_array_equal(probs["LAS"], probs["RAS"])
    np.testing.assert_array_equal(probs["LAS"], probs["LPS"])


def test_resized_training_restores_native_geometry(dataset, tmp_path):
    """A run trained on --size records predicts at the input's native size and grid."""
    from liverseg.convert import ConvertOptions, convert

    src = tmp_path / "src"
    synth.synthesize(src, cases=3, size=48, slices=(6, 6), seed=2, progress=False)
    convert(src, tmp_path / "rec", ConvertOptions(size=32, val=0.34), progress=False)
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
    assert r.spec.size == 32
    image = sorted(src.glob("*_orig.nii.gz"))[0]
    mask, prob, geom = predict.predict_source(r, Source.nifti(image))
    assert mask.shape == prob.shape == nib.load(str(image)).shape and geom.resized
    # its export takes 32x32 slices only, and a contract edited to another size is refused
    from liverseg import export

    out = export.export(r, tmp_path / "onnx", "onnx")[0]
    model = models.load_export(out)
    assert model.engine.input_shape == (None, 32, 32, 1)
    np.testing.assert_array_equal(predict.predict_source(model, Source.nifti(image))[0], mask)
    contract = json.loads((out / models.CONTRACT_FILE).read_text())
    contract["input"].update(size=48, height=48, width=48)
    (out / models.CONTRACT_FILE).write_text(json.dumps(contract))
    with pytest.raises(
        LiversegError,
        match=r"its input \(48x48x1: .* size 48\) does not match the network in "
        r"model\.onnx \(32x32x1\)",
    ):
        models.load_export(out)


def test_largest_component_removes_a_detached_blob_and_fills_holes():
    prob = np.zeros((12, 20, 20), np.float32)
    prob[2:10, 2:12, 2:12] = 0.9
    prob[5, 6, 6] = 0.1  # a hole
    prob[4:6, 16:19, 16:19] = 0.8  # a detached blob
    kept = predict.postprocess(prob, 0.5, largest_component=True, min_fraction=0.1)
    assert kept[4:6, 16:19, 16:19].sum() == 0 and kept[5, 6, 6] == 1 and kept.sum() == 8 * 10 * 10
    raw = predict.postprocess(prob, 0.5, largest_component=False)
    assert raw[4, 17, 17] == 1 and raw[5, 6, 6] == 0
    lobe = prob.copy()
    lobe[2:10, 14:19, 14:19] = 0.8  # a second large piece (200 voxels, 25% of the first) is kept
    assert predict.postprocess(lobe, 0.5, True, min_fraction=0.1)[5, 16, 16] == 1
    assert predict.postprocess(lobe, 0.5, True, min_fraction=1.0)[5, 16, 16] == 0


def test_predict_refuses_to_overwrite_and_reports_a_corrupt_input(trained_run, tmp_path):
    good, _ = _anatomy(tmp_path, "LAS", "good")
    bad = tmp_path / "LAS" / "bad_orig.nii.gz"
    bad.write_bytes(good.read_bytes()[:-200])
    run = models.load_run(trained_run)
    written, failures = predict.predict(run, [tmp_path / "LAS"], tmp_path / "out")
    assert [p.name for p in written] == ["good_liver.nii.gz"]
    assert len(failures) == 1 and str(bad) in failures[0] and "truncated or corrupt" in failures[0]
    assert tree(tmp_path / "out") == ["good_liver.nii.gz"]
    before = (tmp_path / "out" / "good_liver.nii.gz").read_bytes()
    r = invoke("predict", "--run", str(trained_run), str(good), "--out", str(tmp_path / "out"))
    assert r.exit_code == 2 and "exists; pass --force" in r.output
    assert (tmp_path / "out" / "good_liver.nii.gz").read_bytes() == before
    r = invoke("predict", "--run", str(trained_run), str(good), "--out", str(tmp_path / "out"), "--force")
    assert r.exit_code == 0, r.output
    (tmp_path / "notes.txt").write_text("not a scan")  # a path that is no scan does not stop the others
    written, failures = predict.predict(run, [tmp_path / "notes.txt", good], tmp_path / "out2")
    assert [p.name for p in written] == ["good_liver.nii.gz"]
    assert failures == [
        f"{tmp_path / 'notes.txt'}: not a NIfTI file (.nii, .nii.gz), a folder or a zip of DICOM series"
    ]


def test_evaluate_scores_exactly_what_predict_writes(trained_run, phantoms, tmp_path):
    run = models.load_run(trained_run)
    rows, summary, out = evaluate.evaluate(run, data=phantoms, out=tmp_path / "eval")
    assert len(rows) == 6 and (out / "cases.csv").is_file() and len(list(out.glob("*.png"))) == 6
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["summary"]["dice"]["n"] == 6
    written, _ = predict.predict(run, [phantoms], tmp_path / "pred")
    case = rows[0]["case"]
    pred = nib.load(str(tmp_path / "pred" / f"{case}_liver.nii.gz"))
    ref = nib.load(str(phantoms / f"{case}_liver.nii.gz"))
    again = metrics.case_metrics(np.asanyarray(pred.dataobj), np.asanyarray(ref.dataobj), ref.header.get_zooms())
    assert again == pytest.approx({k: v for k, v in rows[0].items() if k != "case"})


def test_evaluate_records_split_and_tensorboard(trained_run):
    rows, summary, out = evaluate.evaluate(models.load_run(trained_run), split="val")
    assert [r["case"] for r in rows] and set(summary) == set(metrics.METRICS)
    assert out == trained_run / "eval" / "val"
    assert list((trained_run / "evaluation").glob("events.*"))


def test_bad_evaluate_and_predict_requests_leave_no_output(trained_run, tmp_path):
    run = models.load_run(trained_run)
    with pytest.raises(LiversegError, match=r"no split 'nope' \(splits: train, val"):
        evaluate.evaluate(run, split="nope")
    assert not (trained_run / "eval" / "nope").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(LiversegError, match=r"empty: no image/mask pairs"):
        evaluate.evaluate(run, data=tmp_path / "empty", out=tmp_path / "eval")
    with pytest.raises(LiversegError, match=r"empty: holds no NIfTI files and no CT DICOM series"):
        predict.predict(run, [tmp_path / "empty"], tmp_path / "pred")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no eval/ or pred/ folder


def test_export_reloads_with_the_same_probabilities(trained_run, tmp_path):
    from liverseg import export

    run = models.load_run(trained_run)
    out, diff = export.export(run, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "best.weights.h5",
        "config.yaml",
        "liverseg-model.json",
        "run.json",
        "saved_model",
    ]
    assert diff <= export.PARITY_TOL
    serving = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    x = np.random.default_rng(0).integers(-1000, 1000, (2, 30, 28, 3)).astype(np.int16)  # odd size: padded inside
    got = serving(slices_hu=tf.constant(x))["liver_probability"].numpy()
    padded = tf.pad(
        pipeline.normalize(tf.constant(x, tf.float32), run.contract.spec.normalization),
        [[0, 0], [0, 2], [0, 0], [0, 0]],
        mode="REFLECT",
    )
    ref = tf.sigmoid(run.model(padded, training=False)).numpy()[:, :30, :28]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    with pytest.raises(LiversegError, match="holds an earlier export; pass --force"):
        export.export(run, out)


def test_only_weight_files_are_loaded(trained_run, tmp_path):
    (tmp_path / "model.keras").write_bytes(b"not loaded")
    with pytest.raises(LiversegError, match=r"only Keras weight files \(\*\.weights\.h5\) are loaded"):
        models.load_run(trained_run, tmp_path / "model.keras")
    with pytest.raises(LiversegError, match="is this a liverseg run directory"):
        models.load_run(tmp_path)


def test_demo_flow_at_toy_size(tmp_path):
    """synth -> convert -> verify -> train -> evaluate -> predict -> export through the CLI."""

    def ok(*args):
        r = invoke(*args)
        assert r.exit_code == 0, r.output
        return r.output

    ok("synth", tmp_path / "nifti", "--cases", 4, "--size", 32, "--slices", "8..10")
    ok("convert", tmp_path / "nifti", tmp_path / "rec", "--val", 0.25, "--test", 0.25)
    ok("verify", tmp_path / "rec")
    ok(
        "train",
        "--config",
        SMOKE,
        "--records",
        tmp_path / "rec",
        "--run",
        tmp_path / "run",
        "--set",
        "train.steps=6",
    )
    out = ok("evaluate", "--run", tmp_path / "run")
    assert "hd95" in out and "dice" in out
    ok("predict", "--run", tmp_path / "run", tmp_path / "nifti", "--out", tmp_path / "pred")
    assert len(list((tmp_path / "pred").glob("*_liver.nii.gz"))) == 4
    ok("export", "--run", tmp_path / "run", tmp_path / "export")


def test_a_second_prediction_into_the_same_folder_is_refused_while_the_first_writes(trained_run, phantoms, tmp_path):
    """Two predicts into one --out: the second fails naming the first (its masks would silently
    replace the other's), and the first finishes as if alone."""
    run = models.load_run(trained_run)
    entered, release = threading.Event(), threading.Event()

    def held(x):  # the first prediction, paused inside its first batch
        entered.set()
        release.wait(600)
        return run.engine(x)

    out, result = tmp_path / "pred", {}
    first = threading.Thread(
        target=lambda: result.update(
            first=predict.predict(dataclasses.replace(run, engine=held), [phantoms / "phantom_001_orig.nii.gz"], out)
        )
    )
    first.start()
    assert entered.wait(600)
    try:
        with pytest.raises(LiversegError, match=r"pred is in use by a prediction \(pid \d+ on .+\); wait for it"):
            predict.predict(run, [phantoms / "phantom_002_orig.nii.gz"], out)
    finally:
        release.set()
        first.join()
    assert result["first"] == ([out / "phantom_001_liver.nii.gz"], [])
    assert sorted(p.name for p in out.iterdir()) == ["phantom_001_liver.nii.gz"]  # the lock removed
