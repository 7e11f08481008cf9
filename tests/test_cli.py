"""The command line through click's CliRunner: thin wrappers, one-line errors, exit codes."""

import os
import subprocess
import sys

from conftest import HANG, WITHOUT_TENSORFLOW, invoke, liverseg_run


def test_synth_convert_verify_inspect(tmp_path):
    r = invoke("synth", tmp_path / "nifti", "--cases", 3, "--size", 24, "--slices", "6..8", "--seed", 1)
    assert r.exit_code == 0, r.output
    r = invoke("convert", tmp_path / "nifti", tmp_path / "rec", "--val", 0.34, "--num-shards", 2)
    assert r.exit_code == 0, r.output
    assert "train: 2 cases" in r.output and "val: 1 cases" in r.output
    r = invoke("verify", tmp_path / "rec")
    assert r.exit_code == 0 and "all 3 shard(s) ok" in r.output
    r = invoke("inspect", tmp_path / "rec", "--png", tmp_path / "png")
    assert r.exit_code == 0 and "train" in r.output
    assert len(list((tmp_path / "png").glob("*.png"))) == 3


def test_errors_are_one_line_with_exit_status_2(tmp_path):
    r = invoke("convert", str(tmp_path), str(tmp_path / "out"))
    assert r.exit_code == 2
    assert r.output.startswith("Error: ") and "no image/mask pairs" in r.output and "Traceback" not in r.output
    r = invoke("synth", str(tmp_path / "x"), "--slices", "forty")
    assert r.exit_code == 2 and "--slices 'forty': write LO..HI" in r.output


def test_verify_names_the_bad_shard(dataset, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    shard = sorted(ds.glob("val-*.tfrecord"))[0]
    shard.write_bytes(shard.read_bytes()[:-3])
    r = invoke("verify", str(ds))
    assert r.exit_code == 2 and f"{shard}: " in r.output and "truncated" in r.output


def test_without_tensorflow_the_package_imports_and_a_tensorflow_command_is_one_clear_line(tmp_path):
    main = "from liverseg.cli import main; main()"
    ok = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT_TENSORFLOW + "import liverseg, liverseg.manifest, liverseg.convert\n"
            "assert 'tensorflow' not in sys.modules",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    p = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW + main, "train", "--run", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and not (tmp_path / "r").exists()
    assert p.stderr.strip() == (
        "Error: liverseg needs TensorFlow: pip install 'liverseg[cpu]' (CPU) "
        "or 'liverseg[gpu]' (NVIDIA GPU, CUDA wheels)"
    )
    # synth, convert and verify need no TensorFlow (verify parses the records in plain Python)
    for args in (
        ["synth", tmp_path / "src", "--cases", "2", "--size", "24", "--slices", "4..5"],
        ["convert", tmp_path / "src", tmp_path / "rec"],
        ["verify", tmp_path / "rec"],
    ):
        p = subprocess.run(
            [sys.executable, "-c", WITHOUT_TENSORFLOW + main, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=HANG,
        )
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert "all 1 shard(s) ok" in p.stdout


def test_a_tensorflow_command_prints_no_tensorflow_noise(dataset):
    """The real CLI process (TensorFlow imported, a pipeline run): stderr holds no import notices
    (oneDNN, absl preamble, CPU features) and no C++ INFO/WARNING/ERROR lines."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    p = liverseg_run(
        "bench", "pipeline", dataset, "--batches", 2, "--batch", 2, "--aug", "none", "--context", 1, env=env
    )
    assert p.returncode == 0, p.stderr
    assert "raw TFRecord read" in p.stdout
    noise = [line for line in p.stderr.splitlines() if line.strip()]
    assert noise == [], noise
