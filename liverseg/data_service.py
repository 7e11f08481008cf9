"""The tf.data service: input processing on CPU hosts apart from the trainers.

A dispatcher and any number of workers (`liverseg data-service dispatcher|worker`, thin
over TensorFlow's `DispatchServer` / `WorkerServer`) run the expensive part of the
training pipeline (shard reads, parsing, 2.5D gather, host augmentation) when the config
sets `data.service: grpc://HOST:PORT`; trainers only receive finished batches.

Sharding policy DYNAMIC: the dispatcher hands the pipeline's *files* (shards, in the
pipeline's shuffled order) to whichever worker asks next, so every slice is produced once
per pass over the files (at most once: a worker that dies takes its current file with
it), however many workers there are and whatever their speed. OFF would make every worker
produce the whole dataset (each slice once per worker per epoch); the static policies
need a fixed worker list. Trainers of a multi-worker job read one shared job (the job
name is derived from the run), so each receives its own share of the batches.

What it costs: the service's iterators cannot be checkpointed, so a resumed run cannot
continue on the exact next batch. The trainer says so at start and keeps a count of
restarts in its checkpoint; each restart reads a fresh job with a pipeline seeded by that
count, i.e. a new, non-repeating data order.

TensorFlow's tf.data servers listen on every interface (TF 2.21 has no bind address); the
address they give out (the dispatcher's, and each worker's to the dispatcher) is
127.0.0.1 unless `--host` names another, so only this machine is sent to them by default.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from urllib.parse import urlparse

from liverseg import LiversegError
from liverseg.config import derive_seed

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 10.0


def parse_address(address: str) -> tuple[str, int]:
    """ "grpc://host:port" or "host:port" -> (host, port); an error naming the value otherwise."""
    url = urlparse(address if "://" in address else f"grpc://{address}")
    if url.scheme != "grpc" or not url.hostname or url.port is None:
        raise LiversegError(f"data service address {address!r}: write grpc://HOST:PORT (e.g. grpc://127.0.0.1:5050)")
    return url.hostname, url.port


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S, what: str = "data.service") -> None:
    """Fail within `timeout` seconds, naming the address, when no dispatcher listens there
    (TensorFlow itself would retry for ever)."""
    host, port = parse_address(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else e.strerror or type(e).__name__
        raise LiversegError(
            f"{what} {address}: no tf.data service dispatcher reachable ({reason}, waited at most "
            f"{timeout:g} s); start one with `liverseg data-service dispatcher --port {port}`"
        ) from None


def distribute(ds, address: str, job_name: str, compression: str = "auto"):
    """Run `ds` (everything up to here) on the service, DYNAMIC sharding, in job `job_name`;
    compression "auto" (the workers compress what they send) or "none"."""
    import tensorflow as tf

    service = tf.data.experimental.service
    return ds.apply(
        service.distribute(
            processing_mode=service.ShardingPolicy.DYNAMIC,
            service=address,
            job_name=job_name,
            compression="AUTO" if compression == "auto" else None,
        )
    )


# ------------------------------------------------------------------------- servers


def _serve(server, what: str, address: str, stop_timeout: float = 10.0) -> None:
    """Print the address, then serve until SIGTERM or SIGINT: a requested stop, so the
    command exits 0. The server is stopped from this thread, outside the signal handler;
    one that does not stop within `stop_timeout` seconds is left to the process's exit."""
    import os
    import signal

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"{what} serving at {address} (Ctrl-C or SIGTERM stops it)", flush=True)
    while not stop.wait(0.5):
        pass
    stopped = stop_within(server, stop_timeout)
    print(f"{what} at {address} stopped", flush=True)
    if not stopped:  # TensorFlow's server is still winding down: the process ends it
        os._exit(0)


def stop_within(server, seconds: float = 10.0) -> bool:
    """Stop a tf.data server, waiting at most `seconds` (a worker may wait for its clients);
    whether it stopped in time."""
    stopper = threading.Thread(target=server.stop, daemon=True)
    stopper.start()
    stopper.join(seconds)
    return not stopper.is_alive()


def check_port_free(port: int, what: str) -> None:
    """Refuse a port something already listens on: gRPC would share it (SO_REUSEPORT), and a
    second dispatcher there would answer trainers with "not found" for the first one's jobs."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
        try:
            s.bind(("", port))
        except OSError as e:
            raise LiversegError(
                f"{what} --port {port}: in use ({e.strerror}), by another tf.data service server or "
                "program; stop it or choose another --port (0: any free one)"
            ) from None


def dispatcher(port: int, host: str = "127.0.0.1", work_dir: str | None = None, block: bool = True):
    """Start a dispatcher on `port` (0: any free one). With work_dir it journals its state
    there (fault-tolerant mode): a restarted dispatcher resumes its jobs."""
    import tensorflow as tf

    check_port_free(port, "dispatcher")
    config = tf.data.experimental.service.DispatcherConfig(
        port=port, work_dir=work_dir, fault_tolerant_mode=work_dir is not None
    )
    server = tf.data.experimental.service.DispatchServer(config)
    address = f"grpc://{host}:{server.target.rsplit(':', 1)[1]}"
    if block:
        _serve(server, "tf.data service dispatcher", address)
    return server, address


def worker(dispatcher_address: str, port: int, host: str = "127.0.0.1", block: bool = True):
    """Start a worker on `port` (0: any free one), registered with the dispatcher as HOST:PORT."""
    import tensorflow as tf

    d_host, d_port = parse_address(dispatcher_address)
    check_reachable(dispatcher_address, what="--dispatcher")
    check_port_free(port, "worker")
    config = tf.data.experimental.service.WorkerConfig(
        dispatcher_address=f"{d_host}:{d_port}", worker_address=f"{host}:%port%", port=port
    )
    server = tf.data.experimental.service.WorkerServer(config)
    address = f"{host}:{server._address.rsplit(':', 1)[1]}" if hasattr(server, "_address") else f"{host}:{port}"
    if block:
        _serve(server, f"tf.data service worker (dispatcher {dispatcher_address})", address)
    return server, address


def restarted(cfg, restarts: int, run: str):
    """(config, job name) of the training pipeline on the tf.data service at a run's start
    number `restarts`: each start reads a job of its own, seeded by that number, so a resumed
    run reads a fresh data order, the same for every trainer of the run (its position on the
    service cannot be saved). Without a service: `cfg` as it is, the default job."""
    if not cfg.data.service:
        return cfg, "liverseg"
    seed = derive_seed(cfg.seed, f"service-restart-{restarts}") if restarts else cfg.seed
    return dataclasses.replace(cfg, seed=seed), f"liverseg-{run}-{restarts}"


def with_deadline(seconds: float, fn, *args, what: str):
    """fn(*args), or LiversegError(what) when it has not returned after `seconds` (it is left
    running in a daemon thread: a tf.data service iterator waiting for workers cannot be interrupted)."""
    done, out = threading.Event(), {}

    def call():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = e
        done.set()

    threading.Thread(target=call, daemon=True).start()
    if not done.wait(seconds):
        raise LiversegError(what)
    if "error" in out:
        raise out["error"]
    return out["value"]


__all__ = [
    "check_reachable",
    "dispatcher",
    "distribute",
    "parse_address",
    "restarted",
    "stop_within",
    "with_deadline",
    "worker",
]
