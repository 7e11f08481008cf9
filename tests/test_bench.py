"""Benchmarks run on tiny data and print every row (figures themselves go in docs/benchmarks.md)."""

from click.testing import CliRunner

from liverseg.cli import cli


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def test_bench_convert(phantoms):
    out = run("bench", "convert", phantoms, "--workers", 2)
    assert "nibabel load" in out and "convert --workers 1" in out and "convert --workers 2" in out


def test_bench_pipeline_prints_all_rows(dataset, phantoms):
    out = run("bench", "pipeline", dataset, "--nifti", phantoms, "--batches", 3, "--batch", 4, "--tutorial-batches", 1)
    for row in ("1 raw TFRecord read", "2 pipeline, no augmentation", "2b pipeline, int16 + uint8 for device augmentation",
                "3 pipeline, host augmentation",
                "4 tutorial loader", "5 ImageProjectiveTransformV3 alone"):
        assert row in out


def test_bench_train(dataset):
    out = run("bench", "train", "--records", dataset, "--sizes", 32, "--models", "unet", "--precisions", "float32",
              "--xla", "off", "--base-filters", 4, "--steps", 2, "--warmup", 1)
    assert "synthetic" in out and "records" in out and "input wait" in out
