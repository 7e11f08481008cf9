"""What training optimises, by value: every loss on a hand-computed case, the schedules,
global-norm clipping, gradients taken as already summed across replicas, flip TTA."""

import math

import numpy as np
import pytest
import tensorflow as tf

from liverseg import config, models, objective, predict, rundir

# One 2x2 slice: sigmoid(logits) = p = [.5, .75, .25, .75] against mask y = [1, 1, 0, 0]
LN3 = math.log(3.0)
LOGITS = tf.constant([0.0, LN3, -LN3, LN3], shape=[1, 2, 2, 1])
MASK = tf.constant([1, 1, 0, 0], tf.uint8, shape=[1, 2, 2, 1])
P, Y = np.array([0.5, 0.75, 0.25, 0.75]), np.array([1.0, 1.0, 0.0, 0.0])


def loss(name, *overrides):
    cfg = config.load(None, [f"train.loss={name}", *overrides]).train
    return float(objective.per_example_loss(cfg)(MASK, LOGITS).numpy()[0])


def test_bce_and_dice_by_hand():
    bce = (math.log(2) + 2 * math.log(4 / 3) + math.log(4)) / 4  # -log p where y=1, -log(1-p) where y=0
    assert loss("bce") == pytest.approx(bce, rel=1e-6)
    # tp = .5 + .75, |P| = 2.25, |Y| = 2, smoothing 1
    assert loss("dice") == pytest.approx(1 - (2 * 1.25 + 1) / (2.25 + 2 + 1), rel=1e-6)
    assert loss("bce_dice") == pytest.approx(bce + 1 - 3.5 / 5.25, rel=1e-6)


def test_focal_by_hand():
    ce = -(Y * np.log(P) + (1 - Y) * np.log(1 - P))
    p_t = np.where(Y == 1, P, 1 - P)
    assert loss("focal", "train.focal_gamma=2") == pytest.approx(np.mean((1 - p_t) ** 2 * ce), rel=1e-6)
    assert loss("focal", "train.focal_gamma=0") == pytest.approx(np.mean(ce), rel=1e-6)  # gamma 0 is BCE


def test_tversky_weighs_false_positives_by_alpha_and_false_negatives_by_beta():
    tp, fp, fn = 1.25, 1.0, 0.75  # fp != fn, so swapping alpha and beta changes the value
    expected = 1 - (tp + 1) / (tp + 0.3 * fp + 0.7 * fn + 1)
    assert loss("tversky", "train.tversky_alpha=0.3", "train.tversky_beta=0.7") == pytest.approx(expected, rel=1e-6)
    assert loss("tversky", "train.tversky_alpha=0.7", "train.tversky_beta=0.3") != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize(
    "kind, values",
    [
        ("constant", {0: 0.1, 4: 0.5, 9: 1.0, 60: 1.0, 110: 1.0}),
        ("cosine", {0: 0.1, 4: 0.5, 9: 1.0, 35: 0.5 * (1 + math.cos(math.pi * 0.25)), 60: 0.5, 110: 0.0, 500: 0.0}),
        ("poly", {0: 0.1, 9: 1.0, 60: 0.5**0.9, 110: 0.0}),
    ],
)
def test_warmup_then_schedule_values(kind, values):
    schedule = objective.WarmupSchedule(2.0, steps=110, warmup=10, kind=kind)  # warmup: (step + 1) / 10
    for step, factor in values.items():
        assert float(schedule(step)) == pytest.approx(2.0 * factor, abs=1e-6), (kind, step)


def _sgd(*overrides):
    return objective.optimizer(
        config.load(
            None,
            [
                "train.optimizer=sgd",
                "train.lr=1.0",
                "train.momentum=0",
                "train.schedule=constant",
                "train.warmup_steps=0",
                *overrides,
            ],
        ).train,
        mixed_float16=False,
    )


def test_clip_norm_bounds_the_global_gradient():
    a, b = tf.Variable([0.0]), tf.Variable([0.0])
    opt = _sgd("train.clip_norm=1.0")
    opt.apply([tf.constant([3.0]), tf.constant([4.0])], [a, b])  # global norm 5 -> scaled to 1
    np.testing.assert_allclose([a.numpy()[0], b.numpy()[0]], [-0.6, -0.8], rtol=1e-6)


def test_gradients_are_taken_as_already_summed_across_replicas():
    """The step all-reduces gradients itself; the optimizer must not sum them again (2 replicas)."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        v = tf.Variable([0.0])
        opt = _sgd("train.clip_norm=0")
        opt.build([v])

    @tf.function
    def step():
        strategy.run(lambda: opt.apply([tf.constant([1.0])], [v]))

    step()
    np.testing.assert_allclose(v.numpy(), [-1.0])  # Keras alone would apply the sum over replicas: -2


def test_flip_tta_averages_with_the_left_right_mirror(tmp_path):
    """A position-dependent stand-in network: TTA must equal (f(x) + flip(f(flip(x)))) / 2 along W."""
    norm = rundir.Normalization(-100.0, 100.0, 0.0, 100.0)
    ramp = np.linspace(-2.0, 2.0, 6, dtype=np.float32).reshape(1, 1, 6, 1)
    contract = models.Contract(rundir.InputSpec(4, 6, 1, 0, None, norm), 1, 0.5, True, False, 1.0, 2)

    class StandIn:
        def logits(self, x):
            return x[..., :1] * ramp + 0.3

    model = StandIn()
    model.contract = contract
    image = np.random.default_rng(0).integers(-150, 150, (3, 4, 6)).astype(np.int16)
    x = (np.clip(image, -100, 100)[..., None] / 100.0).astype(np.float32)
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    plain = sigmoid(model.logits(x))[..., 0]
    mirrored = sigmoid(model.logits(x[:, :, ::-1]))[:, :, ::-1, 0]
    np.testing.assert_allclose(predict.infer_volume(model, image, tta_flip=False), plain, rtol=1e-6)
    np.testing.assert_allclose(predict.infer_volume(model, image, tta_flip=True), (plain + mirrored) / 2, rtol=1e-6)
    assert not np.allclose(plain, mirrored)  # the case can tell a missing or wrong flip
