"""tf.data input pipeline: sharded TFRecords -> batches of 2.5D slices, for one input pipeline.

`build_dataset(cfg, split, input_context)` builds the dataset of one input pipeline, with the
`tf.distribute.InputContext` that `distribute_datasets_from_function` would pass; the trainer
builds one per worker itself and keeps its iterator, because TF's distributed iterators
cannot be checkpointed. Training order, and why:

1. shard *files* across input pipelines (each worker reads only its own shards);
2. shuffle shard order and repeat (at file level, so every epoch visits shards anew);
3. read shards in parallel (interleave, `cycle_length` at a time) and parse each whole
   shard with one vectorised `parse_example` (records of a case are contiguous, so a
   shard holds whole volumes);
4. per shard, pick slices (foreground-aware: keep every liver slice, thin the others so
   the expected liver share is `p + (1 - p) f`) *before* gathering their 2.5D context, so
   dropped slices cost nothing; context slices are gathered from the same case, clamped
   at its first/last slice;
5. interleave the slices of `cycle_length` shards, then shuffle (buffer of slices);
6. batch at the per-replica size with drop_remainder (static shapes for XLA);
7. prepare the batch: cast, spatial augmentation on HU, normalise, intensity
   augmentation (placement "host"); or ship int16 + uint8 untouched (placement "device",
   half the bytes, the training step augments); or just normalise (no augmentation);
8. prefetch.

Evaluation order reads shards in order, keeps every slice exactly once in case/slice
order, never augments and never drops a remainder. Elements are dicts:
image [b, H, W, 2k+1] (float32, or int16 for device placement), mask [b, H, W, 1] uint8,
case_index [b] and slice_index [b] (int64).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import tensorflow as tf

from liverseg import augment, data_service, records
from liverseg.config import Config, derive_seed
from liverseg.manifest import Manifest
from liverseg.plan import Plan, liver_keep_probability, plan_split, source_keep
from liverseg.records import RecordsError
from liverseg.rundir import Normalization

log = logging.getLogger(__name__)
READ_BUFFER = 8 * 2**20


def normalize(hu, norm: Normalization):
    """HU (float32 tensor) -> network input: (clip(hu, lo, hi) - shift) / scale."""
    return (tf.clip_by_value(hu, norm.lo, norm.hi) - norm.shift) / norm.scale


def _read_shard(path, count, compression: str, h: int, w: int) -> dict:
    """A whole shard parsed at once: image [N, H, W] int16, mask [N, H, W] uint8, scalars [N].

    `get_single_element` is a stateful op, for which symbolic checkpointing logs a
    FAILED_PRECONDITION warning (TF C++ level W: hidden at the CLI's default log level) at
    every shard visit; the shard files are immutable, so replaying it on resume is exact
    (tested). Reading the shard as `flat_map(TFRecordDataset.batch)` instead avoids the
    warning but made this pipeline 12x slower under symbolic checkpointing (TF 2.21: 5.3 s
    against 0.45 s for 150 batches of 16 32x32 slices).
    """
    serialized = tf.data.TFRecordDataset(path, compression, READ_BUFFER).batch(count).get_single_element()
    ex = records.decode_example(serialized, h, w)
    return {
        k: ex[k]
        for k in (
            records.IMAGE,
            records.MASK,
            records.CASE_INDEX,
            records.SLICE_INDEX,
            records.NUM_SLICES,
            records.LIVER_VOXELS,
        )
    }


def numbered(ds: tf.data.Dataset, on_service: bool = False) -> tf.data.Dataset:
    """(i, element) with i = 0, 1, ...: `enumerate`, as a scan where the iterator is checkpointed.

    `Dataset.enumerate` is a zip with a counter, and in TF 2.21 a zip over a shuffle cannot
    be checkpointed twice under symbolic checkpointing: an iterator restored once saves an
    empty state for the shuffle, and restoring *that* fails ("Expected N components but got
    0"), so a run could resume only once. A scan keeps its count as plain iterator state
    (guarded by tests/test_pipeline.py::test_resumed_three_times_reads_exactly_like_one_pass).
    On the tf.data service nothing is checkpointed, and DYNAMIC sharding needs every stage to
    pass the shard files' split provider through, which a scan does not (each worker would
    then read every shard): there it stays `enumerate`.
    """
    if on_service:
        return ds.enumerate()

    def count(i, element):
        return i + 1, (i, element)

    return ds.scan(tf.constant(0, tf.int64), count)


def context_rows(slice_index, num_slices, row, k: int):
    """Rows (within a case-contiguous block) of the 2k+1 slices around `row`, clamped to its case."""
    offsets = tf.range(-k, k + 1, dtype=tf.int64)
    return row - slice_index + tf.clip_by_value(slice_index + offsets, 0, num_slices - 1)


def kept_rows(shard: dict, keep_seed=None, keep_bg: float = 1.0, case_keep=None, members=None):
    """The rows [R] int64 of one parsed shard (or of the shards held in memory) to use, in order.

    Rows are thinned here, before any voxel is copied: non-liver rows kept with probability
    keep_bg, and every row with its case's `case_keep` (by case index: the source weights'
    thinning); with `members` (a bool per case index: a fold's shards also hold the other
    split's cases) only the rows of member cases.
    """
    rows = tf.range(tf.shape(shard[records.SLICE_INDEX], out_type=tf.int64)[0])
    keep = None
    if keep_seed is not None and (keep_bg < 1.0 or case_keep is not None):
        u = tf.random.stateless_uniform(tf.shape(rows), keep_seed, dtype=tf.float64)
        p = tf.where(shard[records.LIVER_VOXELS] > 0, tf.constant(1.0, tf.float64), keep_bg)
        if case_keep is not None:
            p = p * tf.gather(case_keep, shard[records.CASE_INDEX])
        keep = u < p
    if members is not None:
        member = tf.gather(members, shard[records.CASE_INDEX])
        keep = member if keep is None else keep & member
    return rows if keep is None else tf.boolean_mask(rows, keep)


def _shard_rows(shard: dict, keep_seed=None, keep_bg: float = 1.0, case_keep=None, members=None) -> tf.data.Dataset:
    """(shard, row) for the `kept_rows` of one parsed shard, in order. The shard's tensors are
    shared by reference (no copy); `_gather_slice` copies out one slice later."""

    def with_shard(row):
        return shard, row

    rows = kept_rows(shard, keep_seed, keep_bg, case_keep, members)
    return tf.data.Dataset.from_tensor_slices(rows).map(with_shard)


def _gather_slice(shard: dict, row, k: int) -> dict:
    """One example with 2.5D context (channels last), copied out of its shard.

    gather copies on purpose: a plain slice would alias the parsed shard, and every slice
    in the shuffle buffer would then keep its whole shard (~100 MB at 512x512) alive.
    """
    s, n = shard[records.SLICE_INDEX][row], shard[records.NUM_SLICES][row]
    # Transposed as float16 bits: a bitcast moves no data, and a transpose moves bits unchanged
    # (tf.stack of the slices instead measured 2.7x slower). oneDNN logs a fallback to Eigen for
    # int16 transposes on CPUs without AVX-512, and for float16 on those without AVX512-FP16
    # (the CLI drops that notice: startup.NOTICES).
    rows = tf.bitcast(tf.gather(shard[records.IMAGE], context_rows(s, n, row, k)), tf.float16)
    image = tf.bitcast(tf.transpose(rows, [1, 2, 0]), tf.int16)
    mask = tf.gather(shard[records.MASK], row)[..., None]  # not a transpose: oneDNN's uint8 transpose logs an error
    return {"image": image, "mask": mask, "case_index": shard[records.CASE_INDEX][row], "slice_index": s}


def batch_preparer(cfg: Config, norm: Normalization):
    """prepare(batch, seed=None): int16/uint8 batch -> network input (float32 normalised image).

    With a seed and augmentation enabled it augments, through one compiled `augment.Augmenter`.
    Shared by host placement (in tf.data) and device placement (in the training step).
    """
    augmenter = None
    if augment.enabled(cfg.augment):  # the dense form inside the compiled step, the gated one on the host
        augmenter = augment.Augmenter(
            cfg.augment, functools.partial(normalize, norm=norm), dense=cfg.augment.placement == "device"
        )

    def prepare(batch: dict, seed=None) -> dict:
        image, mask = batch["image"], batch["mask"]
        if seed is not None and augmenter is not None:
            image, mask = augmenter(image, mask, seed)  # reads the int16 HU as stored
        else:
            image = normalize(tf.cast(image, tf.float32), norm)
        return {**batch, "image": image, "mask": mask}

    return prepare


# ------------------------------------------------------------------------- the dataset


def _files(plan: Plan, shards) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
        ([str(plan.manifest.path(s)) for s in shards], tf.constant([s.num_examples for s in shards], tf.int64))
    )


# Named functions, not lambdas, below: AutoGraph locates a function's source by its line and
# gives up (with a warning) on several lambdas that look alike.


def _stages(cfg: Config, plan: Plan):
    """(read, gather): a shard file -> its parsed tensors; (shard, row) -> one 2.5D example."""
    compression, h, w, k = plan.manifest.compression, plan.height, plan.width, cfg.data.context

    def read(path, count):
        return _read_shard(path, count, compression, h, w)

    def gather(shard, row):
        return _gather_slice(shard, row, k)

    return read, gather


def _in_memory_slices(cfg: Config, plan: Plan, shards, epochs: int | None) -> tf.data.Dataset:
    """Examples of `shards` held in memory (read and parsed once, here): each pass thins the
    rows as a streamed visit would (`kept_rows`, seeded by the pass) and takes them in a
    random permutation of its own, so no shuffle buffer is needed. The iterator's state is
    the pass and the position in it: exact resume, however often."""
    read, gather_at = _stages(cfg, plan)
    try:
        parts = [read(tf.constant(str(plan.manifest.path(s))), tf.constant(s.num_examples, tf.int64)) for s in shards]
        held = {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]}  # whole cases in order: contexts stay in case
    except (tf.errors.ResourceExhaustedError, MemoryError) as e:  # a limit the estimate did not see (ulimit -v)
        raise RecordsError(
            f"data.in_memory: out of memory reading the training shards of {plan.manifest.root} into memory "
            f"({type(e).__name__}); use data.in_memory=never (the shards are streamed) or raise the memory limit"
        ) from None
    keep_bg, seed = liver_keep_probability(cfg, plan.manifest, plan.split), cfg.seed
    sampling = tf.constant(derive_seed(seed, "foreground-sampling"), tf.int64)
    order = tf.constant(derive_seed(seed, f"in-memory-order-{plan.pipe}"), tf.int64)
    keep = source_keep(cfg, plan.manifest, plan.split)
    case_keep = None if keep is None else tf.constant(keep, tf.float64)
    members = None if plan.members is None else tf.constant(plan.members, tf.bool)

    def rows_of_pass(visit):
        rows = kept_rows(held, tf.stack([sampling, visit]), keep_bg, case_keep, members)
        return tf.data.Dataset.from_tensor_slices(
            tf.random.experimental.stateless_shuffle(rows, tf.stack([order, visit]))
        )

    def gather(row):
        return gather_at(held, row)

    ds = tf.data.Dataset.range(epochs if epochs is not None else 2**62).flat_map(rows_of_pass)
    if plan.record_shard:
        ds = ds.shard(plan.n_pipes, plan.pipe)
    return ds.map(gather, num_parallel_calls=_parallel(cfg))


def _training_slices(cfg: Config, plan: Plan, shards, epochs: int | None, on_service: bool) -> tf.data.Dataset:
    """Examples of `shards`, for training: shard order shuffled per epoch, shards read
    `cycle_length` at a time, liver slices favoured, the rows of the visited shards interleaved."""
    read, gather = _stages(cfg, plan)
    keep_bg, seed = liver_keep_probability(cfg, plan.manifest, plan.split), cfg.seed
    sampling = tf.constant(derive_seed(seed, "foreground-sampling"), tf.int64)
    keep = source_keep(cfg, plan.manifest, plan.split)
    case_keep = None if keep is None else tf.constant(keep, tf.float64)
    members = None if plan.members is None else tf.constant(plan.members, tf.bool)

    def rows_of_visit(visit, shard):  # every visit of a shard (counted across epochs) samples anew
        return _shard_rows(shard, tf.stack([sampling, visit]), keep_bg, case_keep, members)

    files, n = _files(plan, shards), len(shards)
    if cfg.data.cache:  # parsed shards kept in memory after the first pass
        parsed = files.map(read).cache().shuffle(n, seed=seed, reshuffle_each_iteration=True).repeat(epochs)
    else:
        parsed = (
            files.shuffle(n, seed=seed, reshuffle_each_iteration=True)
            .repeat(epochs)
            .map(read, num_parallel_calls=None if cfg.deterministic else cfg.data.cycle_length)
        )
    # This interleave only hands out row references, so it needs no parallelism (and TF's
    # parallel interleave is not safe under symbolic checkpointing); the copying happens in
    # the parallel map after it.
    ds = numbered(parsed, on_service).interleave(rows_of_visit, cycle_length=cfg.data.cycle_length, block_length=1)
    if plan.record_shard:  # on row references, before any voxel is copied
        ds = ds.shard(plan.n_pipes, plan.pipe)
    return ds.map(gather, num_parallel_calls=_parallel(cfg))


def _training_batches(cfg: Config, plan: Plan, epochs: int | None, on_service: bool) -> tf.data.Dataset:
    """Shuffled, batched (per replica, remainder dropped: static shapes) and, with host
    placement, augmented batches; device placement ships int16 + uint8 as read."""
    if plan.in_memory:  # each pass a permutation already
        ds = _in_memory_slices(cfg, plan, plan.shards, epochs)
    else:
        ds = _training_slices(cfg, plan, plan.shards, epochs, on_service)
        ds = ds.shuffle(
            cfg.data.shuffle_buffer,
            seed=derive_seed(cfg.seed, f"slice-shuffle-{plan.pipe}"),
            reshuffle_each_iteration=True,
        )
    ds = ds.batch(plan.batch, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)
    if cfg.augment.placement == "device":
        return ds
    prepare = batch_preparer(cfg, plan.norm)
    stream = tf.constant(derive_seed(cfg.seed, f"host-augment-{plan.pipe}"), tf.int64)

    def augment_batch(i, batch):
        if on_service:  # workers count batches apart: the batch's first slice tells them apart
            i = i * 1_000_003 + batch["case_index"][0] * 100_003 + batch["slice_index"][0]
        return prepare(batch, tf.stack([stream, i]))

    return numbered(ds, on_service).map(augment_batch, num_parallel_calls=_parallel(cfg))


def _evaluation_batches(cfg: Config, plan: Plan) -> tf.data.Dataset:
    """Every slice once, in case and slice order, normalised, never augmented; the last batch may be short."""
    read, gather = _stages(cfg, plan)
    prepare = batch_preparer(cfg, plan.norm)

    def normalize_batch(batch):
        return prepare(batch)

    members = None if plan.members is None else tf.constant(plan.members, tf.bool)

    def rows(shard):
        return _shard_rows(shard, members=members)

    parsed = _files(plan, plan.shards).map(read)
    if cfg.data.cache:
        parsed = parsed.cache()
    ds = parsed.flat_map(rows)
    if plan.record_shard:
        ds = ds.shard(plan.n_pipes, plan.pipe)
    ds = ds.map(gather, num_parallel_calls=_parallel(cfg))
    ds = ds.batch(plan.batch, drop_remainder=False, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(normalize_batch, num_parallel_calls=_parallel(cfg))


def _parallel(cfg: Config):
    """num_parallel_calls of the per-example maps. Under op determinism (deterministic: true)
    TF runs them sequentially anyway, by rewriting each node, and logs an error line for an
    attribute the rewrite drops (use_unbounded_threadpool): ask for sequential maps instead."""
    return None if cfg.deterministic else tf.data.AUTOTUNE


def build_dataset(
    cfg: Config,
    split: str,
    input_context: tf.distribute.InputContext | None = None,
    training: bool | None = None,
    epochs: int | None = None,
    service_job: str = "liverseg",
) -> tf.data.Dataset:
    """The dataset of one input pipeline. training defaults to split == "train".

    Training repeats for ever (epochs: that many passes over the shards instead). With
    `data.service`, everything up to the prepared batches runs on the tf.data service in
    job `service_job` (one job shared by the trainers of a run: the service shards it).
    """
    training = split == "train" if training is None else training
    on_service = training and bool(cfg.data.service)
    plan = plan_split(cfg, split, input_context, training, on_service)
    ds = _training_batches(cfg, plan, epochs, on_service) if training else _evaluation_batches(cfg, plan)
    options = tf.data.Options()
    # Deterministic order always: symbolic checkpoints (positions, not buffers) can only replay
    # a deterministic pipeline, and exact resume needs them. Order is a function of the seed.
    options.deterministic = True
    options.experimental_symbolic_checkpoint = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF  # sharded above
    if on_service:  # the workers run the pipeline above (DYNAMIC sharding: each shard once per pass)
        ds = data_service.distribute(
            ds.with_options(options), cfg.data.service, service_job, cfg.data.service_compression
        )
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


@contextlib.contextmanager
def named_data_errors(cfg: Config, split: str):
    """Re-raise TFRecord corruption (DataLossError names no file) naming the shard and record."""
    try:
        yield
    except tf.errors.DataLossError as e:
        m = Manifest.load(cfg.data.records, check_shards=False)
        where = records.find_corruption(m.shard_paths(split), m.compression)
        detail = where or f"{e.message.splitlines()[0]} (shards of {split} look intact; check the disk)"
        raise RecordsError(f"corrupt record: {detail}; run liverseg verify {cfg.data.records}") from None
