"""U-Nets for 2.5D slices: [B, H, W, 2k+1] -> liver logits [B, H, W, 1] (float32).

Every layer takes the dtype policy explicitly (no global Keras state), and the 1x1 output
layer is float32 whatever the policy, so logits, losses and metrics stay in float32
under mixed precision. The sigmoid lives in the loss and in prediction.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import keras
import numpy as np
from keras import layers

from liverseg import LiversegError
from liverseg.config import Config, ModelConfig
from liverseg.files import atomic_path


def seed_unet(channels: int, policy: str = "float32") -> keras.Model:
    """The tutorial's network, faithfully: one 3x3 conv + max-pool per level (32/64/128/256),
    a 512-filter bridge, conv-transpose + concat + one 3x3 conv per decoder level, 1x1 out.
    (The tutorial ends in a sigmoid; here it is folded into the loss, which is equivalent.)"""
    x = inputs = keras.Input((None, None, channels), name="slices")
    skips = []
    for f in (32, 64, 128, 256):
        x = layers.Conv2D(f, 3, padding="same", activation="relu", dtype=policy)(x)
        skips.append(x)
        x = layers.MaxPooling2D(2, dtype=policy)(x)
    x = layers.Conv2D(512, 3, padding="same", activation="relu", dtype=policy)(x)
    for f, skip in zip((256, 128, 64, 32), reversed(skips)):
        x = layers.Conv2DTranspose(f, 2, strides=2, padding="same", dtype=policy)(x)
        x = layers.Concatenate(dtype=policy)([x, skip])
        x = layers.Conv2D(f, 3, padding="same", activation="relu", dtype=policy)(x)
    logits = layers.Conv2D(1, 1, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name="seed_unet")


def _norm(cfg: ModelConfig, filters: int, policy: str):
    kind = cfg.norm
    if kind == "batch":
        return layers.BatchNormalization(momentum=cfg.bn_momentum, dtype=policy)
    if kind == "sync_batch":
        return layers.BatchNormalization(momentum=cfg.bn_momentum, synchronized=True, dtype=policy)
    if kind == "instance":
        return layers.GroupNormalization(groups=filters, dtype=policy)
    if kind == "group":
        return layers.GroupNormalization(groups=max(g for g in (8, 4, 2, 1) if filters % g == 0), dtype=policy)
    return None


def _block(x, filters: int, cfg: ModelConfig, policy: str):
    """Two (3x3 conv -> norm -> ReLU), with an optional residual connection."""
    shortcut = x
    for i in range(2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=cfg.norm == "none", dtype=policy)(x)
        norm = _norm(cfg, filters, policy)
        if norm is not None:
            x = norm(x)
        if cfg.residual and i == 1:
            if shortcut.shape[-1] != filters:
                shortcut = layers.Conv2D(filters, 1, use_bias=False, dtype=policy)(shortcut)
            x = layers.Add(dtype=policy)([x, shortcut])
        x = layers.ReLU(dtype=policy)(x)
    return x


def _attention_gate(skip, gate, policy: str):
    """Additive attention (Oktay et al. 2018): weights the skip features by a gate from the decoder."""
    inter = max(1, skip.shape[-1] // 2)
    theta = layers.Conv2D(inter, 1, dtype=policy)(skip)
    phi = layers.Conv2D(inter, 1, dtype=policy)(gate)
    psi = layers.Conv2D(1, 1, activation="sigmoid", dtype=policy)(
        layers.ReLU(dtype=policy)(layers.Add(dtype=policy)([theta, phi]))
    )
    return layers.Multiply(dtype=policy)([skip, psi])


def unet(cfg: ModelConfig, channels: int, policy: str = "float32") -> keras.Model:
    """The standard U-Net: `depth` downsamplings, filters base * 2^level capped at 16 * base."""
    filters = [cfg.base_filters * min(2**level, 16) for level in range(cfg.depth + 1)]
    x = inputs = keras.Input((None, None, channels), name="slices")
    skips = []
    for f in filters[:-1]:
        x = _block(x, f, cfg, policy)
        skips.append(x)
        x = layers.MaxPooling2D(2, dtype=policy)(x)
    x = _block(x, filters[-1], cfg, policy)
    if cfg.dropout > 0:
        x = layers.SpatialDropout2D(cfg.dropout, dtype=policy)(x)
    for f, skip in zip(reversed(filters[:-1]), reversed(skips)):
        x = layers.Conv2DTranspose(f, 2, strides=2, padding="same", dtype=policy)(x)
        if cfg.attention:
            skip = _attention_gate(skip, x, policy)
        x = _block(layers.Concatenate(dtype=policy)([x, skip]), f, cfg, policy)
    logits = layers.Conv2D(1, 1, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name="unet")


def pointwise(channels: int) -> keras.Model:
    """One 1x1 conv: arithmetic next to nothing, so a step costs what the loop around it costs."""
    inputs = keras.Input((None, None, channels), name="slices")
    return keras.Model(inputs, layers.Conv2D(1, 1, dtype="float32", name="logits")(inputs), name="pointwise")


def build(cfg: ModelConfig, channels: int, policy: str = "float32") -> keras.Model:
    """The configured network for `channels` input slices under a Keras dtype policy name."""
    if cfg.name == "seed_unet":
        return seed_unet(channels, policy)
    if cfg.name == "pointwise":
        return pointwise(channels)
    return unet(cfg, channels, policy)


def divisor(cfg: ModelConfig) -> int:
    """Height and width must be multiples of this."""
    return {"seed_unet": 16, "pointwise": 1}.get(cfg.name, 2**cfg.depth)


def flops_per_image(model: keras.Model, height: int, width: int) -> float:
    """2 x multiply-adds of one forward pass at height x width, counting the convolutions and
    transposed convolutions of the traced graph (the rest is a few % at most). A training
    step costs about 3x this: forward, then backward for activations and for weights."""
    import tensorflow as tf  # the graph is traced with the TensorFlow backend

    spec = tf.TensorSpec([1, height, width, model.input_shape[-1]], tf.float32)
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
    total = 0.0
    for op in graph.get_operations():
        if op.type == "Conv2D":  # output pixels x kernel
            _, h, w, _ = op.outputs[0].shape
            kh, kw, cin, cout = op.inputs[1].shape
        elif op.type == "Conv2DBackpropInput":  # a transposed conv: input pixels x kernel
            _, h, w, _ = op.inputs[2].shape
            kh, kw, cout, cin = op.inputs[1].shape
        else:
            continue
        total += 2.0 * h * w * kh * kw * cin * cout
    return total


def forward_tensor_bytes(model: keras.Model, height: int, width: int) -> float:
    """Bytes of every 4-D floating tensor of one training-mode forward pass at height x width
    (float32): what a training step's activations are measured against (`bench.train`)."""
    import tensorflow as tf

    spec = tf.TensorSpec([1, height, width, model.input_shape[-1]], tf.float32)
    graph = tf.function(lambda x: model(x, training=True)).get_concrete_function(spec).graph
    return float(
        sum(
            4 * math.prod(t.shape)
            for op in graph.get_operations()
            for t in op.outputs
            if t.dtype.is_floating and t.shape.rank == 4 and t.shape.is_fully_defined()
        )
    )


def check_input(cfg: ModelConfig, height: int, width: int, fix: str = "convert with --size") -> None:
    """Refuse an input the network cannot take, saying how to `fix` it."""
    d = divisor(cfg)
    if height % d or width % d:
        raise LiversegError(
            f"slices of {height}x{width} cannot pass a {cfg.name} with depth "
            f"{cfg.depth}: height and width must be multiples of {d} ({fix})"
        )


def check_training_input(cfg: Config, height: int, width: int, records) -> None:
    """The network of `cfg` takes the training slices (height x width, of `records`) and the
    windows augment.crop cuts from them."""
    check_input(cfg.model, height, width)
    crop = cfg.augment.crop
    if crop:
        if crop > min(height, width):
            raise LiversegError(
                f"augment.crop={crop}: larger than the {height}x{width} slices of {records}; choose at most "
                f"{min(height, width)}"
            )
        check_input(cfg.model, crop, crop, f"choose augment.crop={crop - crop % divisor(cfg.model)}")


def weights_fingerprint(model: keras.Model) -> str:
    """sha256 of the weight values (16 hex digits): names one set of trained weights."""
    h = hashlib.sha256()
    for w in model.weights:
        h.update(np.ascontiguousarray(w.value.numpy()).tobytes())
    return h.hexdigest()[:16]


def save_weights(model: keras.Model, path: Path) -> None:
    """The model's weights as `path` (*.weights.h5), written atomically."""
    with atomic_path(path) as tmp:
        model.save_weights(str(tmp))
