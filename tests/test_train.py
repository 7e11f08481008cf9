"""The trainer on tiny phantoms: learning, strategies, resume, signals, non-finite steps, TensorBoard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import HANG, REPO, SMOKE, invoke, liverseg_process, smoke
from liverseg import LiversegError, config, objective, pipeline, plan, rundir, step, train, unet


def _train_dice(cfg, weights: Path) -> float:
    """Global hard Dice of the saved weights over every training slice."""
    model = unet.build(cfg.model, 2 * cfg.data.context + 1)
    model.load_weights(str(weights))
    tp = fp = fn = 0.0
    for b in pipeline.build_dataset(cfg, "train", training=False):
        pred = (model(b["image"], training=False) > 0).numpy()
        y = b["mask"].numpy() > 0
        tp, fp, fn = tp + (pred & y).sum(), fp + (pred & ~y).sum(), fn + (~pred & y).sum()
    return 2 * tp / (2 * tp + fp + fn)


@pytest.mark.slow
def test_overfits_tiny_slices(dataset, tmp_path):
    cfg = smoke(
        dataset,
        "train.steps=250",
        "augment.placement=none",
        "data.foreground_fraction=1.0",
        "model.norm=instance",
        "data.batch_size=8",
        "train.eval_every=1000",
        "train.checkpoint_every=1000",
    )
    train.train(cfg, tmp_path / "run", progress=False)
    assert _train_dice(cfg, tmp_path / "run" / "final.weights.h5") > 0.9


@pytest.mark.slow
def test_mirrored_on_two_devices_matches_one_device(dataset, tmp_path):
    # SGD, not Adam: Adam's m/sqrt(v) turns rounding differences in near-zero gradients into
    # full-size updates, so only an optimiser linear in the gradients can show equivalence.
    base = [
        "train.steps=6",
        "augment.placement=none",
        "deterministic=true",
        "train.clip_norm=0",
        "train.optimizer=sgd",
        "train.lr=0.05",
        "train.momentum=0.9",
        "model.norm=instance",
        "train.eval_every=1000",
    ]
    # Batch-independent normalisation: per-replica BN differs by design, and Keras's synchronised
    # BN takes the variance in one pass (E[x^2] - E[x]^2 over the replicas), whose cancellation
    # on these tiny slices made the two runs drift apart by 1e-2 in 6 steps for some data orders.
    one = train.train(smoke(dataset, *base, "train.strategy=one_device"), tmp_path / "one", progress=False)
    two = train.train(smoke(dataset, *base, "train.strategy=mirrored"), tmp_path / "two", progress=False)
    assert (one["replicas"], two["replicas"]) == (1, 2)
    cfg = smoke(dataset, *base)
    a, b = unet.build(cfg.model, 1), unet.build(cfg.model, 1)
    a.load_weights(str(tmp_path / "one" / "final.weights.h5"))
    b.load_weights(str(tmp_path / "two" / "final.weights.h5"))
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_allclose(wa.numpy(), wb.numpy(), rtol=1e-3, atol=1e-4, err_msg=wa.path)


def _fingerprint(output: str) -> str:
    return next(line.rsplit(" ", 1)[-1] for line in output.splitlines() if line.startswith("finished at step"))


@pytest.mark.slow
def test_two_process_multi_worker_run(dataset, tmp_path):
    """Two MultiWorkerMirroredStrategy workers on localhost, started by tools/launch_local_workers.py."""
    run = tmp_path / "run"
    launcher = REPO / "tools" / "launch_local_workers.py"
    proc = subprocess.run(
        [
            sys.executable,
            str(launcher),
            "2",
            "--",
            sys.executable,
            "-m",
            "liverseg",
            "train",
            "--config",
            str(SMOKE),
            "--records",
            str(dataset),
            "--run",
            str(run),
            "--set",
            "train.strategy=multi_worker",
            "--set",
            "train.steps=8",
        ],
        capture_output=True,
        text=True,
        timeout=HANG,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 0 and "exit codes: [0, 0]" in proc.stdout, proc.stdout + proc.stderr
    outs = [
        "\n".join(line.split("] ", 1)[1] for line in proc.stdout.splitlines() if line.startswith(f"[worker {i}] "))
        for i in range(2)
    ]
    assert _fingerprint(outs[0]) == _fingerprint(outs[1])  # identical weights on both workers
    assert "not the chief: nothing is written" in outs[1]
    # only the chief wrote: one event file per writer, its checkpoints, no worker folders
    assert len(list((run / "train").glob("events.*"))) == 1 and len(list((run / "validation").glob("events.*"))) == 1
    assert sorted(p.name for p in run.iterdir()) == [
        ".lock",
        "best.weights.h5",
        "checkpoints",
        "config.yaml",
        "final.weights.h5",
        "run.json",
        "train",
        "validation",
    ]
    assert (run / ".lock").read_text() == ""  # the chief's run lock, released
    assert json.loads((run / "run.json").read_text())["result"]["replicas"] == 2


@pytest.mark.slow
def test_the_survivor_of_a_killed_chief_says_so_in_one_line(dataset, tmp_path):
    """SIGKILL of the chief of two MultiWorkerMirrored workers, once it has checkpointed: the
    other worker ends with one line naming the lost peer and where training resumes, without
    TensorFlow's traces (Python's, its watcher threads', the collectives' C++ aborts)."""
    import json as json_mod
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    run = tmp_path / "run"
    procs = [
        liverseg_process(
            "train",
            "--config",
            SMOKE,
            "--records",
            dataset,
            "--run",
            run,
            "--set",
            "train.strategy=multi_worker",
            "--set",
            "train.steps=100000",
            "--set",
            "train.checkpoint_every=10",
            "--set",
            "train.eval_every=0",
            env={
                **os.environ,
                "TF_CPP_MIN_LOG_LEVEL": "2",
                "TF_CONFIG": json_mod.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
            },
        )
        for i in range(2)
    ]
    try:
        _wait_for(run / "checkpoints" / "ckpt-10.index", procs[0], timeout=HANG)
        procs[0].kill()
        out = procs[1].communicate(timeout=HANG)[0]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[1].returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "lost contact with a worker of the cluster (UnavailableError: " in errors[0], out
    assert "training resumes from step " in errors[0] and str(run / "checkpoints") in errors[0], out
    for noise in ("Traceback", "E0000", "GRPC", "Exception in thread"):
        assert noise not in out, out


def _wait_for(path: Path, proc, timeout=HANG):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


# Augmentation off: its seeds are iterator state, restored exactly (test_pipeline's three-resume test)
INTERRUPTED = [
    "deterministic=true",
    "train.steps_per_call=2",
    "train.checkpoint_every=4",
    "train.eval_every=1000",
    "data.context=1",
    "augment.placement=none",
]


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory) -> str:
    """The weights fingerprint of 20 steps in one go."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    return train.train(smoke(dataset, *INTERRUPTED, "train.steps=20"), run, progress=False)["weights_fingerprint"]


def _sigterm_after(monkeypatch, terminate, steps: int) -> None:
    """What SIGTERM does (the CLI's handler sets TERMINATE), once the trainer has drawn the
    batches of `steps` steps: at a point fixed in steps, whatever the machine's speed."""
    real, drawn = step.draw, [0]

    def draw(iterator, k, local):
        batches = real(iterator, k, local)
        drawn[0] += k
        if drawn[0] >= steps:
            terminate.set()
        return batches

    monkeypatch.setattr(step, "draw", draw)


@pytest.mark.slow
@pytest.mark.parametrize("prefetch", ["true", "false"])
def test_four_interruptions_end_exactly_like_an_uninterrupted_run(
    dataset, tmp_path, uninterrupted, monkeypatch, terminate, prefetch
):
    """Finished then extended, SIGTERM between checkpoints, SIGTERM at a checkpoint, SIGKILL
    with batches drawn: the same weights, bit for bit, as 20 steps in one go (every resume
    restores an iterator that a resumed run saved)."""
    run, args = tmp_path / "run", [*INTERRUPTED, f"train.device_prefetch={prefetch}"]
    assert train.train(smoke(dataset, *args, "train.steps=6"), run, progress=False)["step"] == 6
    for stop_after, stopped_at in ((4, 10), (2, 12)):  # steps drawn after resuming; where that stops
        with monkeypatch.context() as m:
            _sigterm_after(m, terminate, stop_after)
            with pytest.raises(train.Preempted) as stop:
                train.train(smoke(dataset, *args, "train.steps=20"), run, progress=False)
        assert stop.value.step == stopped_at and (run / "checkpoints" / f"ckpt-{stopped_at}.index").is_file()
        terminate.clear()
    # SIGKILL of the CLI's train with a call's batches drawn, after the checkpoint of step 16
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
import os, signal
from liverseg import config, step, train
real, drawn = step.draw, [0]
def draw(iterator, k, local):
    drawn[0] += k
    if drawn[0] > 4:  # resumed at 12: drawn 12-14, 14-16; checkpoint 16; then 16-18
        os.kill(os.getpid(), signal.SIGKILL)
    return real(iterator, k, local)
step.draw = draw
train.train(config.load({str(SMOKE)!r}, {[f"data.records={dataset}", *args, "train.steps=20"]!r}), {str(run)!r})
""",
        ],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith("ckpt-16")
    resumed = liverseg_process(
        "train",
        "--config",
        SMOKE,
        "--records",
        dataset,
        "--run",
        run,
        *[a for kv in args for a in ("--set", kv)],
        "--set",
        "train.steps=20",
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": ""},
    )  # the CLI's own default log level
    out = resumed.communicate(timeout=HANG)[0]
    assert resumed.returncode == 0 and "resumed from" in out and "at step 16" in out, out
    assert _fingerprint(out) == uninterrupted
    # what a user sees: no stateful-dataset warning per shard visit, no oneDNN or absl banner, no NodeDef error
    assert not [
        line
        for line in out.splitlines()
        if any(
            n in line
            for n in (
                "FAILED_PRECONDITION",
                "oneDNN",
                "absl::InitializeLog",
                "cpu_feature_guard",
                "NodeDef",
                "E0000",
                "W0000",
            )
        )
    ], out


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(dataset, tmp_path):
    proc = liverseg_process(
        "train",
        "--config",
        SMOKE,
        "--records",
        dataset,
        "--run",
        tmp_path / "run",
        "--set",
        "train.steps=100000",
        "--set",
        "train.checkpoint_every=5",
        "--set",
        "train.eval_every=100000",
    )
    _wait_for(tmp_path / "run" / "checkpoints" / "checkpoint", proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=HANG)[0]
    assert proc.returncode == train.PREEMPTED_EXIT, out
    assert "Traceback" not in out
    step = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith(f"ckpt-{step}")


@pytest.mark.slow
def test_persistent_nan_stops_with_the_step_range_and_keeps_the_checkpoint(dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train.train(
        smoke(dataset, "train.steps=4", "train.checkpoint_every=2", "train.eval_every=1000"), run, progress=False
    )
    monkeypatch.setitem(
        objective.LOSSES, "bce_dice", lambda mask, logits, cfg: tf.reduce_mean(logits, [1, 2, 3]) * np.nan
    )
    cfg = smoke(
        dataset, "train.steps=40", "train.checkpoint_every=2", "train.eval_every=1000", "train.max_nonfinite_steps=6"
    )
    with pytest.raises(train.NonFiniteLoss, match=r"non-finite for steps 5-10 \(6 in a row\).*last checkpoint: step 4"):
        train.train(cfg, run, progress=False)
    assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith("ckpt-4")
    reader = tf.train.load_checkpoint(str(run / "checkpoints"))
    floats = [n for n, d in reader.get_variable_to_dtype_map().items() if d.is_floating]
    assert sum(n.startswith("model/") for n in floats) > 10  # weights and statistics are in there
    for name in floats:
        assert np.all(np.isfinite(reader.get_tensor(name))), name


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_with_float32_logits(dataset, tmp_path, precision):
    cfg = smoke(
        dataset,
        f"train.precision={precision}",
        "train.steps=4",
        "train.log_every=2",
        "augment.placement=device",
        "train.eval_every=1000",
    )
    model = unet.build(cfg.model, 1, precision)
    half = tf.float16 if precision == "mixed_float16" else tf.bfloat16
    assert model.layers[1].compute_dtype == half.name  # the convolutions run in half precision...
    assert model(tf.zeros([1, 32, 32, 1])).dtype == tf.float32  # ...and the logits come out float32
    result = train.train(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(result["train"]["loss"]) and result["train"]["skipped_steps"] == 0
    if precision == "mixed_float16":
        assert result["train"]["loss_scale"] > 0


def test_mixed_float16_logits_and_loss_on_an_all_liver_512_slice():
    cfg = config.load(None, ["model.base_filters=4", "model.depth=4"])
    model = unet.build(cfg.model, 1, "mixed_float16")
    assert model(tf.random.uniform([1, 64, 64, 1])).dtype == tf.float32  # the logits layer stays float32
    # float16 logits of a confident, correct prediction over 512x512: every loss is ~0, which
    # needs float32 sums (a float16 sum over the slice overflows to inf, and Dice would be nan)
    mask = tf.ones([1, 512, 512, 1], tf.uint8)
    logits = tf.fill([1, 512, 512, 1], tf.constant(12.0, tf.float16))
    for name in objective.LOSSES:
        value = objective.LOSSES[name](mask, logits, cfg.train)
        assert value.dtype == tf.float32 and float(value[0]) == pytest.approx(0.0, abs=2e-5), name
        # the same value as from float32 logits: the loss casts before it sums
        assert float(value[0]) == pytest.approx(
            float(objective.LOSSES[name](mask, tf.cast(logits, tf.float32), cfg.train)[0]), abs=1e-7
        ), name


def test_tensorboard_event_files_have_the_expected_tags(dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train.train(
        smoke(dataset, "train.steps=10", "train.eval_every=5", "train.log_every=5", "train.profile_steps=[2, 4]"),
        tmp_path / "run",
        progress=False,
    )
    acc = EventAccumulator(str(tmp_path / "run" / "train"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert {"loss", "dice", "learning_rate", "images_per_sec", "input_wait_fraction", "skipped_steps"} <= tags
    assert "_hparams_/session_start_info" in tags
    for tag in ("loss", "dice", "input_wait_fraction", "images_per_sec"):  # the figures of the last window, as logged
        logged = acc.Tensors(tag)[-1]
        assert logged.step == 10 and float(tf.make_ndarray(logged.tensor_proto)) == pytest.approx(
            result["train"][tag]
        ), tag
    val = EventAccumulator(str(tmp_path / "run" / "validation"), size_guidance={"tensors": 0})
    val.Reload()
    vtags = set(val.Tags()["tensors"])
    assert {"loss", "dice_3d", "dice_slice", "overlay (green truth, red prediction)"} <= vtags
    assert [e.step for e in val.Tensors("dice_3d")] == [5, 10]
    assert list((tmp_path / "run" / "train" / "plugins" / "profile").rglob("*.xplane.pb"))


def test_resume_refuses_a_changed_recipe_but_extends_steps(dataset, tmp_path):
    run = tmp_path / "run"
    train.train(smoke(dataset, "train.steps=2", "train.eval_every=1000"), run, progress=False)
    with pytest.raises(LiversegError, match=r"different config \(train.lr: 0.003 -> 0.1\)"):
        train.train(smoke(dataset, "train.steps=2", "train.lr=0.1"), run, progress=False)
    result = train.train(smoke(dataset, "train.steps=4", "train.eval_every=1000"), run, progress=False)
    assert result["step"] == 4


@pytest.mark.parametrize("first, then", [(1.0, 0.0), (0.0, 1.0)], ids=["in-memory-then-short", "streamed-then-ample"])
def test_a_run_resumes_whichever_way_free_memory_moved(dataset, tmp_path, monkeypatch, terminate, first, then):
    """data.in_memory=auto decides at the run's first start and run.json keeps it: resumed when
    free memory has crossed the line (either way), the run restores its input position and ends
    as an uninterrupted run of the same decision does."""
    args = [*INTERRUPTED, "train.steps=8"]
    monkeypatch.setattr(plan, "IN_MEMORY_SHARE", first)  # 1: the shards fit the share; 0: they never do
    whole = train.train(smoke(dataset, *args), tmp_path / "whole", progress=False)
    with monkeypatch.context() as m:
        _sigterm_after(m, terminate, 4)
        with pytest.raises(train.Preempted):
            train.train(smoke(dataset, *args), tmp_path / "run", progress=False)
    assert rundir.RunInfo.load(tmp_path / "run").in_memory is (first == 1.0)
    terminate.clear()
    monkeypatch.setattr(plan, "IN_MEMORY_SHARE", then)
    resumed = train.train(smoke(dataset, *args), tmp_path / "run", progress=False)
    assert resumed["weights_fingerprint"] == whole["weights_fingerprint"]


def test_the_schedule_spans_the_steps_a_budget_fixes():
    steps = tf.Variable(100.0)
    lr = objective.WarmupSchedule(1.0, steps, 0, "cosine")
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-6) and float(lr(50)) == pytest.approx(0.5, abs=1e-6)
    steps.assign(200.0)
    assert float(lr(100)) == pytest.approx(0.5, abs=1e-6)


def test_cli_rejects_unknown_set_key(dataset, tmp_path):
    r = invoke(
        "train",
        "--config",
        str(SMOKE),
        "--records",
        str(dataset),
        "--run",
        str(tmp_path / "r"),
        "--set",
        "train.nope=1",
    )
    assert r.exit_code == 2 and "unknown config key train.nope" in r.output and "valid keys at train: steps" in r.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_several_steps_per_call_equal_one_step_per_call(dataset, tmp_path):
    """steps_per_call only batches host round trips: same steps, same data, same weights."""
    base = ["deterministic=true", "train.steps=7", "train.eval_every=1000", "train.log_every=2"]
    one = train.train(smoke(dataset, *base, "train.steps_per_call=1"), tmp_path / "one", progress=False)
    three = train.train(smoke(dataset, *base, "train.steps_per_call=3"), tmp_path / "three", progress=False)
    assert one["step"] == three["step"] == 7  # 3 + 3 + 1: the last call runs the remainder
    assert one["weights_fingerprint"] == three["weights_fingerprint"]


def test_xla_with_device_augmentation_and_steps_per_call(dataset, tmp_path):
    """The default recipe's GPU path (jit_compile, device augmentation, several steps per call) on CPU."""
    result = train.train(
        smoke(
            dataset,
            "train.jit_compile=true",
            "train.steps_per_call=2",
            "train.steps=5",
            "augment.placement=device",
            "train.eval_every=5",
        ),
        tmp_path / "run",
        progress=False,
    )
    assert result["step"] == 5 and np.isfinite(result["train"]["loss"]) and result["train"]["skipped_steps"] == 0
    assert result["best_step"] == 5 and set(result["validation"]) >= {"loss", "dice_3d", "dice_slice"}


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_checkpoint(dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train.train(
        smoke(dataset, "train.steps=4", "train.checkpoint_every=4", "train.eval_every=1000"), run, progress=False
    )
    real = tf.train.CheckpointManager.save

    def full(self, checkpoint_number=None, **kw):
        (Path(self.directory) / f"ckpt-{checkpoint_number}_temp").mkdir()  # what TF leaves when a write fails
        raise tf.errors.ResourceExhaustedError(None, None, f"{self.directory}/ckpt_temp; No space left on device")

    monkeypatch.setattr(tf.train.CheckpointManager, "save", full)
    with pytest.raises(
        LiversegError,
        match=r"checkpoints: no space left on device writing the checkpoint of step 8; "
        r"the last checkpoint is step 4: free space",
    ):
        train.train(
            smoke(dataset, "train.steps=8", "train.checkpoint_every=4", "train.eval_every=1000"), run, progress=False
        )
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if "temp" in p.name) == []
    monkeypatch.setattr(tf.train.CheckpointManager, "save", real)
    assert (
        train.train(
            smoke(dataset, "train.steps=8", "train.checkpoint_every=4", "train.eval_every=1000"), run, progress=False
        )["step"]
        == 8
    )  # resumed from step 4 once there is space
