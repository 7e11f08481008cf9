"""The trainer's periodic hooks: log, validate, checkpoint, the non-finite streak, preempt,
and the profiler window.

`Hooks` is built by `train.Trainer` with everything it uses named in its constructor (a
dataclass: the fields are the contract). After each call of the compiled step the loop
calls `after_call(before, after, staged, last, window)` with its own timing of the log
window, and gets back a `Report` (the figures made, the seconds paused); each hook runs
when the step count crosses its interval (`every`). This is where the host reads device values: the training figures
(`step.Accumulators`) at log and checkpoint intervals, and the non-finite streak every
`max_nonfinite_steps` steps (so a diverged run stops within that many more steps, whatever
`log_every` is). The loop itself reads only the step counter of one call per log window,
which it times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import shutil
import signal
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from liverseg import TERMINATE, LiversegError, config, metrics, storage
from liverseg.config import Config, TrainConfig
from liverseg.rundir import RunDir
from liverseg.step import TrainState
from liverseg.unet import save_weights

log = logging.getLogger(__name__)
PREEMPTED_EXIT = 42  # TensorFlow's "preempted, restart me" exit status


class Preempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint."""

    def __init__(self, at: int, saved: int):
        where = "checkpoint saved" if saved == at else f"last checkpoint: step {saved}"
        super().__init__(f"stopped by SIGTERM at step {at}; {where}; run the same command to resume")
        self.step = at


class NonFiniteLoss(LiversegError):
    pass


def every(before: int, after: int, n: int) -> bool:
    """Did the step count cross a multiple of n going from `before` to `after`?"""
    return n > 0 and after // n > before // n


def stop_requested() -> bool:
    """SIGTERM arrived: during the run, or before it (the CLI sets TERMINATE from its first line)."""
    return TERMINATE.is_set()


@contextlib.contextmanager
def sigterm_stops(multi_worker: bool):
    """SIGTERM asks the loop to checkpoint and stop (sets TERMINATE) for the block; under
    multi-worker TF's preemption handler catches it instead."""
    old = None
    if not multi_worker:
        with contextlib.suppress(ValueError):  # not the main thread: no signal handling
            old = signal.signal(signal.SIGTERM, lambda *_: TERMINATE.set())
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


@dataclasses.dataclass
class LogWindow:
    """Timing of one log interval, kept by the training loop: wall time, hook pauses, host time
    blocked on input, steps and images, and one call timed on its own (the device time per
    step when inputs are ready)."""

    t0: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0
    images: int = 0
    paused: float = 0.0
    input_wait: float = 0.0
    step_time: float | None = None  # seconds per step of the timed call

    def call(self, run_steps, batches, upcoming, k: int, token, first: bool):
        """run_steps(batches, upcoming) for `k` steps; once per window (not the first call: it
        compiles) timed on its own, the queue drained before and after (`token`: the previous
        call's device value): the device time per step when inputs are ready."""
        if self.step_time is not None or first or token is None:
            return run_steps(batches, upcoming)
        int(token)
        t = time.perf_counter()
        staged, token = run_steps(batches, upcoming)
        int(token)
        self.step_time = (time.perf_counter() - t) / k
        return staged, token

    def busy_fraction(self, wall: float) -> float | None:
        return None if self.step_time is None or wall <= 0 else min(1.0, self.steps * self.step_time / wall)


@dataclasses.dataclass
class Report:
    """What the hooks did after one call: seconds spent in validation and checkpoints, and the
    figures they produced (the log window's, the validation's, the step of a new best)."""

    paused: float = 0.0
    train: dict | None = None
    validation: dict | None = None
    best_step: int | None = None


def writers(cfg: Config, paths: RunDir, chief: bool) -> dict:
    """TensorBoard writers "train" and "validation" (the chief's, with the run's hyperparameters;
    no-op writers on the other workers)."""
    if not chief:
        return {k: tf.summary.create_noop_writer() for k in ("train", "validation")}
    from tensorboard.plugins.hparams import api as hp

    out = {k: tf.summary.create_file_writer(str(paths.board(k))) for k in ("train", "validation")}
    with out["train"].as_default():
        hp.hparams(
            {k: (str(v) if isinstance(v, list) else v) for k, v in config.flatten(cfg).items()},
            trial_id=paths.root.name,
        )
    return out


@dataclasses.dataclass
class Hooks:
    """The periodic work of a training run. It keeps only what lasts between calls (the step
    of the last checkpoint, the profiler's state); the loop hands it each call's window."""

    tc: TrainConfig
    paths: RunDir
    chief: bool
    state: TrainState  # model, optimizer, step, best validation Dice, the on-device figures
    manager: tf.train.CheckpointManager
    sync_bn: Callable[[], None]  # average batch-norm statistics across replicas (a collective: every worker)
    validating: bool  # validation runs (on every worker: its batch-norm sync is a collective)
    validator: Callable | None  # validation.make_validator's function, on the chief
    writers: dict  # TensorBoard writers "train" and "validation" (no-op writers off the chief)
    preemption: object | None  # TF's PreemptionCheckpointHandler under multi-worker
    last_saved: int  # step of the last checkpoint written (or restored)
    saved: Callable[[int], None] = lambda at: None  # told of each checkpoint written (run.json's time budget)
    profiling: bool = False

    def after_call(self, before: int, after: int, staged: bool, last: bool, window: LogWindow) -> Report:
        """The hooks due after a call that took the step count from `before` to `after`
        (`staged`: the next call's batches are already on the devices; `last`: the run's end;
        `window`: the loop's timing since the last log)."""
        tc, report = self.tc, Report()
        if every(before, after, tc.log_every) or last:
            report.train = self.log(after, window)
        elif every(before, after, tc.max_nonfinite_steps):
            self._figures(after, reset=False)  # the streak check alone
        if self.validating and (every(before, after, tc.eval_every) or last):
            t = time.perf_counter()
            report.validation, report.best_step = self.validate(after)
            report.paused += time.perf_counter() - t
        if every(before, after, tc.checkpoint_every) or last:
            t = time.perf_counter()
            self.checkpoint(after)
            report.paused += time.perf_counter() - t
        self.preempt(after, staged)
        return report

    def profile(self, at: int) -> None:
        """Start or stop the profiler trace of train.profile_steps (the chief only)."""
        window = self.tc.profile_steps
        if not (window and self.chief):
            return
        if not self.profiling and window[0] <= at < window[1]:
            tf.profiler.experimental.start(str(self.paths.board("train")))
            self.profiling = True
        elif self.profiling and at >= window[1]:
            tf.profiler.experimental.stop()
            self.profiling = False

    def _figures(self, at: int, reset: bool) -> dict:
        """Read the on-device figures (a sync) and stop on a persistent non-finite streak."""
        fig = self.state.figures.read(reset)
        if fig["streak"] >= self.tc.max_nonfinite_steps:
            raise NonFiniteLoss(
                f"loss or gradients non-finite for steps {fig['streak_first']}-{at} ({fig['streak']} in a row); "
                f"weights were not updated by those steps, last checkpoint: step {self.last_saved} in "
                f"{self.manager.directory} (lower train.lr, check the data, or use float32)"
            )
        return fig

    def log(self, at: int, w: LogWindow) -> dict:
        """The window's training figures, written to TensorBoard and returned."""
        fig = self._figures(at, reset=True)
        wall = time.perf_counter() - w.t0 - w.paused
        busy = w.busy_fraction(wall)
        optimizer = self.state.optimizer
        lr = optimizer.learning_rate
        means = {
            "loss": fig["loss_sum"] / fig["applied"] if fig["applied"] else float("nan"),
            "dice": metrics.dice_from_counts(*fig["counts"]),
            "learning_rate": float(lr.numpy()) if hasattr(lr, "numpy") else self.tc.lr,
            "images_per_sec": w.images / wall,
            "host_input_wait_fraction": w.input_wait / wall,
            "skipped_steps": fig["skipped"],
        }
        if busy is not None:
            means["input_wait_fraction"] = 1.0 - busy  # device idle: input, or anything else the host did
        if hasattr(optimizer, "dynamic_scale"):  # a LossScaleOptimizer (mixed_float16)
            means["loss_scale"] = float(optimizer.dynamic_scale.numpy())
        with self.writers["train"].as_default(step=at):
            for name, value in means.items():
                tf.summary.scalar(name, value)
        return means

    def validate(self, at: int) -> tuple[dict | None, int | None]:
        """(the validation figures, `at` when they are a new best) on the chief; every worker
        syncs its batch-norm statistics first (a collective)."""
        self.sync_bn()
        if self.validator is None:
            return None, None
        result, images = self.validator(self.tc.num_images)
        with self.writers["validation"].as_default(step=at):
            for name, value in result.items():
                tf.summary.scalar(name, value)
            if images:
                tf.summary.image(
                    "overlay (green truth, red prediction)", np.stack(images) / 255.0, max_outputs=len(images)
                )
        log.info("step %d: validation %s", at, {k: round(v, 4) for k, v in result.items()})
        if result["dice_3d"] > self.state.best.numpy():
            self.state.best.assign(result["dice_3d"])
            save_weights(self.state.model, self.paths.best_weights)
            return result, at
        return result, None

    def checkpoint(self, at: int) -> None:
        fig = self._figures(at, reset=False)
        if fig["streak"]:  # keep the last good checkpoint: never save in the middle of non-finite steps
            log.warning("no checkpoint at step %d: steps %d-%d were non-finite", at, fig["streak_first"], at)
        else:
            self.sync_bn()
            self._save(at)
            self.last_saved = at
            self.saved(at)

    def _save(self, at: int) -> None:
        """manager.save, a full disk said in one line with TF's half-written `ckpt-N_temp` removed."""
        directory = storage.path(self.manager.directory)
        try:
            self.manager.save(checkpoint_number=at)
        except (tf.errors.OpError, OSError) as e:
            message = getattr(e, "message", None) or str(e)
            if getattr(e, "errno", None) != errno.ENOSPC and "No space left on device" not in message:
                raise
            for partial in directory.glob(f"ckpt-{at}_temp*"):
                shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
            raise LiversegError(
                f"{directory}: no space left on device writing the checkpoint of step {at}; the last "
                f"checkpoint is step {self.last_saved}: free space and run the same command to resume "
                "from it"
            ) from None

    def preempt(self, at: int, staged: bool) -> None:
        """SIGTERM: checkpoint (unless this step's hook just did) and stop. With batches staged
        on the devices, their call runs first, so the checkpoint's iterator is where training is."""
        if self.preemption is not None:
            self.preemption.save_checkpoint_if_preempted()
        elif stop_requested() and not staged:
            if self.last_saved != at:
                self.checkpoint(at)
            raise Preempted(at, self.last_saved)

    def close(self) -> None:
        if self.profiling:
            tf.profiler.experimental.stop()
            self.profiling = False
        for wr in self.writers.values():
            wr.flush()
