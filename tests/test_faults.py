"""Faults met with a clear message and nothing lost: damaged checkpoints, another dataset on
resume, refused values, leaked processes, full disks, corrupt shards, early SIGTERM, a
second trainer, a quiet log, and image/mask pairs written in different axis orders."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import HANG, SMOKE, invoke, liverseg_process, load_image, smoke, write_nifti
from liverseg import LiversegError, checkpoints, config, geometry, models, nifti_io, rundir, step, synth, train
from liverseg.convert import ConvertOptions, convert
from liverseg.manifest import Manifest

# ------------------------------------------------------------------------- 1. damaged checkpoints


def _three_checkpoints(directory: Path):
    """ckpt-2, ckpt-4, ckpt-6 of a small object graph whose values say which one was restored."""
    v, step = tf.Variable(tf.zeros([4096])), tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(v=v, step=step)
    manager = tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=3)
    for n in (2, 4, 6):
        v.assign(tf.fill([4096], float(n)))
        step.assign(n)
        manager.save(checkpoint_number=n)
    v.assign(tf.zeros([4096]))
    step.assign(0)
    return ckpt, step


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p: Path):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


DAMAGE = {
    "newest index missing": (lambda d: (d / "ckpt-6.index").unlink(), 4, "index file is missing"),
    "newest data truncated": (lambda d: _truncate(d / "ckpt-6.data-00000-of-00001"), 4, "does not restore"),
    "newest data flipped": (lambda d: _flip(d / "ckpt-6.data-00000-of-00001"), 4, "does not restore"),
    "state file missing": (lambda d: (d / "checkpoint").unlink(), 6, None),
    "state file garbled": (lambda d: (d / "checkpoint").write_bytes(b"\x00\xffnot a proto {{{"), 6, None),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_resumes_from_the_newest_readable_and_keeps_the_older(tmp_path, damage, caplog):
    apply, expected, why = DAMAGE[damage]
    ckpt, step = _three_checkpoints(tmp_path)
    apply(tmp_path)
    assert checkpoints.restore_newest(ckpt, tmp_path, repair=True) == expected
    assert int(step.numpy()) == expected
    for n in (2, 4):  # never deleted
        assert (tmp_path / f"ckpt-{n}.index").is_file() and (tmp_path / f"ckpt-{n}.data-00000-of-00001").is_file()
    if why:
        assert f"skipping checkpoint {tmp_path / 'ckpt-6'}: " in caplog.text and why in caplog.text
        assert (tmp_path / "damaged").is_dir() and not list(tmp_path.glob("ckpt-6.*"))
    # TF's own bookkeeping now lists what is on disk, so rotation deletes nothing newer than it should
    assert tf.train.CheckpointManager(ckpt, str(tmp_path), 3).checkpoints == [
        str(tmp_path / f"ckpt-{n}") for n in ((2, 4) if expected == 4 else (2, 4, 6))
    ]


def test_no_readable_checkpoint_stops_naming_the_files(tmp_path):
    ckpt, step = _three_checkpoints(tmp_path)
    for n in (2, 4, 6):
        _truncate(tmp_path / f"ckpt-{n}.data-00000-of-00001")
    with pytest.raises(LiversegError, match=r"no checkpoint restores \(ckpt-6: .*ckpt-4: .*ckpt-2: .*move .* aside"):
        checkpoints.restore_newest(ckpt, tmp_path, repair=True)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == sorted(  # nothing moved or deleted
        f"ckpt-{n}.{k}" for n in (2, 4, 6) for k in ("index", "data-00000-of-00001")
    )
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "checkpoint").write_text('model_checkpoint_path: "ckpt-9"\n')
    with pytest.raises(LiversegError, match=r"lists checkpoints but no ckpt-\* files"):
        checkpoints.restore_newest(ckpt, tmp_path / "only", repair=True)


def test_training_resumes_past_a_truncated_newest_checkpoint(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # 40 steps, checkpoints 20, 30, 40 kept
    _truncate(run / "checkpoints" / "ckpt-40.data-00000-of-00001")
    cfg = config.replace(
        rundir.load_config(run), **{"train.steps": 35, "train.checkpoint_every": 5, "train.eval_every": 1000}
    )
    result = train.train(cfg, run, progress=False)
    assert result["step"] == 35  # resumed at 30, not 0
    assert sorted(int(p.name.split("-")[1].split(".")[0]) for p in (run / "checkpoints").glob("ckpt-*.index")) == [
        20,
        30,
        35,
    ]
    assert (run / "checkpoints" / "damaged" / "ckpt-40.index").is_file()


# ------------------------------------------------------------------------- 2. another dataset on resume


def test_resume_on_another_dataset_is_refused_and_run_json_kept(trained_run, phantoms, tmp_path):
    other = tmp_path / "other"
    convert(phantoms, other, ConvertOptions(val=0.34, shard_mb=0.04), progress=False)  # same slices, another split
    before = (trained_run / "run.json").read_bytes()
    cfg = config.replace(rundir.load_config(trained_run), **{"data.records": str(other)})
    with pytest.raises(LiversegError, match=r"was trained on .* is another dataset .*start a new --run"):
        train.train(cfg, trained_run, progress=False)
    assert (trained_run / "run.json").read_bytes() == before
    assert not (trained_run / ".lock").read_text()  # released


# ------------------------------------------------------------------------- 3. values refused


def test_complex_ct_is_refused_in_convert_and_predict(trained_run, tmp_path):
    src = tmp_path / "src"
    write_nifti(src / "c_orig.nii.gz", np.zeros((16, 16, 4)), dtype=np.complex64)
    write_nifti(src / "c_liver.nii.gz", np.zeros((16, 16, 4)), dtype=np.uint8)
    with pytest.raises(LiversegError, match=r"c_orig\.nii\.gz: voxels are complex \(complex64\), not real numbers"):
        convert(src, tmp_path / "out", ConvertOptions(), progress=False)
    assert not (tmp_path / "out").exists()
    from liverseg import predict

    written, failures = predict.predict(models.load_run(trained_run), [src / "c_orig.nii.gz"], tmp_path / "pred")
    assert not written and "voxels are complex" in failures[0]


def test_context_reaching_past_the_shortest_case_is_refused(dataset, tmp_path):
    shortest = min(c.num_slices for c in Manifest.load(dataset).cases_in("train"))
    with pytest.raises(
        LiversegError,
        match=rf"data.context={shortest} stacks {2 * shortest + 1} slices, but training "
        rf"case \S+ has {shortest}: .*data.context <= {(shortest - 1) // 2}",
    ):
        train.train(smoke(dataset, f"data.context={shortest}"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------- 4. leaks


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to list child processes")
def test_killing_a_multi_worker_convert_leaves_no_worker(tmp_path):
    synth.synthesize(tmp_path / "src", cases=8, size=64, slices=(40, 40), seed=3, progress=False)
    proc = liverseg_process("convert", tmp_path / "src", tmp_path / "out", "--workers", 2, "--num-shards", 8)
    deadline = time.time() + 60
    while len(workers := _children(proc.pid)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert len(workers) >= 2, proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)]
    assert not list((tmp_path / "out").glob("*-of-*.tfrecord")) and not (tmp_path / "out" / "dataset.json").exists()


def _beam_workers_of(pid: int) -> list[int]:
    """The Beam SDK worker processes started for the converter `pid` (through a shell)."""
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if (
                b"liverseg.convert.beam_worker" in (d / "cmdline").read_bytes()
                and f"LIVERSEG_CONVERTER_PID={pid}".encode() in (d / "environ").read_bytes()
            ):
                found.append(int(d.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to list processes")
def test_killing_a_beam_convert_leaves_no_beam_worker(tmp_path):
    pytest.importorskip("apache_beam")
    synth.synthesize(tmp_path / "src", cases=8, size=64, slices=(40, 40), seed=3, progress=False)
    proc = liverseg_process(
        "convert", tmp_path / "src", tmp_path / "out", "--runner", "direct", "--workers", 2, "--num-shards", 8
    )
    deadline = time.monotonic() + HANG  # a bound against hanging: Beam starts its workers within seconds
    while len(workers := _beam_workers_of(proc.pid)) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert len(workers) == 2, proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + HANG  # they poll for the converter every second
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tensorboard_says_where_it_serves_in_few_lines_and_frees_its_port_on_sigterm(trained_run):
    import json
    import urllib.request

    port = _free_port()
    proc = liverseg_process("tensorboard", trained_run, "--port", port)
    before = []
    while not (line := proc.stdout.readline()).startswith("TensorBoard "):  # the address line, however long it takes
        assert line, "".join(before) + (proc.communicate()[0] or "")
        before.append(line)
    assert len(before) <= 2 and f"http://127.0.0.1:{port}/" in line, before + [line]
    deadline = time.monotonic() + HANG  # a bound against hanging: its first load cycle may still be running
    while not (
        tags := json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=HANG).read()
        )
    ).get("validation"):
        assert time.monotonic() < deadline, tags
        time.sleep(0.2)
    assert {"loss", "dice"} <= set(tags["train"]) and "dice_3d" in tags["validation"]  # the run's logs are served
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=HANG)
    with socket.socket() as s:  # the same PID held the socket: it is free again
        s.bind(("127.0.0.1", port))


def test_a_stale_worker_checkpoint_folder_is_removed_on_the_next_start(tmp_path):
    first = checkpoints.worker_checkpoint_dir(tmp_path / "run", "worker1")
    (first / "ckpt-5.index").write_text("left by a killed worker")
    again = checkpoints.worker_checkpoint_dir(tmp_path / "run", "worker1")
    assert again == first and list(again.iterdir()) == []
    assert checkpoints.worker_checkpoint_dir(tmp_path / "other", "worker1") != first
    shutil.rmtree(first)


# ------------------------------------------------------------------------- 5. clear errors, nothing half-written


def _final(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*")) if out.exists() else []


def test_disk_full_while_writing_shards_is_one_line_and_nothing_final(good_pair_src, tmp_path, monkeypatch):
    from liverseg import records

    real = records.ShardWriter.write
    calls = []

    def write(self, record):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write() to a full disk raises
        return real(self, record)

    monkeypatch.setattr(records.ShardWriter, "write", write)
    out = tmp_path / "out"
    r = invoke("convert", str(good_pair_src), str(out))
    lines = [line for line in r.output.replace("\r", "\n").splitlines() if line and not line.startswith("convert")]
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    assert lines[0].startswith(f"Error: {out}/.liverseg-tmp-train-00000.tfrecord: no space left on device")
    assert _final(out) == []


def test_disk_full_while_writing_the_manifest_leaves_nothing_final(good_pair_src, tmp_path, monkeypatch):
    from liverseg.convert import output

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(output.os, "fsync", fsync)
    out = tmp_path / "out"
    r = invoke("convert", str(good_pair_src), str(out))
    assert r.exit_code == 2 and "no space left on device" in r.output and "Traceback" not in r.output
    assert _final(out) == []  # no final-named shard, no temporary manifest: a re-run needs no extra space


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_on_a_real_small_filesystem(tmp_path):
    """A 32 KB tmpfs: uncompressed, the plan is refused before anything is written; GZIP sizes
    are unknown in advance, so the real ENOSPC is met while writing, and reported as one line."""
    rng = np.random.default_rng(0)
    write_nifti(tmp_path / "src" / "c1_orig.nii.gz", rng.integers(-1000, 1000, (64, 64, 8)), dtype=np.int16)  # noise
    write_nifti(tmp_path / "src" / "c1_liver.nii.gz", np.zeros((64, 64, 8)), dtype=np.uint8)
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        r = invoke("convert", str(tmp_path / "src"), str(mnt / "out"))
        assert r.exit_code == 2 and "MB free; free space or choose another output folder" in r.output, r.output
        assert not (mnt / "out").exists()
        r = invoke("convert", str(tmp_path / "src"), str(mnt / "out"), "--compression", "GZIP")
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert f"Error: {mnt / 'out'}/.liverseg-tmp-train-00000.tfrecord: no space left on device" in r.output
        assert _final(mnt / "out") == [] and list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_evaluate_on_a_corrupt_shard_names_it_and_leaves_no_folder(trained_run, dataset, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    shard = sorted(ds.glob("test-*.tfrecord"))[0]
    _flip(shard)  # same size: only reading the records finds it
    out = tmp_path / "new" / "eval"
    r = invoke("evaluate", "--run", str(trained_run), "--records", str(ds), "--out", str(out))
    assert r.exit_code == 2 and r.output.startswith("Error: corrupt record: ") and str(shard) in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "new").exists()


def test_unreadable_inputs_say_why(tmp_path):
    (tmp_path / "a_liver.nii.gz").symlink_to(tmp_path / "b_liver.nii.gz")
    (tmp_path / "b_liver.nii.gz").symlink_to(tmp_path / "a_liver.nii.gz")
    with pytest.raises(nifti_io.InputError, match=r"a_liver\.nii\.gz: symbolic link loop"):
        nifti_io.read_header(tmp_path / "a_liver.nii.gz")
    (tmp_path / "gone.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    with pytest.raises(
        nifti_io.InputError, match=r"gone\.nii\.gz: symbolic link to .*nowhere\.nii\.gz, which does not"
    ):
        nifti_io.read_file(tmp_path / "gone.nii.gz")
    plain = write_nifti(tmp_path / "plain.nii", np.zeros((8, 8, 3), np.int16))
    named = tmp_path / "plain_orig.nii.gz"
    shutil.copy(plain, named)
    for fn in (nifti_io.read_header, load_image):
        with pytest.raises(
            nifti_io.InputError, match=r"plain_orig\.nii\.gz: named \.gz but not gzip-compressed.*rename it to \.nii"
        ):
            fn(named)
    (tmp_path / "empty_orig.nii.gz").write_bytes(b"")
    for fn in (nifti_io.read_header, load_image):
        with pytest.raises(nifti_io.InputError, match=r"empty_orig\.nii\.gz: the file is empty \(0 bytes\); re-copy"):
            fn(tmp_path / "empty_orig.nii.gz")


def test_weights_of_another_architecture_are_one_line(trained_run, tmp_path):
    from liverseg import unet

    other = unet.build(config.load(None, ["model.base_filters=4", "model.depth=3"]).model, 3)
    other.save_weights(str(tmp_path / "other.weights.h5"))
    with pytest.raises(LiversegError) as e:
        models.load_run(trained_run, tmp_path / "other.weights.h5")
    assert len(str(e.value).splitlines()) == 1 and "cannot load into this run's unet" in str(e.value)
    assert "pass the weights of this run (best.weights.h5 or final.weights.h5)" in str(e.value)


def _catches(pid: int, signum: int) -> bool:
    """Has process `pid` installed a handler for `signum` (its SigCgt mask in /proc)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signum - 1) & 1)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc to see a process's signal handlers")
def test_sigterm_while_train_starts_up_exits_42(dataset, tmp_path):
    """SIGTERM as soon as the CLI's handler is in place, long before TensorFlow has loaded."""
    proc = liverseg_process(
        "train", "--config", SMOKE, "--records", dataset, "--run", tmp_path / "run", "--set", "train.steps=1000"
    )
    deadline = time.monotonic() + HANG  # a bound against hanging, not a speed
    while not _catches(proc.pid, signal.SIGTERM):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.001)
    assert "tensorflow" not in Path(f"/proc/{proc.pid}/maps").read_text()  # still starting up
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=HANG)[0]
    assert proc.returncode == train.PREEMPTED_EXIT, out
    assert "stopped by SIGTERM at step 0" in out and "Traceback" not in out


def test_a_lost_worker_is_one_line():
    where = lambda: "step 40 in run/checkpoints"  # noqa: E731
    with pytest.raises(
        LiversegError,
        match=r"^lost contact with a worker of the cluster \(UnavailableError: Collective "
        r"ops is aborted by: peer down\); restart every worker .*resumes from step 40 in run/checkpoints$",
    ):
        with step.lost_workers_explained(True, where):
            raise tf.errors.UnavailableError(None, None, "Collective ops is aborted by: peer down\nAdditional GRPC ...")
    with pytest.raises(tf.errors.UnavailableError):  # one process: not ours to explain
        with step.lost_workers_explained(False, where):
            raise tf.errors.UnavailableError(None, None, "x")


# ------------------------------------------------------------------------- 6. one trainer per run


def test_a_second_trainer_on_a_locked_run_fails_and_a_stale_lock_is_taken_over(dataset, tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()  # a folder claim() did not create is kept, with its lock file
    with rundir.claim(run):
        with pytest.raises(LiversegError, match=rf"{run} is in use by a trainer \(pid {os.getpid()} on "):
            train.train(smoke(dataset, "train.steps=1"), run, progress=False)
    assert (run / ".lock").read_text() == ""  # released cleanly
    (run / ".lock").write_text("pid 99999 on elsewhere since 2026-01-01 00:00:00")  # a crashed trainer's
    with rundir.claim(run):
        assert (run / ".lock").read_text().startswith(f"pid {os.getpid()} ")
    assert "taking over the lock of a trainer that did not exit cleanly (pid 99999" in caplog.text


# ------------------------------------------------------------------------- 7. the console


def test_verify_reports_a_missing_manifest_without_importing_tensorflow(tmp_path):
    code = (
        "import atexit, sys; atexit.register(lambda: print('tensorflow' in sys.modules)); "
        f"sys.argv = ['liverseg', 'verify', {str(tmp_path / 'nope')!r}]; from liverseg.cli import main; main()"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "LIVERSEG_MALLOC": "system"}
    )
    assert p.returncode == 2 and "no dataset.json manifest" in p.stderr
    assert p.stdout.strip() == "False" and p.stderr.count("\n") == 1, p.stderr


# ------------------------------------------------------------------------- axis orders of a pair


@pytest.fixture
def good_pair_src(tmp_path):
    ct, mask = synth.render(np.random.default_rng(5), (24, 24, 6), (14.0, 14.0, 15.0))
    for kind, arr, dtype in (("orig", ct, np.int16), ("liver", mask, np.uint8)):
        a, aff = geometry.from_canonical_ras(arr, (14.0, 14.0, 15.0), "RAS")
        write_nifti(tmp_path / "pair" / f"c1_{kind}.nii.gz", a, aff, dtype)
    return tmp_path / "pair"


@pytest.mark.parametrize("image_axes, mask_axes", [("RAS", "LAS"), ("LAS", "LPS"), ("PSL", "RAS")])
def test_a_mask_in_another_axis_order_of_the_same_grid_is_accepted(tmp_path, image_axes, mask_axes):
    ct, mask = synth.render(np.random.default_rng(5), (24, 24, 6), (14.0, 14.0, 15.0))

    def write(folder, kind, arr, axes, dtype):
        a, aff = geometry.from_canonical_ras(arr, (14.0, 14.0, 15.0), axes, origin=(-100, 50, 7))
        write_nifti(tmp_path / folder / f"c1_{kind}.nii.gz", a, aff, dtype)

    for folder, (ia, ma) in (("plain", (image_axes, image_axes)), ("mixed", (image_axes, mask_axes))):
        write(folder, "orig", ct, ia, np.int16)
        write(folder, "liver", mask, ma, np.uint8)
        convert(tmp_path / folder, tmp_path / f"{folder}-rec", ConvertOptions(), progress=False)
    a, b = (sorted((tmp_path / f"{f}-rec").glob("*.tfrecord")) for f in ("plain", "mixed"))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    # a genuinely different grid (shifted by one voxel) is still refused
    shifted, aff = geometry.from_canonical_ras(mask, (14.0, 14.0, 15.0), mask_axes, origin=(-86, 50, 7))
    write_nifti(tmp_path / "mixed" / "c1_liver.nii.gz", shifted, aff, np.uint8)
    with pytest.raises(
        LiversegError, match=r"c1_liver\.nii\.gz: affine differs from image \S*c1_orig\.nii\.gz by 14 mm"
    ):
        convert(tmp_path / "mixed", tmp_path / "bad-rec", ConvertOptions(), progress=False)


def test_a_consistently_edited_cases_file_is_named_by_evaluate(trained_run, dataset, tmp_path):
    """cases.jsonl edited (its sha256 in dataset.json updated to match) so a case's slice count
    disagrees with its shard: evaluate names the case and the file, as verify does."""
    import hashlib
    import shutil

    edited = tmp_path / "records"
    shutil.copytree(dataset, edited)
    lines = [json.loads(line) for line in (edited / "cases.jsonl").read_text().splitlines()]
    test_case = next(c for c in lines if c["split"] == "test")
    test_case["num_slices"] -= 1
    text = "".join(json.dumps(c) + "\n" for c in lines)
    (edited / "cases.jsonl").write_text(text)
    manifest = json.loads((edited / "dataset.json").read_text())
    manifest["cases"]["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    (edited / "dataset.json").write_text(json.dumps(manifest, indent=1) + "\n")
    r = invoke("evaluate", "--run", str(trained_run), "--records", str(edited), "--out", str(tmp_path / "r"))
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    n = test_case["num_slices"]
    assert f"case {test_case['case_id']} has {n + 1} slices in its records, but the manifest's cases file says {n}" in (
        r.output
    )
    assert not (tmp_path / "r").exists()
