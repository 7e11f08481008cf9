"""The run directory: what `liverseg train` keeps in RUN, and how it is read back.

    RUN/config.yaml          the resolved config (`config.dump`); a resumed run must match it
    RUN/run.json             `RunInfo`: the dataset trained on and the input contract that
                             `predict`, `evaluate` and `export` rebuild the network from
    RUN/checkpoints/         tf.train checkpoints (model, optimizer, step, input position);
                             a damaged one is moved into checkpoints/damaged/, never deleted
    RUN/.lock                held (flock) by the chief trainer while it runs
    RUN/train, validation,   TensorBoard event files
        evaluation
    RUN/best.weights.h5, final.weights.h5

This module owns the keys of `run.json`; no other module spells them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from liverseg import LiversegError, __version__, atomic_path, config
from liverseg.config import Config

log = logging.getLogger(__name__)

RUN_INFO = "run.json"
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"
RUN_INFO_VERSION = 1
# Keys that may change when a run is resumed (they do not change what is learned per step).
RESUMABLE = {"train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
             "train.max_nonfinite_steps", "train.num_images", "train.profile_steps", "data.records", "eval.batch_size",
             "data.service", "data.service_timeout_s", "data.service_compression"}


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
    and how source slices were brought to the stored grid (`size`: in-plane resize, or with
    `spacing` the window after resampling to spacing-mm pixels)."""

    height: int
    width: int
    channels: int
    context: int
    size: int | None
    intensity: Intensity
    spacing: float | None = None

    def to_json(self) -> dict:
        return {"height": self.height, "width": self.width, "channels": self.channels, "context": self.context,
                "size": self.size, "spacing": self.spacing, "intensity": self.intensity.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "InputSpec":
        return cls(d["height"], d["width"], d["channels"], d["context"], d.get("size"), Intensity.from_json(d["intensity"]),
                   d.get("spacing"))


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


def check_dataset(run: Path, info: RunInfo) -> None:
    """A run keeps its dataset: resuming on another manifest (or another input contract) is refused.

    The dataset may move (`data.records` is resumable): the manifest's sha256 identifies it.
    """
    if not (run / RUN_INFO).is_file():
        return
    old = RunInfo.load(run)
    if old.manifest_sha256 != info.manifest_sha256:
        raise LiversegError(
            f"{run} was trained on {old.records} (dataset.json sha256 {old.manifest_sha256[:12]}...), but --records "
            f"{info.records} is another dataset (sha256 {info.manifest_sha256[:12]}...); resume with the records it "
            "trained on, or start a new --run")
    if old.input != info.input:
        raise LiversegError(f"{run}: the input contract changed ({old.input} -> {info.input}); start a new --run")


# ------------------------------------------------------------------------- the run lock


@contextlib.contextmanager
def claim(run: Path):
    """Hold RUN/.lock (an flock, released by the kernel when the process dies) while training.

    A second trainer on the same run fails naming the holder. A lock file left by a crashed
    trainer holds no flock, so it is taken over (and said so). A run folder this call created
    is removed again when nothing but the lock was written into it.
    """
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise LiversegError(f"{run} is in use by a trainer ({holder}); wait for it to finish or stop it "
                                "(two trainers would interleave checkpoints), or choose another --run") from None
        stale = os.pread(fd, 512, 0).decode(errors="replace").strip()
        if stale:
            log.warning("%s: taking over the lock of a trainer that did not exit cleanly (%s)", path, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # an empty lock file: released cleanly (the file stays: unlinking races)
    finally:
        os.close(fd)  # releases the flock
        if created and run.is_dir() and not [p for p in run.iterdir() if p.name != LOCK]:
            shutil.rmtree(run, ignore_errors=True)


# ------------------------------------------------------------------------- checkpoints

_CKPT = re.compile(r"^ckpt-(\d+)\.(index|data-\d{5}-of-(\d{5}))$")


def _checkpoint_files(directory: Path) -> dict[int, list[Path]]:
    found: dict[int, list[Path]] = {}
    for p in directory.iterdir() if directory.is_dir() else ():
        m = _CKPT.match(p.name)
        if m:
            found.setdefault(int(m.group(1)), []).append(p)
    return found


def _incomplete(number: int, files: list[Path]) -> str | None:
    """Why the files of checkpoint `number` cannot be a whole checkpoint, or None."""
    names = {p.name for p in files}
    if f"ckpt-{number}.index" not in names:
        return "its .index file is missing"
    shards = {int(_CKPT.match(n).group(3)) for n in names if ".data-" in n}
    if len(shards) != 1:
        return "its .data file is missing" if not shards else "its .data files disagree on their count"
    total = shards.pop()
    missing = [f"ckpt-{number}.data-{i:05d}-of-{total:05d}" for i in range(total)
               if f"ckpt-{number}.data-{i:05d}-of-{total:05d}" not in names]
    return f"{missing[0]} is missing" if missing else None


def restore_newest(ckpt, directory: Path, repair: bool) -> int | None:
    """Restore the newest checkpoint in `directory` that restores cleanly; its number (the step), or None.

    Checkpoints are found by their files, not by TF's `checkpoint` state file, so a missing or
    garbled state file loses nothing. A newer checkpoint that is incomplete or fails to restore
    (truncated or corrupted data) is skipped with a warning naming it and why. With `repair`
    (the chief), skipped checkpoints are moved into `directory/damaged/` and the state file is
    rewritten to list the intact ones, so rotation never deletes a checkpoint older than the
    resumed one. Raises LiversegError when checkpoint files exist but none restores: a run that
    holds checkpoints never silently starts again from step 0.
    """
    state = directory / "checkpoint"
    found = _checkpoint_files(directory)
    if not found:
        if state.is_file():
            raise LiversegError(f"{state} lists checkpoints but no ckpt-* files are in {directory}; put them back, "
                                f"or move {directory} aside to train from step 0")
        return None
    skipped: list[tuple[int, str]] = []
    restored = None
    for number in sorted(found, reverse=True):
        why = _incomplete(number, found[number])
        if why is None:
            try:
                ckpt.restore(str(directory / f"ckpt-{number}")).assert_existing_objects_matched()
                restored = number
                break
            except Exception as e:  # noqa: BLE001 - TF raises several types for damaged files
                why = f"it does not restore ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"
        log.warning("skipping checkpoint %s: %s", directory / f"ckpt-{number}", why)
        skipped.append((number, why))
    if restored is None:
        raise LiversegError(f"{directory}: no checkpoint restores (" + "; ".join(f"ckpt-{n}: {w}" for n, w in skipped)
                            + f"); restore them from a backup, or move {directory} aside to train from step 0")
    if repair:
        _set_aside(directory, [p for n, _ in skipped for p in found[n]])
        kept = sorted(n for n in found if n <= restored and _incomplete(n, found[n]) is None)
        _write_state(directory, kept)
    return restored


def _set_aside(directory: Path, files: list[Path]) -> None:
    if not files:
        return
    aside = directory / "damaged"
    aside.mkdir(exist_ok=True)
    for p in files:
        target = aside / p.name
        if target.exists():
            target = aside / f"{p.name}.{int(time.time())}"
        p.replace(target)
    log.warning("moved the skipped checkpoint files into %s", aside)


def _write_state(directory: Path, numbers: list[int]) -> None:
    """TF's `checkpoint` state file (a CheckpointState text proto) listing `numbers`, oldest first."""
    stamps = [(directory / f"ckpt-{n}.index").stat().st_mtime for n in numbers]
    lines = [f'model_checkpoint_path: "ckpt-{numbers[-1]}"']
    lines += [f'all_model_checkpoint_paths: "ckpt-{n}"' for n in numbers]
    lines += [f"all_model_checkpoint_timestamps: {t:.6f}" for t in stamps]
    lines.append(f"last_preserved_timestamp: {min(stamps) - 1:.6f}")
    with atomic_path(directory / "checkpoint") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def worker_checkpoint_dir(run: Path, task: str) -> Path:
    """Where a non-chief worker writes its (discarded) checkpoints: a fixed temporary folder per
    run and task, emptied at start, so one left by a killed worker is removed on the next start."""
    key = hashlib.sha256(str(run.resolve()).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"liverseg-worker-{task}-{key}"
    if path.exists():
        log.info("removing %s, left by an earlier worker", path)
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


__all__ = ["InputSpec", "Intensity", "RunInfo", "check_dataset", "check_resume", "claim", "load_config",
           "restore_newest", "save_config", "worker_checkpoint_dir"]
