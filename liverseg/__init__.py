"""liverseg: fast, distributed U-Net training for liver segmentation in CT.

Data flow (one module per stage): nifti_io -> convert -> records -> pipeline -> augment
-> unet -> train -> metrics -> predict, with `cli` on top and `config` beside.

Importing the package is cheap and does not import TensorFlow; the stages that need it
import it themselves. `require_tensorflow()` turns a missing install into one clear line.
"""

from __future__ import annotations

import importlib.util

__version__ = "0.1.0"


class LiversegError(Exception):
    """A user-facing error: the message names the bad file/value and how to fix it.

    The CLI prints it as one line and exits with status 2; nothing else is caught.
    """


def require_tensorflow() -> None:
    """Raise a one-line ImportError naming the extra to install when TF is missing."""
    if importlib.util.find_spec("tensorflow") is None:
        raise ImportError(
            "liverseg needs TensorFlow: pip install 'liverseg[cpu]' (CPU) "
            "or 'liverseg[gpu]' (NVIDIA GPU, CUDA wheels)"
        )


require_tensorflow()
