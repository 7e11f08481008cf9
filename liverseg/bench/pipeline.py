"""`liverseg bench pipeline`: the input pipeline's rows against the raw read, the tutorial's
loader and TensorFlow's bare batched affine."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from liverseg import config, data_service, layouts
from liverseg.bench.measure import MB, batch_count, throughput, warm
from liverseg.manifest import Manifest

UNAUGMENTED = {"augment.placement": "none", "augment.crop": 0}  # row 2: whole slices as stored, a crop too is off


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


def bench_pipeline(
    records_dir: str | Path,
    nifti: str | Path | None = None,
    batches: int = 40,
    aug: str = "host",
    context: int | None = None,
    batch: int | None = None,
    tutorial_batches: int = 2,
    split: str = "train",
    service: bool = False,
    config_path: str | Path | None = None,
    overrides=(),
) -> list[dict]:
    """Slices/s and MB/s of: raw TFRecord read, the pipeline without augmentation (float32 out,
    and int16 out as shipped for device augmentation) and with host augmentation, the tutorial's
    loader (with nifti), TF's batched bilinear transform alone (the floor), and with `service`
    the 2b (and 3) pipelines through a tf.data service of 1 and 2 workers on loopback
    (uncompressed: data.service_compression none). The pipeline rows use the data and augment
    settings of `config_path` (+ `overrides`; default: the built-in defaults), with `context`
    and `batch` when given."""

    from liverseg import pipeline

    m = Manifest.load(records_dir)
    paths = m.shard_paths(split)
    warm(paths)
    h, w = m.split(split).slice_shape
    base = config.load(
        config_path,
        [
            *overrides,
            f"data.records={records_dir}",
            *([f"data.context={context}"] if context is not None else []),
            *([f"data.batch_size={batch}"] if batch is not None else []),
        ],
    )
    base = config.replace(base, **{"augment.placement": "host"})  # row 3 is host augmentation
    context, batch = base.data.context, base.data.batch_size
    rows = []

    def add(name, rate):
        rows.append({"row": name, "slices/s": rate[0], "MB/s": rate[1] / MB})

    add("1 raw TFRecord read", _raw_rate(m, split, base.data.cycle_length, batch, batches))
    add(
        "2 pipeline, no augmentation",
        throughput(
            iter(pipeline.build_dataset(config.replace(base, **UNAUGMENTED), split)),
            batches,
            5,
            batch_count,
        ),
    )
    add(
        "2b pipeline, int16 + uint8 for device augmentation",
        throughput(
            iter(pipeline.build_dataset(config.replace(base, **{"augment.placement": "device"}), split)),
            batches,
            5,
            batch_count,
        ),
    )
    if aug == "host":
        add(
            "3 pipeline, host augmentation",
            throughput(iter(pipeline.build_dataset(base, split)), batches, 5, batch_count),
        )
    if nifti is not None:
        add("4 tutorial loader (nib.load per slice)", _tutorial_rate(Path(nifti), m, split, batch, tutorial_batches))
    if service:
        for name, cfg in [
            ("6 tf.data service, int16 + uint8", config.replace(base, **{"augment.placement": "device"}))
        ] + ([("7 tf.data service, host augmentation", base)] if aug == "host" else []):
            for n, rate in _through_service(cfg, split, batches):
                number, what = name.split(" ", 1)
                add(f"{number}{'b' if n > 1 else ''} {what}, {n} worker{'s' if n > 1 else ''}", rate)
    add("5 ImageProjectiveTransformV3 alone", _floor_rate(batch, h, w, 2 * context + 1, batches))
    return _relative(rows)


def _raw_rate(m, split: str, cycle_length: int, batch: int, batches: int) -> tuple[float, float]:
    """The split's shards read as serialized records only (the pipeline's interleave width): the
    ceiling of any pipeline on them."""
    import tensorflow as tf

    from liverseg import pipeline

    per_slice = m.split(split).bytes / m.split(split).num_examples
    raw = (
        tf.data.TFRecordDataset(
            [str(p) for p in m.shard_paths(split)], m.compression, pipeline.READ_BUFFER, num_parallel_reads=cycle_length
        )
        .repeat()
        .batch(batch)
        .prefetch(2)
    )
    return throughput(iter(raw), batches, 5, lambda b: (int(b.shape[0]), int(b.shape[0] * per_slice)))


def _tutorial_rate(nifti: Path, m, split: str, batch: int, batches: int) -> tuple[float, float]:
    """The tutorial's loader (a whole NIfTI read per random slice) over the split's cases found
    in `nifti` (else every case there)."""

    found, _ = layouts.find(nifti)
    pairs = [(found[c.case_id][0].path, found[c.case_id][1].path) for c in m.cases_in(split) if c.case_id in found]
    loader = TutorialLoader(pairs or [(image.path, mask.path) for image, mask, *_ in found.values()], batch)
    it = (loader[i] for i in range(10**9))
    return throughput(it, batches, 1, lambda b: (b[0].shape[0], b[0].nbytes + b[1].nbytes))


def _floor_rate(batch: int, h: int, w: int, channels: int, batches: int) -> tuple[float, float]:
    """TF's batched bilinear ImageProjectiveTransformV3 alone on batches of the pipeline's shape:
    the resampling floor of any spatial augmentation."""
    import tensorflow as tf

    x = tf.random.uniform([batch, h, w, channels], -1000, 1000)
    theta = np.deg2rad(7.0)
    t = tf.constant(
        [[np.cos(theta), -np.sin(theta), 3.0, np.sin(theta), np.cos(theta), -2.0, 0.0, 0.0]] * batch, tf.float32
    )
    floor = (
        tf.data.Dataset.from_tensors(x)
        .repeat()
        .map(
            lambda im: tf.raw_ops.ImageProjectiveTransformV3(
                images=im,
                transforms=t,
                output_shape=[h, w],
                fill_value=0.0,
                interpolation="BILINEAR",
                fill_mode="CONSTANT",
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .prefetch(2)
    )
    return throughput(iter(floor), batches, 5, lambda b: (int(b.shape[0]), int(b.numpy().nbytes)))


def _relative(rows: list[dict]) -> list[dict]:
    """Each row against the raw read (1), the tutorial (4, when measured) and the floor (5), rounded."""
    ref = {r["row"][0]: r["slices/s"] for r in rows}
    for r in rows:
        r["vs 1"] = f"{100 * r['slices/s'] / ref['1']:.0f}%"
        r["vs 4"] = f"{r['slices/s'] / ref['4']:.0f}x" if "4" in ref else ""
        r["vs 5"] = f"{100 * r['slices/s'] / ref['5']:.0f}%"
        r["slices/s"], r["MB/s"] = round(r["slices/s"], 1), round(r["MB/s"], 1)
    return rows


def _through_service(cfg, split: str, batches: int) -> list[tuple[int, tuple[float, float]]]:
    """The pipeline of `cfg` through a dispatcher and 1, then 2, workers in this process (loopback)."""
    from liverseg import pipeline

    out = []
    for n in (1, 2):
        dispatcher, address = data_service.dispatcher(0, block=False)
        workers = [data_service.worker(address, 0, block=False)[0] for _ in range(n)]
        try:
            on_loopback = {"data.service": address, "data.service_compression": "none"}  # compressing costs CPU here
            ds = pipeline.build_dataset(config.replace(cfg, **on_loopback), split, service_job=f"bench-{n}")
            out.append((n, throughput(iter(ds), batches, 5, batch_count)))
        finally:
            for server in (*workers, dispatcher):
                data_service.stop_within(server)
    return out
