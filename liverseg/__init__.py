"""liverseg: fast, distributed U-Net training for liver segmentation in CT.

Data flow (one module per stage): files, geometry -> source -> the format readers
(nifti_io, nrrd_io, dicom_io, dicom_seg) -> volumes -> layouts -> manifest -> convert ->
records -> plan -> pipeline -> augment -> unet -> step -> budget -> train (+ hooks,
checkpoints, validation) -> metrics -> models -> predict -> evaluate, with `outputs` (what an
output may replace) above the formats, `cli` on top and `config` beside.

Imports: each module imports liverseg's own modules at its top (there is no import circle,
counting imports inside functions: tests/test_package.py). A function imports only what is
heavy or optional (TensorFlow, Keras, Beam, TensorBoard, an export runtime, a format's library),
or a liverseg module that loads one of those at its top; the entry point (`cli.main`) imports
the commands after its start-up, so a SIGTERM is caught from its first line.

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
