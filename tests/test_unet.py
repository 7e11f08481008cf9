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


@pytest.mark.parametrize("extra", [{}, {"model.residual": True}, {"model.attention": True},
                                   {"model.norm": "group"}, {"model.norm": "instance"}, {"model.dropout": 0.2}])
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
