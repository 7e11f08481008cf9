"""Benchmarks (`liverseg bench ...`): throughput measured in one run, printed as a table.

Rates are totals over wall time (total slices / total seconds after warm-up), never
averages of per-step rates. Figures belong in docs/benchmarks.md with the command.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from liverseg import LiversegError

MB = 2**20


def _warm(paths: list[Path]) -> None:
    """Read every file once so all timed runs see the same (warm) page cache."""
    for p in paths:
        p.read_bytes()


def bench_convert(src: str | Path, workers: int = 2, opts=None, dicom: str | Path | None = None,
                  beam: bool = False) -> list[dict]:
    """Plain nibabel load of every volume vs `convert` with 1 and `workers` processes; with
    `dicom` (the same volumes as 3D-IRCADb-01 DICOM trees), the same conversions from DICOM;
    with `beam`, the same conversions on Apache Beam's DirectRunner ("x local": its time over
    the local converter's with as many workers)."""
    from liverseg.convert import ConvertOptions, convert, discover
    from liverseg.convert.beam import convert_beam

    src = Path(src)
    opts = opts or ConvertOptions()
    cases = discover(src, opts)
    files = [p.path for c in cases for p in (c.image, c.mask)]
    _warm(files)
    t0 = time.perf_counter()
    slices = voxel_bytes = 0
    for c in cases:
        image = np.asanyarray(nib.load(str(c.image.path)).dataobj)
        mask = np.asanyarray(nib.load(str(c.mask.path)).dataobj)
        slices += image.shape[2]
        voxel_bytes += image.nbytes + mask.nbytes
    rows = [{"run": "nibabel load (image+mask)", "seconds": time.perf_counter() - t0}]
    runs = [(f"convert --workers {n}", src, _with(opts, workers=n)) for n in sorted({1, workers})]
    if beam:
        runs += [(f"beam direct --workers {n}", src, _with(opts, workers=n, runner="direct")) for n in sorted({1, workers})]
    if dicom is not None:
        dicom_cases = discover(Path(dicom), _with(opts, layout="ircad"))
        if len(dicom_cases) != len(cases):
            raise LiversegError(f"{dicom}: {len(dicom_cases)} DICOM cases, {src} has {len(cases)}; give the same volumes")
        _warm([Path(c.image.path) / m for c in dicom_cases for m in c.image.members]
              + [Path(c.mask.path) / m for c in dicom_cases for m in c.mask.members])
        runs += [(f"convert DICOM --workers {n}", Path(dicom), _with(opts, workers=n, layout="ircad"))
                 for n in sorted({1, workers})]
    tmp = Path(tempfile.mkdtemp(prefix="liverseg-bench-"))
    try:
        for name, source, o in runs:
            t0 = time.perf_counter()
            convert_beam(source, tmp / "out", o) if o.runner != "local" else convert(source, tmp / "out", o, progress=False)
            rows.append({"run": name, "seconds": time.perf_counter() - t0})
            shutil.rmtree(tmp / "out")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t_load, t_one = rows[0]["seconds"], {}
    for r in rows:
        kind = r["run"].rsplit(" --workers", 1)[0]
        t_one.setdefault(kind, r["seconds"])
        r["s/volume"] = round(r["seconds"] / len(cases), 3)
        r["slices/s"] = round(slices / r["seconds"], 1)
        r["MB/s"] = round(voxel_bytes / MB / r["seconds"], 2)
        r["x load time"] = round(r["seconds"] / t_load, 2)
        r["speedup vs 1 worker"] = round(t_one[kind] / r["seconds"], 2) if r["run"] != rows[0]["run"] else ""
    local = {r["run"].rsplit("--workers ", 1)[1]: r["seconds"] for r in rows if r["run"].startswith("convert --workers")}
    for r in rows:
        r["x local"] = round(r["seconds"] / local[r["run"].rsplit("--workers ", 1)[1]], 2) if "--workers" in r["run"] else ""
        r["seconds"] = round(r["seconds"], 2)
    return rows


def _with(opts, **kw):
    from dataclasses import replace

    return replace(opts, **kw)


# ------------------------------------------------------------------------- pipeline


def _rate(iterator, batches: int, warmup: int, count) -> tuple[float, float]:
    """(items/s, bytes/s) over `batches` items of `iterator` after `warmup` items; count(item) -> (n, bytes)."""
    for _ in range(warmup):
        next(iterator)
    n = nbytes = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        a, b = count(next(iterator))
        n, nbytes = n + a, nbytes + b
    dt = time.perf_counter() - t0
    return n / dt, nbytes / dt


def _batch_count(b) -> tuple[int, int]:
    return int(b["mask"].shape[0]), int(sum(v.numpy().nbytes for v in b.values()))


class TutorialLoader:
    """The tutorial's keras.utils.Sequence: nib.load + get_fdata() of a whole volume per random slice."""

    def __init__(self, pairs: list[tuple[Path, Path]], batch: int, seed: int = 0):
        self.pairs, self.batch, self.rng = pairs, batch, np.random.default_rng(seed)
        self.depths = [nib.load(str(img)).shape[2] for img, _ in pairs]

    def __len__(self):
        return 10**9

    def __getitem__(self, _):
        xs, ys = [], []
        for _ in range(self.batch):
            c = self.rng.integers(len(self.pairs))
            s = self.rng.integers(self.depths[c])
            img, mask = self.pairs[c]
            xs.append(nib.load(str(img)).get_fdata()[:, :, s][..., None])
            ys.append(nib.load(str(mask)).get_fdata()[:, :, s][..., None])
        return np.stack(xs), np.stack(ys)


def bench_pipeline(records_dir: str | Path, nifti: str | Path | None = None, batches: int = 40, aug: str = "host",
                   context: int = 0, batch: int = 8, tutorial_batches: int = 2, split: str = "train",
                   service: bool = False) -> list[dict]:
    """Slices/s and MB/s of: raw TFRecord read, the pipeline without augmentation (float32 out,
    and int16 out as shipped for device augmentation) and with host augmentation, the tutorial's
    loader (with nifti), TF's batched bilinear transform alone (the floor), and with `service`
    the 2b (and 3) pipelines through a tf.data service of 1 and 2 workers on loopback
    (uncompressed: data.service_compression none)."""
    import tensorflow as tf

    from liverseg import config, pipeline
    from liverseg.manifest import Manifest

    m = Manifest.load(records_dir)
    paths = m.shard_paths(split)
    _warm(paths)
    h, w = m.split(split).slice_shape
    base = config.load(None, [f"data.records={records_dir}", f"data.context={context}", f"data.batch_size={batch}"])
    rows = []

    def add(name, rate):
        rows.append({"row": name, "slices/s": rate[0], "MB/s": rate[1] / MB})

    per_slice = m.split(split).bytes / m.split(split).num_examples
    raw = tf.data.TFRecordDataset([str(p) for p in paths], m.compression, pipeline.READ_BUFFER,
                                  num_parallel_reads=base.data.cycle_length).repeat().batch(batch).prefetch(2)
    add("1 raw TFRecord read", _rate(iter(raw), batches, 5, lambda b: (int(b.shape[0]), int(b.shape[0] * per_slice))))
    add("2 pipeline, no augmentation", _rate(iter(pipeline.build_dataset(config.replace(base, **{"augment.placement": "none"}), split)),
                                             batches, 5, _batch_count))
    add("2b pipeline, int16 + uint8 for device augmentation",
        _rate(iter(pipeline.build_dataset(config.replace(base, **{"augment.placement": "device"}), split)),
              batches, 5, _batch_count))
    if aug == "host":
        add("3 pipeline, host augmentation", _rate(iter(pipeline.build_dataset(base, split)), batches, 5, _batch_count))
    if nifti is not None:
        from liverseg import layouts

        found, _ = layouts.find(Path(nifti))
        pairs = [(found[c.case_id][0].path, found[c.case_id][1].path) for c in m.cases_in(split) if c.case_id in found]
        loader = TutorialLoader(pairs or [(image.path, mask.path) for image, mask, _ in found.values()], batch)
        it = (loader[i] for i in range(10**9))
        add("4 tutorial loader (nib.load per slice)",
            _rate(it, tutorial_batches, 1, lambda b: (b[0].shape[0], b[0].nbytes + b[1].nbytes)))
    if service:
        for name, cfg in [("6 tf.data service, int16 + uint8", config.replace(base, **{"augment.placement": "device"}))] + (
                [("7 tf.data service, host augmentation", base)] if aug == "host" else []):
            for n, rate in _through_service(cfg, split, batches):
                number, what = name.split(" ", 1)
                add(f"{number}{'b' if n > 1 else ''} {what}, {n} worker{'s' if n > 1 else ''}", rate)
    x = tf.random.uniform([batch, h, w, 2 * context + 1], -1000, 1000)
    theta = np.deg2rad(7.0)
    t = tf.constant([[np.cos(theta), -np.sin(theta), 3.0, np.sin(theta), np.cos(theta), -2.0, 0.0, 0.0]] * batch, tf.float32)
    floor = tf.data.Dataset.from_tensors(x).repeat().map(
        lambda im: tf.raw_ops.ImageProjectiveTransformV3(images=im, transforms=t, output_shape=[h, w], fill_value=0.0,
                                                         interpolation="BILINEAR", fill_mode="CONSTANT"),
        num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    add("5 ImageProjectiveTransformV3 alone", _rate(iter(floor), batches, 5, lambda b: (int(b.shape[0]), int(b.numpy().nbytes))))
    ref = {r["row"][0]: r["slices/s"] for r in rows}
    for r in rows:
        r["vs 1"] = f"{100 * r['slices/s'] / ref['1']:.0f}%"
        r["vs 4"] = f"{r['slices/s'] / ref['4']:.0f}x" if "4" in ref else ""
        r["vs 5"] = f"{100 * r['slices/s'] / ref['5']:.0f}%"
        r["slices/s"], r["MB/s"] = round(r["slices/s"], 1), round(r["MB/s"], 1)
    return rows


def _through_service(cfg, split: str, batches: int) -> list[tuple[int, tuple[float, float]]]:
    """The pipeline of `cfg` through a dispatcher and 1, then 2, workers in this process (loopback)."""
    from liverseg import config, data_service, pipeline

    out = []
    for n in (1, 2):
        dispatcher, address = data_service.dispatcher(0, block=False)
        workers = [data_service.worker(address, 0, block=False)[0] for _ in range(n)]
        try:
            on_loopback = {"data.service": address, "data.service_compression": "none"}  # compressing costs CPU here
            ds = pipeline.build_dataset(config.replace(cfg, **on_loopback), split, service_job=f"bench-{n}")
            out.append((n, _rate(iter(ds), batches, 5, _batch_count)))
        finally:
            for server in (*workers, dispatcher):
                data_service.stop_within(server)
    return out


# ------------------------------------------------------------------------- training


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _timed_training(cfg, run: Path, warmup: int, steps: int, fixed: bool) -> tuple[float, dict]:
    """Seconds per step of the real loop (`train.Trainer.run`: compiled step, draws, hooks)
    over `steps` steps after `warmup` calls (at least 2: a call that stages the next call's
    batches and one that does not are traced apart). Both are whole calls of
    train.steps_per_call steps, so nothing is traced or compiled while timing. fixed: batches
    come from one batch held in memory, so no input pipeline runs. Excludes the checkpoint
    the last step writes; includes the final read of the on-device figures."""
    import tensorflow as tf

    from liverseg import config, train

    def one_batch(ds):
        return tf.data.Dataset.from_tensors(next(iter(ds))).repeat()

    k = cfg.train.steps_per_call
    warmup, steps = max(2, warmup) * k, -(-steps // k) * k
    cfg = config.replace(cfg, **{"train.steps": warmup + steps, "train.log_every": 10**9, "train.eval_every": 0,
                                 "train.checkpoint_every": 10**9, "train.keep_checkpoints": 1})
    trainer = train.Trainer(cfg, run, progress=False, input_transform=one_batch if fixed else None)
    try:
        trainer.run(warmup)
        paused, t0 = trainer.hooks.paused_total, time.perf_counter()
        trainer.run(warmup + steps)
        seconds = time.perf_counter() - t0 - (trainer.hooks.paused_total - paused)
    finally:
        trainer.close()
    return seconds / steps, trainer.hooks.summary["train"]


def _tiny_records(tmp: Path, size: int = 64) -> Path:
    """A few synthetic cases converted at size x size (the loop-overhead probe's data)."""
    from liverseg import synth
    from liverseg.convert import ConvertOptions, convert

    synth.synthesize(tmp / "nifti", cases=3, size=size, slices=(8, 10), seed=1, progress=False)
    convert(tmp / "nifti", tmp / "records", ConvertOptions(val=0.0, test=0.0), progress=False)
    return tmp / "records"


ROWS = ("model", "loop", "input", "end-to-end")


def bench_train(records: str | Path, config_file: str | Path | None = None, overrides=(), steps: int = 8,
                warmup: int = 2, loop_steps: int = 400, input_batches: int = 20, peak_tflops: float | None = None,
                rows: tuple = ROWS) -> list[dict]:
    """Ceilings of training throughput for one config, measured in one run (`rows` picks):

    model          the real loop and compiled step, one batch held on the device (compute only)
    loop           the same with a one-1x1-conv model on 64x64 slices, without and with device
                   augmentation: host ms per step (dispatch and bookkeeping)
    input          the config's training pipeline alone (slices/s, and per core)
    end-to-end     the real loop on the records, with the device-idle (input wait) fraction
    always         FLOPs per image (training ~3x forward) and the img/s of 40% MFU at --peak-tflops
    """
    import logging

    import tensorflow as tf

    from liverseg import config, pipeline, step, unet
    from liverseg.manifest import Manifest

    logging.getLogger("liverseg.train").setLevel(logging.ERROR)  # "no validation" is intended here
    cfg = config.load(config_file, [*overrides, f"data.records={records}"])
    h, w = Manifest.load(records).split("train").slice_shape
    batch, channels = cfg.data.batch_size, 2 * cfg.data.context + 1
    devices = [d.name for d in tf.config.list_logical_devices("GPU")] or ["CPU"]
    recipe = (f"{batch} x {h}x{w}x{channels}, {step.precision(cfg)}, xla {cfg.train.jit_compile}, "
              f"{cfg.train.steps_per_call} steps/call, {cfg.augment.placement} augmentation, {', '.join(devices)}")
    table = []

    def add(name, value, unit, detail=""):
        table.append({"row": name, "value": value, "unit": unit, "detail": detail})

    with tempfile.TemporaryDirectory(prefix="liverseg-bench-") as tmp:
        tmp = Path(tmp)
        if "model" in rows:
            per_step, _ = _timed_training(cfg, tmp / "model", warmup, steps, fixed=True)
            add("model", round(batch / per_step, 2), "img/s", f"{cfg.model.name}: {recipe}")
        if "loop" in rows:
            probe = config.replace(cfg, **{"model.name": "pointwise", "data.records": str(_tiny_records(tmp))})
            for placement in ("none", "device"):
                per_step, _ = _timed_training(config.replace(probe, **{"augment.placement": placement}),
                                              tmp / f"loop-{placement}", warmup, loop_steps, fixed=True)
                add("loop overhead" + (" + device augmentation" if placement == "device" else ""),
                    round(1000 * per_step, 2), "ms/step",
                    f"pointwise model, {batch} x 64x64x{channels}: drives up to {batch / per_step:,.0f} img/s")
        if "input" in rows:
            fill = -(-cfg.data.shuffle_buffer // batch) + 2  # warm-up fills the shuffle buffer first
            rate, _ = _rate(iter(pipeline.build_dataset(cfg, "train")), input_batches, fill, _batch_count)
            add("input ceiling", round(rate, 1), "slices/s",
                f"{rate / _cores():.1f} per core ({_cores()} cores); {cfg.augment.placement} augmentation path")
        if "end-to-end" in rows:
            per_step, fig = _timed_training(cfg, tmp / "e2e", warmup, steps, fixed=False)
            idle = fig.get("input_wait_fraction")
            add("end to end", round(batch / per_step, 2), "img/s",
                f"input wait (device idle) {'n/a' if idle is None else f'{100 * idle:.0f}%'}, "
                f"host blocked on input {100 * fig['host_input_wait_fraction']:.0f}%")

    fwd = unet.flops_per_image(unet.build(cfg.model, channels), h, w)
    add("FLOPs per image", f"{3 * fwd / 1e9:.4g}", "GFLOP", f"training ~3x forward ({fwd / 1e9:.4g} GFLOP)")
    if peak_tflops:
        add("40% MFU target", f"{0.4 * peak_tflops * 1e12 / (3 * fwd):.4g}", "img/s",
            f"at {peak_tflops:g} TFLOPS peak: the loop and input ceilings must clear it")
    return table


# ------------------------------------------------------------------------- prediction


def bench_predict(run_dir: str | Path, data: str | Path, cases: int = 5) -> list[dict]:
    """Per NIfTI pair: whole-volume prediction seconds (read, infer, restore geometry) and
    slices/s, and metric seconds (Dice ... HD95/ASSD on the source grid)."""
    from liverseg import layouts, metrics, predict, volumes

    run = predict.load_run(run_dir)
    found, _ = layouts.find(Path(data))
    pairs = sorted(found.items())[:cases]
    _warm([p.path for _, (image, mask, _) in pairs for p in (image, mask)])
    predict.predict_source(run, pairs[0][1][0])  # trace and warm up once
    rows = []
    for case_id, (image, mask, _) in pairs:
        t0 = time.perf_counter()
        pred, _, geom = predict.predict_source(run, image)
        t_pred = time.perf_counter() - t0
        ref = volumes.load_mask(mask).voxels
        t0 = time.perf_counter()
        m = metrics.case_metrics(pred, ref, geom.spacing)
        t_metric = time.perf_counter() - t0
        rows.append({"case": case_id, "shape": "x".join(map(str, geom.shape)), "predict s": round(t_pred, 2),
                     "slices/s": round(geom.stored_shape[0] / t_pred, 1), "metrics s": round(t_metric, 2),
                     "dice": round(m["dice"], 3)})
    return rows


def bench_metrics(masks: str | Path, shift: int = 2) -> list[dict]:
    """Metric time per case on real masks, scored against an imperfect 'prediction': the
    mask shifted by `shift` voxels along every axis and eroded once."""
    from scipy import ndimage

    from liverseg import metrics

    rows = []
    for p in sorted(Path(masks).glob("*_liver.nii*")):
        img = nib.load(str(p))
        ref = np.asanyarray(img.dataobj) > 0
        pred = ndimage.binary_erosion(np.roll(ref, shift, axis=(0, 1, 2)))
        t0 = time.perf_counter()
        m = metrics.case_metrics(pred, ref, img.header.get_zooms()[:3])
        rows.append({"case": p.name.split("_liver")[0], "shape": "x".join(map(str, ref.shape)),
                     "seconds": round(time.perf_counter() - t0, 2), "dice": round(m["dice"], 3),
                     "hd95 mm": round(m["hd95"], 2), "assd mm": round(m["assd"], 2)})
    return rows
