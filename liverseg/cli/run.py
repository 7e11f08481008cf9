"""Run commands: train, tensorboard, evaluate, predict, export."""

from __future__ import annotations

from pathlib import Path

import click

from liverseg import LiversegError
from liverseg.cli.group import cli, run_option, runs_tensorflow, set_option, table, weights_option
from liverseg.layouts import LAYOUTS


def _config(config_path, records, overrides):
    from liverseg import config as config_mod

    overrides = list(overrides)
    if records is not None:
        overrides.append(f"data.records={records}")
    return config_mod.load(config_path, overrides)


@runs_tensorflow
@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML preset (configs/default.yaml, seed.yaml, smoke.yaml).")
@click.option("--records", type=click.Path(file_okay=False, path_type=Path), help="Converted dataset (sets data.records).")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory; re-running on it resumes.")
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
    click.echo(f"finished at step {result['step']}; best val Dice (3D): {result['best_val_dice_3d']}; "
               f"weights {result['weights_fingerprint']}")
    click.echo(f"TensorBoard: liverseg tensorboard {run_dir}   (or: tensorboard --logdir {run_dir})")


@runs_tensorflow
@cli.command()
@click.argument("logdir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (0.0.0.0 exposes it to the network).")
@click.option("--port", default=6006, show_default=True)
def tensorboard(logdir, host, port):
    """Serve TensorBoard for a run (or a folder of runs), on localhost by default."""
    from liverseg import board

    raise SystemExit(board.serve(logdir, host, port))


@runs_tensorflow
@cli.command()
@run_option
@weights_option
@click.option("--records", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Converted dataset (default: the one the run trained on).")
@click.option("--split", default="test", show_default=True, help="Records split to evaluate.")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of image/mask pairs in a convert --layout, scored on each case's own grid instead.")
@click.option("--layout", type=click.Choice(LAYOUTS), default="pattern", show_default=True,
              help="Layout of --data (as for convert).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder (default RUN/eval/<split>).")
def evaluate(run_dir, weights, records, split, data, layout, out):
    """Per-case Dice, IoU, VOE, RVD, HD95, ASSD, MSD (mm): CSV, JSON, overlays, TensorBoard."""
    from liverseg import evaluate as evaluate_mod
    from liverseg import predict as predict_mod

    rows, summary, out = evaluate_mod.evaluate(predict_mod.load_run(run_dir, weights), records, split, data, out,
                                               layout=layout)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) and abs(v) < 1e6 else str(v)  # noqa: E731
    click.echo(table([{k: fmt(v) for k, v in r.items()} for r in rows]))
    click.echo()
    click.echo(table([{"metric": k, "mean": fmt(v["mean"]), "sd": fmt(v["sd"]), "median": fmt(v["median"]),
                        "cases": v["n"], "infinite": v["n_inf"]} for k, v in summary.items()]))
    click.echo(f"wrote {out}/cases.csv, {out}/metrics.json and overlays; TensorBoard: {run_dir}/evaluation")


@runs_tensorflow
@cli.command()
@run_option
@weights_option
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--prob", is_flag=True, help="Also write <case>_liver_prob.nii.gz probability maps.")
def predict(run_dir, weights, inputs, out, force, prob):
    """Write <case>_liver.nii.gz masks for NIfTI files, DICOM series (folders or zips), on each input's own grid."""
    from liverseg import predict as predict_mod

    written, failures = predict_mod.predict(predict_mod.load_run(run_dir, weights), inputs, out, force, prob)
    click.echo(f"wrote {len(written)} file(s) to {out}")
    if failures:
        raise LiversegError(f"{len(failures)} input(s) failed: " + "; ".join(failures))


@runs_tensorflow
@cli.command()
@run_option
@weights_option
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace a non-empty OUT.")
def export(run_dir, weights, out, force):
    """SavedModel (serving: int16 HU slices -> liver probabilities) + weights + config."""
    from liverseg import predict as predict_mod

    click.echo(f"exported to {predict_mod.export(predict_mod.load_run(run_dir, weights), out, force)}")
