"""liverseg: fast, distributed U-Net training for liver segmentation in CT.

Data flow (one module per stage): geometry + nifti_io / dicom_io + volumes -> layouts ->
convert -> records -> pipeline -> augment -> unet -> step -> train (+ hooks, checkpoints,
validation) -> metrics -> predict -> evaluate, with `cli` on top and `config` beside.

Importing the package is cheap and neither imports nor needs TensorFlow: the stages that
need it import it themselves, and the CLI checks that it is installed before running a
command that needs it (`cli.startup.require_tensorflow`: one clear line naming the extra to install).
"""

from __future__ import annotations

import threading

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
