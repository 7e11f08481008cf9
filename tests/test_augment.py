"""Augmentation: same result eagerly and in Dataset.map, image and mask aligned, masks binary."""

import numpy as np
import pytest
import tensorflow as tf

from liverseg import augment, config

OFF = {f"augment.{op}_p": 0.0 for op in augment.OPS}
SPATIAL = ["flip_lr", "flip_ap", "affine", "elastic"]
INTENSITY = ["blur", "noise", "contrast", "brightness", "gamma"]


def only(op: str, **extra):
    return config.replace(config.load(None), **{**OFF, f"augment.{op}_p": 1.0, **extra}).augment


def _pattern(b=3, h=40, w=36):
    """An asymmetric mask (an L plus a dot, different per example) and its image in HU (plus a ramp)."""
    m = np.zeros((b, h, w, 1), np.uint8)
    for i in range(b):
        m[i, 6 + i : 30, 8:13] = 1
        m[i, 25:30, 8 : 26 - i] = 1
        m[i, 10:13, 24:27] = 1
    ramp = np.linspace(-150, 150, w)[None, None, :, None]  # grey levels for the intensity ops
    return tf.constant(np.where(m == 1, 200.0, -600.0) + ramp, tf.float32), tf.constant(m)


def _norm(hu):
    return (tf.clip_by_value(hu, -200.0, 250.0) + 200.0) / 450.0


def _augment(image, mask, seed, cfg, norm, dense=True):
    """One batch through a fresh Augmenter (dense: the device form; else the host form)."""
    return augment.Augmenter(cfg, norm, dense)(image, mask, seed)


@pytest.mark.parametrize("dense", [True, False], ids=["device form", "host form"])
@pytest.mark.parametrize("op", augment.OPS)
def test_eager_equals_dataset_map(op, dense):
    cfg = only(op)
    image, mask = _pattern()
    seed = tf.constant([5, 9], tf.int64)
    eager = _augment(image, mask, seed, cfg, _norm, dense)
    mapped = next(
        iter(tf.data.Dataset.from_tensors((image, mask)).map(lambda i, m: _augment(i, m, seed, cfg, _norm, dense)))
    )
    # the mask exactly; the image up to float rounding (graph mode may reorder arithmetic)
    np.testing.assert_array_equal(eager[1].numpy(), mapped[1].numpy())
    np.testing.assert_allclose(eager[0].numpy(), mapped[0].numpy(), rtol=1e-6, atol=1e-6)
    if not op.startswith("flip"):  # a flip at p=1 is deterministic; every other op draws values
        other = _augment(image, mask, tf.constant([5, 10], tf.int64), cfg, _norm, dense)
        assert not np.array_equal(eager[0].numpy(), other[0].numpy()), f"{op}: the seed must matter"


def test_the_host_form_gives_the_device_forms_result_but_its_own_noise():
    """Default probabilities, 8 examples: the same ops, parameters and transforms for a seed;
    the noise has the same per-example std but other values."""
    image, mask = _pattern(8)
    seed = tf.constant([11, 3], tf.int64)
    cfg = config.load(None, ["augment.noise_p=0"]).augment
    dense, gated = _augment(image, mask, seed, cfg, _norm, True), _augment(image, mask, seed, cfg, _norm, False)
    np.testing.assert_array_equal(dense[1].numpy(), gated[1].numpy())
    np.testing.assert_allclose(dense[0].numpy(), gated[0].numpy(), rtol=1e-5, atol=1e-5)
    noise = only("noise", **{"augment.noise_std": 0.2})
    clean = augment.Augmenter(config.replace(config.load(None), **OFF).augment, _norm)(image, mask, seed)[0].numpy()
    d, g = (_augment(image, mask, seed, noise, _norm, f)[0].numpy() - clean for f in (True, False))
    assert not np.allclose(d, g)
    # 1440 pixels each: a sample std is within ~1.9 % of its drawn std (1 sd), the two forms' ratio ~2.6 %;
    # 12 % (4.6 sd) still fails a std off by sqrt(2) or a field drawn once for all examples
    np.testing.assert_allclose(d.std(axis=(1, 2, 3)), g.std(axis=(1, 2, 3)), rtol=0.12)


def test_int16_hu_as_stored_augment_like_float32():
    image, mask = _pattern()
    seed, cfg = tf.constant([2, 8], tf.int64), only("affine")
    for dense in (True, False):
        as_float = _augment(tf.round(image), mask, seed, cfg, _norm, dense)
        as_int16 = _augment(tf.cast(tf.round(image), tf.int16), mask, seed, cfg, _norm, dense)
        np.testing.assert_array_equal(as_float[1].numpy(), as_int16[1].numpy())
        np.testing.assert_allclose(as_float[0].numpy(), as_int16[0].numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", SPATIAL)
def test_image_and_mask_stay_aligned_and_binary(op):
    cfg = only(op, **({"augment.rotation_deg": 25.0} if op == "affine" else {}))
    image, mask = _pattern()
    seed = tf.constant([1, 2], tf.int64)
    moved, moved_mask = augment.spatial(image, mask, seed, cfg)
    moved_mask = moved_mask.numpy()
    assert moved_mask.dtype == np.uint8 and set(np.unique(moved_mask)) <= {0, 1}
    as_image = (moved.numpy() > -200).astype(np.uint8)  # the pattern transformed as an image (threshold
    # between the mask's -750..-450 HU and the liver's 50..350 HU)
    for i in range(moved_mask.shape[0]):
        if op.startswith("flip"):  # pixel-exact maps: bilinear and nearest agree exactly
            np.testing.assert_array_equal(as_image[i], moved_mask[i])
        else:  # resampling differs only at the boundary; the shapes coincide
            agree = (as_image[i] == moved_mask[i]).mean()
            assert agree > 0.97, f"{op}: only {agree:.3f} of pixels agree"
            c_img = np.argwhere(as_image[i][..., 0]).mean(0)
            c_mask = np.argwhere(moved_mask[i][..., 0]).mean(0)
            assert np.abs(c_img - c_mask).max() < 0.75
    assert not np.array_equal(moved_mask, mask.numpy()), f"{op} must move something at p=1"
    if op in ("affine", "elastic"):  # identical examples in one batch get different transforms
        same = tf.repeat(mask[:1], 3, axis=0)
        _, out = augment.spatial(tf.repeat(image[:1], 3, axis=0), same, seed, cfg)
        assert not np.array_equal(out.numpy()[0], out.numpy()[1])


def test_flips_are_exact_mirrors():
    image, mask = _pattern(1)
    out, out_mask = augment.spatial(image, mask, tf.constant([0, 0], tf.int64), only("flip_lr"))
    np.testing.assert_array_equal(out_mask.numpy(), mask.numpy()[:, :, ::-1])
    np.testing.assert_array_equal(out.numpy(), image.numpy()[:, :, ::-1])
    out, out_mask = augment.spatial(image, mask, tf.constant([0, 0], tf.int64), only("flip_ap"))
    np.testing.assert_array_equal(out_mask.numpy(), mask.numpy()[:, ::-1])


@pytest.mark.parametrize("op", INTENSITY)
def test_intensity_ops_leave_the_mask_alone(op):
    image, mask = _pattern()
    out, out_mask = _augment(image, mask, tf.constant([3, 4], tf.int64), only(op), _norm)
    np.testing.assert_array_equal(out_mask.numpy(), mask.numpy())
    assert out.dtype == tf.float32 and not np.array_equal(out.numpy(), _norm(image).numpy())


def test_nothing_enabled_is_identity_and_probability_is_per_example():
    image, mask = _pattern(8)
    cfg = config.replace(config.load(None), **OFF).augment
    out, out_mask = _augment(image, mask, tf.constant([1, 1], tf.int64), cfg, _norm)
    np.testing.assert_allclose(out.numpy(), _norm(image).numpy(), rtol=1e-6, atol=1e-7)  # compiled: 1-ulp rounding
    np.testing.assert_array_equal(out_mask.numpy(), mask.numpy())
    half = config.replace(config.load(None), **{**OFF, "augment.flip_lr_p": 0.5}).augment
    _, flipped = augment.spatial(image, mask, tf.constant([7, 7], tf.int64), half)
    changed = [not np.array_equal(flipped.numpy()[i], mask.numpy()[i]) for i in range(8)]
    assert 0 < sum(changed) < 8


def test_gaussian_blur_matches_reference():
    from scipy import ndimage

    x = np.random.default_rng(0).normal(size=(2, 20, 18, 1)).astype(np.float32)
    out = augment._gaussian_blur(tf.constant(x), tf.constant([0.7, 1.0])).numpy()
    for i, s in enumerate((0.7, 1.0)):
        ref = ndimage.gaussian_filter(x[i, ..., 0], s, mode="mirror", truncate=3 / s)
        np.testing.assert_allclose(out[i, ..., 0], ref, atol=1e-5)


@pytest.mark.parametrize("dense", [True, False], ids=["device form", "host form"])
def test_a_crop_without_transforms_is_an_exact_window_of_image_and_mask(dense):
    """augment.crop alone: each example is a 24x24 window of its slice at a whole-pixel corner,
    the same window of image and mask, windows differing between examples; eagerly as in a map."""
    image, mask = _pattern(6)
    cfg = config.replace(config.load(None), **{**OFF, "augment.crop": 24}).augment
    seed = tf.constant([4, 2], tf.int64)
    out_image, out_mask = _augment(image, mask, seed, cfg, _norm, dense)
    assert out_image.shape == (6, 24, 24, 1) and out_mask.shape == (6, 24, 24, 1)
    want = _norm(image).numpy()
    corners = []
    for i in range(6):
        found = [
            (r, c)
            for r in range(40 - 24 + 1)
            for c in range(36 - 24 + 1)
            if np.allclose(want[i, r : r + 24, c : c + 24], out_image[i].numpy(), atol=1e-6)
        ]
        assert len(found) >= 1, i
        r, c = found[0]
        np.testing.assert_array_equal(out_mask[i].numpy(), mask.numpy()[i, r : r + 24, c : c + 24])
        corners.append(found[0])
    assert len(set(corners)) > 1
    mapped = next(
        iter(tf.data.Dataset.from_tensors((image, mask)).map(lambda i, m: _augment(i, m, seed, cfg, _norm, dense)))
    )
    np.testing.assert_array_equal(mapped[1].numpy(), out_mask.numpy())


def test_a_crop_larger_than_the_slices_or_off_the_divisor_is_refused(dataset, tmp_path):
    from liverseg import LiversegError, train

    base = [f"data.records={dataset}", "train.steps=1"]
    with pytest.raises(LiversegError, match=r"augment.crop=48: larger than the 32x32 slices of .*choose at most 32"):
        train.Trainer(config.load("smoke", [*base, "augment.crop=48"]), tmp_path / "a", progress=False)
    with pytest.raises(
        LiversegError,
        match=r"slices of 30x30 cannot pass a unet with depth 2: .* multiples of 4 \(choose augment.crop=28\)",
    ):
        train.Trainer(config.load("smoke", [*base, "augment.crop=30"]), tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(
        config.ConfigError, match=r"augment.crop=16 is not valid: needs augment.placement host or device"
    ):
        config.load("smoke", [*base, "augment.crop=16", "augment.placement=none"])
