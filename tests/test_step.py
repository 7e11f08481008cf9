"""The compiled training step and the loop around it: one XLA computation, no host work
inside a call, batches staged ahead without changing a single weight, precision auto."""

import re

import numpy as np
import pytest
import tensorflow as tf

from conftest import smoke
from liverseg import config, objective, step, train

HOST_OPS = {"PyFunc", "EagerPyFunc", "NumpyFunction", "PrintV2", "Print", "Assert"}


@pytest.mark.slow
def test_device_prefetch_changes_no_weight(dataset, tmp_path):
    """Staging the next call's batches (and not staging before a checkpoint) is invisible to the result."""
    base = [
        "deterministic=true",
        "train.steps=9",
        "train.steps_per_call=2",
        "train.checkpoint_every=4",
        "train.log_every=3",
        "train.eval_every=1000",
    ]
    on = train.train(smoke(dataset, *base, "train.device_prefetch=true"), tmp_path / "on", progress=False)
    off = train.train(smoke(dataset, *base, "train.device_prefetch=false"), tmp_path / "off", progress=False)
    assert on["step"] == off["step"] == 9
    assert on["weights_fingerprint"] == off["weights_fingerprint"]


@pytest.mark.slow
def test_the_host_reads_device_values_only_in_hooks(dataset, tmp_path, monkeypatch):
    """12 steps, 2 per call, log every 4, checkpoint every 6: 6 calls, 3 + 2 reads of the figures."""
    reads, calls = [], []
    real_read = step.Accumulators.read
    monkeypatch.setattr(step.Accumulators, "read", lambda self, reset: reads.append(reset) or real_read(self, reset))
    real_build = step.build_train_step

    def counting_build(*args):
        run_steps = real_build(*args)
        return lambda batches, upcoming: calls.append(len(batches)) or run_steps(batches, upcoming)

    monkeypatch.setattr(step, "build_train_step", counting_build)
    train.train(
        smoke(
            dataset,
            "train.steps=12",
            "train.steps_per_call=2",
            "train.log_every=4",
            "train.checkpoint_every=6",
            "train.eval_every=1000",
        ),
        tmp_path / "run",
        progress=False,
    )
    assert calls == [2] * 6
    assert sorted(reads) == [False, False, True, True, True]  # checkpoints (6, 12) do not reset; logs (4, 8, 12) do


def _graph_op_types(concrete) -> set:
    graph_def = concrete.graph.as_graph_def()
    ops = {n.op for n in graph_def.node}
    for fn in graph_def.library.function:
        ops |= {n.op for n in fn.node_def}
    return ops


def test_the_call_has_no_host_ops_and_the_step_is_one_xla_computation(dataset, tmp_path):
    cfg = smoke(
        dataset,
        "train.jit_compile=true",
        "augment.placement=device",
        "train.steps=2",
        "train.steps_per_call=2",
        "train.optimizer=adamw",
    )
    trainer = train.Trainer(cfg, tmp_path / "run", progress=False)
    batches = step.draw(trainer.iterator, 2, 1)
    ops = _graph_op_types(trainer.run_steps.get_concrete_function(batches, batches))
    assert not ops & HOST_OPS, ops & HOST_OPS
    # The replica step (augmentation, forward, backward, all-reduce, skip, AdamW update) lowers to one HLO module;
    # anything XLA cannot compile would raise here.
    hlo = []
    trainer.strategy.run(
        lambda: hlo.append(
            trainer.run_steps.replica_step.experimental_get_compiler_ir(batches[0][0], tf.constant(0, tf.int64))(
                stage="hlo"
            )
        )
    )
    found = set(re.findall(r"\b(rng-bit-generator|gather|convolution|conditional|sqrt)\b", hlo[0]))
    assert found == {"rng-bit-generator", "gather", "convolution", "conditional", "sqrt"}
    assert hlo[0].count("HloModule") == 1
    trainer.close()


@pytest.mark.parametrize(
    "capability, expected",
    [((9, 0), "mixed_bfloat16"), ((8, 0), "mixed_bfloat16"), ((7, 5), "mixed_float16"), (None, "mixed_float16")],
)
def test_precision_auto_picks_bfloat16_on_gpus_that_have_it(monkeypatch, capability, expected):
    cfg = config.load(None, ["train.precision=auto"])
    details = {"compute_capability": capability} if capability else {}
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda gpu: details)
    assert step.precision(cfg, gpus=["fake-gpu"]) == expected
    assert step.precision(cfg, gpus=[]) == "float32"
    assert step.precision(config.load(None, ["train.precision=mixed_float16"]), gpus=["fake-gpu"]) == "mixed_float16"


@pytest.mark.parametrize("mixed16", [False, True])
@pytest.mark.parametrize("devices", [["/cpu:0"], ["/cpu:0", "/cpu:1"]])
def test_apply_or_skip_one_rule_for_every_precision_and_strategy(mixed16, devices):
    """A skipped step changes no weight on any replica (a loss-scaled optimizer halves its
    scale); an applied one updates every replica the same."""
    import keras

    strategy = (
        tf.distribute.OneDeviceStrategy(devices[0]) if len(devices) == 1 else tf.distribute.MirroredStrategy(devices)
    )
    cfg = config.load(
        None,
        [
            "train.optimizer=sgd",
            "train.lr=1.0",
            "train.momentum=0",
            "train.schedule=constant",
            "train.warmup_steps=0",
            "train.clip_norm=0",
        ],
    ).train
    with strategy.scope():
        w = tf.Variable([1.0, 2.0])
        opt = objective.optimizer(cfg, mixed16)
        opt.build([w])
    scale0 = float(opt.dynamic_scale.numpy()) if mixed16 else None

    @tf.function
    def run(grad, ok):
        strategy.run(lambda: step.apply_or_skip(opt, [grad], [w], ok))

    run(tf.constant([np.nan, 1.0]), tf.constant(False))
    assert [v.numpy().tolist() for v in strategy.experimental_local_results(w)] == [[1.0, 2.0]] * len(devices)
    if mixed16:
        assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
        assert float(opt.dynamic_scale.numpy()) == scale0 / 2
    scale = float(opt.dynamic_scale.numpy()) if mixed16 else 1.0
    run(tf.constant([0.5, 1.0]) * scale, tf.constant(True))  # a loss-scaled gradient is unscaled by apply
    for v in strategy.experimental_local_results(w):
        np.testing.assert_allclose(v.numpy(), [0.5, 1.0], rtol=1e-6)


def test_a_later_mirrored_run_in_the_same_process_keeps_its_collectives_apart():
    """Two runs under MirroredStrategy in one process, the second all-reducing another shape
    first: each new strategy numbered its collectives from the same keys, and TensorFlow kept
    the first run's shape for them ("Shape mismatch in the collective instance 100")."""

    def all_reduce(strategy, shape):
        @tf.function
        def reduce():
            def replica():
                return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.ones(shape))

            return strategy.run(replica)

        return strategy.experimental_local_results(reduce())

    first = step.make_strategy("mirrored")
    assert [v.numpy().tolist() for v in all_reduce(first, [])] == [2.0, 2.0]
    second = step.make_strategy("mirrored")
    assert [v.shape for v in all_reduce(second, [5, 7])] == [(5, 7), (5, 7)]
    assert float(all_reduce(second, [5, 7])[1][4, 6]) == 2.0
