"""Configuration: a frozen dataclass tree, YAML presets and dotted overrides.

A config is built from the dataclass defaults, then a preset (a YAML file, or one shipped in
`liverseg/presets/`, which the repository's `configs/` links to: `--config smoke`), then
`--set section.key=value` overrides (values parsed as YAML). An unknown key or a value of
the wrong type is a `ConfigError` that names the key and the valid choices. The resolved
config is written into every run directory (`RUN/config.yaml`) and read back from there
by `evaluate`, `predict` and `export`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from liverseg import LiversegError


def derive_seed(seed: int, stream: str) -> int:
    """An independent seed in [0, 2**31) for one random stream ("host-augment-0", ...) of a
    run seeded with `seed`: the same on every machine and Python version (not `hash`)."""
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class ConfigError(LiversegError):
    pass


@dataclass(frozen=True)
class DataConfig:
    """How slices become batches (the `pipeline` module)."""

    # Converted dataset folder (holds dataset.json); `--records` on the command line sets it.
    records: str = ""
    # 2.5D context k: each example stacks slices s-k..s+k (clamped to the case) as 2k+1 channels.
    context: int = 0
    # Global batch size (all replicas together); each replica gets batch_size / replicas.
    batch_size: int = 8
    # Make batch_size per replica instead: the global batch grows with the number of
    # replicas (every GPU keeps a full batch) and train.lr is scaled by the same factor
    # (linear scaling rule, Goyal et al. 2017).
    batch_per_replica: bool = False
    # "window": clip HU to hu_window and scale to [0, 1].
    # "zscore": clip to the training split's liver HU percentiles (0.5, 99.5) from the
    # manifest, then subtract the liver mean and divide by the liver std (nnU-Net's CT scheme).
    normalize: Literal["window", "zscore"] = "window"
    # HU window used by normalize: window (a liver window by default).
    hu_window: tuple[float, float] = (-200.0, 250.0)
    # Probability that a training slice is drawn from the slices containing liver; the
    # rest are drawn from all slices. Expected share of liver slices: p + (1 - p) * f,
    # where f is the split's natural liver-slice fraction (from the manifest).
    foreground_fraction: float = 0.5
    # Slices held in the shuffle buffer (after interleave). Memory: buffer * H * W * 3 bytes.
    shuffle_buffer: int = 512
    # Shards read concurrently by the interleave (each holds one parsed shard in memory).
    cycle_length: int = 4
    # Keep parsed shards in memory after the first pass (for datasets that fit in RAM).
    cache: bool = False
    # Training reads this pipeline's shards into memory once and draws each pass's slices from
    # there, in a fresh random order (a permutation of the pass, no shuffle buffer), instead of
    # reading every shard again each pass: with source_weights or foreground sampling most rows
    # read are dropped. "auto": when the shards take at most a quarter of the available memory
    # (and not on the tf.data service); "always"; "never": stream the shards. Exact resume
    # holds either way (the pass and its position are the iterator's state).
    in_memory: Literal["auto", "always", "never"] = "auto"
    # "grpc://HOST:PORT" of a tf.data service dispatcher (`liverseg data-service`): the
    # training pipeline's shard reads, parsing, 2.5D gather and host augmentation run on its
    # workers. A resumed run then continues with a fresh data order, not the exact next batch.
    service: str = ""
    # Stop with an error when the service delivers no batch for this long (dead workers).
    service_timeout_s: float = 300.0
    # "auto": workers compress batches before sending them (less network, more worker CPU);
    # "none": send them as they are (loopback, or a network faster than the compression).
    service_compression: Literal["auto", "none"] = "auto"
    # Each source's share of the training slices, by the cases' `source` tag (a case list's
    # `source` column), e.g. {real: 0.5, phantom: 0.5}: drawn in these proportions whatever
    # each source's number of slices. Empty: slices are drawn as they come (by count).
    source_weights: dict[str, float] = field(default_factory=dict)
    # Cross-validation: with folds K >= 2 the manifest's training patients (its train and val
    # splits together) are dealt into K folds (by fold_seed, not the training seed: runs of
    # several seeds share their folds; stable, one patient = one case id, never split); the
    # run validates on fold `fold` and trains on the others. The test split is never used.
    # 0: the manifest's own train/val split.
    folds: int = 0
    fold: int = 0
    fold_seed: int = 0


@dataclass(frozen=True)
class AugmentConfig:
    """Joint image+mask augmentation (the `augment` module). Probabilities are per example."""

    # "none": no augmentation; "host": in tf.data after batching (vectorised over the batch);
    # "device": inside the training step on the accelerator (the pipeline ships int16 + uint8).
    placement: Literal["none", "host", "device"] = "host"
    # Train on random CROP x CROP windows of the slices (0: whole slices): the spatial
    # transform samples the window only, so augmentation and each step cost (CROP / size)^2 of
    # a whole slice; the network, fully convolutional, still predicts whole slices. A
    # multiple of the model's divisor (2**depth), at most the slice size.
    crop: int = 0
    # Mirror left-right / anterior-posterior. Off by default: the liver's side is a real cue.
    flip_lr_p: float = 0.0
    flip_ap_p: float = 0.0
    # One affine per example: rotation, isotropic scale, translation, shear.
    affine_p: float = 0.5
    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    # Translation as a fraction of the image size, drawn uniformly in [-t, t] per axis.
    translate: float = 0.05
    # Shear angle in degrees, drawn uniformly in [-s, s].
    shear_deg: float = 5.0
    # Elastic deformation: a random displacement field of std `elastic_alpha` pixels,
    # smoothed at `elastic_sigma` pixels. Slower than the affine path; off by default.
    elastic_p: float = 0.0
    elastic_alpha: float = 8.0
    elastic_sigma: float = 12.0
    # Intensity ops act on the normalised image only, never on the mask.
    brightness_p: float = 0.3
    brightness: float = 0.1  # additive shift drawn in [-b, b] (normalised units)
    contrast_p: float = 0.3
    contrast: tuple[float, float] = (0.75, 1.25)  # multiplicative, about the image mean
    gamma_p: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)  # on the image rescaled to [0, 1], then back
    noise_p: float = 0.15
    noise_std: float = 0.05  # Gaussian noise std drawn in [0, noise_std] (normalised units)
    blur_p: float = 0.1
    blur_sigma: tuple[float, float] = (0.5, 1.0)  # Gaussian blur sigma in pixels


@dataclass(frozen=True)
class ModelConfig:
    """The network (the `unet` module)."""

    # "unet": the standard design; "seed_unet": the tutorial's network, for comparison;
    # "pointwise": one 1x1 conv, a near-free model that times the training loop itself.
    name: Literal["unet", "seed_unet", "pointwise"] = "unet"
    # Filters at the first level; doubled at each downsampling (capped at 16x).
    base_filters: int = 32
    # Number of 2x downsamplings. Input height and width must be divisible by 2**depth.
    depth: int = 4
    # "batch": per-replica batch norm; "sync_batch": statistics all-reduced across
    # replicas; "instance"/"group": batch-independent (exact across replica counts).
    norm: Literal["batch", "sync_batch", "instance", "group", "none"] = "batch"
    # Batch norm's moving-average momentum. Keras defaults to 0.99 (a ~100-step memory),
    # which lags a network whose weights still move fast, so inference-mode statistics
    # no longer match it; 0.9 (PyTorch's default) tracks it.
    bn_momentum: float = 0.9
    # Residual connection around each level's pair of convolutions.
    residual: bool = False
    # Additive attention gates on the skip connections (Oktay et al. 2018).
    attention: bool = False
    # Spatial dropout rate at the bottleneck (0 disables).
    dropout: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """The training loop (the `train` module)."""

    steps: int = 20000
    # Minutes of training (0: off): the run measures its own steps/s over its first
    # BUDGET_STEPS steps after compilation and then trains min(steps, the steps that fit the
    # budget), so a recipe ends in about this time on any machine (the learning-rate schedule
    # spans the steps fixed). The steps fixed are stored in RUN/run.json: a resumed run keeps
    # them (one interrupted before they were fixed measures again).
    time_budget_min: float = 0.0
    # "auto": one device, or MirroredStrategy when several GPUs are visible;
    # "multi_worker": MultiWorkerMirroredStrategy from TF_CONFIG.
    strategy: Literal["auto", "one_device", "mirrored", "multi_worker"] = "auto"
    # "auto": mixed_bfloat16 on GPUs with bfloat16 tensor cores (compute capability 8.0+),
    # mixed_float16 on older GPUs, float32 without a GPU.
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = "auto"
    # Compile each training step (augmentation, forward, backward, all-reduce, update) with XLA.
    jit_compile: bool = False
    # Training steps per call of the step function (amortises Python and dispatch overhead).
    steps_per_call: int = 1
    # Copy the next call's batches onto the accelerator while this call computes. Exact
    # resume holds: checkpoints are only taken with nothing drawn ahead, and SIGTERM first
    # runs the call already copied. Under multi-worker, TF's preemption handler may save
    # with one call drawn ahead (a resumed run then skips those steps_per_call batches);
    # false makes that exact too, at the cost of an exposed copy per call.
    device_prefetch: bool = True
    loss: Literal["bce", "dice", "bce_dice", "focal", "tversky"] = "bce_dice"
    focal_gamma: float = 2.0
    tversky_alpha: float = 0.3  # weight of false positives
    tversky_beta: float = 0.7  # weight of false negatives
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    schedule: Literal["constant", "cosine", "poly"] = "cosine"
    warmup_steps: int = 500
    weight_decay: float = 1e-4  # adamw only
    momentum: float = 0.99  # sgd (Nesterov) only
    # Clip the global gradient norm to this value (0 disables).
    clip_norm: float = 12.0
    log_every: int = 50
    eval_every: int = 1000  # validate every N steps and at the end (0: never)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    # Stop with an error when the loss is non-finite for this many consecutive steps.
    max_nonfinite_steps: int = 25
    # Overlay images written to TensorBoard at each validation.
    num_images: int = 3
    # Profiler trace for steps [start, stop) (empty: no trace).
    profile_steps: tuple[int, ...] = ()


@dataclass(frozen=True)
class EvalConfig:
    """Whole-volume inference (the `predict` module), shared by evaluate and predict."""

    batch_size: int = 16
    threshold: float = 0.5
    # Average the probabilities of the image and its left-right mirror.
    tta_flip: bool = False
    # Keep the largest 3D connected component (and fill holes), dropping the others...
    largest_component: bool = True
    # ...unless they have at least this fraction of its voxels: a lobe predicted
    # disconnected at thick slices is kept, a stray blob is not (1.0: strictly the largest).
    min_component_fraction: float = 0.1


@dataclass(frozen=True)
class Config:
    seed: int = 0
    # Bit-identical data order, augmentation and (with op determinism) training.
    deterministic: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------- loading


PRESETS = ("default", "demo", "real-cpu", "seed", "smoke")  # liverseg/presets/*.yaml, shipped in the package


def preset(name: str):
    """The shipped preset `name` (e.g. "smoke") as a readable path-like (importlib.resources:
    it works from an installed wheel; the repository's configs/ links to the same files)."""
    from importlib import resources

    if name not in PRESETS:
        raise ConfigError(f"no preset {name!r}; presets: {', '.join(PRESETS)} (or give a YAML file's path)")
    return resources.files("liverseg") / "presets" / f"{name}.yaml"


def resolve(path: str | Path):
    """A --config value: a YAML file, or the name of a shipped preset (smoke, real-cpu.yaml, ...)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.exists():
        raise ConfigError(f"config file {path} is not a regular file (a folder or a device); give a YAML file")
    name = p.name.removesuffix(".yaml")
    if name in PRESETS and (len(p.parts) == 1 or p.parent.name == "configs"):
        return preset(name)
    raise ConfigError(f"config file {path} does not exist; give a YAML file or a preset name ({', '.join(PRESETS)})")


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML preset at `path` (a file, or a shipped preset's name) <- `key.sub=value`
    overrides. Validated."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = resolve(path)
        try:
            tree = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} cannot be read ({e}); give a YAML file") from None
        if tree is None:  # an empty file would silently train the library's defaults
            raise ConfigError(
                f"config file {path} holds no settings; give a recipe (a preset such as smoke or real-cpu is a "
                "start), or leave --config out for the defaults"
            )
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping, got {type(tree).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return from_dict(tree)


def from_dict(tree: dict[str, Any]) -> Config:
    return _build(Config, tree, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), suitable for YAML/JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, dict):
            v = dict(v)
        out[f.name] = v
    return out


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """{"train.lr": 0.001, ...}: for TensorBoard hparams and config diffs."""
    flat: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(to_dict(cfg), "")
    return flat


def replace(cfg: Config, **dotted: Any) -> Config:
    """Copy of `cfg` with dotted keys replaced, validated: replace(cfg, **{"train.lr": 1e-4})."""
    tree = to_dict(cfg)
    for key, value in dotted.items():
        _set_dotted(tree, key, value)
    return from_dict(tree)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def _build(cls: type, tree: Any, prefix: str) -> Any:
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(tree) - set(names))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (valid keys at {where}: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in tree:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, tree[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(tree[name], tp, f"{prefix}{name}")
    cfg = cls(**kwargs)
    _check_ranges(cfg, prefix)
    return cfg


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping, e.g. {{real: 0.5, phantom: 0.5}}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. [{', '.join('0' for _ in args[:2])}]")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}={value!r} must have {len(args)} values")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp}")  # a bug in this module


def _check_ranges(cfg: Any, prefix: str) -> None:
    """Value checks that types cannot express; each names the key and the valid range."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{prefix}{key}={getattr(cfg, key)!r} is not valid: {what}")

    checks = _RANGE_CHECKS.get(type(cfg))
    if checks is not None:
        checks(cfg, need)


def _ranges_config(cfg: Config, need) -> None:
    need(0 <= cfg.seed < 2**31, "seed", "must be in [0, 2**31)")
    need(
        not (cfg.deterministic and cfg.train.jit_compile),
        "deterministic",
        "cannot be combined with train.jit_compile=true: XLA has no deterministic max-pool "
        "gradient; set train.jit_compile=false for deterministic runs",
    )


def _ranges_data(cfg: DataConfig, need) -> None:
    need(0 <= cfg.context <= 16, "context", "must be in [0, 16] (2 is usual)")
    need(1 <= cfg.batch_size <= 65536, "batch_size", "must be in [1, 65536]")
    need(
        -1024 <= cfg.hu_window[0] < cfg.hu_window[1] <= 3071,
        "hu_window",
        "needs -1024 <= low < high <= 3071 (the HU range records hold)",
    )
    need(0.0 <= cfg.foreground_fraction <= 1.0, "foreground_fraction", "must be in [0, 1]")
    need(1 <= cfg.shuffle_buffer <= 2**20, "shuffle_buffer", "must be in [1, 1048576] slices")
    need(1 <= cfg.cycle_length <= 256, "cycle_length", "must be in [1, 256]")
    need(not cfg.service or cfg.service.startswith("grpc://"), "service", "must be empty or grpc://HOST:PORT")
    need(not (cfg.service and cfg.cache), "service", "cannot be combined with data.cache (the workers read)")
    need(
        not (cfg.service and cfg.in_memory == "always"),
        "service",
        "cannot be combined with data.in_memory=always (the workers read the shards)",
    )
    need(cfg.service_timeout_s > 0, "service_timeout_s", "must be > 0")
    need(
        all(w >= 0 for w in cfg.source_weights.values())
        and (not cfg.source_weights or sum(cfg.source_weights.values()) > 0),
        "source_weights",
        "weights must be >= 0 and not all 0",
    )
    need(0 <= cfg.fold_seed < 2**31, "fold_seed", "must be in [0, 2**31)")
    need(cfg.folds == 0 or 2 <= cfg.folds <= 1000, "folds", "must be 0 (no folds) or in [2, 1000]")
    need(
        0 <= cfg.fold < max(cfg.folds, 1),
        "fold",
        f"must be in [0, {max(cfg.folds, 1) - 1}] (data.folds={cfg.folds})",
    )
    need(
        not (cfg.folds and cfg.normalize == "zscore"),
        "normalize",
        "zscore takes the train split's liver HU percentiles from the manifest, which a fold's cases do not "
        "have: use window with data.folds",
    )


def _ranges_augment(cfg: AugmentConfig, need) -> None:
    for f in dataclasses.fields(cfg):
        if f.name.endswith("_p"):
            need(0.0 <= getattr(cfg, f.name) <= 1.0, f.name, "a probability in [0, 1]")
    for name in ("scale", "contrast", "gamma", "blur_sigma"):
        lo, hi = getattr(cfg, name)
        need(0.0 < lo <= hi <= 10.0, name, "needs 0 < low <= high <= 10")
    need(0.0 <= cfg.rotation_deg <= 180.0, "rotation_deg", "must be in [0, 180] degrees")
    need(0 <= cfg.crop <= 4096, "crop", "must be in [0, 4096] pixels (0: whole slices)")
    need(
        not (cfg.crop and cfg.placement == "none"),
        "crop",
        "needs augment.placement host or device (the spatial transform samples the window)",
    )
    need(0.0 <= cfg.translate < 1.0, "translate", "must be in [0, 1) (a fraction of the image size)")
    need(0.0 <= cfg.shear_deg < 90.0, "shear_deg", "must be in [0, 90) degrees")
    need(0.0 <= cfg.elastic_alpha <= 100.0, "elastic_alpha", "must be in [0, 100] pixels")
    need(1.0 <= cfg.elastic_sigma <= 1000.0, "elastic_sigma", "must be in [1, 1000] pixels")
    need(0.0 <= cfg.brightness <= 10.0, "brightness", "must be in [0, 10] (normalised units)")
    need(0.0 <= cfg.noise_std <= 10.0, "noise_std", "must be in [0, 10] (normalised units)")


def _ranges_model(cfg: ModelConfig, need) -> None:
    need(1 <= cfg.base_filters <= 512, "base_filters", "must be in [1, 512]")
    need(1 <= cfg.depth <= 7, "depth", "must be in [1, 7]")
    need(0.0 <= cfg.dropout < 1.0, "dropout", "must be in [0, 1)")
    need(0.0 <= cfg.bn_momentum < 1.0, "bn_momentum", "must be in [0, 1)")


def _ranges_train(cfg: TrainConfig, need) -> None:
    need(1 <= cfg.steps <= 10**9, "steps", "must be in [1, 10**9]")
    need(0 <= cfg.time_budget_min <= 60 * 24 * 30, "time_budget_min", "must be in [0, 43200] minutes (0: off)")
    need(1 <= cfg.steps_per_call <= 1000, "steps_per_call", "must be in [1, 1000]")
    need(0 < cfg.lr <= 10, "lr", "must be in (0, 10]")
    need(cfg.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(cfg.clip_norm >= 0, "clip_norm", "must be >= 0 (0 disables)")
    need(0 <= cfg.weight_decay <= 1, "weight_decay", "must be in [0, 1]")
    need(0 <= cfg.momentum < 1, "momentum", "must be in [0, 1)")
    need(cfg.focal_gamma >= 0, "focal_gamma", "must be >= 0")
    need(0 <= cfg.tversky_alpha <= 1 and 0 <= cfg.tversky_beta <= 1, "tversky_alpha", "alpha and beta in [0, 1]")
    need(0 <= cfg.num_images <= 64, "num_images", "must be in [0, 64]")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps"):
        need(getattr(cfg, name) >= 1, name, "must be >= 1")
    need(cfg.eval_every >= 0, "eval_every", "must be >= 0 (0: never validate)")
    need(len(cfg.profile_steps) in (0, 2), "profile_steps", "must be [] or [start, stop]")


def _ranges_eval(cfg: EvalConfig, need) -> None:
    need(1 <= cfg.batch_size <= 4096, "batch_size", "must be in [1, 4096]")
    need(0.0 < cfg.threshold < 1.0, "threshold", "must be in (0, 1)")
    need(0.0 <= cfg.min_component_fraction <= 1.0, "min_component_fraction", "must be in [0, 1]")


_RANGE_CHECKS = {
    Config: _ranges_config,
    DataConfig: _ranges_data,
    AugmentConfig: _ranges_augment,
    ModelConfig: _ranges_model,
    TrainConfig: _ranges_train,
    EvalConfig: _ranges_eval,
}

__all__ = [
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "TrainConfig",
    "dump",
    "flatten",
    "from_dict",
    "load",
    "replace",
    "to_dict",
]
