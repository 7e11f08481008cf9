"""The training loop: one GPU, several GPUs (Mirrored) or several hosts (MultiWorkerMirrored).

A custom loop, because Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy (keras
issue 20585). It reads top to bottom:

    set-up   strategy (first), run directory, model / optimizer / counters in strategy
             scope, input iterator, checkpoint (restored), the compiled step (`step`),
             validation (`validate`), TensorBoard writers
    loop     run a call of `steps_per_call` compiled steps; the call also copies the next
             call's batches onto the devices (drawn before it, unless a checkpoint is due)
    hooks    log, validate, checkpoint, preempt (`hooks.Hooks`): each when the step count
             crosses its interval, and each the only place the host reads device values

* Non-finite steps are skipped on every replica (`step.apply_or_skip`); a streak of
  `max_nonfinite_steps` stops the run naming the steps, and no checkpoint is written
  during a streak, so the last checkpoint is good.
* The checkpoint holds model, optimizer, step, best validation Dice and the tf.data
  iterator: re-running on the same run directory continues on the exact next batch (from
  the newest checkpoint that restores, `rundir.restore_newest`; the chief holds the run
  lock). Through the tf.data service the iterator cannot be saved: a count of restarts is,
  and each restart reads a freshly seeded job.
* SIGTERM saves a checkpoint and ends with `Preempted` (exit status 42, TF's "preempted,
  restart me" convention); under multi-worker, TF's PreemptionCheckpointHandler
  coordinates the save across workers.
* Only the chief writes into the run directory; other workers checkpoint to a temporary
  folder (deleted at the end) and write no logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import tensorflow as tf

from liverseg import (TERMINATE, LiversegError, config, data_service, objective, pipeline, rundir, step,
                      unet, validate)
from liverseg.config import Config
from liverseg.hooks import PREEMPTED_EXIT, Hooks, NonFiniteLoss, Preempted, Window, every, save_weights, weights_fingerprint

log = logging.getLogger(__name__)


def _within(seconds: float, fn, *args, what: str):
    """fn(*args), or LiversegError(what) when it has not returned after `seconds` (it is left
    running in a daemon thread: a tf.data service iterator waiting for workers cannot be interrupted)."""
    done, out = threading.Event(), {}

    def call():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = e
        done.set()

    threading.Thread(target=call, daemon=True).start()
    if not done.wait(seconds):
        raise LiversegError(what)
    if "error" in out:
        raise out["error"]
    return out["value"]


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


class Trainer(Hooks):
    """Set-up in __init__, then `loop()`, then `finish()`; the hooks are `hooks.Hooks`."""

    def __init__(self, cfg: Config, run: Path, progress: bool = True):
        self.cfg, self.tc, self.run = cfg, cfg.train, run
        self.strategy = step.make_strategy(cfg.train.strategy)  # first: MultiWorkerMirrored must precede any TF op
        tf.keras.utils.set_random_seed(cfg.seed)
        _set_op_determinism(cfg.deterministic)
        self.chief = step.is_chief(self.strategy)
        self.replicas = self.strategy.num_replicas_in_sync
        self.local = len(self.strategy.extended.worker_devices)
        self.global_batch = pipeline.global_batch(cfg, self.replicas)
        self.manifest, self.info = self._check_inputs()
        self.cleanup = contextlib.ExitStack()  # the run lock, a worker's temporary folder: released by close()
        try:
            self._set_up(progress)
        except BaseException:
            self.cleanup.close()
            raise

    def _set_up(self, progress: bool) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        self._claim_run()
        self._build_state()
        self._build_input_and_checkpoint()
        self.run_steps = step.build_train_step(cfg, self.strategy, self.model, self.optimizer, self.info.input.intensity,
                                               self.step_var, self.acc)
        self.sync_bn = step.batch_norm_sync(self.strategy, self.model)
        self.has_val = "val" in self.manifest.splits and self.tc.eval_every > 0
        if not self.has_val:
            log.warning("no validation (%s): no best.weights.h5", "train.eval_every=0" if self.tc.eval_every == 0
                        else f"{self.manifest.root} has no val split")
        self.validate = (validate.make_validator(self.model, cfg, objective.per_example_loss(self.tc), len(self.manifest.cases))
                         if self.has_val and self.chief else None)
        self.writers = self._writers()
        self.bar = tqdm(total=self.tc.steps, initial=self.at, desc="train", unit="step", disable=not (progress and self.chief))
        self.window, self.summary, self.profiling, self.calls = Window(), {}, False, 0

    # ------------------------------------------------------------------ set-up

    def _check_inputs(self) -> tuple:
        """Everything about the inputs that can be checked before anything is written."""
        cfg = self.cfg
        if self.global_batch % self.replicas:
            raise LiversegError(f"data.batch_size={cfg.data.batch_size} must be a multiple of the {self.replicas} replicas")
        manifest = pipeline.open_split(cfg, "train")
        h, w = manifest.split("train").slice_shape
        unet.check_input(cfg.model, h, w)
        pipeline.check_context(cfg, manifest)
        if cfg.data.service:
            data_service.check_reachable(cfg.data.service)
        spec = rundir.InputSpec(h, w, 2 * cfg.data.context + 1, cfg.data.context, manifest.size,
                                pipeline.intensity(cfg, manifest), manifest.spacing)
        return manifest, rundir.RunInfo(str(Path(cfg.data.records).resolve()), manifest.sha256, spec)

    def _claim_run(self) -> None:
        """The chief locks the run directory, checks that a resumed run keeps its recipe and its
        dataset, and only then writes config.yaml and run.json."""
        if not self.chief:
            log.info("not the chief: nothing is written to %s", self.run)
            return
        self.cleanup.enter_context(rundir.claim(self.run))
        rundir.check_resume(self.run, self.cfg)
        rundir.check_dataset(self.run, self.info)
        rundir.save_config(self.run, self.cfg)
        self.info.save(self.run)

    def _build_state(self) -> None:
        policy = step.precision(self.cfg)
        self.mixed16 = policy == "mixed_float16"
        lr_scale = self.replicas if self.cfg.data.batch_per_replica else 1
        with self.strategy.scope():
            self.model = unet.build(self.cfg.model, self.info.input.channels, policy)
            self.optimizer = objective.optimizer(self.tc, self.mixed16, lr_scale)
            self.optimizer.build(self.model.trainable_variables)
            self.acc = step.Accumulators()
        self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.best = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_val_dice")

    def dataset(self) -> tf.data.Dataset:
        """This worker's training batches (`liverseg bench train` substitutes batches already in memory).

        On the tf.data service, each start of the run reads a job of its own, seeded by the
        number of restarts: a fresh data order, the same for every trainer of the run."""
        cfg, job = self.cfg, "liverseg"
        if cfg.data.service:
            restarts = int(self.restarts.numpy())
            cfg = config.replace(cfg, seed=cfg.seed + 7919 * restarts)
            job = f"liverseg-{self.info.manifest_sha256[:12]}-{self.run.name}-{restarts}"
        return pipeline.build_dataset(cfg, "train", step.input_context(self.strategy), service_job=job)

    def _build_input_and_checkpoint(self) -> None:
        # One plain tf.data iterator per worker, feeding its local replicas: unlike TF's
        # DistributedIterator (not trackable, TF issue 56372) it can be checkpointed, so a
        # resumed run continues on the exact next batch. A cache or the tf.data service
        # cannot be checkpointed: then a resumed run continues with a fresh data order.
        tracked = {"model": self.model, "optimizer": self.optimizer, "step": self.step_var, "best": self.best}
        service = self.cfg.data.service
        if service:
            log.warning("data.service %s: the service's position cannot be checkpointed, so a resumed run continues "
                        "with a fresh, non-repeating data order, not the exact next batch", service)
            self.restarts = tf.Variable(0, dtype=tf.int64, trainable=False, name="input_restarts")
            tracked["input_restarts"] = self.restarts
        else:
            self.iterator = iter(self.dataset())
            if self.cfg.data.cache:
                log.warning("data.cache: tf.data cannot checkpoint a cache, so a resumed run restarts the data order")
            else:
                tracked["iterator"] = self.iterator
        self.ckpt = tf.train.Checkpoint(**tracked)
        self.ckpt_dir = self.run / rundir.CHECKPOINTS
        # Every worker restores from the chief's checkpoints; only the chief repairs them.
        restored = rundir.restore_newest(self.ckpt, self.ckpt_dir, repair=self.chief)
        if service:
            if restored is not None:
                self.restarts.assign_add(1)
            self.iterator = iter(self.dataset())
        if self.chief:
            self.write_dir = self.ckpt_dir
        else:
            resolver = self.strategy.cluster_resolver
            self.write_dir = rundir.worker_checkpoint_dir(self.run, f"{resolver.task_type}{resolver.task_id}")
            self.cleanup.callback(shutil.rmtree, self.write_dir, ignore_errors=True)
        self.manager = tf.train.CheckpointManager(self.ckpt, str(self.write_dir), max_to_keep=self.tc.keep_checkpoints)
        self.at = self.last_saved = int(self.step_var.numpy())  # the one read of the step counter
        if restored is not None:
            log.info("resumed from %s at step %d", self.ckpt_dir / f"ckpt-{restored}", self.at)

    def _writers(self) -> dict:
        if not self.chief:
            return {k: tf.summary.create_noop_writer() for k in ("train", "validation")}
        from tensorboard.plugins.hparams import api as hp

        writers = {k: tf.summary.create_file_writer(str(self.run / k)) for k in ("train", "validation")}
        with writers["train"].as_default():
            hp.hparams({k: (str(v) if isinstance(v, list) else v) for k, v in config.flatten(self.cfg).items()},
                       trial_id=self.run.name)
        return writers

    @property
    def stop_requested(self) -> bool:
        """SIGTERM arrived: during the run, or before it (the CLI sets TERMINATE from its first line)."""
        return TERMINATE.is_set()

    @contextlib.contextmanager
    def signals(self):
        """SIGTERM asks the loop to checkpoint and stop (multi-worker: TF's handler does it)."""
        self.preemption, old = None, None
        if self.tc.strategy == "multi_worker":
            self.preemption = tf.distribute.experimental.PreemptionCheckpointHandler(
                self.strategy.cluster_resolver, self.manager,
                termination_config=tf.distribute.experimental.TerminationConfig(exit_fn=lambda: sys.exit(PREEMPTED_EXIT)))
        else:
            with contextlib.suppress(ValueError):  # not the main thread: no signal handling
                old = signal.signal(signal.SIGTERM, lambda *_: TERMINATE.set())
        try:
            yield
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)

    # ------------------------------------------------------------------ the loop

    def loop(self) -> None:
        tc, staged, token = self.tc, [], None
        self.preempt_hook(self.at, staged=False)  # SIGTERM during set-up
        with pipeline.named_data_errors(self.cfg, "train"):
            while self.at < tc.steps:
                before = self.at
                k = len(staged) or min(tc.steps_per_call, tc.steps - before)
                batches = staged or self._draw(k)
                after = before + k
                k_next = min(tc.steps_per_call, tc.steps - after)
                ahead = (tc.device_prefetch and k_next > 0 and not self.stop_requested
                         and not every(before, after, tc.checkpoint_every))  # checkpoints see nothing drawn ahead
                upcoming = self._draw(k_next) if ahead else []
                self._profile(before)
                # Once per log window (not the first call: it compiles) one call is timed on its own,
                # queue drained before and after: the device time per step when inputs are ready.
                timed = self.window.step_time is None and self.calls > 0 and token is not None
                if timed:
                    int(token)
                    t = time.perf_counter()
                staged, token = self.run_steps(batches, upcoming)
                if timed:
                    int(token)
                    self.window.step_time = (time.perf_counter() - t) / k
                self.calls += 1
                self.at = after
                self.window.steps += k
                self.bar.update(k)
                self.hooks(before, after, bool(staged))

    def _draw(self, k: int) -> list:
        t = time.perf_counter()
        if self.cfg.data.service:
            batches = _within(self.cfg.data.service_timeout_s, step.draw, self.iterator, k, self.local,
                              what=f"no batch from the tf.data service at {self.cfg.data.service} for "
                                   f"{self.cfg.data.service_timeout_s:g} s (data.service_timeout_s): are its workers "
                                   "running? (liverseg data-service worker --dispatcher ...)")
        else:
            batches = step.draw(self.iterator, k, self.local)
        self.window.input_wait += time.perf_counter() - t
        return batches

    # ------------------------------------------------------------------ the end

    def close(self) -> None:
        self.bar.close()
        if self.profiling:
            tf.profiler.experimental.stop()
        for wr in self.writers.values():
            wr.flush()
        self.cleanup.close()

    def finish(self) -> dict:
        self.sync_bn()
        best = float(self.best.numpy())
        self.summary.update(step=self.at, best_val_dice_3d=best if best >= 0 else None,
                            weights_fingerprint=weights_fingerprint(self.model), replicas=self.replicas)
        log.info("finished at step %d, weights %s", self.at, self.summary["weights_fingerprint"])
        if self.chief:
            save_weights(self.model, self.run / "final.weights.h5")
            result = {k: v for k, v in self.summary.items() if k != "train"}
            dataclasses.replace(self.info, result=result).save(self.run)
        return self.summary


def train(cfg: Config, run: str | Path, progress: bool = True) -> dict:
    """Train (or resume) in `run`. Returns the summary also written to RUN/run.json (chief)."""
    trainer = Trainer(cfg, Path(run), progress)
    try:
        with trainer.signals(), lost_workers_explained(trainer):
            trainer.loop()
            return trainer.finish()
    finally:
        trainer.close()


@contextlib.contextmanager
def lost_workers_explained(trainer: Trainer):
    """Under multi-worker, a peer that died or became unreachable surfaces as a collective's
    UnavailableError (or a deadline/abort) with a long trace: say it in one line instead."""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError) as e:
        if trainer.tc.strategy != "multi_worker":
            raise
        first = (e.message or type(e).__name__).strip().splitlines()[0][:200]
        raise LiversegError(f"lost contact with a worker of the cluster ({type(e).__name__}: {first}); restart every "
                            f"worker with the same command: training resumes from the last checkpoint "
                            f"(step {trainer.last_saved} in {trainer.ckpt_dir})") from None


__all__ = ["NonFiniteLoss", "PREEMPTED_EXIT", "Preempted", "Trainer", "every", "train"]
