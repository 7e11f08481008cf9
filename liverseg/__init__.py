"""liverseg: fast, distributed U-Net training for liver segmentation in CT.

Data flow (one module per stage): geometry + nifti_io / dicom_io + volumes -> layouts ->
convert -> records -> pipeline -> augment -> unet -> step -> train (+ hooks, checkpoints,
validation) -> metrics -> predict -> evaluate, with `cli` on top and `config` beside.

Importing the package is cheap and neither imports nor needs TensorFlow: the stages that
need it import it themselves, and the CLI checks that it is installed before running a
command that needs it (`require_tensorflow`: one clear line naming the extra to install).
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
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
