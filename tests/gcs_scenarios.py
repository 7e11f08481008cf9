"""The scenario tests/test_gcs.py runs inside tools/gcs-emulator (a bucket on loopback):
`python gcs_scenarios.py PHANTOMS WORK`. It prints one JSON line of what it saw, and the test
checks the figures. Library calls where only the result matters, the CLI where what a user
sees matters (one line when the bucket stops answering)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

BUCKET = "gs://liverseg-test"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# an outage fails fast here (TensorFlow's GCS client retries 10 times, up to 32 s apart, by default)
os.environ.update(
    {
        "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
        "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "100000",
        "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "200000",
    }
)

from liverseg import LiversegError, config, evaluate, export, models, predict, storage, train, verify  # noqa: E402
from liverseg.convert import ConvertOptions, convert  # noqa: E402

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
STEPS = ["deterministic=true", "train.checkpoint_every=6", "train.eval_every=6", "train.log_every=3"]
SPLIT = ("--val", "0.17", "--test", "0.17", "--shard-mb", "0.04")


def smoke(records, *overrides):
    return config.load(SMOKE, [f"data.records={records}", *STEPS, *overrides])


def files(root) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(storage.path(root).iterdir()) if p.is_file()}


def refused(fn, *args, **kw) -> str:
    try:
        fn(*args, **kw)
    except LiversegError as e:
        return str(e)
    return "(not refused)"


def during_an_outage(args: list, ready) -> tuple[int, list[str], bool]:
    """`liverseg ARGS` in a process of its own; once `ready()`, the bucket stops answering until
    the process ends: (exit status, its Error: lines, whether it printed a traceback)."""
    down = Path(os.environ["LIVERSEG_GCS_EMULATOR_OUTAGE"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "liverseg", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    down.touch()
    try:
        _, err = proc.communicate(timeout=900)
    finally:
        down.unlink()
    return proc.returncode, [line for line in err.splitlines() if line.startswith("Error:")], "Traceback" in err


def holds_temporary(out: str) -> bool:
    out = storage.path(out)
    return out.is_dir() and any(p.name.startswith(".liverseg-tmp-") for p in out.iterdir())


def scenario(phantoms: Path, work: Path) -> dict:
    got: dict = {}
    # records: converted to the bucket, byte for byte a local conversion
    opts = ConvertOptions(val=0.17, test=0.17, shard_mb=0.04)
    records = f"{BUCKET}/records"
    convert(phantoms, work / "records", opts, progress=False)
    convert(phantoms, records, opts, progress=False)
    local, remote = files(work / "records"), files(records)
    got["shards"] = sorted(n for n in local if n.endswith(".tfrecord"))
    got["same_shards"] = sorted(n for n in got["shards"] if local[n] == remote.get(n))
    got["same_splits"] = json.loads(local["dataset.json"])["splits"] == json.loads(remote["dataset.json"])["splits"]
    got["verified"] = [r.ok for r in verify.verify(records)]
    # a run in the bucket: trained, resumed, against an uninterrupted run on local disk
    run = f"{BUCKET}/run"
    first = train.train(smoke(records, "train.steps=6"), run, progress=False)
    resumed = train.train(smoke(records, "train.steps=12"), run, progress=False)
    whole = train.train(smoke(records, "train.steps=12"), work / "whole", progress=False)
    got["steps"] = [first["step"], resumed["step"]]
    got["resumed_equals_whole"] = resumed["weights_fingerprint"] == whole["weights_fingerprint"]
    got["run_files"] = sorted(p.name for p in storage.path(run).iterdir())
    got["checkpoints"] = sorted(p.name for p in (storage.path(run) / "checkpoints").iterdir())
    # evaluated, predicted from, exported, all in the bucket
    rows, _, report = evaluate.evaluate(models.load_run(run), split="test", pngs=False)
    got["report"], got["dice"] = str(report), rows[0]["dice"]
    got["report_files"] = sorted(p.name for p in storage.path(report).iterdir())
    scan = phantoms / "phantom_001_orig.nii.gz"
    written, got["failures"] = predict.predict(models.load_run(run), [scan], f"{BUCKET}/pred", probabilities=True)
    got["predicted"] = [str(w) for w in written]
    out, _ = export.export(models.load_run(run), f"{BUCKET}/export", "onnx")
    got["export_files"] = sorted(p.name for p in storage.path(out).iterdir())
    written, _ = predict.predict(models.load_exports(out), [scan], work / "by-export")
    got["by_export"] = [p.name for p in written]
    # what a bucket cannot do safely, refused
    got["export_again"] = refused(export.export, models.load_run(run), out, "onnx", overwrite=True)
    lock = storage.path(run) / ".lock"
    lock.write_text(f"pid {os.getpid()} on {socket.gethostname()} since 2026-12-08 00:00:00")  # a live holder
    got["locked"] = refused(train.train, smoke(records, "train.steps=14"), run, progress=False)
    lock.unlink()
    foreign = storage.path(f"{BUCKET}/foreign")
    (foreign / "train-00000-of-00002.tfrecord").write_bytes(b"another tool's records")
    got["foreign"] = refused(convert, phantoms, foreign, progress=False)
    got["foreign_kept"] = (foreign / "train-00000-of-00002.tfrecord").read_bytes().decode()
    # the bucket stops answering mid-conversion: one line, no manifest; then the conversion completes
    second = f"{BUCKET}/records2"
    got["convert_outage"] = during_an_outage(["convert", phantoms, second, *SPLIT], lambda: holds_temporary(second))
    got["left_after_outage"] = sorted(p.name for p in storage.path(second).iterdir())
    convert(phantoms, second, opts, progress=False)
    got["verified_after"] = [r.ok for r in verify.verify(second)]
    # ... and mid-training, once checkpoint 6 is in the bucket: one line; then it resumes exactly
    run2 = storage.path(f"{BUCKET}/run2")
    args = ["train", "--config", SMOKE, "--records", records, "--run", run2, *[x for s in STEPS for x in ("--set", s)]]
    got["train_outage"] = during_an_outage(
        [*args, "--set", "train.steps=12"], lambda: (run2 / "checkpoints" / "ckpt-6.index").exists()
    )
    again = train.train(smoke(records, "train.steps=12"), run2, progress=False)
    got["resumed_after_outage_equals_whole"] = again["weights_fingerprint"] == whole["weights_fingerprint"]
    return got


if __name__ == "__main__":
    print(json.dumps(scenario(Path(sys.argv[1]), Path(sys.argv[2]))))
