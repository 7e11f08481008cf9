"""Shared fixtures: tiny synthetic volumes (32-48 px, a few slices) so everything runs on 2 CPU cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import nibabel as nib
import numpy as np
import pytest

from liverseg.cli.startup import import_tensorflow_quietly

import_tensorflow_quietly()  # no absl/oneDNN import notices in the test output
import tensorflow as tf  # noqa: E402

# Two logical CPU devices, so MirroredStrategy can be tested on a CPU-only machine. This
# must happen before TensorFlow initialises its runtime, i.e. before any test runs an op.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIVERSEG_SHARED", REPO.parent / "shared"))
SHARED_MASKS = SHARED / "data" / "ircad-liver-masks"
REAL_CT = SHARED / "data" / "real-ct"
HANG = 900  # seconds: what ends a subprocess that hangs; never a speed (a loaded machine is slow)


def preset(name: str) -> Path:
    """A shipped recipe, as the repository holds it (configs/NAME.yaml)."""
    return REPO / "configs" / f"{name}.yaml"


SMOKE = preset("smoke")


def smoke(records, *overrides):
    """The smoke recipe on `records`, with `key=value` overrides."""
    from liverseg import config

    return config.load(SMOKE, [f"data.records={records}", *overrides])


def invoke(*args, catch_exceptions: bool = False):
    """`liverseg ARGS` in this process (click's runner): the result, output and exit code."""
    from click.testing import CliRunner

    from liverseg.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=catch_exceptions)


def write_nifti(path: Path, arr: np.ndarray, affine=None, dtype=None, slope: float | None = None) -> Path:
    """Write a NIfTI file exactly as given (dtype, optional scl_slope)."""
    affine = np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine
    arr = np.asarray(arr)
    img = nib.Nifti1Image(arr.astype(dtype) if dtype else arr, affine)
    if dtype:
        img.header.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


# Python code that makes TensorFlow (and Keras) unimportable, as on a machine without them:
# prefix it to a `python -c` script.
WITHOUT_TENSORFLOW = """
import importlib.abc, sys
class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoTensorFlow())
"""


def load_image(path):
    """(int16 HU voxels, header) of a NIfTI CT, through the loader every stage uses."""
    from liverseg import volumes

    vol = volumes.load_image(volumes.Source.nifti(path))
    return vol.voxels, vol.header


def load_mask(path, merge_tumour: bool = False):
    """(uint8 liver voxels, header) of a NIfTI mask, through the loader every stage uses."""
    from liverseg import volumes

    vol = volumes.load_mask(volumes.Source.nifti(path), merge_tumour)
    return vol.voxels, vol.header


def liverseg_process(*args, env=None, **kw) -> subprocess.Popen:
    """`python -m liverseg ARGS` as a user runs it (stdout and stderr together, text; `kw`
    overrides). `env`: the whole environment (default: this one, TensorFlow's C++ log at 2)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"} if env is None else env
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, **kw}
    return subprocess.Popen([sys.executable, "-m", "liverseg", *map(str, args)], env=env, **popen)


def liverseg_run(*args, env=None, **kw) -> subprocess.CompletedProcess:
    """`python -m liverseg ARGS` run to its end (stdout and stderr apart, text); `env` as for
    `liverseg_process`."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"} if env is None else env
    return subprocess.run(
        [sys.executable, "-m", "liverseg", *map(str, args)], capture_output=True, text=True, env=env, timeout=HANG, **kw
    )


def tree(path: Path) -> list[str]:
    """Every file under path (relative), for 'nothing written' assertions."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """Six procedural phantoms, 32x32, 8-12 slices, mixed orientations."""
    from liverseg import synth

    out = tmp_path_factory.mktemp("phantoms")
    synth.synthesize(out, cases=6, size=32, slices=(8, 12), seed=7, progress=False)
    return out


@pytest.fixture(scope="session")
def dataset(phantoms, tmp_path_factory) -> Path:
    """The phantoms converted: 4 train, 1 val, 1 test case, one case per shard."""
    from liverseg.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("records") / "ds"
    convert(phantoms, out, ConvertOptions(val=0.17, test=0.17, num_shards=None, shard_mb=0.04), progress=False)
    return out


@pytest.fixture
def real_ct() -> Path:
    """../shared/data/real-ct (real scans no part of liverseg made), or the test is skipped."""
    if not REAL_CT.is_dir():
        pytest.skip(f"real CT not available at {REAL_CT}")
    return REAL_CT


@pytest.fixture
def shared_masks() -> Path:
    if not SHARED_MASKS.is_dir():
        pytest.skip(f"real masks not available at {SHARED_MASKS}")
    return SHARED_MASKS


@pytest.fixture(scope="session")
def trained_run(dataset, tmp_path_factory) -> Path:
    """A smoke run of 40 steps on `dataset` (context 1), validated at 20 and 40. Read it, do not change it."""
    from liverseg import train

    run = tmp_path_factory.mktemp("run") / "smoke"
    train.train(smoke(dataset, "train.steps=40", "data.context=1", "train.eval_every=20"), run, progress=False)
    return run


@pytest.fixture
def terminate():
    """liverseg.TERMINATE (what the CLI's SIGTERM handler sets), cleared before and after."""
    from liverseg import TERMINATE

    TERMINATE.clear()
    yield TERMINATE
    TERMINATE.clear()
