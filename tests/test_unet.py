"""Models: the tutorial's architecture exactly, our U-Net's options, float32 logits, input checks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from liverseg import LiversegError, config, unet


def test_seed_unet_is_the_tutorials_architecture():
    m = unet.seed_unet(1)
    convs = [layer for layer in m.layers if type(layer) is keras.layers.Conv2D]
    assert [c.filters for c in convs] == [32, 64, 128, 256, 512, 256, 128, 64, 32, 1]
    assert all(c.kernel_size == (3, 3) for c in convs[:-1]) and convs[-1].kernel_size == (1, 1)
    ups = [layer for layer in m.layers if isinstance(layer, keras.layers.Conv2DTranspose)]
    assert [u.filters for u in ups] == [256, 128, 64, 32] and all(u.strides == (2, 2) for u in ups)
    assert len([layer for layer in m.layers if isinstance(layer, keras.layers.MaxPooling2D)]) == 4
    assert len([layer for layer in m.layers if isinstance(layer, keras.layers.Concatenate)]) == 4
    assert m(tf.zeros([1, 32, 32, 1])).shape == (1, 32, 32, 1)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"model.residual": True},
        {"model.attention": True},
        {"model.norm": "group"},
        {"model.norm": "instance"},
        {"model.dropout": 0.2},
    ],
)
def test_unet_variants_build_and_keep_float32_logits(extra):
    cfg = config.replace(config.load(None), **{"model.base_filters": 4, "model.depth": 3, **extra})
    m = unet.build(cfg.model, 5, "mixed_float16")
    out = m(tf.random.uniform([2, 40, 48, 5]), training=True)
    assert out.shape == (2, 40, 48, 1) and out.dtype == tf.float32
    assert any(layer.compute_dtype == "float16" for layer in m.layers if layer.weights)
    assert np.all(np.isfinite(out.numpy()))


def test_filters_double_per_level_and_cap():
    cfg = config.replace(config.load(None), **{"model.base_filters": 2, "model.depth": 6}).model
    m = unet.build(cfg, 1)
    widest = max(layer.filters for layer in m.layers if isinstance(layer, keras.layers.Conv2D))
    assert widest == 2 * 16  # capped at 16x base


def test_input_size_must_divide():
    cfg = config.load(None).model
    unet.check_input(cfg, 512, 512)
    with pytest.raises(LiversegError, match="multiples of 16"):
        unet.check_input(cfg, 500, 512)


def test_flops_per_image_counts_convolutions_and_transposed_convolutions():
    x = keras.Input((None, None, 5))
    y = keras.layers.Conv2D(8, 3, padding="same")(x)  # 2 * 32*32 * 3*3*5 * 8
    y = keras.layers.MaxPooling2D(2)(y)
    y = keras.layers.Conv2DTranspose(4, 2, strides=2, padding="same")(y)  # 2 * 16*16 input px * 2*2*8 * 4
    model = keras.Model(x, keras.layers.Conv2D(1, 1)(y))  # 2 * 32*32 * 4
    assert unet.flops_per_image(model, 32, 32) == 2 * 32 * 32 * 9 * 5 * 8 + 2 * 16 * 16 * 4 * 8 * 4 + 2 * 32 * 32 * 4
    pointwise = unet.build(config.replace(config.load(None), **{"model.name": "pointwise"}).model, 5)
    assert unet.flops_per_image(pointwise, 64, 64) == 2 * 64 * 64 * 5
    # The tutorial's U-Net at 512x512, 1 channel: its first two convs alone are 2*512^2*9*(1*32) and 2*256^2*9*(32*64)
    seed = unet.flops_per_image(unet.seed_unet(1), 512, 512)
    assert 2 * 512**2 * 9 * 32 + 2 * 256**2 * 9 * 32 * 64 < seed < 1e11
