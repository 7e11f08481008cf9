"""The distributed training step: strategy, precision, the compiled step and how batches reach it.

One training step per replica is, with `train.jit_compile`, a single XLA computation:
device augmentation, forward, backward, the gradient all-reduce (gradients and the
non-finite flag in one collective), the skip decision and the optimizer update. A call
(`run_steps`) runs `steps_per_call` such steps and, first of all, copies the *next*
call's batches onto the replicas' devices, so that copy overlaps this call's compute
(the copy is issued before this call's kernels are queued; a copy issued after them would
wait for them). Nothing in a call reads a value back to the host: losses, Dice counts,
skipped steps and the non-finite streak are summed on the device (`Accumulators`) and
read at log and checkpoint intervals.

Where the whole step cannot be one computation: MirroredStrategy and MultiWorkerMirrored
only run without `merge_call` under XLA when every device is a GPU; elsewhere (several
CPU devices, i.e. tests) the update needs `merge_call`, which cannot run inside a
compiled function, so augmentation and forward/backward are compiled and the all-reduce
and update run outside (`whole_step_compiles`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import threading
from collections.abc import Callable

import keras
import tensorflow as tf

from liverseg import LiversegError, objective, pipeline, plan, unet
from liverseg.config import Config, derive_seed

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------- strategy


# The collective strategies made in this process, by kind and devices (see make_strategy).
_COLLECTIVE: dict[tuple, tf.distribute.Strategy] = {}


def make_strategy(name: str) -> tf.distribute.Strategy:
    """auto: Mirrored over several GPUs, else one device. mirrored without GPUs uses every
    logical CPU device (for testing). multi_worker reads the cluster from TF_CONFIG.

    A process makes one Mirrored (or MultiWorkerMirrored) strategy per set of devices and
    reuses it for every later run: each new strategy numbers its collectives from the same keys
    (group 1, instance 100, ...), and TensorFlow's collective executor keeps an instance's
    shape for the life of the process, so a second run's first all-reduce met the first run's
    ("Shape mismatch in the collective instance 100 ... [29482] vs [1]": two runs in one
    process, such as bench train's rows, cv folds in a notebook, or the test suite). Reused, a
    strategy goes on numbering where it stopped."""
    gpus = tf.config.list_physical_devices("GPU")  # logical devices would start the runtime, too early for MWMS
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise LiversegError("train.strategy=multi_worker needs TF_CONFIG (the cluster and this task's index)")
        impl = (
            tf.distribute.experimental.CommunicationImplementation.NCCL
            if gpus
            else tf.distribute.experimental.CommunicationImplementation.RING
        )
        return _reused(
            ("multi_worker", os.environ["TF_CONFIG"], impl.name),
            lambda: tf.distribute.MultiWorkerMirroredStrategy(
                communication_options=tf.distribute.experimental.CommunicationOptions(implementation=impl)
            ),
        )
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        logical = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        devices = tuple(d.name for d in logical)
        return _reused(("mirrored", devices), lambda: tf.distribute.MirroredStrategy(list(devices)))
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")


def _reused(key: tuple, make) -> tf.distribute.Strategy:
    if key not in _COLLECTIVE:
        _COLLECTIVE[key] = make()
    return _COLLECTIVE[key]


def set_op_determinism(on: bool) -> None:
    """Op determinism is process-global in TensorFlow: turn it on for a deterministic run and
    back off for the next run in the same process (it would make an XLA run fail)."""
    if on:
        tf.config.experimental.enable_op_determinism()
        return
    from tensorflow.python.framework import config as tf_config  # no public "disable" (TF 2.21)

    disable = getattr(tf_config, "disable_op_determinism", None)
    if disable is not None:
        disable()


def preemption_handler(strategy, manager, exit_status: int):
    """Under MultiWorkerMirrored, TF's PreemptionCheckpointHandler (every worker saves at the
    same step on SIGTERM, then exits with `exit_status`); elsewhere None (the loop saves)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    return tf.distribute.experimental.PreemptionCheckpointHandler(
        strategy.cluster_resolver,
        manager,
        termination_config=tf.distribute.experimental.TerminationConfig(exit_fn=lambda: sys.exit(exit_status)),
    )


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


LOST_PEER = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
)
_REASONS = re.compile(
    r"((?:Collective ops is )?aborted by: .+)|((?:recvmsg:)?Connection reset by peer|Socket closed|Connection refused|"
    r"failed to connect to all addresses|Deadline Exceeded|heartbeat timeout[^.]*|"
    r"leader task was preempted/died/restarted unexpectedly)"
)


def lost_peer_reason(e: tf.errors.OpError) -> str:
    """The line of a collective's error that says what happened to the peer (TF's first line
    is often only "Graph execution error:")."""
    text = e.message or ""
    m = _REASONS.search(text)
    if m:
        return (m.group(1) or m.group(2)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


@contextlib.contextmanager
def lost_workers_explained(multi_worker: bool, resume_point: Callable[[], str]):
    """Under multi-worker, a peer that died or became unreachable surfaces as a collective's
    UnavailableError (or a deadline, abort or cancellation) with a long trace, in the loop or
    while the strategy sets up, and in TF's own watcher threads: say it in one line instead,
    naming where training resumes (`resume_point()`), and keep the threads' copies of it off
    the console."""
    if not multi_worker:
        yield
        return
    default_hook = threading.excepthook

    def quiet_lost_peer(args) -> None:  # TF's preemption watchers fail with the same lost peer
        if issubclass(args.exc_type, LOST_PEER):
            log.debug("%s: %s", args.thread.name if args.thread else "thread", args.exc_value)
            return
        default_hook(args)

    threading.excepthook = quiet_lost_peer
    try:
        yield
    except LOST_PEER as e:  # the hook stays: the watchers may fail again while the process exits
        raise LiversegError(
            f"lost contact with a worker of the cluster ({type(e).__name__}: {lost_peer_reason(e)}); "
            f"restart every worker with the same command: training resumes from {resume_point()}"
        ) from None
    except BaseException:
        threading.excepthook = default_hook
        raise
    threading.excepthook = default_hook


def input_context(strategy: tf.distribute.Strategy) -> tf.distribute.InputContext:
    """This worker's input pipeline: one per worker (host), feeding its local replicas."""
    resolver = getattr(strategy, "cluster_resolver", None)
    pipes, pipe = 1, 0
    if resolver is not None and resolver.task_type:
        spec = resolver.cluster_spec().as_dict()
        tasks = [("chief", 0)] * len(spec.get("chief", [])) + [
            ("worker", i) for i in range(len(spec.get("worker", [])))
        ]
        pipes, pipe = len(tasks), tasks.index((resolver.task_type, resolver.task_id))
    return tf.distribute.InputContext(
        num_input_pipelines=pipes, input_pipeline_id=pipe, num_replicas_in_sync=strategy.num_replicas_in_sync
    )


def precision(cfg: Config, gpus: list | None = None) -> str:
    """The Keras dtype policy. "auto": mixed_bfloat16 on GPUs with bfloat16 tensor cores
    (compute capability 8.0+: A100, H100; no loss scaling needed), mixed_float16 on older
    GPUs, float32 without a GPU (CPUs emulate both half types slowly)."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    gpus = tf.config.list_physical_devices("GPU") if gpus is None else gpus
    if not gpus:
        return "float32"
    capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability") or (0, 0)
    return "mixed_bfloat16" if tuple(capability) >= (8, 0) else "mixed_float16"


def whole_step_compiles(strategy: tf.distribute.Strategy) -> bool:
    """Can the update (all-reduce + optimizer) run inside the compiled step? Yes for one
    device and for (multi-worker) mirrored GPUs; no for several CPU devices (merge_call)."""
    if strategy.num_replicas_in_sync == 1:
        return True
    return all("GPU" in d.upper() for d in strategy.extended.worker_devices)


# ------------------------------------------------------------------------- on-device figures


def confusion(logits, mask, axis=None):
    """Hard (TP, FP, FN) pixel counts of logits > 0 against the mask, stacked on the last axis."""
    pred, y = tf.cast(logits > 0, tf.float32), tf.cast(mask, tf.float32)
    return tf.stack(
        [tf.reduce_sum(pred * y, axis), tf.reduce_sum(pred * (1 - y), axis), tf.reduce_sum((1 - pred) * y, axis)],
        axis=-1,
    )


class Accumulators:
    """Training figures kept on the device between two reads (created in strategy scope).

    Replica-local (sync-on-read) variables: each replica adds its own share inside the
    compiled step, with no collective; reading sums the shares (loss, counts) or takes
    the first replica's copy of figures that are identical on every replica.
    """

    def __init__(self):
        on_read = {"synchronization": tf.VariableSynchronization.ON_READ, "trainable": False}
        total = {**on_read, "aggregation": tf.VariableAggregation.SUM}
        first = {**on_read, "aggregation": tf.VariableAggregation.ONLY_FIRST_REPLICA}
        self.loss = tf.Variable(0.0, name="loss_sum", **total)  # of applied steps (replica shares of the mean)
        self.counts = tf.Variable(tf.zeros([3], tf.float64), name="tp_fp_fn", **total)
        self.applied = tf.Variable(tf.constant(0, tf.int64), name="applied", **first)
        self.skipped = tf.Variable(tf.constant(0, tf.int64), name="skipped", **first)  # since the run started
        self.streak = tf.Variable(tf.constant(0, tf.int64), name="streak", **first)  # skipped in a row, up to now
        self.streak_first = tf.Variable(tf.constant(0, tf.int64), name="streak_first", **first)

    def record(self, ok, loss, counts, step_done):
        """In replica context, after the update of step `step_done` (1-based)."""
        ok64 = tf.cast(ok, tf.int64)
        self.loss.assign_add(tf.where(ok, tf.cast(loss, tf.float32), 0.0))
        self.counts.assign_add(tf.where(ok, tf.cast(counts, tf.float64), tf.zeros([3], tf.float64)))
        self.applied.assign_add(ok64)
        self.skipped.assign_add(1 - ok64)
        self.streak_first.assign(
            tf.where(ok, tf.constant(0, tf.int64), tf.where(self.streak > 0, self.streak_first, step_done))
        )
        self.streak.assign(tf.where(ok, tf.constant(0, tf.int64), self.streak + 1))

    def read(self, reset: bool) -> dict:
        """The figures since the last reset (a host read: one sync). Cross-replica context."""
        out = {
            "loss_sum": float(self.loss.read_value()),
            "counts": self.counts.read_value().numpy(),
            "applied": int(self.applied.read_value()),
            "skipped": int(self.skipped.read_value()),
            "streak": int(self.streak.read_value()),
            "streak_first": int(self.streak_first.read_value()),
        }
        if reset:
            self.loss.assign(0.0)
            self.counts.assign(tf.zeros([3], tf.float64))
            self.applied.assign(0)
        return out


# ------------------------------------------------------------------------- the update


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What training changes and a checkpoint holds (`build_state`): the model and its
    optimizer, whose learning-rate schedule spans `schedule_steps` (a variable: a time budget
    fixes the run's steps after it started), created in strategy scope with the on-device
    figures; the step counter and the best validation Dice are plain variables beside them
    (the compiled call adds to the counter once, outside the replicas)."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    figures: Accumulators
    schedule_steps: tf.Variable
    step: tf.Variable
    best: tf.Variable


def build_state(cfg: Config, strategy, channels: int, steps: int, lr_scale: float = 1.0) -> TrainState:
    """A fresh TrainState for a run of `steps` steps on `channels`-slice inputs."""
    policy = precision(cfg)
    with strategy.scope():
        model = unet.build(cfg.model, channels, policy)
        schedule_steps = tf.Variable(float(steps), trainable=False, name="schedule_steps")
        optimizer = objective.optimizer(cfg.train, policy == "mixed_float16", lr_scale, schedule_steps)
        optimizer.build(model.trainable_variables)
        figures = Accumulators()
    return TrainState(
        model,
        optimizer,
        figures,
        schedule_steps,
        tf.Variable(0, dtype=tf.int64, trainable=False, name="step"),
        tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_val_dice"),
    )


def apply_or_skip(optimizer, grads, variables, ok) -> None:
    """Apply the all-reduced gradients on every replica, or skip the step on every replica.

    One rule for every precision: `ok` (no replica saw a non-finite loss or gradient) is
    identical on all replicas, so all take the same branch. A skipped step changes
    nothing, except that a LossScaleOptimizer halves its scale (Keras's own rule for a
    non-finite step; Keras alone would look at each replica's local gradients).
    Where replicas synchronise through merge_call (MirroredStrategy outside XLA-on-GPUs,
    OneDeviceStrategy), a cond in replica context may not contain one and the optimizer's
    update does: the cond then runs in cross-replica context, as Keras's own does.
    """
    lso = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def update():
        optimizer.apply(grads, variables)

    def skip():
        if lso:
            optimizer.step_counter.assign(0)
            optimizer.dynamic_scale.assign(optimizer.dynamic_scale * 0.5)

    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(ok, update, skip)
        return

    def cross(distribution, ok):
        flag = distribution.experimental_local_results(ok)[0]
        tf.cond(flag, lambda: distribution.extended.call_for_each_replica(update), skip)

    tf.distribute.get_replica_context().merge_call(cross, args=(ok,))


def batch_norm_sync(strategy: tf.distribute.Strategy, model):
    """sync(): average batch-norm moving statistics across replicas.

    Keras 3 mirrors them with aggregation NONE, so each replica keeps its own. A moving
    average is linear in the batch statistics, so averaging just before they are read
    (validation, checkpoint, saved weights) equals averaging after every step, without a
    collective per step. Under multi-worker every worker must call it at the same points.
    """
    stats = [v for v in model.non_trainable_variables if v.dtype in ("float32", "float16", "bfloat16")]
    if strategy.num_replicas_in_sync == 1 or not stats:
        return lambda: None

    def average():
        ctx = tf.distribute.get_replica_context()
        for v, mean in zip(stats, ctx.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in stats])):
            v.assign(mean)

    @tf.function
    def sync():
        strategy.run(average)

    return sync


# ------------------------------------------------------------------------- the step


def build_train_step(cfg: Config, strategy, model, optimizer, norm, step: tf.Variable, acc: Accumulators):
    """run_steps(batches, upcoming) -> (staged, token).

    batches: this call's steps, each a list of per-local-replica dicts {"image", "mask"}
    (on the devices when they were staged by the previous call, else host tensors);
    upcoming: the next call's steps as host tensors (or [] when nothing may be drawn
    ahead), returned as `staged` on the replicas' devices. token: the step counter after
    the call (reading it waits for the call). Also used by `liverseg bench train`.
    """
    replicas = strategy.num_replicas_in_sync
    mixed16 = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    loss_fn = objective.per_example_loss(cfg.train)
    batch = plan.global_batch(cfg, replicas)
    prepare = pipeline.batch_preparer(cfg, norm) if cfg.augment.placement == "device" else None
    seed = derive_seed(cfg.seed, "device-augment")
    variables = model.trainable_variables

    def compute(b, at):
        """This replica's share: augment (device placement), forward, backward."""
        image, mask = b["image"], b["mask"]
        if prepare is not None:
            replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int64)
            b = prepare(b, tf.stack([tf.constant(seed, tf.int64), at * replicas + replica]))
            image, mask = b["image"], b["mask"]
        with tf.GradientTape() as tape:
            logits = model(image, training=True)
            # This replica's share of the global mean (tf.nn.compute_average_loss adds an Assert: a host op)
            loss = tf.reduce_sum(loss_fn(mask, logits)) / batch
            scaled = optimizer.scale_loss(loss) if mixed16 else loss
        grads = tape.gradient(scaled, variables)
        finite = tf.math.is_finite(loss) & tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        return loss, grads, 1.0 - tf.cast(finite, tf.float32), confusion(logits, mask)

    def update(loss, grads, bad, counts, at):
        """Gradients and flag summed in one collective; applied everywhere or nowhere; recorded."""
        *grads, bad = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, [*grads, bad])
        ok = bad == 0
        apply_or_skip(optimizer, grads, variables, ok)
        acc.record(ok, loss, counts, at + 1)

    if whole_step_compiles(strategy):  # one function per step, traced once (compiled with jit_compile)
        replica_step = tf.function(lambda b, at: update(*compute(b, at), at), jit_compile=cfg.train.jit_compile)
    else:
        if cfg.train.jit_compile:
            log.info(
                "XLA: several CPU replicas synchronise through merge_call, which cannot run in a compiled "
                "function; compiling augmentation and forward/backward, not the update"
            )
        compute_fn = tf.function(compute, jit_compile=True) if cfg.train.jit_compile else compute

        def replica_step(b, at):
            update(*compute_fn(b, at), at)

    devices = strategy.extended.worker_devices
    local = len(devices)

    def stage(per_replica: list) -> list:
        out = []
        for device, b in zip(devices, per_replica):
            with tf.device(device):
                out.append({k: tf.identity(v) for k, v in b.items()})
        return out

    @tf.function
    def run_steps(batches, upcoming):
        staged = [stage(per_replica) for per_replica in upcoming]  # first, so the copies overlap this call
        for i, per_replica in enumerate(batches):
            values = strategy.experimental_distribute_values_from_function(
                lambda ctx, per_replica=per_replica: per_replica[ctx.replica_id_in_sync_group % local]
            )
            strategy.run(replica_step, args=(values, step + i))
        step.assign_add(len(batches))
        return staged, step.read_value()

    run_steps.replica_step = replica_step  # for tests: one replica's step (compiled as one piece when it can be)
    return run_steps


def draw(iterator, steps: int, local_replicas: int) -> list:
    """`steps` steps of per-local-replica batches from this worker's iterator (image and mask only)."""
    return [
        [{k: b[k] for k in ("image", "mask")} for b in (next(iterator) for _ in range(local_replicas))]
        for _ in range(steps)
    ]


__all__ = [
    "LOST_PEER",
    "Accumulators",
    "apply_or_skip",
    "batch_norm_sync",
    "build_train_step",
    "confusion",
    "draw",
    "input_context",
    "is_chief",
    "lost_peer_reason",
    "lost_workers_explained",
    "make_strategy",
    "precision",
    "preemption_handler",
    "set_op_determinism",
    "whole_step_compiles",
]
