"""What a split's pipeline reads, decided before any graph is built (no TensorFlow here).

`plan_split(cfg, split, input_context, ...)` resolves a pipeline's part of a split: its shards
(files divided among input pipelines, or rows where there are fewer shards than pipelines),
the slice shape, the normalisation as numbers, the per-replica batch, a fold's members, and
whether training holds the shards in memory. Beside it, what sampling needs per case (the
foreground keep probability, the sources' weights) and every check that can refuse a recipe
before anything is written (`check_training`): context, memory, the service. `pipeline`
builds the tf.data stages from a plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from liverseg import data_service, folds
from liverseg.config import Config
from liverseg.manifest import Manifest
from liverseg.records import RecordsError
from liverseg.rundir import InputSpec, Normalization

log = logging.getLogger(__name__)


def available_memory() -> float | None:
    """Bytes this process may still take: MemAvailable from /proc/meminfo, or less where a
    cgroup (a container's or a job's memory limit) leaves less; None where nothing says."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(float(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            cap, used = Path(limit).read_text().strip(), Path(usage).read_text().strip()
        except OSError:
            continue
        if cap.isdigit() and int(cap) < 2**60:  # "max", or v1's "no limit" (a page-rounded 2**63)
            found.append(max(0.0, float(cap) - float(used)))
        break
    return min(found) if found else None


def normalization(cfg: Config, manifest: Manifest) -> Normalization:
    """The HU normalisation of cfg, resolved to numbers (they are saved with the run)."""
    if cfg.data.normalize == "window":
        lo, hi = cfg.data.hu_window
        return Normalization(lo, hi, lo, hi - lo)
    stats = manifest.split("train").hu.liver
    if stats.count == 0:
        raise RecordsError(f"{manifest.root}: no liver voxels in the train split; use data.normalize=window")
    if stats.std < 1.0:  # (x - mean) / std would blow rounding up into the whole input range
        raise RecordsError(
            f"{manifest.root}: the train split's liver HU have a standard deviation of {stats.std:g} "
            "(nearly constant): z-score normalisation cannot be taken from them; use "
            "data.normalize=window (and data.hu_window), or check the masks and images"
        )
    pct = stats.percentiles
    return Normalization(pct["0.5"], pct["99.5"], stats.mean, stats.std)


def open_split(cfg: Config, split: str) -> Manifest:
    """Load and validate the manifest (version, shards present) before any graph is built;
    with data.folds, as the fold sees it (`folds.view`)."""

    if not cfg.data.records:
        raise RecordsError("no records folder: pass --records RECORDS (or set data.records)")
    m = folds.view(Manifest.load(cfg.data.records), cfg.data)
    if m.split(split).slice_shape is None:
        raise RecordsError(f"{m.root}: split {split!r} mixes slice sizes; re-convert with --size N to train on it")
    return m


def check_context(cfg: Config, manifest: Manifest) -> None:
    """Refuse a 2.5D context that reaches past the shortest training case; warn when its
    window is wider than that case (those channels are copies of the case's edge slices)."""
    k = cfg.data.context
    known = manifest.split("train").min_slices
    if k == 0 or known is not None and 2 * k + 1 <= known:  # from the summary: no case read
        return
    shortest = min(manifest.cases_in("train"), key=lambda c: c.num_slices, default=None)
    if shortest is None or 2 * k + 1 <= shortest.num_slices:
        return
    what = f"data.context={k} stacks {2 * k + 1} slices, but training case {shortest.case_id} has {shortest.num_slices}"
    if k >= shortest.num_slices:
        raise RecordsError(
            f"{what}: most channels would be copies of its edge slices; choose data.context <= "
            f"{(shortest.num_slices - 1) // 2} (2 is usual)"
        )
    log.warning("%s: its edge slices are repeated to fill the window", what)


def check_memory(cfg: Config, manifest: Manifest, available: float | None, replicas: int = 1) -> None:
    """Refuse a shuffle buffer or batch whose slices alone would take most of this machine's
    memory (`available` bytes; None: unknown), naming the key and what would fit."""
    if available is None:
        return
    h, w = manifest.split("train").slice_shape
    slice_bytes = h * w * (2 * (2 * cfg.data.context + 1) + 1)  # int16 image channels + uint8 mask
    for key, count, per in (
        ("data.shuffle_buffer", cfg.data.shuffle_buffer, slice_bytes),
        ("data.batch_size", global_batch(cfg, replicas), 3 * slice_bytes),
    ):  # + float32 copies
        if count * per > 0.5 * available:
            raise RecordsError(
                f"{key}={count}: {count} slices of {h}x{w} take {count * per / 1e9:.1f} GB, more than "
                f"half of the {available / 1e9:.1f} GB available; choose at most {int(0.5 * available // per)}"
            )


def global_batch(cfg: Config, replicas: int) -> int:
    """Examples per training step over all replicas (data.batch_size, or x replicas with batch_per_replica)."""
    return cfg.data.batch_size * (replicas if cfg.data.batch_per_replica else 1)


def liver_keep_probability(cfg: Config, manifest: Manifest, split: str) -> float:
    """Keep probability r of non-liver slices so a drawn slice has liver with prob p + (1-p) f."""
    f = manifest.split(split).liver_fraction
    p = cfg.data.foreground_fraction
    target = p + (1 - p) * f
    if f <= 0 or target >= 1 or p == 0:
        return 1.0
    return f * (1 - target) / (target * (1 - f))


# ------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Plan:
    """What one input pipeline reads: its shards of the split, slice shape, normalisation,
    per-replica batch, and how it shares the split with other pipelines (`pipe` of
    `n_pipes`; `record_shard`: fewer shards than pipelines, so rows are divided instead)."""

    manifest: Manifest
    split: str
    shards: tuple
    height: int
    width: int
    norm: Normalization
    batch: int
    pipe: int
    n_pipes: int
    record_shard: bool
    members: tuple[bool, ...] | None = None  # per case index, where the shards hold cases of other splits
    in_memory: bool = False  # training reads the shards into memory once (`in_memory`)


def plan_split(cfg: Config, split: str, input_context, training: bool, on_service: bool) -> Plan:
    m = open_split(cfg, split)
    h, w = m.split(split).slice_shape
    shards = m.shards(split)
    n_pipes = input_context.num_input_pipelines if input_context and not on_service else 1  # the service shards
    pipe = input_context.input_pipeline_id if input_context and not on_service else 0
    replicas = input_context.num_replicas_in_sync if input_context else 1
    # training: equal per-replica batches (the global batch must divide); evaluation keeps
    # every slice and needs no equal split
    batch = global_batch(cfg, replicas) // replicas if training else -(-cfg.eval.batch_size // replicas)
    record_shard = n_pipes > 1 and len(shards) < n_pipes
    if record_shard:
        log.warning(
            "split %s has %d shard(s) for %d input pipelines: every pipeline reads every shard and "
            "keeps 1/%d of the slices; convert with --num-shards >= %d to shard by file",
            split,
            len(shards),
            n_pipes,
            n_pipes,
            n_pipes,
        )
    elif n_pipes > 1:
        shards = shards[pipe::n_pipes]
    members = None
    if cfg.data.folds:  # only a fold's shards hold cases of another split (`folds.refold`)
        held = {case for s in shards for case in m.cases_of(s)}
        own = {c.case_id for c in m.cases_in(split)}
        members = tuple(c.split == split for c in m.cases) if held - own else None
    memory = training and in_memory(cfg, shards, h, w, on_service)
    return Plan(
        m, split, tuple(shards), h, w, normalization(cfg, m), batch, pipe, n_pipes, record_shard, members, memory
    )


IN_MEMORY_SHARE = 0.25  # data.in_memory "auto": the shards may take this share of the available memory
IN_MEMORY_LIMIT = 0.75  # "always" (or a run that decided so): refused above this share


def in_memory(cfg: Config, shards, h: int, w: int, on_service: bool = False) -> bool:
    """Whether training holds these shards (of h x w slices) in memory (data.in_memory;
    "auto": they take at most IN_MEMORY_SHARE of the available memory, and not on the
    tf.data service). "always" is refused, naming the sizes, where they would take more
    than IN_MEMORY_LIMIT of it."""
    if cfg.data.in_memory == "never" or (cfg.data.in_memory == "auto" and on_service):
        return False
    need = sum(s.num_examples for s in shards) * (3 * h * w + 64)  # int16 image + uint8 mask + scalars
    available = available_memory()
    if cfg.data.in_memory == "auto":
        return available is not None and need <= IN_MEMORY_SHARE * available
    if available is not None and need > IN_MEMORY_LIMIT * available:
        raise RecordsError(
            f"data.in_memory=always: the training shards take {need / 1e9:.2f} GB in memory, more than "
            f"{IN_MEMORY_LIMIT:.0%} of the {available / 1e9:.2f} GB available; use data.in_memory=never (the "
            "shards are streamed) or free memory"
        )
    return True


def holds_in_memory(cfg: Config, input_context=None) -> bool:
    """Whether this training pipeline holds its shards in memory (`in_memory` on its shards)."""
    return plan_split(cfg, "train", input_context, True, bool(cfg.data.service)).in_memory


def resumed_in_memory(cfg: Config, input_context, decided: bool | None, run) -> bool:
    """Whether a run's training data is held in memory: as an earlier start of the run decided
    (`decided`, from run.json: its checkpoints hold an input position of that kind), else
    data.in_memory now."""
    if decided is None:
        return holds_in_memory(cfg, input_context)
    held = replace(cfg, data=replace(cfg.data, in_memory="always" if decided else "never"))
    try:
        return holds_in_memory(held, input_context)
    except RecordsError as e:
        raise RecordsError(
            f"{run} holds its training data in memory (decided at its first start; its checkpoints hold an "
            f"input position of that kind), but {str(e).split(': ', 1)[1]}; free memory to resume it, or train "
            "a new --run"
        ) from None


def check_training(cfg: Config, replicas: int) -> Manifest:
    """The training split's manifest, once everything about the data that can be checked
    before anything is written holds: the batch divides among the replicas, the slices are of
    one size, the 2.5D context fits, the sources' weights match, the shuffle buffer and batch
    fit the memory, the tf.data service answers."""
    if global_batch(cfg, replicas) % replicas:
        raise RecordsError(f"data.batch_size={cfg.data.batch_size} must be a multiple of the {replicas} replicas")
    manifest = open_split(cfg, "train")
    check_context(cfg, manifest)
    source_keep(cfg, manifest)  # weights for the training cases' sources
    check_memory(cfg, manifest, available_memory(), replicas)
    if cfg.data.service:
        data_service.check_reachable(cfg.data.service)
    return manifest


def input_spec(cfg: Config, manifest: Manifest) -> InputSpec:
    """What a run trained on this dataset takes: the slice size, 2k+1 channels, the
    normalisation resolved to numbers, how the source was brought to the stored grid."""
    h, w = manifest.split("train").slice_shape
    k = cfg.data.context
    return InputSpec(h, w, 2 * k + 1, k, manifest.size, normalization(cfg, manifest), manifest.spacing)


def source_keep(cfg: Config, manifest: Manifest, split: str = "train") -> list[float] | None:
    """Per case index, the probability of keeping its slices so each source's share of the
    drawn slices follows data.source_weights whatever its number of slices (None without
    weights). Sources of the split and weights must match (checked here).

    A source s of N slices, L of them with liver, yields E = L + (N - L) r slices under the
    foreground thinning r (`liver_keep_probability`); keeping each with w_s / E_s scaled so
    the largest is 1 makes the shares w_s. Thinning, not a mix of per-source pipelines: in TF
    2.21 a sample over shuffled inputs cannot be restored twice (exact resume), as `numbered`
    explains for a zip. The slices dropped are row references: the large source's shards
    are still read whole (reading is not what a training step waits on).
    """
    weights = cfg.data.source_weights
    if not weights:
        return None
    cases = manifest.cases_in(split)
    present = {c.source for c in cases}
    absent, unweighted = sorted(set(weights) - present), sorted(present - set(weights))
    if absent or unweighted:
        named = lambda xs: ", ".join(x or "(untagged)" for x in xs)  # noqa: E731
        raise RecordsError(
            "data.source_weights: "
            + "; ".join(
                ([f"no {split} case has source {named(absent)}"] if absent else [])
                + ([f"{split} cases of source {named(unweighted)} have no weight"] if unweighted else [])
            )
            + f" (the {split} split's sources: {named(sorted(present))}; tag them with the case list's source column)"
        )
    r = liver_keep_probability(cfg, manifest, split)
    expected = {
        s: sum(c.liver_slices + (c.num_slices - c.liver_slices) * r for c in cases if c.source == s) for s in present
    }
    rate = {s: weights[s] / max(expected[s], 1e-9) for s in present}
    top = max(rate.values())
    keep = [0.0] * manifest.num_cases
    for c in cases:
        keep[c.index] = rate[c.source] / top
    return keep


__all__ = [
    "IN_MEMORY_LIMIT",
    "IN_MEMORY_SHARE",
    "Plan",
    "available_memory",
    "check_context",
    "check_memory",
    "check_training",
    "global_batch",
    "holds_in_memory",
    "in_memory",
    "input_spec",
    "liver_keep_probability",
    "normalization",
    "open_split",
    "plan_split",
    "resumed_in_memory",
    "source_keep",
]
