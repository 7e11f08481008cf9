"""The private framework internals liverseg relies on, one guard each: a TensorFlow, Keras,
TensorBoard or Beam upgrade that moves one fails here first, with the internal named.

Each guard checks that the internal exists *and* still does what liverseg uses it for."""

import numpy as np
import pytest
import tensorflow as tf

from liverseg import checkpoints, objective


def test_tf_python_framework_config_disable_op_determinism():
    """step.set_op_determinism: TF 2.21 has a public enable but no public disable."""
    from tensorflow.python.framework import config as tf_config

    assert callable(getattr(tf_config, "disable_op_determinism", None))
    was = tf_config.is_op_determinism_enabled()
    try:
        tf.config.experimental.enable_op_determinism()
        assert tf_config.is_op_determinism_enabled()
        tf_config.disable_op_determinism()
        assert not tf_config.is_op_determinism_enabled()
    finally:
        if was:
            tf.config.experimental.enable_op_determinism()


def test_tf_internal_strategy_supports_no_merge_call():
    """step.apply_or_skip: decides whether the update's cond may run in replica context. The
    default strategy has no merge_call to avoid; OneDevice and Mirrored (outside XLA on GPUs)
    synchronise through merge_call, so the cond must go through it there."""
    fn = tf.__internal__.distribute.strategy_supports_no_merge_call
    assert fn() is True
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert not bool(one.run(lambda: tf.constant(fn())).numpy())
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert not any(
        bool(v.numpy()) for v in mirrored.experimental_local_results(mirrored.run(lambda: tf.constant(fn())))
    )


def test_keras_tf_optimizer_all_reduce_sum_gradients():
    """objective._pre_reduced overrides it so Keras does not sum the gradients a second time:
    on two mirrored replicas, SGD (lr 1) given a gradient of 1 on each replica moves the
    weight by exactly 1 (Keras alone sums the replicas' gradients: 2)."""
    import keras

    for cls in (keras.optimizers.Adam, keras.optimizers.AdamW, keras.optimizers.SGD):
        assert callable(getattr(cls, "_all_reduce_sum_gradients", None)), cls
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    moved = {}
    for name, cls in (("keras", keras.optimizers.SGD), ("ours", objective._pre_reduced(keras.optimizers.SGD))):
        with mirrored.scope():
            v = keras.Variable(np.zeros(1, np.float32))
            opt = cls(learning_rate=1.0)
            opt.build([v])

        def applier(opt, v):
            return tf.function(lambda: mirrored.run(lambda: opt.apply([tf.ones(1)], [v])))

        applier(opt, v)()
        moved[name] = float(-v.numpy()[0])
    assert moved == {"keras": 2.0, "ours": 1.0}


def test_keras_loss_scale_optimizer_step_counter_and_dynamic_scale():
    """step.apply_or_skip halves the scale and resets the counter on a skipped step, as Keras's own rule."""
    import keras

    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam())
    v = keras.Variable(np.ones(2, np.float32))
    opt.build([v])
    for name in ("step_counter", "dynamic_scale"):
        var = getattr(opt, name, None)
        assert var is not None and hasattr(var, "assign"), name
    opt.dynamic_scale.assign(opt.dynamic_scale * 0.5)
    opt.step_counter.assign(0)
    assert float(opt.dynamic_scale.numpy()) == 2.0**14 and int(opt.step_counter.numpy()) == 0  # Keras starts at 2**15


def test_tf_data_service_worker_server_address():
    """data_service.worker prints the port a worker really bound (port 0: any free one) from `_address`."""
    from liverseg import data_service

    dispatcher, address = data_service.dispatcher(0, block=False)
    try:
        worker = tf.data.experimental.service.WorkerServer(
            tf.data.experimental.service.WorkerConfig(dispatcher_address=address.removeprefix("grpc://"), port=0)
        )
        try:
            host, port = worker._address.rsplit(":", 1)
            assert int(port) > 0
        finally:
            data_service.stop_within(worker, 5)
    finally:
        data_service.stop_within(dispatcher, 5)


def test_beam_fn_api_runner_and_its_while_running_error_text():
    """convert.beam runs `--runner direct` on the FnApiRunner itself with a default environment
    (the DirectRunner would try to download Prism), and cuts a step's error at Beam's
    " [while running" suffix (beam._explained): a step that raises must say so that way."""
    pytest.importorskip("apache_beam")
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.transforms import environments

    def fail(x):
        raise ValueError(f"liverseg-guard {x}")

    runner = FnApiRunner(default_environment=environments.EmbeddedPythonEnvironment.default())
    with pytest.raises(Exception) as err:
        with beam.Pipeline(runner=runner) as p:
            _ = p | beam.Create([7]) | "Step" >> beam.Map(fail)
    assert "liverseg-guard 7 [while running" in str(err.value)
    from apache_beam.testing.util import assert_that, equal_to

    with beam.Pipeline(runner=FnApiRunner(default_environment=environments.EmbeddedPythonEnvironment.default())) as p:
        assert_that(p | beam.Create([1, 2]) | beam.Map(lambda x: 10 * x), equal_to([10, 20]))


def test_beam_subprocess_environment_and_sdk_worker_main():
    """convert.beam starts its workers as SubprocessSDKEnvironment.from_command_string(command), and
    beam_worker runs apache_beam's sdk_worker_main through runpy as __main__ (its main(argv))."""
    pytest.importorskip("apache_beam")
    import importlib.util
    import inspect

    from apache_beam.runners.worker import sdk_worker_main
    from apache_beam.transforms import environments

    env = environments.SubprocessSDKEnvironment.from_command_string("python -m liverseg.convert.beam_worker 123")
    assert env.command_string == "python -m liverseg.convert.beam_worker 123"
    assert importlib.util.find_spec("apache_beam.runners.worker.sdk_worker_main") is not None
    assert len(inspect.signature(sdk_worker_main.main).parameters) == 1  # main(argv)
    assert "if __name__ == '__main__':\n  main(sys.argv)" in inspect.getsource(
        sdk_worker_main
    )  # runpy's __main__ runs it


def test_tf_checkpoint_writes_into_a_prefix_temp_folder(tmp_path):
    """hooks._save removes `ckpt-N_temp*` after a failed save: TF writes a checkpoint's shards into
    `<prefix>_temp/` first (a file of that name in the way makes the save fail naming it)."""
    (tmp_path / "ckpt-1_temp").write_text("in the way")
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)), str(tmp_path), max_to_keep=2)
    with pytest.raises(tf.errors.OpError, match=r"ckpt-1_temp/part-00000-of-00001"):
        manager.save(checkpoint_number=1)


def test_checkpoint_state_file_written_by_hand_is_read_by_tf(tmp_path):
    """checkpoints._write_state writes TF's CheckpointState text proto; TF must read it back."""
    ckpt = tf.train.Checkpoint(v=tf.Variable(1.0))
    manager = tf.train.CheckpointManager(ckpt, str(tmp_path), max_to_keep=5)
    for n in (2, 4, 6):
        manager.save(checkpoint_number=n)
    checkpoints._write_state(tmp_path, [2, 4])
    state = tf.train.get_checkpoint_state(str(tmp_path))
    assert state.model_checkpoint_path.endswith("ckpt-4")
    assert [p.rsplit("/", 1)[-1] for p in state.all_model_checkpoint_paths] == ["ckpt-2", "ckpt-4"]
    assert [p.rsplit("/", 1)[-1] for p in tf.train.CheckpointManager(ckpt, str(tmp_path), 5).checkpoints] == [
        "ckpt-2",
        "ckpt-4",
    ]


def test_tensorboard_data_server_binary_lookup():
    """board.serve asks for the fast data server by name when `get_server_binary` finds it."""
    from tensorboard.data import server_ingester

    assert issubclass(server_ingester.NoDataServerError, Exception)
    try:
        binary = server_ingester.get_server_binary()
    except server_ingester.NoDataServerError:
        pytest.skip("no TensorBoard data server binary on this platform")
    import os

    assert os.access(binary.path, os.X_OK)
