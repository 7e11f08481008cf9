"""Input processing on the tf.data service: a dispatcher and two workers on 127.0.0.1 inside
the test process; every slice once per pass, training and resuming through it, bounded
failures (an unreachable dispatcher, dead workers), and the CLI servers."""

import collections
import re
import signal
import threading

import pytest
import tensorflow as tf

from conftest import HANG, SMOKE, liverseg_process
from liverseg import LiversegError, config, data_service, pipeline, train
from liverseg.manifest import Manifest


@pytest.fixture(scope="module")
def service():
    """grpc://127.0.0.1:PORT of a dispatcher with two workers (and the workers, to stop one)."""
    dispatcher, address = data_service.dispatcher(0, block=False)
    workers = [data_service.worker(address, 0, block=False)[0] for _ in range(2)]
    yield address, workers
    for server in (*workers, dispatcher):
        data_service.stop_within(server, 5)


def _cfg(dataset, address, *overrides):
    return config.load(SMOKE, [f"data.records={dataset}", f"data.service={address}", *overrides])


def test_every_training_slice_is_delivered_once_per_pass(dataset, service):
    """DYNAMIC sharding over two workers: over two passes of the shards, each training slice
    exactly twice (no liver thinning, batches of one so no remainder is dropped)."""
    cfg = _cfg(dataset, service[0], "data.foreground_fraction=0", "data.batch_size=1", "augment.placement=host")
    got = collections.Counter(
        (int(b["case_index"][0]), int(b["slice_index"][0]))
        for b in pipeline.build_dataset(cfg, "train", epochs=2, service_job="once-per-pass")
    )
    m = Manifest.load(dataset)
    expected = {(c.index, s) for c in m.cases_in("train") for s in range(c.num_slices)}
    assert set(got) == expected and set(got.values()) == {2}


@pytest.mark.slow
def test_training_and_resuming_through_the_service(dataset, service, tmp_path, caplog):
    run = tmp_path / "run"
    result = train.train(
        _cfg(dataset, service[0], "train.steps=4", "train.checkpoint_every=2", "train.eval_every=100"),
        run,
        progress=False,
    )
    assert result["step"] == 4 and result["train"]["skipped_steps"] == 0
    assert "cannot be checkpointed, so a resumed run continues with a fresh, non-repeating data order" in caplog.text
    result = train.train(
        _cfg(dataset, service[0], "train.steps=6", "train.checkpoint_every=2", "train.eval_every=100"),
        run,
        progress=False,
    )
    assert result["step"] == 6
    reader = tf.train.load_checkpoint(str(run / "checkpoints"))
    assert reader.get_tensor("input_restarts/.ATTRIBUTES/VARIABLE_VALUE") == 1  # the resumed start read a new job
    assert not any("iterator" in name for name in reader.get_variable_to_shape_map())


def test_a_dead_worker_does_not_stop_the_input(dataset, service):
    address, workers = service
    it = iter(pipeline.build_dataset(_cfg(dataset, address), "train", service_job="one-dies"))
    for _ in range(5):
        next(it)
    workers[1].stop()  # the other keeps serving
    done = threading.Event()
    threading.Thread(target=lambda: ([next(it) for _ in range(50)], done.set()), daemon=True).start()
    assert done.wait(600), "the input stopped when one of two workers died"  # a bound against hanging, not a speed


@pytest.mark.slow
def test_no_batch_for_too_long_is_an_error_naming_the_service(dataset, tmp_path):
    """A dispatcher whose workers are all gone: the trainer stops after data.service_timeout_s."""
    dispatcher, address = data_service.dispatcher(0, block=False)
    try:
        with pytest.raises(LiversegError, match=rf"no batch from the tf.data service at {address} for 3 s"):
            train.train(
                _cfg(dataset, address, "data.service_timeout_s=3", "train.steps=2"), tmp_path / "run", progress=False
            )
    finally:
        dispatcher.stop()


def test_an_unreachable_dispatcher_fails_in_bounded_time(dataset, tmp_path):
    _, address = data_service.dispatcher(0, block=False)  # a port that was free...
    port = int(address.rsplit(":", 1)[1]) + 7  # ...and one next to it that nobody listens on
    with pytest.raises(
        LiversegError,
        match=rf"data.service grpc://127.0.0.1:{port}: no tf.data service dispatcher "
        rf"reachable \(Connection refused, waited at most 10 s\)",
    ):
        train.train(_cfg(dataset, f"grpc://127.0.0.1:{port}"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(LiversegError, match=r"data service address 'nowhere': write grpc://HOST:PORT"):
        data_service.parse_address("nowhere")


@pytest.mark.slow
def test_the_servers_print_their_address_and_stop_on_sigterm():
    dispatcher = liverseg_process("data-service", "dispatcher", "--port", 0)
    line = dispatcher.stdout.readline()
    assert re.fullmatch(
        r"tf\.data service dispatcher serving at grpc://127\.0\.0\.1:\d+ \(Ctrl-C or SIGTERM stops it\)\n", line
    ), line
    address = line.split(" at ")[1].split()[0]
    worker = liverseg_process("data-service", "worker", "--dispatcher", address)
    assert worker.stdout.readline().startswith(f"tf.data service worker (dispatcher {address}) serving at 127.0.0.1:")
    # a second dispatcher on the first one's port is refused (gRPC would share the port)
    port = address.rsplit(":", 1)[1]
    second = liverseg_process("data-service", "dispatcher", "--port", port)
    out = second.communicate(timeout=HANG)[0]
    assert second.returncode == 2 and f"Error: dispatcher --port {port}: in use" in out, out
    dispatcher.send_signal(signal.SIGKILL)  # the worker outlives its dispatcher...
    dispatcher.wait()
    for proc in (worker,):  # ...and still stops on SIGTERM
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=HANG)[0]
        assert proc.returncode == 0 and out.rstrip().endswith("stopped") and "Traceback" not in out, out
