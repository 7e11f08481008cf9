"""The run directory: what `liverseg train` keeps in RUN, and how it is read back.

    RUN/config.yaml          the resolved config (`config.dump`); a resumed run must match it
    RUN/run.json             `RunInfo`: the dataset trained on and the input contract that
                             `predict`, `evaluate` and `export` rebuild the network from
    RUN/checkpoints/         tf.train checkpoints (model, optimizer, step, input position),
                             kept by `checkpoints`
    RUN/.lock                held (flock) by the chief trainer while it runs
    RUN/train, validation,   TensorBoard event files
        evaluation
    RUN/eval/<name>/         evaluation reports
    RUN/best.weights.h5, final.weights.h5

`RunDir` names every one of these paths (no other module spells a file name of RUN); this
module also owns the keys of `run.json` (`RunInfo`, `InputSpec`, `Normalization`: plain
data), the lock and the checks a resumed run must pass.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from liverseg import LiversegError, __version__, config, serial, storage
from liverseg.config import Config
from liverseg.files import atomic_path, folder_lock

log = logging.getLogger(__name__)

RUN_INFO_VERSION = 1
# Keys that may change when a run is resumed (they do not change what is learned per step).
RESUMABLE = {
    "train.steps",
    "train.time_budget_min",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_nonfinite_steps",
    "train.num_images",
    "train.profile_steps",
    "data.records",
    "eval.batch_size",
    "data.service",
    "data.service_timeout_s",
    "data.service_compression",
}


@dataclass(frozen=True)
class RunDir:
    """The paths of a run directory (see the module docstring)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", storage.path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def info(self) -> Path:
        return self.root / "run.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def best_weights(self) -> Path:
        return self.root / "best.weights.h5"

    @property
    def final_weights(self) -> Path:
        return self.root / "final.weights.h5"

    def board(self, name: str) -> Path:
        """TensorBoard event folder: "train", "validation" or "evaluation"."""
        return self.root / name

    def report(self, name: str) -> Path:
        """Where `evaluate` writes the report of a split (or folder) by default."""
        return self.root / "eval" / name


@dataclass(frozen=True)
class Normalization(serial.Record):
    """How HU become the network's input: (clip(hu, lo, hi) - shift) / scale (applied by
    `pipeline.normalize`; the numbers are saved with the run)."""

    lo: float
    hi: float
    shift: float
    scale: float


@dataclass(frozen=True)
class InputSpec(serial.Record):
    """What the network was trained on: slice size, 2k+1 channels, how HU were normalised,
    and how source slices were brought to the stored grid (`size`: in-plane resize, or with
    `spacing` the window after resampling to spacing-mm pixels)."""

    height: int
    width: int
    channels: int
    context: int
    size: int | None
    normalization: Normalization = serial.key("intensity")  # its key in run.json since version 1
    spacing: float | None = None


@dataclass(frozen=True)
class RunInfo(serial.Record):
    """`run.json`: the dataset a run trained on (folder and manifest sha256), its input
    contract, and its result once training finished."""

    records: str
    manifest_sha256: str
    input: InputSpec
    result: dict | None = serial.key(omit=True, default=None)
    liverseg_version: str = __version__  # the liverseg that wrote it ("?": a file that does not say)
    version: int = RUN_INFO_VERSION
    folds: dict | None = serial.key(omit=True, default=None)  # data.folds K, data.fold k, fold_seed, the patients
    budget: dict | None = serial.key(omit=True, default=None)  # time_budget_min: minutes, steps, spent_s, steps/s, ...
    # whether training holds its data in memory (data.in_memory, decided at the run's first
    # start): the saved input position is of that kind, so every resume reads the same way
    in_memory: bool | None = serial.key(omit=True, default=None)

    @classmethod
    def from_json(cls, d: dict, where: str | Path = "run.json") -> RunInfo:
        version = d.get("version", 1) if isinstance(d, dict) else None
        if not isinstance(version, int) or not 1 <= version <= RUN_INFO_VERSION:
            raise LiversegError(
                f"{where}: run.json version {version!r} is newer than this liverseg reads "
                f"(1..{RUN_INFO_VERSION}); upgrade liverseg"
            )
        try:
            return serial.from_json(cls, {"liverseg_version": "?", **d, "version": version})
        except (KeyError, TypeError, ValueError) as e:
            raise LiversegError(f"{where}: malformed run.json ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, run: str | Path) -> RunInfo:
        path = RunDir(run).info
        try:
            return cls.from_json(json.loads(path.read_text()), path)
        except FileNotFoundError:
            raise LiversegError(
                f"{run}: no {path.name}; is this a liverseg run directory (liverseg train --run)?"
            ) from None
        except (OSError, ValueError) as e:
            raise LiversegError(f"{path}: unreadable ({e})") from None

    def save(self, run: str | Path) -> None:
        with atomic_path(RunDir(run).info) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")


def load_config(run: str | Path) -> Config:
    path = RunDir(run).config
    if not path.is_file():
        raise LiversegError(f"{run}: no {path.name}; is this a liverseg run directory (liverseg train --run)?")
    return config.from_dict(yaml.safe_load(path.read_text()))


def save_config(run: str | Path, cfg: Config) -> None:
    with atomic_path(RunDir(run).config) as tmp:
        tmp.write_text(config.dump(cfg))


def check_resume(run: Path, cfg: Config) -> None:
    """A run directory keeps its recipe: only RESUMABLE keys may change on resume."""
    if not RunDir(run).config.is_file():
        return
    saved = config.flatten(load_config(run))
    now = config.flatten(cfg)
    changed = sorted(k for k in now if now[k] != saved.get(k) and k not in RESUMABLE)
    if changed:
        diff = "; ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed[:5])
        raise LiversegError(
            f"{run} was trained with a different config ({diff}); resume with the same config or start a new --run"
        )


def check_dataset(run: Path, info: RunInfo) -> None:
    """A run keeps its dataset: resuming on another manifest (or another input contract) is refused.

    The dataset may move (`data.records` is resumable): the manifest's sha256 identifies it.
    """
    if not RunDir(run).info.is_file():
        return
    old = RunInfo.load(run)
    if old.manifest_sha256 != info.manifest_sha256:
        raise LiversegError(
            f"{run} was trained on {old.records} (dataset.json sha256 {old.manifest_sha256[:12]}...), but --records "
            f"{info.records} is another dataset (sha256 {info.manifest_sha256[:12]}...); resume with the records it "
            "trained on, or start a new --run"
        )
    if old.input != info.input:
        raise LiversegError(f"{run}: the input contract changed ({old.input} -> {info.input}); start a new --run")


# What a run folder may hold (RunDir's names): a run is trained only into a new or empty
# folder or a run of its own.
RUN_ENTRIES = frozenset(
    {
        "config.yaml",
        "run.json",
        "checkpoints",
        ".lock",
        "train",
        "validation",
        "evaluation",
        "eval",
        "best.weights.h5",
        "final.weights.h5",
    }
)


# ------------------------------------------------------------------------- the run lock


def claim(run: Path):
    """Hold RUN/.lock while training (`files.folder_lock`): a second trainer on the same
    run fails naming the holder; a lock left by a crashed trainer is taken over."""
    return folder_lock(
        run,
        RunDir(run).lock.name,
        "a trainer",
        "wait for it to finish or stop it (two trainers would interleave checkpoints), or choose another --run",
    )


__all__ = [
    "InputSpec",
    "Normalization",
    "RUN_ENTRIES",
    "RunDir",
    "RunInfo",
    "check_dataset",
    "check_resume",
    "claim",
    "load_config",
    "save_config",
]
