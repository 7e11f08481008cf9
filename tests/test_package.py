"""liverseg as users install it: a wheel, in a virtual environment of its own, away from the
repository: its presets come with it (package data), so a command naming one runs."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import HANG, REPO


@pytest.mark.slow
def test_a_wheel_carries_the_presets_and_a_command_names_one(dataset, tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        timeout=HANG,
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=HANG)
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
        timeout=HANG,
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
        timeout=HANG,
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
        timeout=HANG,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 pipeline, no augmentation" in run.stdout
    bad = subprocess.run(
        [str(python), "-m", "liverseg", "bench", "pipeline", str(dataset), "--config", "nope"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert (
        bad.returncode == 2 and "give a YAML file or a preset name (default, demo, real-cpu, seed, smoke)" in bad.stderr
    )


def _package_stats():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import package_stats
    finally:
        sys.path.remove(str(REPO / "tools"))
    return package_stats


def test_no_import_cycle_among_liverseg_modules_counting_imports_inside_functions():
    stats = _package_stats()
    mods, edges = stats.graph(REPO / "liverseg")
    assert stats.cycles(mods, edges) == []


# The one liverseg import inside a function that defers no heavy library: the entry point
# imports its command modules after catching SIGTERM and setting TensorFlow's log level.
START_UP_FIRST = {
    ("liverseg.cli", m) for m in ("liverseg.cli.bench", "liverseg.cli.data", "liverseg.cli.group", "liverseg.cli.run")
}


def test_liverseg_modules_are_imported_at_the_top_unless_they_load_tensorflow_keras_or_beam():
    """An import of a liverseg module inside a function defers a heavy library (TensorFlow,
    Keras, Beam, an optional runtime) that module loads at its top and the importer does not;
    any other is at the top of the file, where a circle would show at once."""
    stats = _package_stats()
    mods, edges = stats.graph(REPO / "liverseg")
    heavy = stats.heavy_at_top(mods, edges)
    light = {
        (i.importer, i.imported)
        for i in edges
        if i.lazy and i.imported in mods and (i.imported not in heavy or i.importer in heavy)
    }
    assert light - START_UP_FIRST == set()
    assert {"liverseg.train", "liverseg.unet", "liverseg.pipeline"} <= heavy  # the check sees TensorFlow
    assert not {"liverseg.volumes", "liverseg.predict", "liverseg.models", "liverseg.convert"} & heavy
