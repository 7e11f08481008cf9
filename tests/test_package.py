"""liverseg as users install it: a wheel, in a virtual environment of its own, away from the
repository: its presets come with it (package data), so a command naming one runs."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.slow
def test_a_wheel_carries_the_presets_and_a_command_names_one(dataset, tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    target = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    wheel = next(wheels.glob("liverseg-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # the wheel's liverseg, with this environment's dependencies (their folder holds no liverseg
    # package: the repository's editable install is a .pth finder, which PYTHONPATH does not run)
    deps = sysconfig.get_paths()["purelib"]
    env = {**os.environ, "PYTHONPATH": deps, "TF_CPP_MIN_LOG_LEVEL": "2"}
    where = subprocess.run(
        [str(python), "-c", "import liverseg, sys; print(liverseg.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    run = subprocess.run(
        [
            str(python),
            "-m",
            "liverseg",
            "bench",
            "pipeline",
            str(dataset),
            "--config",
            "smoke",
            "--batches",
            "2",
            "--aug",
            "none",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 pipeline, no augmentation" in run.stdout
    bad = subprocess.run(
        [str(python), "-m", "liverseg", "bench", "pipeline", str(dataset), "--config", "nope"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        bad.returncode == 2 and "give a YAML file or a preset name (default, demo, real-cpu, seed, smoke)" in bad.stderr
    )
