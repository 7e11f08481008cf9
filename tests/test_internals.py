"""The private framework internals liverseg relies on, one guard each: a TensorFlow, Keras,
TensorBoard or Beam upgrade that moves one fails here first, with the internal named.

Each guard checks that the internal exists *and* still does what liverseg uses it for."""

import numpy as np
import pytest
import tensorflow as tf

from liverseg import checkpoints, objective


def test_tf_python_framework_config_disable_op_determinism():
    """train._set_op_determinism: TF 2.21 has a public enable but no public disable."""
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
    """step.apply_or_skip: decides whether the update's cond may run in replica context."""
    fn = tf.__internal__.distribute.strategy_supports_no_merge_call
    assert fn() in (True, False)  # the default strategy
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert one.run(lambda: tf.constant(fn())).numpy() in (True, False)


def test_keras_tf_optimizer_all_reduce_sum_gradients():
    """objective._pre_reduced overrides it so Keras does not sum the gradients a second time."""
    import keras

    for cls in (keras.optimizers.Adam, keras.optimizers.AdamW, keras.optimizers.SGD):
        assert callable(getattr(cls, "_all_reduce_sum_gradients", None)), cls
        assert "_all_reduce_sum_gradients" in vars(objective._pre_reduced(cls))


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
        worker = tf.data.experimental.service.WorkerServer(tf.data.experimental.service.WorkerConfig(
            dispatcher_address=address.removeprefix("grpc://"), port=0))
        try:
            host, port = worker._address.rsplit(":", 1)
            assert int(port) > 0
        finally:
            data_service.stop_within(worker, 5)
    finally:
        data_service.stop_within(dispatcher, 5)


def test_beam_fn_api_runner():
    """convert.beam runs `--runner direct` on the FnApiRunner itself (the DirectRunner would try to download Prism)."""
    pytest.importorskip("apache_beam")
    import inspect

    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    assert "default_environment" in inspect.signature(FnApiRunner.__init__).parameters


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
    assert [p.rsplit("/", 1)[-1] for p in tf.train.CheckpointManager(ckpt, str(tmp_path), 5).checkpoints] == \
        ["ckpt-2", "ckpt-4"]


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
