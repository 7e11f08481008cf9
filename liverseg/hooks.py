"""The trainer's periodic hooks: log, validate, checkpoint, preempt (and the profiler window).

Each runs when the step count crosses its interval (`every`), and each is the only place
the host reads device values: the training figures are summed on the device
(`step.Accumulators`) and read here, once per interval. `Hooks` is mixed into
`train.Trainer` and uses the state its set-up built (config, accumulators, writers,
checkpoint manager, validator, the timing `Window`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from liverseg import LiversegError, atomic_path, metrics

log = logging.getLogger("liverseg.train")
PREEMPTED_EXIT = 42


class Preempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint."""

    def __init__(self, at: int):
        super().__init__(f"stopped by SIGTERM at step {at}; checkpoint saved; run the same command to resume")
        self.step = at


class NonFiniteLoss(LiversegError):
    pass


def every(before: int, after: int, n: int) -> bool:
    """Did the step count cross a multiple of n going from `before` to `after`?"""
    return n > 0 and after // n > before // n


def weights_fingerprint(model) -> str:
    h = hashlib.sha256()
    for w in model.weights:
        h.update(np.ascontiguousarray(w.value.numpy()).tobytes())
    return h.hexdigest()[:16]


def save_weights(model, path: Path) -> None:
    with atomic_path(path) as tmp:
        model.save_weights(str(tmp))


@dataclasses.dataclass
class Window:
    """Timing of one log interval: wall time, hook pauses, host time blocked on input, and
    one call timed on its own (the device time per step when inputs are ready)."""

    t0: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0
    paused: float = 0.0
    input_wait: float = 0.0
    step_time: float | None = None  # seconds per step of the timed call

    def busy_fraction(self, wall: float) -> float | None:
        return None if self.step_time is None or wall <= 0 else min(1.0, self.steps * self.step_time / wall)


class Hooks:
    """log_hook, validate_hook, checkpoint_hook, preempt_hook, called by `hooks` after each call."""

    def _profile(self, at: int) -> None:
        window = self.tc.profile_steps
        if not (window and self.chief):
            return
        if not self.profiling and window[0] <= at < window[1]:
            tf.profiler.experimental.start(str(self.run / "train"))
            self.profiling = True
        elif self.profiling and at >= window[1]:
            tf.profiler.experimental.stop()
            self.profiling = False

    def hooks(self, before: int, after: int, staged: bool) -> None:
        tc, last = self.tc, after == self.tc.steps
        if every(before, after, tc.log_every) or last:
            self.log_hook(after)
        if self.has_val and (every(before, after, tc.eval_every) or last):
            self.validate_hook(after)
        if every(before, after, tc.checkpoint_every) or last:
            self.checkpoint_hook(after)
        self.preempt_hook(after, staged)

    def _read_figures(self, at: int, reset: bool) -> dict:
        """Read the on-device figures (a sync) and stop on a persistent non-finite streak."""
        fig = self.acc.read(reset)
        if fig["streak"] >= self.tc.max_nonfinite_steps:
            raise NonFiniteLoss(
                f"loss or gradients non-finite for steps {fig['streak_first']}-{at} ({fig['streak']} in a row); "
                f"weights were not updated by those steps, last checkpoint: step {self.last_saved} in {self.ckpt_dir} "
                "(lower train.lr, check the data, or use float32)")
        return fig

    def log_hook(self, at: int) -> None:
        fig = self._read_figures(at, reset=True)
        w = self.window
        wall = time.perf_counter() - w.t0 - w.paused
        busy = w.busy_fraction(wall)
        means = {"loss": fig["loss_sum"] / fig["applied"] if fig["applied"] else float("nan"),
                 "dice": metrics.dice_from_counts(*fig["counts"]),
                 "learning_rate": float(self.optimizer.learning_rate.numpy()) if hasattr(self.optimizer.learning_rate, "numpy")
                 else self.tc.lr,
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
        self.window = Window()

    def validate_hook(self, at: int) -> None:
        t = time.perf_counter()
        self.sync_bn()  # every worker: a collective
        if self.validate is not None:
            result, images = self.validate(self.tc.num_images)
            with self.writers["validation"].as_default(step=at):
                for name, value in result.items():
                    tf.summary.scalar(name, value)
                if images:
                    tf.summary.image("overlay (green truth, red prediction)", np.stack(images) / 255.0,
                                     max_outputs=len(images))
            if result["dice_3d"] > self.best.numpy():
                self.best.assign(result["dice_3d"])
                save_weights(self.model, self.run / "best.weights.h5")
                self.summary["best_step"] = at
            self.summary["validation"] = result
            log.info("step %d: validation %s", at, {k: round(v, 4) for k, v in result.items()})
        self.window.paused += time.perf_counter() - t

    def checkpoint_hook(self, at: int) -> None:
        t = time.perf_counter()
        fig = self._read_figures(at, reset=False)
        if fig["streak"]:  # keep the last good checkpoint: never save in the middle of non-finite steps
            log.warning("no checkpoint at step %d: steps %d-%d were non-finite", at, fig["streak_first"], at)
        else:
            self.sync_bn()
            self.manager.save(checkpoint_number=at)
            self.last_saved = at
        self.window.paused += time.perf_counter() - t

    def preempt_hook(self, at: int, staged: bool) -> None:
        if self.preemption is not None:
            self.preemption.save_checkpoint_if_preempted()
        elif self.stop_requested and not staged:  # with batches staged, their call runs first (exact resume)
            if self.last_saved != at:  # not saved by this step's checkpoint hook already
                self.checkpoint_hook(at)
            raise Preempted(at)
