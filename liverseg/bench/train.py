"""`liverseg bench train`: the ceilings of a training recipe (model, loop, input, end to end)."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from liverseg import config, plan, synth
from liverseg.bench.measure import batch_count, cores, throughput
from liverseg.convert import ConvertOptions, convert
from liverseg.manifest import Manifest


class _Without(logging.Filter):
    """Drops the records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _timed_training(cfg, run: Path, warmup: int, steps: int, fixed: bool) -> tuple[float, dict]:
    """Seconds per step of the real loop (`train.Trainer.run`: compiled step, draws, hooks)
    over `steps` steps after `warmup` calls (at least 2: a call that stages the next call's
    batches and one that does not are traced apart). Both are whole calls of
    train.steps_per_call steps, so nothing is traced or compiled while timing. fixed: batches
    come from one batch held in memory, so no input pipeline runs. Excludes the checkpoint
    the last step writes; includes the final read of the on-device figures."""
    import tensorflow as tf

    from liverseg import train

    def one_batch(ds):
        return tf.data.Dataset.from_tensors(next(iter(ds))).repeat()

    k = cfg.train.steps_per_call
    warmup, steps = max(2, warmup) * k, -(-steps // k) * k
    cfg = config.replace(
        cfg,
        **{
            "train.steps": warmup + steps,
            "train.time_budget_min": 0,  # the rows time a fixed number of steps
            "train.log_every": 10**9,
            "train.eval_every": 0,
            "train.checkpoint_every": 10**9,
            "train.keep_checkpoints": 1,
        },
    )
    quiet = _Without("no validation")  # train.eval_every=0 is intended here
    logging.getLogger("liverseg.train").addFilter(quiet)
    try:
        trainer = train.Trainer(cfg, run, progress=False, input_transform=one_batch if fixed else None)
    finally:
        logging.getLogger("liverseg.train").removeFilter(quiet)
    try:
        trainer.run(warmup)
        paused, t0 = trainer.paused_total, time.perf_counter()
        trainer.run(warmup + steps)
        seconds = time.perf_counter() - t0 - (trainer.paused_total - paused)
    finally:
        trainer.close()
    return seconds / steps, trainer.summary["train"]


def _tiny_records(tmp: Path, size: int = 64) -> Path:
    """A few synthetic cases converted at size x size (the loop-overhead probe's data)."""

    synth.synthesize(tmp / "nifti", cases=3, size=size, slices=(8, 10), seed=1, progress=False)
    convert(tmp / "nifti", tmp / "records", ConvertOptions(val=0.0, test=0.0), progress=False)
    return tmp / "records"


ROWS = ("model", "loop", "input", "end-to-end")

# Memory of a training run on the CPU, measured (`/usr/bin/time -f %M liverseg bench train
# RECORDS --rows model --set data.batch_size=B` on 512x512x5 records, the default recipe):
# peak RSS 6.12 GB at batch 2, 7.87 GB at batch 4: 0.87 GB per image, which is 0.52 of the
# bytes of its forward pass's 4-D tensors (1.67 GB per image, `unet.forward_tensor_bytes`);
# 4.4 GB at batch 0, of which ~2.2 GB is TensorFlow, the compiled step and the model and the
# rest the input pipeline's buffers (shuffle buffer and parsed shards).
ACTIVATION_SHARE = 0.52
RUNTIME_BYTES = 2.2e9
MEMORY_HEADROOM = 0.85  # of MemAvailable: the rest is left to the system


def available_memory() -> float | None:
    """This machine's available memory (a function of its own, so tests can pretend)."""
    return plan.available_memory()


def training_memory(cfg, model, h: int, w: int, shard_bytes: float) -> tuple[float, float]:
    """(fixed bytes, bytes per image of the batch) of a training run on the CPU, estimated
    from the measurement above: runtime, weights with the optimizer's two moments and the
    gradients, the input pipeline's shuffle buffer and parsed shards; and the activations."""
    from liverseg import unet

    channels = model.input_shape[-1]
    pipeline_bytes = cfg.data.shuffle_buffer * h * w * (2 * channels + 1) + cfg.data.cycle_length * shard_bytes
    fixed = RUNTIME_BYTES + 16 * model.count_params() + pipeline_bytes
    return fixed, ACTIVATION_SHARE * unet.forward_tensor_bytes(model, h, w)


def fitting_batch(batch: int, fixed: float, per_image: float, available: float | None, replicas: int = 1) -> int:
    """The batch to measure at: `batch`, or the largest multiple of `replicas` below it whose
    estimated memory fits in MEMORY_HEADROOM of `available` (0: not even one fits)."""
    if available is None or fixed + per_image * batch <= MEMORY_HEADROOM * available:
        return batch
    fit = int((MEMORY_HEADROOM * available - fixed) // per_image)
    return max(0, min(batch, fit - fit % replicas))


def bench_train(
    records: str | Path,
    config_file: str | Path | None = None,
    overrides=(),
    steps: int = 8,
    warmup: int = 2,
    loop_steps: int = 400,
    input_batches: int = 20,
    peak_tflops: float | None = None,
    rows: tuple = ROWS,
) -> list[dict]:
    """Ceilings of training throughput for one config, measured in one run (`rows` picks):

    model          the real loop and compiled step, one batch held on the device (compute only)
    loop           the same with a one-1x1-conv model on 64x64 slices, without and with device
                   augmentation: host ms per step (dispatch and bookkeeping)
    input          the config's training pipeline alone (slices/s, and per core)
    end-to-end     the real loop on the records, with the device-idle (input wait) fraction
    always         FLOPs per image (training ~3x forward) and the img/s of 40% MFU at --peak-tflops
    """
    import tensorflow as tf

    from liverseg import step

    cfg = config.load(config_file, [*overrides, f"data.records={records}"])
    h, w = Manifest.load(records).split("train").slice_shape
    batch, channels = cfg.data.batch_size, 2 * cfg.data.context + 1
    devices = [d.name for d in tf.config.list_logical_devices("GPU")] or ["CPU"]
    recipe = (
        f"{batch} x {h}x{w}x{channels}, {step.precision(cfg)}, xla {cfg.train.jit_compile}, "
        f"{cfg.train.steps_per_call} steps/call, {cfg.augment.placement} augmentation, {', '.join(devices)}"
    )
    table = []

    def add(name, value, unit, detail=""):
        table.append({"row": name, "value": value, "unit": unit, "detail": detail})

    m = Manifest.load(records)
    sized = _sized_for_memory(cfg, h, w, max(s.bytes for s in m.shards("train")), devices != ["CPU"])

    def measured(name, unit, fixed_input, detail):
        """One of the rows that train the real model, at a batch that fits (or skipped, saying why)."""
        run_cfg, note = sized
        if run_cfg is None:
            add(name, "skipped", unit, note)
            return None
        per_step, fig = _timed_training(run_cfg, tmp / name.replace(" ", "-"), warmup, steps, fixed=fixed_input)
        add(name, round(run_cfg.data.batch_size / per_step, 2), unit, "; ".join(x for x in (detail(fig), note) if x))
        return fig

    with tempfile.TemporaryDirectory(prefix="liverseg-bench-") as tmp:
        tmp = Path(tmp)
        if "model" in rows:
            measured("model", "img/s", True, lambda fig: f"{cfg.model.name}: {recipe}")
        if "loop" in rows:
            _loop_rows(cfg, tmp, warmup, loop_steps, add)
        if "input" in rows:
            _input_row(cfg, input_batches, add)
        if "end-to-end" in rows:

            def waits(fig):
                idle = fig.get("input_wait_fraction")
                return (
                    f"input wait (device idle) {'n/a' if idle is None else f'{100 * idle:.0f}%'}, "
                    f"host blocked on input {100 * fig['host_input_wait_fraction']:.0f}%"
                )

            measured("end to end", "img/s", False, waits)

    _flops_rows(cfg, channels, h, w, peak_tflops, add)
    return table


def _loop_rows(cfg, tmp: Path, warmup: int, loop_steps: int, add) -> None:
    """The loop's host cost per step: the real loop with a one-1x1-conv model on 64x64 slices
    of the recipe's depth and batch, without and with device augmentation."""

    batch, channels = cfg.data.batch_size, 2 * cfg.data.context + 1
    probe = config.replace(cfg, **{"model.name": "pointwise", "data.records": str(_tiny_records(tmp))})
    for placement in ("none", "device"):
        per_step, _ = _timed_training(
            config.replace(probe, **{"augment.placement": placement}),
            tmp / f"loop-{placement}",
            warmup,
            loop_steps,
            fixed=True,
        )
        add(
            "loop overhead" + (" + device augmentation" if placement == "device" else ""),
            round(1000 * per_step, 2),
            "ms/step",
            f"pointwise model, {batch} x 64x64x{channels}: drives up to {batch / per_step:,.0f} img/s",
        )


def _input_row(cfg, input_batches: int, add) -> None:
    """The recipe's training pipeline alone, after its shuffle buffer has filled."""
    from liverseg import pipeline

    fill = -(-cfg.data.shuffle_buffer // cfg.data.batch_size) + 2  # warm-up fills the shuffle buffer first
    rate, _ = throughput(iter(pipeline.build_dataset(cfg, "train")), input_batches, fill, batch_count)
    add(
        "input ceiling",
        round(rate, 1),
        "slices/s",
        f"{rate / cores():.1f} per core ({cores()} cores); {cfg.augment.placement} augmentation path",
    )


def _flops_rows(cfg, channels: int, h: int, w: int, peak_tflops: float | None, add) -> None:
    """FLOPs per image of a training step (~3x the forward pass), and the img/s of 40% MFU."""
    from liverseg import unet

    fwd = unet.flops_per_image(unet.build(cfg.model, channels), h, w)
    add("FLOPs per image", f"{3 * fwd / 1e9:.4g}", "GFLOP", f"training ~3x forward ({fwd / 1e9:.4g} GFLOP)")
    if peak_tflops:
        add(
            "40% MFU target",
            f"{0.4 * peak_tflops * 1e12 / (3 * fwd):.4g}",
            "img/s",
            f"at {peak_tflops:g} TFLOPS peak: the loop and input ceilings must clear it",
        )


def _sized_for_memory(cfg, h: int, w: int, shard_bytes: float, on_gpus: bool):
    """(the config to train the model rows with, or None to skip them; a note on the batch).
    On GPUs TensorFlow reports a batch that does not fit itself; on the CPU the kernel would
    kill the process, so the batch is fitted to this machine's memory first."""
    from liverseg import unet

    if on_gpus:
        return cfg, ""
    model = unet.build(cfg.model, 2 * cfg.data.context + 1)
    fixed, per_image = training_memory(cfg, model, h, w, shard_bytes)
    batch, available = cfg.data.batch_size, available_memory()
    fit = fitting_batch(batch, fixed, per_image, available)
    if fit == batch:
        return cfg, ""
    need = f"batch {batch} needs ~{(fixed + per_image * batch) / 1e9:.1f} GB, {available / 1e9:.1f} GB available"
    if fit == 0:
        return None, f"{need}: not even batch 1 fits (~{(fixed + per_image) / 1e9:.1f} GB)"
    return config.replace(cfg, **{"data.batch_size": fit}), f"at batch {fit}: {need}"
