"""The training loop: one GPU, several GPUs (Mirrored) or several hosts (MultiWorkerMirrored).

Flat and explicit, because Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy
(keras issue 20585): build the strategy; create model, optimizer and checkpoint inside
`strategy.scope()`; run `steps_per_call` steps per call of one `tf.function` through
`strategy.run`; log, validate and checkpoint when a step count crosses a multiple of the
configured interval.

* Per-example losses are averaged over the *global* batch (`tf.nn.compute_average_loss`).
* Non-finite steps are skipped on every replica: each replica's finite flag is
  all-reduced first (Keras's LossScaleOptimizer would only look at replica 0's local
  gradients). A streak of `max_nonfinite_steps` skipped steps stops the run with an
  error naming the steps; weights are never updated by a skipped step, so the last
  checkpoint is good.
* The checkpoint holds model, optimizer, step, best validation Dice and the tf.data
  iterator: re-running on the same run directory continues on the exact next batch.
* SIGTERM saves a checkpoint and ends with `Preempted` (exit status 42, TF's
  "preempted, restart me" convention); under multi-worker, TF's
  PreemptionCheckpointHandler coordinates the save across workers.
* Only the chief writes into the run directory; other workers checkpoint to a temporary
  folder (deleted at the end) and write no logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from liverseg import LiversegError, atomic_path, config, objective, overlay, pipeline, rundir, unet
from liverseg.config import Config

log = logging.getLogger(__name__)
PREEMPTED_EXIT = 42


class Preempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint."""

    def __init__(self, step: int):
        super().__init__(f"stopped by SIGTERM at step {step}; checkpoint saved; run the same command to resume")
        self.step = step


class NonFiniteLoss(LiversegError):
    pass


# ------------------------------------------------------------------------- set-up


def make_strategy(name: str) -> tf.distribute.Strategy:
    """auto: Mirrored over several GPUs, else one device. mirrored without GPUs uses every
    logical CPU device (for testing). multi_worker reads the cluster from TF_CONFIG."""
    gpus = tf.config.list_physical_devices("GPU")  # logical devices would start the runtime, too early for MWMS
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise LiversegError("train.strategy=multi_worker needs TF_CONFIG (the cluster and this task's index)")
        impl = (tf.distribute.experimental.CommunicationImplementation.NCCL if gpus
                else tf.distribute.experimental.CommunicationImplementation.RING)
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(implementation=impl))
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


def input_context(strategy: tf.distribute.Strategy) -> tf.distribute.InputContext:
    """This worker's input pipeline: one per worker (host), feeding its local replicas."""
    resolver = getattr(strategy, "cluster_resolver", None)
    pipes, pipe = 1, 0
    if resolver is not None and resolver.task_type:
        spec = resolver.cluster_spec().as_dict()
        tasks = [("chief", 0)] * len(spec.get("chief", [])) + [("worker", i) for i in range(len(spec.get("worker", [])))]
        pipes, pipe = len(tasks), tasks.index((resolver.task_type, resolver.task_id))
    return tf.distribute.InputContext(num_input_pipelines=pipes, input_pipeline_id=pipe,
                                      num_replicas_in_sync=strategy.num_replicas_in_sync)


def every(before: int, after: int, n: int) -> bool:
    """Did the step count cross a multiple of n going from `before` to `after`?"""
    return after // n > before // n


def weights_fingerprint(model) -> str:
    h = hashlib.sha256()
    for w in model.weights:
        h.update(np.ascontiguousarray(w.value.numpy()).tobytes())
    return h.hexdigest()[:16]


def _save_weights(model, path: Path) -> None:
    with atomic_path(path) as tmp:
        model.save_weights(str(tmp))


def precision(cfg: Config) -> str:
    """The Keras dtype policy: "auto" is mixed_float16 with a GPU, float32 without."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"


# ------------------------------------------------------------------------- validation


def confusion(logits, mask, axis=None):
    """Hard (TP, FP, FN) pixel counts of logits > 0 against the mask, stacked on the last axis."""
    pred, y = tf.cast(logits > 0, tf.float32), tf.cast(mask, tf.float32)
    return tf.stack([tf.reduce_sum(pred * y, axis), tf.reduce_sum(pred * (1 - y), axis),
                     tf.reduce_sum((1 - pred) * y, axis)], axis=-1)


def _dice(tp, fp, fn) -> float:
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom  # both empty: perfect agreement


def make_validator(model, cfg: Config, loss_fn):
    """validate(num_images) -> (metrics, overlays): loss, mean slice Dice and mean per-volume
    3D hard Dice on the val split, and RGB overlays of the slices with the most liver."""
    ds = pipeline.build_dataset(cfg, "val", training=False)

    @tf.function(reduce_retracing=True)
    def run(image, mask):
        logits = model(image, training=False)
        return loss_fn(mask, logits), confusion(logits, mask, [1, 2, 3]), logits

    def validate(num_images: int) -> tuple[dict, list[np.ndarray]]:
        return _validate(ds, run, cfg, num_images)

    return validate


def _validate(ds, run, cfg: Config, num_images: int) -> tuple[dict, list[np.ndarray]]:
    cases: dict[int, np.ndarray] = {}
    losses, slice_dice, picks = [], [], []
    with pipeline.named_data_errors(cfg, "val"):
        for b in ds:
            loss, counts, logits = run(b["image"], b["mask"])
            counts = counts.numpy().astype(np.float64)
            losses.append(loss.numpy())
            for c, row in zip(b["case_index"].numpy(), counts):
                cases[c] = cases.get(c, 0) + row
                if row.sum() > 0:  # slices with liver in truth or prediction
                    slice_dice.append(_dice(*row))
            liver = counts[:, 0] + counts[:, 2]
            for i in np.argsort(-liver)[:num_images]:
                picks.append((liver[i], b["image"][i].numpy(), b["mask"][i, ..., 0].numpy(), logits[i, ..., 0].numpy() > 0))
            picks = sorted(picks, key=lambda p: -p[0])[:num_images]
    k = cfg.data.context
    images = []
    for _, image, truth, pred in picks:
        ct = image[..., k]
        grey = (np.clip((ct - ct.min()) / max(1e-6, ct.max() - ct.min()), 0, 1) * 255).astype(np.uint8)
        images.append(overlay.draw(grey, [(truth, overlay.GREEN), (pred, overlay.RED)]))
    metrics = {
        "loss": float(np.mean(np.concatenate(losses))) if losses else float("nan"),
        "dice_slice": float(np.mean(slice_dice)) if slice_dice else 1.0,
        "dice_3d": float(np.mean([_dice(*v) for v in cases.values()])) if cases else float("nan"),
    }
    return metrics, images


# ------------------------------------------------------------------------- the loop


def build_step(cfg: Config, strategy, model, optimizer, norm: rundir.Intensity, step: tf.Variable):
    """run_steps(batches) -> (losses [k], stats [k, 3], skipped [k]): k training steps in one call.

    Each batch is a distributed value (one per-replica batch per replica). Also used by
    `liverseg bench train`, so the benchmark times exactly this step.
    """
    tc = cfg.train
    replicas = strategy.num_replicas_in_sync
    mixed16 = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    loss_fn = objective.per_example_loss(tc)
    global_batch = cfg.data.batch_size

    def forward_backward(image, mask):
        with tf.GradientTape() as tape:
            logits = model(image, training=True)
            loss = tf.nn.compute_average_loss(loss_fn(mask, logits), global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss) if mixed16 else loss
        grads = tape.gradient(scaled, model.trainable_variables)
        return loss, grads, confusion(logits, mask)

    if tc.jit_compile:
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def apply_if(ok, grads):
        """optimizer.apply on every replica, or on none (ok is identical on all replicas)."""
        def cross(distribution, ok, grads):
            flag = distribution.experimental_local_results(ok)[0]
            tf.cond(flag, lambda: distribution.extended.call_for_each_replica(
                optimizer.apply, args=(grads, model.trainable_variables)), lambda: None)
        tf.distribute.get_replica_context().merge_call(cross, args=(ok, grads))

    running_stats = [v for v in model.non_trainable_variables if v.dtype in ("float32", "float16", "bfloat16")]

    def replica_step(batch, at):
        ctx = tf.distribute.get_replica_context()
        image, mask = batch["image"], batch["mask"]
        if cfg.augment.placement == "device":
            seed = tf.stack([tf.constant(cfg.seed * 1_000_003 + 7919, tf.int64),
                             at * replicas + tf.cast(ctx.replica_id_in_sync_group, tf.int64)])
            prepared = pipeline.prepare_batch(batch, cfg, norm, seed)
            image, mask = prepared["image"], prepared["mask"]
        loss, grads, stats = forward_backward(image, mask)
        if replicas > 1 and running_stats:
            # Keras 3 makes BatchNorm moving statistics MirroredVariables with aggregation NONE:
            # each replica would silently keep its own. Average them (one small all-reduce).
            for v, mean in zip(running_stats, ctx.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in running_stats])):
                v.assign(mean)
        finite = tf.math.is_finite(loss) & tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])
        bad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
        ok = bad == 0
        if mixed16:  # make every replica's gradients non-finite so the LossScaleOptimizer skips everywhere
            grads = [tf.where(ok, g, tf.constant(np.nan, g.dtype)) for g in grads]
            optimizer.apply(grads, model.trainable_variables)
        else:
            apply_if(ok, grads)
        return loss, stats, bad

    @tf.function
    def run_steps(batches):
        losses, stats, bads = [], [], []
        for i, batch in enumerate(batches):
            loss, st, bad = strategy.run(replica_step, args=(batch, step + i))
            losses.append(strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None))
            stats.append(strategy.reduce(tf.distribute.ReduceOp.SUM, st, axis=None))
            bads.append(strategy.reduce(tf.distribute.ReduceOp.MEAN, bad, axis=None))
        step.assign_add(len(batches))
        return tf.stack(losses), tf.stack(stats), tf.stack(bads)

    return run_steps


def feeder(strategy, iterator):
    """next_global_batch(): one per-replica batch from this worker's iterator for each local replica."""
    local = len(strategy.extended.worker_devices)

    def next_global_batch():
        batches = [next(iterator) for _ in range(local)]
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: batches[ctx.replica_id_in_sync_group % local])

    return next_global_batch


def _set_op_determinism(on: bool) -> None:
    """Op determinism is process-global in TensorFlow: turn it on for a deterministic run and
    back off for the next run in the same process (it would make an XLA run fail)."""
    if on:
        tf.config.experimental.enable_op_determinism()
        return
    from tensorflow.python.framework import config as tf_config  # no public "disable" (TF 2.21)

    disable = getattr(tf_config, "disable_op_determinism", None)
    if disable is not None:
        disable()


def train(cfg: Config, run: str | Path, progress: bool = True) -> dict:
    """Train (or resume) in `run`. Returns the summary also written to RUN/run.json (chief)."""
    from tqdm import tqdm

    run = Path(run)
    strategy = make_strategy(cfg.train.strategy)  # first: MultiWorkerMirrored must precede any TF op
    tf.keras.utils.set_random_seed(cfg.seed)
    _set_op_determinism(cfg.deterministic)
    chief = is_chief(strategy)
    replicas = strategy.num_replicas_in_sync
    tc = cfg.train
    if cfg.data.batch_size % replicas:
        raise LiversegError(f"data.batch_size={cfg.data.batch_size} must be a multiple of the {replicas} replicas")
    rundir.check_resume(run, cfg)
    manifest = pipeline.open_split(cfg, "train")
    h, w = manifest.split("train").slice_shape
    unet.check_input(cfg.model, h, w)
    norm = pipeline.intensity(cfg, manifest)
    channels = 2 * cfg.data.context + 1
    has_val = "val" in manifest.splits and tc.eval_every > 0
    if not has_val:
        log.warning("no validation (%s): no best.weights.h5",
                    "train.eval_every=0" if tc.eval_every == 0 else f"{manifest.root} has no val split")
    if chief:
        run.mkdir(parents=True, exist_ok=True)
        rundir.save_config(run, cfg)
        info = rundir.RunInfo(str(Path(cfg.data.records).resolve()), manifest.sha256,
                              rundir.InputSpec(h, w, channels, cfg.data.context, manifest.size, norm))
        info.save(run)
    else:
        log.info("not the chief: nothing is written to %s", run)

    policy = precision(cfg)
    mixed16 = policy == "mixed_float16"
    with strategy.scope():
        model = unet.build(cfg.model, channels, policy)
        optimizer = objective.optimizer(tc, replicas, mixed16)
        optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    best = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_val_dice")

    # One plain tf.data iterator per worker, feeding its local replicas: unlike TF's
    # DistributedIterator (not trackable, TF issue 56372) it can be checkpointed, so a
    # resumed run continues on the exact next batch.
    iterator = iter(pipeline.build_dataset(cfg, "train", input_context(strategy)))
    next_global_batch = feeder(strategy, iterator)
    tracked = {"model": model, "optimizer": optimizer, "step": step, "best": best}
    if cfg.data.cache:
        log.warning("data.cache: tf.data cannot checkpoint a cache, so a resumed run restarts the data order")
    else:
        tracked["iterator"] = iterator
    ckpt = tf.train.Checkpoint(**tracked)
    ckpt_dir = run / "checkpoints"
    write_dir = ckpt_dir if chief else Path(tempfile.mkdtemp(prefix="liverseg-worker-ckpt-"))
    manager = tf.train.CheckpointManager(ckpt, str(write_dir), max_to_keep=tc.keep_checkpoints)
    latest = tf.train.latest_checkpoint(str(ckpt_dir))
    if latest:
        ckpt.restore(latest).assert_existing_objects_matched()
        log.info("resumed from %s at step %d", latest, int(step.numpy()))
    start = int(step.numpy())

    loss_fn = objective.per_example_loss(tc)
    global_batch = cfg.data.batch_size
    run_steps = build_step(cfg, strategy, model, optimizer, norm, step)

    validate = make_validator(model, cfg, loss_fn) if has_val and chief else None
    writers = ({k: tf.summary.create_file_writer(str(run / k)) for k in ("train", "validation")} if chief
               else {k: tf.summary.create_noop_writer() for k in ("train", "validation")})
    if chief:
        from tensorboard.plugins.hparams import api as hp

        with writers["train"].as_default():
            hp.hparams({k: (str(v) if isinstance(v, list) else v) for k, v in config.flatten(cfg).items()},
                       trial_id=run.name)

    stop = {"sigterm": False}
    preemption = None
    old_handler = None
    if tc.strategy == "multi_worker":
        preemption = tf.distribute.experimental.PreemptionCheckpointHandler(
            strategy.cluster_resolver, manager,
            termination_config=tf.distribute.experimental.TerminationConfig(exit_fn=lambda: sys.exit(PREEMPTED_EXIT)))
    elif hasattr(signal, "SIGTERM"):
        try:
            old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
        except ValueError:  # not the main thread: no signal handling
            old_handler = None

    pending: list[tuple[int, tf.Tensor, tf.Tensor, tf.Tensor]] = []
    window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0}
    streak = {"first": None, "n": 0, "skipped": 0}
    last_saved = int(step.numpy())
    summary: dict = {}
    profiling = False

    def flush() -> dict:
        """Sync pending step results: update the non-finite streak, return interval means."""
        if not pending:
            return {}
        losses, tps = [], np.zeros(3)
        for first, loss, stats, bads in pending:
            loss, stats, bads = loss.numpy(), stats.numpy(), bads.numpy()
            for i, bad in enumerate(bads):
                at = first + i + 1
                if bad > 0:
                    streak["skipped"] += 1
                    streak["n"] += 1
                    streak["first"] = streak["first"] or at
                    if streak["n"] >= tc.max_nonfinite_steps:
                        raise NonFiniteLoss(
                            f"loss or gradients non-finite for steps {streak['first']}-{at} ({streak['n']} in a row); "
                            f"weights were not updated by those steps, last checkpoint: step {last_saved} in {ckpt_dir} "
                            "(lower train.lr, check the data, or use float32)")
                else:
                    streak["n"], streak["first"] = 0, None
                    losses.append(loss[i])
                    tps += stats[i]
        pending.clear()
        return {"loss": float(np.mean(losses)) if losses else float("nan"), "dice": _dice(*tps)}

    def save(at: int) -> None:
        nonlocal last_saved
        if streak["n"]:  # keep the last good checkpoint: never save in the middle of non-finite steps
            log.warning("no checkpoint at step %d: steps %d-%d were non-finite", at, streak["first"], at)
            return
        manager.save(checkpoint_number=at)
        last_saved = at

    bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", disable=not (progress and chief))
    try:
        with pipeline.named_data_errors(cfg, "train"):
            while int(step.numpy()) < tc.steps:
                before = int(step.numpy())
                k = min(tc.steps_per_call, tc.steps - before)
                if tc.profile_steps and chief:
                    if not profiling and tc.profile_steps[0] <= before < tc.profile_steps[1]:
                        tf.profiler.experimental.start(str(run / "train"))
                        profiling = True
                t0 = time.perf_counter()
                batches = [next_global_batch() for _ in range(k)]
                window["wait"] += time.perf_counter() - t0
                losses, stats, bads = run_steps(batches)
                pending.append((before, losses, stats, bads))
                after = before + k
                window["steps"] += k
                bar.update(k)
                if profiling and after >= tc.profile_steps[1]:
                    tf.profiler.experimental.stop()
                    profiling = False
                if every(before, after, tc.log_every) or after == tc.steps:
                    means = flush()
                    dt = time.perf_counter() - window["t0"]
                    lr = float(optimizer.learning_rate.numpy()) if hasattr(optimizer.learning_rate, "numpy") else tc.lr
                    means.update(learning_rate=lr, images_per_sec=window["steps"] * global_batch / dt,
                                 input_wait_fraction=window["wait"] / dt, skipped_steps=streak["skipped"])
                    if mixed16:
                        means["loss_scale"] = float(optimizer.dynamic_scale.numpy())
                    with writers["train"].as_default(step=after):
                        for name, value in means.items():
                            tf.summary.scalar(name, value)
                    bar.set_postfix(loss=f"{means['loss']:.4f}", dice=f"{means['dice']:.3f}",
                                    img_s=f"{means['images_per_sec']:.1f}", wait=f"{means['input_wait_fraction']:.0%}")
                    summary["train"] = means
                    window.update(t0=time.perf_counter(), wait=0.0, steps=0)
                if has_val and chief and (every(before, after, tc.eval_every) or after == tc.steps):
                    flush()
                    metrics, images = validate(tc.num_images)
                    with writers["validation"].as_default(step=after):
                        for name, value in metrics.items():
                            tf.summary.scalar(name, value)
                        if images:
                            tf.summary.image("overlay (green truth, red prediction)", np.stack(images) / 255.0,
                                             max_outputs=len(images))
                    if metrics["dice_3d"] > best.numpy():
                        best.assign(metrics["dice_3d"])
                        _save_weights(model, run / "best.weights.h5")
                        summary["best_step"] = after
                    summary["validation"] = metrics
                    log.info("step %d: validation %s", after, {k: round(v, 4) for k, v in metrics.items()})
                if every(before, after, tc.checkpoint_every) or after == tc.steps:
                    flush()
                    save(after)
                if preemption is not None:
                    preemption.save_checkpoint_if_preempted()
                if stop["sigterm"]:
                    flush()
                    save(after)
                    raise Preempted(after)
    finally:
        bar.close()
        if profiling:
            tf.profiler.experimental.stop()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        for wr in writers.values():
            wr.flush()
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)

    final = int(step.numpy())
    summary.update(step=final, best_val_dice_3d=float(best.numpy()) if best.numpy() >= 0 else None,
                   weights_fingerprint=weights_fingerprint(model), replicas=replicas)
    log.info("finished at step %d, weights %s", final, summary["weights_fingerprint"])
    if chief:
        _save_weights(model, run / "final.weights.h5")
        dataclasses.replace(info, result={k: v for k, v in summary.items() if k != "train"}).save(run)
    return summary


__all__ = ["NonFiniteLoss", "PREEMPTED_EXIT", "Preempted", "build_step", "feeder", "make_strategy", "make_validator", "train"]
