"""What training optimises: per-example losses, the learning-rate schedule, the optimiser.

Losses take logits (any float dtype) and a {0,1} mask, compute in float32 (a float16 sum
over a 512x512 slice overflows), and return one value per example `[B]`, so the training
step can average them over the *global* batch (sum over the replica, divided by the global batch).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from liverseg.config import TrainConfig

SMOOTH = 1.0  # Laplace smoothing of the overlap losses: an empty slice predicted empty costs 0


def _prep(mask, logits):
    return tf.cast(mask, tf.float32), tf.cast(logits, tf.float32)


def _sum(x):
    return tf.reduce_sum(x, axis=[1, 2, 3])


def bce(mask, logits, cfg: TrainConfig):
    y, z = _prep(mask, logits)
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=z), axis=[1, 2, 3])


def dice(mask, logits, cfg: TrainConfig):
    """Soft Dice loss per slice: 1 - (2|P.Y| + s) / (|P| + |Y| + s)."""
    y, z = _prep(mask, logits)
    p = tf.sigmoid(z)
    return 1.0 - (2.0 * _sum(p * y) + SMOOTH) / (_sum(p) + _sum(y) + SMOOTH)


def bce_dice(mask, logits, cfg: TrainConfig):
    return bce(mask, logits, cfg) + dice(mask, logits, cfg)


def focal(mask, logits, cfg: TrainConfig):
    """Binary focal loss (Lin et al. 2017), mean over pixels: (1 - p_t)^gamma * BCE."""
    y, z = _prep(mask, logits)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=z)
    p_t = tf.exp(-ce)
    return tf.reduce_mean((1.0 - p_t) ** cfg.focal_gamma * ce, axis=[1, 2, 3])


def tversky(mask, logits, cfg: TrainConfig):
    """1 - TP / (TP + alpha FP + beta FN), soft, per slice (beta > alpha favours recall)."""
    y, z = _prep(mask, logits)
    p = tf.sigmoid(z)
    tp, fp, fn = _sum(p * y), _sum(p * (1 - y)), _sum((1 - p) * y)
    return 1.0 - (tp + SMOOTH) / (tp + cfg.tversky_alpha * fp + cfg.tversky_beta * fn + SMOOTH)


LOSSES = {"bce": bce, "dice": dice, "bce_dice": bce_dice, "focal": focal, "tversky": tversky}


def per_example_loss(cfg: TrainConfig):
    fn = LOSSES[cfg.loss]
    return lambda mask, logits: fn(mask, logits, cfg)


@keras.saving.register_keras_serializable(package="liverseg")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `lr`, then constant, cosine to 0, or polynomial (power 0.9) to 0.

    `steps` may be a variable (train.time_budget_min fixes the run's steps after it started):
    the decay then spans its value when the step runs."""

    def __init__(self, lr: float, steps, warmup: int, kind: str):
        self.lr, self.steps, self.warmup, self.kind = lr, steps, warmup, kind

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = tf.minimum(1.0, (step + 1.0) / max(1, self.warmup)) if self.warmup else 1.0
        span = tf.maximum(1.0, tf.cast(self.steps, tf.float32) - self.warmup)
        t = tf.clip_by_value((step - self.warmup) / span, 0.0, 1.0)
        if self.kind == "cosine":
            decay = 0.5 * (1.0 + tf.cos(math.pi * t))
        elif self.kind == "poly":
            decay = (1.0 - t) ** 0.9
        else:
            decay = 1.0
        return self.lr * warm * decay

    def get_config(self):
        return {"lr": self.lr, "steps": int(tf.cast(self.steps, tf.int64)), "warmup": self.warmup, "kind": self.kind}


_PRE_REDUCED: dict[type, type] = {}


def _pre_reduced(cls: type) -> type:
    """`cls` for gradients that are already summed across replicas.

    The training step all-reduces the gradients itself, in one collective together with the
    non-finite flag and before deciding to skip, so the collective overlaps the backward
    pass under XLA instead of waiting inside the update's conditional. Keras would sum
    them again inside `apply` (TFOptimizer._all_reduce_sum_gradients, Keras 3.15): this
    subclass turns that second sum off. `test_mirrored_on_two_devices_matches_one_device`
    fails if it ever sums twice.
    """
    if cls not in _PRE_REDUCED:

        def _all_reduce_sum_gradients(self, grads_and_vars):
            return list(grads_and_vars)

        _PRE_REDUCED[cls] = type(
            f"PreReduced{cls.__name__}", (cls,), {"_all_reduce_sum_gradients": _all_reduce_sum_gradients}
        )
    return _PRE_REDUCED[cls]


def optimizer(cfg: TrainConfig, mixed_float16: bool, lr_scale: float = 1.0, steps=None) -> keras.optimizers.Optimizer:
    """The configured optimiser (loss-scaled for mixed_float16), built by the caller;
    `steps` (a number or a variable): what the schedule spans, default train.steps.

    It expects gradients already summed across replicas (see `_pre_reduced`), so
    `clip_norm` bounds the norm of the global gradient exactly, whatever the replica count.
    lr_scale multiplies train.lr (linear scaling when the global batch grows with replicas).
    """
    schedule = WarmupSchedule(cfg.lr * lr_scale, cfg.steps if steps is None else steps, cfg.warmup_steps, cfg.schedule)
    clip = {"global_clipnorm": cfg.clip_norm} if cfg.clip_norm > 0 else {}
    if cfg.optimizer == "adam":
        opt = _pre_reduced(keras.optimizers.Adam)(schedule, **clip)
    elif cfg.optimizer == "adamw":
        opt = _pre_reduced(keras.optimizers.AdamW)(schedule, weight_decay=cfg.weight_decay, **clip)
    else:
        opt = _pre_reduced(keras.optimizers.SGD)(schedule, momentum=cfg.momentum, nesterov=True, **clip)
    return keras.optimizers.LossScaleOptimizer(opt) if mixed_float16 else opt
