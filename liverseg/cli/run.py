"""Run commands: train, tensorboard, evaluate, predict, export."""

from __future__ import annotations

from pathlib import Path

import click

from liverseg import LiversegError, board, models
from liverseg import config as config_mod
from liverseg import export as export_mod
from liverseg import predict as predict_mod
from liverseg.cli.group import (
    Location,
    cli,
    runs_option,
    runs_tensorflow,
    runs_tensorflow_without,
    set_option,
    table,
    weights_option,
)
from liverseg.engines import ENGINES
from liverseg.export import FORMATS as EXPORT_FORMATS
from liverseg.layouts import LAYOUTS
from liverseg.predict import OUTPUT_FORMATS


def _config(config_path, records, overrides):

    overrides = list(overrides)
    if records is not None:
        overrides.append(f"data.records={records}")
    return config_mod.load(config_path, overrides)


@runs_tensorflow
@cli.command()
@click.option(
    "--config",
    "config_path",
    help="A YAML file or a shipped preset's name: default, demo, real-cpu, seed, smoke (configs/*.yaml).",
)
@click.option(
    "--records", type=Location(file_okay=False), help="Converted dataset (sets data.records); a folder or gs://..."
)
@click.option(
    "--run",
    "run_dir",
    required=True,
    type=Location(file_okay=False),
    help="Run directory; re-running on it resumes.",
)
@set_option
def train(config_path, records, run_dir, overrides):
    """Train (or resume) a U-Net; TensorBoard logs go to RUN/train and RUN/validation."""
    cfg = _config(config_path, records, overrides)  # a bad key or value is reported before TensorFlow loads
    from liverseg import train as train_mod

    try:
        result = train_mod.train(cfg, run_dir)
    except train_mod.Preempted as e:
        click.echo(str(e), err=True)
        raise SystemExit(train_mod.PREEMPTED_EXIT) from None
    click.echo(
        f"finished at step {result['step']}; best val Dice (3D): {result['best_val_dice_3d']}; "
        f"weights {result['weights_fingerprint']}"
    )
    click.echo(f"TensorBoard: liverseg tensorboard {run_dir}   (or: tensorboard --logdir {run_dir})")


@runs_tensorflow
@cli.command()
@click.argument("logdir", type=Location(exists=True, file_okay=False))
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Bind address (0.0.0.0 exposes it to the network)."
)
@click.option("--port", default=6006, show_default=True)
def tensorboard(logdir, host, port):
    """Serve TensorBoard for a run (or a folder of runs), on localhost by default."""

    raise SystemExit(board.serve(logdir, host, port))


@runs_tensorflow
@cli.command()
@runs_option
@weights_option
@click.option(
    "--records",
    type=Location(exists=True, file_okay=False),
    help="Converted dataset (default: the one the run trained on).",
)
@click.option("--split", default="test", show_default=True, help="Records split to evaluate.")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of image/mask pairs in a convert --layout, scored on each case's own grid instead.",
)
@click.option(
    "--layout",
    type=click.Choice(LAYOUTS),
    default="pattern",
    show_default=True,
    help="Layout of --data (as for convert).",
)
@click.option("--out", type=Location(file_okay=False), help="Output folder (default RUN/eval/<split>).")
def evaluate(run_dirs, weights, records, split, data, layout, out):
    """Per-case Dice, IoU, VOE, RVD, HD95, ASSD, MSD (mm): CSV, JSON, overlays, TensorBoard
    (several --run: their ensemble)."""
    from liverseg import evaluate as evaluate_mod

    if not run_dirs:
        raise click.UsageError("give --run RUN (several: their ensemble)")
    rows, summary, out = evaluate_mod.evaluate(
        load_models(run_dirs, weights, ()), records, split, data, out, layout=layout
    )
    click.echo(table([{k: _fmt(v) for k, v in r.items()} for r in rows]))
    click.echo()
    click.echo(_summary_table(summary))
    click.echo(f"wrote {out}/cases.csv, {out}/metrics.json and overlays; TensorBoard: {run_dirs[0]}/evaluation")


@runs_tensorflow
@cli.command()
@click.argument("runs", nargs=-1, required=True, type=Location(exists=True, file_okay=False))
@click.option("--out", type=Location(file_okay=False), help="Output folder (default: cv/ beside the first run).")
def cv(runs, out):
    """Cross-validation: the out-of-fold scores of RUNS (one run per fold of one dataset), per patient and per fold."""
    from liverseg import evaluate as evaluate_mod

    rows, summary, out = evaluate_mod.cross_validate(runs, out)
    click.echo(table([{k: _fmt(v) for k, v in r.items()} for r in rows]))
    for name, part in [("all folds", summary["overall"]), *((f"fold {f}", s) for f, s in summary["folds"].items())]:
        click.echo(f"\n{name}")
        click.echo(_summary_table(part))
    click.echo(f"wrote {out}/cases.csv and {out}/metrics.json")


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) and abs(v) < 1e6 else str(v)


def _summary_table(summary: dict) -> str:
    return table(
        [
            {
                "metric": k,
                "mean": _fmt(v["mean"]),
                "sd": _fmt(v["sd"]),
                "median": _fmt(v["median"]),
                "cases": v["n"],
                "infinite": v["n_inf"],
            }
            for k, v in summary.items()
        ]
    )


def load_models(run_dirs, weights, model_dirs, engine=None) -> list:
    """The models of --run (each with --weights when one run is given) and --model options."""
    if not run_dirs and not model_dirs:
        raise click.UsageError("give --run RUN or --model EXPORT (several of either: an ensemble)")
    if weights and len(run_dirs) != 1:
        raise click.UsageError("--weights picks the weights of one --run")
    runs = [models.load_run(r, weights) for r in run_dirs]
    if engine:
        runs = [r.use_engine(engine) for r in runs]  # refuses an engine that runs exports only
    return runs + [member for m in model_dirs for member in models.load_exports(m, engine)]


engine_option = click.option(
    "--engine",
    type=click.Choice(ENGINES),
    help="Who runs the network: a run's tensorflow (default) or tensorflow-xla; an export's "
    "own runtime (default), or openvino / openvino-bf16 (bfloat16) for an ONNX or "
    "OpenVINO export.",
)


@runs_tensorflow_without("--model")
@cli.command()
@runs_option
@weights_option
@click.option(
    "--model",
    "model_dirs",
    multiple=True,
    type=Location(exists=True, file_okay=False),
    help="An exported folder (liverseg export): runs without TensorFlow for onnx/openvino exports.",
)
@engine_option
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=Location(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(OUTPUT_FORMATS),
    default="nifti",
    show_default=True,
    help="nifti: <case>_liver.nii.gz on each input's grid; dicom-seg: <case>_liver.dcm, a DICOM "
    "Segmentation over each input DICOM series.",
)
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--prob", is_flag=True, help="Also write <case>_liver_prob.nii.gz probability maps (an ensemble's mean).")
def predict(run_dirs, weights, model_dirs, engine, inputs, out, fmt, force, prob):
    """Liver masks for NIfTI files and DICOM series (folders or zips), on each input's own grid."""
    written, failures = predict_mod.predict(
        load_models(run_dirs, weights, model_dirs, engine), inputs, out, force, prob, fmt
    )
    click.echo(f"wrote {len(written)} file(s) to {out}")
    if failures:
        raise LiversegError(f"{len(failures)} input(s) failed: " + "; ".join(failures))


@runs_tensorflow
@cli.command()
@runs_option
@weights_option
@click.argument("out", type=Location(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(EXPORT_FORMATS),
    default="savedmodel",
    show_default=True,
    help="savedmodel (TensorFlow), onnx (ONNX Runtime), openvino (OpenVINO IR), litert (.tflite).",
)
@click.option("--force", is_flag=True, help="Replace a non-empty OUT.")
def export(run_dirs, weights, out, fmt, force):
    """The run's network in FORMAT with its input contract (several --run: an ensemble);
    liverseg predict --model OUT runs it."""

    if not run_dirs:
        raise click.UsageError("give --run RUN (several: an exported ensemble)")
    out, diff = export_mod.export_ensemble(load_models(run_dirs, weights, ()), out, fmt, force)
    click.echo(f"exported {fmt} to {out} (probabilities within {diff:.2g} of the run's on a probe batch)")
