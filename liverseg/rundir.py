"""The run directory: what `liverseg train` keeps in RUN, and how it is read back.

    RUN/config.yaml          the resolved config (`config.dump`); a resumed run must match it
    RUN/run.json             `RunInfo`: the dataset trained on and the input contract that
                             `predict`, `evaluate` and `export` rebuild the network from
    RUN/checkpoints/         tf.train checkpoints (model, optimizer, step, input position)
    RUN/train, validation,   TensorBoard event files
        evaluation
    RUN/best.weights.h5, final.weights.h5

This module owns the keys of `run.json`; no other module spells them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from liverseg import LiversegError, __version__, atomic_path, config
from liverseg.config import Config

RUN_INFO = "run.json"
CONFIG = "config.yaml"
RUN_INFO_VERSION = 1
# Keys that may change when a run is resumed (they do not change what is learned per step).
RESUMABLE = {"train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
             "train.max_nonfinite_steps", "train.num_images", "train.profile_steps", "data.records", "eval.batch_size"}


@dataclass(frozen=True)
class Intensity:
    """HU -> network input: (clip(hu, lo, hi) - shift) / scale, as float32 tensors."""

    lo: float
    hi: float
    shift: float
    scale: float

    def __call__(self, hu):
        import tensorflow as tf

        return (tf.clip_by_value(hu, self.lo, self.hi) - self.shift) / self.scale

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Intensity":
        return cls(float(d["lo"]), float(d["hi"]), float(d["shift"]), float(d["scale"]))


@dataclass(frozen=True)
class InputSpec:
    """What the network was trained on: slice size, 2k+1 channels, how HU were normalised,
    and how source slices were brought to the stored grid (`size`: in-plane resize)."""

    height: int
    width: int
    channels: int
    context: int
    size: int | None
    intensity: Intensity

    def to_json(self) -> dict:
        return {"height": self.height, "width": self.width, "channels": self.channels, "context": self.context,
                "size": self.size, "intensity": self.intensity.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "InputSpec":
        return cls(d["height"], d["width"], d["channels"], d["context"], d.get("size"), Intensity.from_json(d["intensity"]))


@dataclass(frozen=True)
class RunInfo:
    """`run.json`: the dataset a run trained on (folder and manifest sha256), its input
    contract, and its result once training finished."""

    records: str
    manifest_sha256: str
    input: InputSpec
    result: dict | None = None
    liverseg_version: str = __version__
    version: int = RUN_INFO_VERSION

    def to_json(self) -> dict:
        d = {"version": self.version, "liverseg_version": self.liverseg_version, "records": self.records,
             "manifest_sha256": self.manifest_sha256, "input": self.input.to_json()}
        if self.result is not None:
            d["result"] = self.result
        return d

    @classmethod
    def from_json(cls, d: dict, where: str | Path = RUN_INFO) -> "RunInfo":
        version = d.get("version", 1) if isinstance(d, dict) else None
        if not isinstance(version, int) or not 1 <= version <= RUN_INFO_VERSION:
            raise LiversegError(f"{where}: run.json version {version!r} is newer than this liverseg reads "
                                f"(1..{RUN_INFO_VERSION}); upgrade liverseg")
        try:
            return cls(d["records"], d["manifest_sha256"], InputSpec.from_json(d["input"]), d.get("result"),
                       d.get("liverseg_version", "?"), version)
        except (KeyError, TypeError, ValueError) as e:
            raise LiversegError(f"{where}: malformed run.json ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, run: str | Path) -> "RunInfo":
        path = Path(run) / RUN_INFO
        try:
            return cls.from_json(json.loads(path.read_text()), path)
        except FileNotFoundError:
            raise LiversegError(f"{run}: no {RUN_INFO}; is this a liverseg run directory (liverseg train --run)?") from None
        except (OSError, ValueError) as e:
            raise LiversegError(f"{path}: unreadable ({e})") from None

    def save(self, run: str | Path) -> None:
        with atomic_path(Path(run) / RUN_INFO) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")


def load_config(run: str | Path) -> Config:
    path = Path(run) / CONFIG
    if not path.is_file():
        raise LiversegError(f"{run}: no {CONFIG}; is this a liverseg run directory (liverseg train --run)?")
    return config.from_dict(yaml.safe_load(path.read_text()))


def save_config(run: str | Path, cfg: Config) -> None:
    with atomic_path(Path(run) / CONFIG) as tmp:
        tmp.write_text(config.dump(cfg))


def check_resume(run: Path, cfg: Config) -> None:
    """A run directory keeps its recipe: only RESUMABLE keys may change on resume."""
    if not (run / CONFIG).is_file():
        return
    saved = config.flatten(load_config(run))
    now = config.flatten(cfg)
    changed = sorted(k for k in now if now[k] != saved.get(k) and k not in RESUMABLE)
    if changed:
        diff = "; ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed[:5])
        raise LiversegError(f"{run} was trained with a different config ({diff}); resume with the same "
                            f"config or start a new --run")


__all__ = ["InputSpec", "Intensity", "RunInfo", "check_resume", "load_config", "save_config"]
