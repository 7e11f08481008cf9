"""The trainer's periodic hooks: log, validate, checkpoint, the non-finite streak, preempt,
and the profiler window.

`Hooks` is built by `train.Trainer` with everything it uses named in its constructor (a
dataclass: the fields are the contract). After each call of the compiled step the loop
calls `after_call(before, after, staged, last)`; each hook runs when the step count crosses
its interval (`every`). This is where the host reads device values: the training figures
(`step.Accumulators`) at log and checkpoint intervals, and the non-finite streak every
`max_nonfinite_steps` steps (so a diverged run stops within that many more steps, whatever
`log_every` is). The loop itself reads only the step counter of one call per log window,
which it times.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from liverseg import TERMINATE, LiversegError, metrics
from liverseg.outputs import atomic_path
from liverseg.config import TrainConfig
from liverseg.rundir import RunDir

log = logging.getLogger("liverseg.train")
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


def weights_fingerprint(model) -> str:
    h = hashlib.sha256()
    for w in model.weights:
        h.update(np.ascontiguousarray(w.value.numpy()).tobytes())
    return h.hexdigest()[:16]


def save_weights(model, path: Path) -> None:
    with atomic_path(path) as tmp:
        model.save_weights(str(tmp))


@dataclasses.dataclass
class LogWindow:
    """Timing of one log interval: wall time, hook pauses, host time blocked on input, and
    one call timed on its own (the device time per step when inputs are ready)."""

    t0: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0
    paused: float = 0.0
    input_wait: float = 0.0
    step_time: float | None = None  # seconds per step of the timed call

    def busy_fraction(self, wall: float) -> float | None:
        return None if self.step_time is None or wall <= 0 else min(1.0, self.steps * self.step_time / wall)


@dataclasses.dataclass
class Hooks:
    """The periodic work of a training run, and the state it keeps between calls."""

    tc: TrainConfig
    paths: RunDir
    chief: bool
    model: object
    optimizer: object
    acc: object  # step.Accumulators: the on-device training figures
    best: tf.Variable  # best validation 3D Dice so far (checkpointed)
    manager: tf.train.CheckpointManager
    sync_bn: Callable[[], None]  # average batch-norm statistics across replicas (a collective: every worker)
    validating: bool  # validation runs (on every worker: its batch-norm sync is a collective)
    validator: Callable | None  # validation.make_validator's function, on the chief
    writers: dict  # TensorBoard writers "train" and "validation" (no-op writers off the chief)
    global_batch: int
    mixed16: bool  # a LossScaleOptimizer: log its scale
    preemption: object | None  # TF's PreemptionCheckpointHandler under multi-worker
    bar: object  # the tqdm progress bar
    last_saved: int  # step of the last checkpoint written (or restored)
    window: LogWindow = dataclasses.field(default_factory=LogWindow)
    summary: dict = dataclasses.field(default_factory=dict)  # last figures, returned by Trainer.finish
    paused_total: float = 0.0  # seconds spent in validation and checkpoints, over the whole run
    profiling: bool = False

    def after_call(self, before: int, after: int, staged: bool, last: bool) -> None:
        """The hooks due after a call that took the step count from `before` to `after`
        (`staged`: the next call's batches are already on the devices; `last`: the run's end)."""
        tc = self.tc
        if every(before, after, tc.log_every) or last:
            self.log(after)
        elif every(before, after, tc.max_nonfinite_steps):
            self._figures(after, reset=False)  # the streak check alone
        if self.validating and (every(before, after, tc.eval_every) or last):
            self.validate(after)
        if every(before, after, tc.checkpoint_every) or last:
            self.checkpoint(after)
        self.preempt(after, staged)

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
        fig = self.acc.read(reset)
        if fig["streak"] >= self.tc.max_nonfinite_steps:
            raise NonFiniteLoss(
                f"loss or gradients non-finite for steps {fig['streak_first']}-{at} ({fig['streak']} in a row); "
                f"weights were not updated by those steps, last checkpoint: step {self.last_saved} in "
                f"{self.manager.directory} (lower train.lr, check the data, or use float32)")
        return fig

    def log(self, at: int) -> None:
        fig = self._figures(at, reset=True)
        w = self.window
        wall = time.perf_counter() - w.t0 - w.paused
        busy = w.busy_fraction(wall)
        lr = self.optimizer.learning_rate
        means = {"loss": fig["loss_sum"] / fig["applied"] if fig["applied"] else float("nan"),
                 "dice": metrics.dice_from_counts(*fig["counts"]),
                 "learning_rate": float(lr.numpy()) if hasattr(lr, "numpy") else self.tc.lr,
                 "images_per_sec": w.steps * self.global_batch / wall,
                 "host_input_wait_fraction": w.input_wait / wall,
                 "skipped_steps": fig["skipped"]}
        if busy is not None:
            means["input_wait_fraction"] = 1.0 - busy  # device idle: input, or anything else the host did
        if self.mixed16:
            means["loss_scale"] = float(self.optimizer.dynamic_scale.numpy())
        with self.writers["train"].as_default(step=at):
            for name, value in means.items():
                tf.summary.scalar(name, value)
        self.bar.set_postfix(loss=f"{means['loss']:.4f}", dice=f"{means['dice']:.3f}",
                             img_s=f"{means['images_per_sec']:.1f}", idle=f"{means.get('input_wait_fraction', 0):.0%}")
        self.summary["train"] = means
        self.window = LogWindow()

    def validate(self, at: int) -> None:
        t = time.perf_counter()
        self.sync_bn()  # every worker: a collective
        if self.validator is not None:
            result, images = self.validator(self.tc.num_images)
            with self.writers["validation"].as_default(step=at):
                for name, value in result.items():
                    tf.summary.scalar(name, value)
                if images:
                    tf.summary.image("overlay (green truth, red prediction)", np.stack(images) / 255.0,
                                     max_outputs=len(images))
            if result["dice_3d"] > self.best.numpy():
                self.best.assign(result["dice_3d"])
                save_weights(self.model, self.paths.best_weights)
                self.summary["best_step"] = at
            self.summary["validation"] = result
            log.info("step %d: validation %s", at, {k: round(v, 4) for k, v in result.items()})
        self._pause(t)

    def checkpoint(self, at: int) -> None:
        t = time.perf_counter()
        fig = self._figures(at, reset=False)
        if fig["streak"]:  # keep the last good checkpoint: never save in the middle of non-finite steps
            log.warning("no checkpoint at step %d: steps %d-%d were non-finite", at, fig["streak_first"], at)
        else:
            self.sync_bn()
            self._save(at)
            self.last_saved = at
        self._pause(t)

    def _save(self, at: int) -> None:
        """manager.save, a full disk said in one line with TF's half-written `ckpt-N_temp` removed."""
        directory = Path(self.manager.directory)
        try:
            self.manager.save(checkpoint_number=at)
        except (tf.errors.OpError, OSError) as e:
            message = getattr(e, "message", None) or str(e)
            if getattr(e, "errno", None) != errno.ENOSPC and "No space left on device" not in message:
                raise
            for partial in directory.glob(f"ckpt-{at}_temp*"):
                shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
            raise LiversegError(f"{directory}: no space left on device writing the checkpoint of step {at}; the last "
                                f"checkpoint is step {self.last_saved}: free space and run the same command to resume "
                                "from it") from None

    def preempt(self, at: int, staged: bool) -> None:
        """SIGTERM: checkpoint (unless this step's hook just did) and stop. With batches staged
        on the devices, their call runs first, so the checkpoint's iterator is where training is."""
        if self.preemption is not None:
            self.preemption.save_checkpoint_if_preempted()
        elif stop_requested() and not staged:
            if self.last_saved != at:
                self.checkpoint(at)
            raise Preempted(at, self.last_saved)

    def _pause(self, since: float) -> None:
        spent = time.perf_counter() - since
        self.window.paused += spent
        self.paused_total += spent

    def close(self) -> None:
        if self.profiling:
            tf.profiler.experimental.stop()
            self.profiling = False
        for wr in self.writers.values():
            wr.flush()
