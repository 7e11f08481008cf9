"""Training checkpoints in RUN/checkpoints/: found, restored, repaired, set aside; worker folders.

A checkpoint is TF's `ckpt-N.index` + `ckpt-N.data-*` files (N: the step), written by a
`tf.train.CheckpointManager`. Resume takes the newest one that restores cleanly; a newer one
that is incomplete or does not restore is named, moved into `checkpoints/damaged/` (never
deleted) and skipped, and TF's `checkpoint` state file is rewritten to list the intact ones,
so the manager's rotation never deletes a checkpoint older than the one resumed. A run that
holds checkpoint files never silently restarts at step 0.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path

from liverseg import LiversegError
from liverseg.files import atomic_path

log = logging.getLogger(__name__)

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
    missing = [
        f"ckpt-{number}.data-{i:05d}-of-{total:05d}"
        for i in range(total)
        if f"ckpt-{number}.data-{i:05d}-of-{total:05d}" not in names
    ]
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
            raise LiversegError(
                f"{state} lists checkpoints but no ckpt-* files are in {directory}; put them back, "
                f"or move {directory} aside to train from step 0"
            )
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
        raise LiversegError(
            f"{directory}: no checkpoint restores ("
            + "; ".join(f"ckpt-{n}: {w}" for n, w in skipped)
            + f"); restore them from a backup, or move {directory} aside to train from step 0"
        )
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


__all__ = ["restore_newest", "worker_checkpoint_dir"]
