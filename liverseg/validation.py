"""Validation during training: loss, mean slice Dice and mean per-volume 3D Dice on the val split.

Runs on the chief, between training calls. Each batch is one compiled call that adds to
totals kept on the device: per-case (TP, FP, FN) scattered by case index, the loss sum,
the slice-Dice sum and count, and the `num_images` slices with the most liver (CT,
truth, prediction) for the TensorBoard overlays. The host only feeds batches and reads
the totals once at the end, so validation costs the forward passes and no per-batch
round trip. Per-case Dice is `metrics.dice_from_counts`, the definition `evaluate` uses; the
slice Dice is that formula on the device, over slices with liver in truth or prediction.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from liverseg import metrics, overlay, pipeline
from liverseg.config import Config
from liverseg.step import confusion


def make_validator(model, cfg: Config, loss_fn, num_cases: int):
    """run(num_images) -> (metrics, overlays): {"loss", "dice_slice", "dice_3d"} and
    RGB overlays (green truth, red prediction) of the slices with the most liver."""
    ds = pipeline.build_dataset(cfg, "val", training=False)
    h, w = ds.element_spec["image"].shape[1:3]
    centre = cfg.data.context  # the slice being segmented, among the 2k+1 channels

    def start(n_img: int) -> dict:
        return {
            "cases": tf.zeros([num_cases, 3], tf.float64),
            "seen": tf.zeros([num_cases], tf.float64),
            "loss": tf.zeros([], tf.float64),
            "n": tf.zeros([], tf.float64),
            "dice": tf.zeros([], tf.float64),
            "slices": tf.zeros([], tf.float64),
            "liver": tf.fill([n_img], -1.0),
            "ct": tf.zeros([n_img, h, w]),
            "truth": tf.zeros([n_img, h, w], tf.uint8),
            "pred": tf.zeros([n_img, h, w], tf.uint8),
        }

    @tf.function(jit_compile=cfg.train.jit_compile, reduce_retracing=True)
    def add(state, image, mask, case_index):
        logits = model(image, training=False)
        counts = confusion(logits, mask, [1, 2, 3])  # [b, 3]
        c64 = tf.cast(counts, tf.float64)
        where = case_index[:, None]
        tp, fp, fn = c64[:, 0], c64[:, 1], c64[:, 2]
        any_liver = (tp + fp + fn) > 0  # slices with liver in truth or prediction
        out = dict(state)
        out["cases"] = tf.tensor_scatter_nd_add(state["cases"], where, c64)
        out["seen"] = tf.tensor_scatter_nd_add(state["seen"], where, tf.ones_like(tp))
        out["loss"] = state["loss"] + tf.reduce_sum(tf.cast(loss_fn(mask, logits), tf.float64))
        out["n"] = state["n"] + tf.cast(tf.shape(tp)[0], tf.float64)
        out["dice"] = state["dice"] + tf.reduce_sum(
            tf.where(any_liver, 2 * tp / tf.maximum(2 * tp + fp + fn, 1.0), 0.0)
        )
        out["slices"] = state["slices"] + tf.reduce_sum(tf.cast(any_liver, tf.float64))
        n_img = state["liver"].shape[0]
        if n_img:  # keep the n_img slices with the most true liver seen so far
            liver = tf.concat([state["liver"], tf.cast(tp + fn, tf.float32)], 0)
            keep = tf.math.top_k(liver, n_img).indices
            out["liver"] = tf.gather(liver, keep)
            out["ct"] = tf.gather(tf.concat([state["ct"], image[..., centre]], 0), keep)
            out["truth"] = tf.gather(tf.concat([state["truth"], mask[..., 0]], 0), keep)
            out["pred"] = tf.gather(tf.concat([state["pred"], tf.cast(logits[..., 0] > 0, tf.uint8)], 0), keep)
        return out

    def run(num_images: int) -> tuple[dict, list[np.ndarray]]:
        state = start(num_images)
        with pipeline.named_data_errors(cfg, "val"):
            for b in ds:
                state = add(state, b["image"], b["mask"], b["case_index"])
        s = {k: v.numpy() for k, v in state.items()}  # the one read
        per_case = [metrics.dice_from_counts(*row) for row, seen in zip(s["cases"], s["seen"]) if seen > 0]
        result = {
            "loss": float(s["loss"] / s["n"]) if s["n"] else float("nan"),
            "dice_slice": float(s["dice"] / s["slices"]) if s["slices"] else 1.0,
            "dice_3d": float(np.mean(per_case)) if per_case else float("nan"),
        }
        images = []
        for liver, ct, truth, pred in zip(s["liver"], s["ct"], s["truth"], s["pred"]):
            if liver >= 0:
                grey = (np.clip((ct - ct.min()) / max(1e-6, ct.max() - ct.min()), 0, 1) * 255).astype(np.uint8)
                images.append(overlay.draw(grey, [(truth, overlay.GREEN), (pred, overlay.RED)]))
        return result, images

    return run
