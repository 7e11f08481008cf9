"""liverseg: fast, distributed U-Net training for liver segmentation in CT.

Data flow (one module per stage): geometry + nifti_io / dicom_io + volumes -> layouts ->
convert -> records -> pipeline -> augment -> unet -> step -> train (+ hooks, checkpoints,
validation) -> metrics -> predict -> evaluate, with `cli` on top and `config` beside.

Importing the package is cheap and neither imports nor needs TensorFlow: the stages that
need it import it themselves, and the CLI checks that it is installed before running a
command that needs it (`require_tensorflow`: one clear line naming the extra to install).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

__version__ = "0.1.0"


# Set by SIGTERM in a long-running command (the CLI installs the handler before importing
# TensorFlow, so a SIGTERM in its first seconds is not lost); the trainer checkpoints and stops.
TERMINATE = threading.Event()


class LiversegError(Exception):
    """A user-facing error: the message names the bad file/value and how to fix it.

    The CLI prints it as one line and exits with status 2; nothing else is caught.
    """


class InputError(LiversegError):
    """A bad input file (NIfTI, DICOM, zip). The message starts with the file's path."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Write to the yielded temporary sibling of `path`; it is renamed onto `path` when the
    block succeeds and removed when it fails, so `path` is never half-written.

    The temporary name (`.partial-<name>`) keeps the suffix, so nibabel and Keras pick the
    same format. A folder works too (an existing folder at `path` is replaced).
    """
    path = Path(path)
    tmp = path.with_name(f".partial-{path.name}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir():
        _remove(path)  # rename cannot replace a non-empty folder
    tmp.replace(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_lock(folder: str | Path, name: str, holder_kind: str, advice: str, remove: bool = False) -> Iterator[None]:
    """Hold `folder/name` (an flock, released by the kernel when the process dies) for the block.

    A second holder fails with one line naming the first (pid, host, since when) and `advice`.
    A lock file left by a process that died holds no flock, so it is taken over (and said so).
    `remove`: the lock file is deleted on release (a taker then checks that the file it locked
    is still the one at the path, and retries otherwise); else it stays, emptied. A folder
    this call created is removed again when nothing but the lock was written into it.
    """
    import fcntl
    import logging
    import os
    import socket
    import time

    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LiversegError(f"{folder} is in use by {holder_kind} ({holder}); {advice}") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it as we took it: take the one at the path now
    try:
        stale = os.pread(fd, 512, 0).decode(errors="replace").strip()
        if stale:
            logging.getLogger(__name__).warning("%s: taking over the lock of %s that did not exit cleanly (%s)",
                                                path, holder_kind, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        try:
            yield
        finally:
            if remove:
                path.unlink(missing_ok=True)
            else:
                os.ftruncate(fd, 0)  # an empty lock file: released cleanly
    finally:
        os.close(fd)  # releases the flock
        if created and folder.is_dir() and not [p for p in folder.iterdir() if p != path]:
            shutil.rmtree(folder, ignore_errors=True)


def available_memory() -> float | None:
    """MemAvailable (bytes) from /proc/meminfo, or None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def derive_seed(seed: int, stream: str) -> int:
    """An independent seed in [0, 2**31) for one random stream ("host-augment-0", ...) of a
    run seeded with `seed`: the same on every machine and Python version (not `hash`)."""
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def require_tensorflow() -> None:
    """Raise a one-line ImportError naming the extra to install when TF is missing."""
    try:
        found = importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):  # a finder that refuses it: as good as missing
        found = False
    if not found:
        raise ImportError(
            "liverseg needs TensorFlow: pip install 'liverseg[cpu]' (CPU) "
            "or 'liverseg[gpu]' (NVIDIA GPU, CUDA wheels)"
        )
