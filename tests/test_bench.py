"""Benchmarks run on tiny data and print every row (figures themselves go in docs/benchmarks.md)."""

import pytest

from conftest import SMOKE, invoke

# bench train's rows on a U-Net small enough for 2 CPU cores: the smoke recipe, 2 filters, depth 2, batch 4
TINY_UNET = ("--config", str(SMOKE), "--set", "model.base_filters=2", "--set", "model.depth=2")
TINY_UNET += ("--set", "data.batch_size=4")


def run(*args):
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    return r.output


def _rows(out: str, names) -> dict:
    """{row name: the cells after it} for the printed table's rows that start with one of `names`."""
    rows = {}
    for line in out.splitlines()[2:]:
        name = next((n for n in names if line.startswith(n)), None)
        if name:
            rows[name] = line[len(name) :].split()
    assert set(rows) == set(names), out
    return rows


def _ratio_of(printed: str, a: float, b: float, step: float = 0.005) -> bool:
    """Is `printed` (rounded to 0.01) a / b, where a and b are printed rounded to 0.01 too?"""
    lo, hi = (a - step) / (b + step), (a + step) / max(b - step, 1e-6)
    return lo - 0.005 <= float(printed) <= hi + 0.005


def test_bench_convert(phantoms, tmp_path):
    from liverseg import synth

    synth.synthesize(tmp_path / "dicom", cases=6, size=32, slices=(8, 12), seed=7, layout="ircad", progress=False)
    out = run("bench", "convert", phantoms, "--workers", 2, "--dicom", tmp_path / "dicom", "--beam")
    names = [
        "nibabel load (image+mask)",
        "convert --workers 1",
        "convert --workers 2",
        "beam direct --workers 1",
        "beam direct --workers 2",
        "convert DICOM --workers 1",
        "convert DICOM --workers 2",
    ]
    rows = _rows(out, names)
    seconds = {name: float(cells[0]) for name, cells in rows.items()}
    load = seconds[names[0]]
    for name, (_secs, per_volume, _slices_s, _mb_s, x_load, *_rest) in rows.items():
        assert float(per_volume) == pytest.approx(seconds[name] / 6, abs=0.006), name  # 6 volumes
        # ratios between rows, from the printed seconds (rounded to 0.01 s)
        assert _ratio_of(x_load, seconds[name], load), name
    # every row converts the same slices: slices/s x seconds (each printed rounded) brackets one total
    totals = [(float(cells[2]) - 0.05) * (seconds[name] - 0.005) for name, cells in rows.items()]
    totals_hi = [(float(cells[2]) + 0.05) * (seconds[name] + 0.005) for name, cells in rows.items()]
    assert max(totals) <= min(totals_hi), (totals, totals_hi)
    for kind in ("convert", "beam direct", "convert DICOM"):  # speedup of 2 workers over 1 of the same kind
        one, two = seconds[f"{kind} --workers 1"], seconds[f"{kind} --workers 2"]
        assert _ratio_of(rows[f"{kind} --workers 2"][5], one, two), kind
    for n in (1, 2):  # Beam over the local converter with as many workers
        beam, local = seconds[f"beam direct --workers {n}"], seconds[f"convert --workers {n}"]
        assert _ratio_of(rows[f"beam direct --workers {n}"][6], beam, local), n


def test_bench_pipeline_prints_all_rows(dataset, phantoms):
    out = run("bench", "pipeline", dataset, "--nifti", phantoms, "--batches", 3, "--batch", 4, "--tutorial-batches", 1)
    names = [
        "1 raw TFRecord read",
        "2 pipeline, no augmentation",
        "2b pipeline, int16 + uint8 for device augmentation",
        "3 pipeline, host augmentation",
        "4 tutorial loader (nib.load per slice)",
        "5 ImageProjectiveTransformV3 alone",
    ]
    rows = _rows(out, names)
    rate = {name: float(cells[0]) for name, cells in rows.items()}
    for name, (_slices_s, _mb_s, vs1, vs4, vs5) in rows.items():  # each row against rows 1, 4 and 5, as printed
        assert float(vs1.rstrip("%")) == pytest.approx(100 * rate[name] / rate[names[0]], abs=1.0), name
        assert float(vs4.rstrip("x")) == pytest.approx(rate[name] / rate[names[4]], rel=0.05, abs=1.0), name
        assert float(vs5.rstrip("%")) == pytest.approx(100 * rate[name] / rate[names[5]], abs=1.0), name


def test_bench_pipeline_measures_a_recipes_own_settings(dataset, tmp_path):
    """--config: the rows use the recipe's context, batch and crop (here 5 channels and a 16x16
    window from --set, as real-cpu crops): row 2 (no augmentation) ships whole slices, a
    float32 [32, 32, 5] image, its uint8 mask and two int64 indices per slice; row 3 the
    recipe's 16x16 windows."""
    out = run(
        "bench",
        "pipeline",
        dataset,
        "--config",
        str(SMOKE),
        "--set",
        "data.context=2",
        "--set",
        "augment.crop=16",
        "--batches",
        3,
    )
    rows = _rows(out, ["2 pipeline, no augmentation", "3 pipeline, host augmentation"])
    for name, expected in [
        ("2 pipeline, no augmentation", 32 * 32 * 5 * 4 + 32 * 32 + 16),
        ("3 pipeline, host augmentation", 16 * 16 * 5 * 4 + 16 * 16 + 16),
    ]:
        _holds_bytes_per_slice(rows[name], expected, name)


def test_bench_pipeline_through_the_service(dataset):
    out = run("bench", "pipeline", dataset, "--batches", 2, "--batch", 2, "--aug", "none", "--service")
    names = [
        "1 raw TFRecord read",
        "2 pipeline, no augmentation",
        "2b pipeline, int16 + uint8 for device augmentation",
        "6 tf.data service, int16 + uint8, 1 worker",
        "6b tf.data service, int16 + uint8, 2 workers",
        "5 ImageProjectiveTransformV3 alone",
    ]
    rows = _rows(out, names)
    # through the service the same batches arrive: int16 [32, 32, 1] image, uint8 mask, two int64 indices per slice
    for name in names[2:5]:
        _holds_bytes_per_slice(rows[name], 32 * 32 * 2 + 32 * 32 + 16, name)


def _holds_bytes_per_slice(row, expected: int, name: str) -> None:
    """The table prints slices/s and MB/s to 0.1: their ratio is checked within what that
    rounding allows (a slow machine prints small MB/s), plus 1 %."""
    slices_s, mb_s = float(row[0]), float(row[1])
    low = (mb_s - 0.05) * 2**20 / (slices_s + 0.05)
    high = (mb_s + 0.05) * 2**20 / max(slices_s - 0.05, 1e-9)
    assert 0.99 * low <= expected <= 1.01 * high, (name, slices_s, mb_s, expected)


@pytest.mark.slow
def test_bench_train_reports_every_ceiling(dataset):
    out = run(
        "bench",
        "train",
        dataset,
        *TINY_UNET,
        "--set",
        "train.steps_per_call=2",
        "--steps",
        2,
        "--loop-steps",
        4,
        "--input-batches",
        2,
        "--peak-tflops",
        100,
    )
    rows = {line.split("  ")[0].strip(): line.split() for line in out.splitlines()[2:]}
    for name, unit in [
        ("model", "img/s"),
        ("loop overhead", "ms/step"),
        ("loop overhead + device augmentation", "ms/step"),
        ("input ceiling", "slices/s"),
        ("end to end", "img/s"),
        ("FLOPs per image", "GFLOP"),
        ("40% MFU target", "img/s"),
    ]:
        value = rows[name][len(name.split())]
        assert float(value) > 0 and rows[name][len(name.split()) + 1] == unit, (name, rows[name])
    # 40% of 100 TFLOPS over 3x the forward FLOPs, as printed
    flops = float(rows["FLOPs per image"][3]) * 1e9
    assert float(rows["40% MFU target"][3]) == pytest.approx(0.4 * 100e12 / flops, rel=1e-3)


def test_bench_train_rejects_an_unknown_row(dataset):
    r = invoke("bench", "train", str(dataset), "--rows", "model,gpu")
    assert r.exit_code == 2 and "'gpu' is not one of model, loop, input, end-to-end" in r.output


def test_bench_train_measures_the_default_recipe_without_config(dataset):
    """Without --config it measures configs/default.yaml (5 input slices, device augmentation)."""
    out = run("bench", "train", dataset, "--set", "data.batch_size=4", "--rows", "input", "--input-batches", 2)
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()[2:]}
    assert "device augmentation path" in rows["input ceiling"]
    # the default U-Net (32 filters, depth 5): 343 GFLOP per 512x512 image (docs), so 343 / 256 at 32x32
    assert float(rows["FLOPs per image"].split()[3]) == pytest.approx(343 / 256, rel=0.01)


def test_a_training_batch_is_fitted_to_the_memory_before_it_runs():
    from liverseg.bench.train import MEMORY_HEADROOM, fitting_batch

    gb = 1e9
    assert fitting_batch(32, 4 * gb, 0.87 * gb, None) == 32  # nothing known: as asked
    assert fitting_batch(32, 4 * gb, 0.87 * gb, 40 * gb) == 32  # 31.8 GB fits 0.85 x 40
    assert fitting_batch(32, 4 * gb, 0.87 * gb, 24 * gb) == int((MEMORY_HEADROOM * 24 - 4) / 0.87)  # 18
    assert fitting_batch(32, 4 * gb, 0.87 * gb, 24 * gb, replicas=4) == 16  # a multiple of the replicas
    assert fitting_batch(32, 4 * gb, 0.87 * gb, 4 * gb) == 0  # not even one


@pytest.mark.slow
def test_bench_train_says_at_which_batch_it_measured_or_why_it_skipped(dataset, monkeypatch):
    from liverseg import config, unet
    from liverseg.bench import train as bench_train
    from liverseg.manifest import Manifest

    cfg = config.load(str(SMOKE), ["model.base_filters=2", "model.depth=2", "data.batch_size=4"])
    shard = max(s.bytes for s in Manifest.load(dataset).shards("train"))
    fixed, per_image = bench_train.training_memory(cfg, unet.build(cfg.model, 1), 32, 32, shard)
    args = [
        "bench",
        "train",
        dataset,
        *TINY_UNET,
        "--rows",
        "model",
        "--steps",
        1,
    ]
    monkeypatch.setattr(
        bench_train, "available_memory", lambda: (fixed + 2.5 * per_image) / bench_train.MEMORY_HEADROOM
    )
    out = run(*args)
    row = next(line for line in out.splitlines() if line.startswith("model "))
    assert "at batch 2: batch 4 needs ~" in row and " GB available" in row and float(row.split()[1]) > 0
    monkeypatch.setattr(bench_train, "available_memory", lambda: fixed / 2)
    row = next(line for line in run(*args).splitlines() if line.startswith("model "))
    assert row.split()[1] == "skipped" and "not even batch 1 fits" in row


@pytest.mark.slow
def test_bench_predict_measures_each_engine_and_the_ensemble_on_the_same_volumes(trained_run, phantoms):
    """One row per engine in its own process, masks compared with the first engine's; with
    two runs, the ensemble's rows too."""
    from liverseg.bench.predict import bench_predict

    rows = bench_predict([trained_run, trained_run], phantoms, cases=1, engine_rows=("tensorflow", "onnxruntime"))
    assert [(r["engine"], r["models"]) for r in rows] == [
        ("tensorflow", "1 run"),
        ("onnxruntime", "1 run"),
        ("tensorflow", "ensemble of 2"),
        ("onnxruntime", "ensemble of 2"),
    ]
    for r in rows:
        assert (
            r["note"] == "" and r["s/volume"] >= 0 and r["slices/s"] > 0 and r["peak RSS MB"] > 100
        )  # no speed asserted
    assert [r["same mask"] for r in rows] == ["(reference)", "100.000%", "(reference)", "100.000%"]


def test_bench_predict_of_an_untrained_recipe_at_a_size(phantoms):
    out = run(
        "bench",
        "predict",
        phantoms,
        "--config",
        str(SMOKE),
        "--size",
        "32",
        "--cases",
        "1",
        "--engine",
        "tensorflow",
        "--engine",
        "openvino",
    )
    rows = _rows(out, ["tensorflow", "openvino"])
    assert rows["tensorflow"][:2] == ["1", "run"] and rows["openvino"][-1].endswith("%")
