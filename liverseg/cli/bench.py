"""Benchmark commands (`liverseg bench ...`): figures go in docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

import click

from liverseg import bench as bench_mod
from liverseg.bench import ROWS, scale
from liverseg.bench.predict import ENGINE_ROWS
from liverseg.cli.data import build_convert_options, convert_options
from liverseg.cli.group import Location, cli, runs_option, runs_tensorflow, set_option, table
from liverseg.engines import ENGINES


@cli.group()
def bench():
    """Throughput benchmarks (figures go in docs/benchmarks.md)."""


@bench.command("convert")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--dicom",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The same volumes as 3D-IRCADb-01 DICOM trees (liverseg synth --layout ircad): adds DICOM rows.",
)
@click.option(
    "--beam", is_flag=True, help="Add the same conversions on Apache Beam's DirectRunner (needs liverseg[beam])."
)
@convert_options
def bench_convert(src, dicom, beam, **kw):
    """Time a plain nibabel load of SRC against `convert` with 1 and --workers processes."""

    workers = kw["workers"] if kw["workers"] > 1 else 2
    click.echo(table(bench_mod.bench_convert(src, workers, build_convert_options(**kw), dicom, beam)))


@runs_tensorflow
@bench.command("pipeline")
@click.argument("records", type=Location(exists=True, file_okay=False))
@click.option(
    "--nifti",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Source NIfTI folder: adds the tutorial's per-slice nib.load loader.",
)
@click.option("--batches", default=40, show_default=True, help="Batches timed per row (after 5 warm-up batches).")
@click.option("--aug", type=click.Choice(["none", "host"]), default="host", show_default=True)
@click.option("--context", type=int, help="2.5D context k (2k+1 channels)  [default: the recipe's, else 0]")
@click.option("--batch", type=int, help="Batch size  [default: the recipe's, else 8]")
@click.option("--tutorial-batches", default=2, show_default=True, help="Batches timed for the (slow) tutorial loader.")
@click.option("--service", is_flag=True, help="Add the pipeline through a tf.data service of 1 and 2 loopback workers.")
@click.option(
    "--config",
    "config_path",
    help="A recipe (YAML file or preset name) whose data and augment settings the rows use (--context and "
    "--batch then default to the recipe's).",
)
@set_option
def bench_pipeline(records, nifti, batches, aug, context, batch, tutorial_batches, service, config_path, overrides):
    """Pipeline throughput against the raw read ceiling, the tutorial loader and the resampling floor."""

    click.echo(
        table(
            bench_mod.bench_pipeline(
                records,
                nifti,
                batches,
                aug,
                context,
                batch,
                tutorial_batches,
                service=service,
                config_path=config_path,
                overrides=overrides,
            )
        )
    )


def _bench_rows(ctx, param, value: str) -> tuple:

    return _choices(value, ROWS, "--rows")


def _choices(value: str, valid: tuple, flag: str) -> tuple:
    picked = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in picked if v not in valid]
    if bad or not picked:
        raise click.BadParameter(f"{bad[0] if bad else value!r} is not one of {', '.join(valid)}", param_hint=flag)
    return picked


@runs_tensorflow
@bench.command("train")
@click.argument("records", type=Location(exists=True, file_okay=False))
@click.option(
    "--config",
    "config_path",
    default="default",
    show_default=True,
    help="The recipe measured: a YAML file or a preset name (default, real-cpu, smoke, ...).",
)
@set_option
@click.option(
    "--steps", default=8, show_default=True, help="Timed steps of the model and end-to-end rows (after --warmup)."
)
@click.option(
    "--warmup",
    default=2,
    show_default=True,
    help="Untimed calls of train.steps_per_call steps first (compilation; 2 at least).",
)
@click.option("--loop-steps", default=400, show_default=True, help="Timed steps of the loop-overhead rows.")
@click.option("--input-batches", default=20, show_default=True, help="Batches timed for the input-ceiling row.")
@click.option(
    "--peak-tflops", type=float, help="Accelerator peak (e.g. 989 for an H100 SXM in bf16): adds the 40% MFU target."
)
@click.option(
    "--rows",
    default="model,loop,input,end-to-end",
    show_default=True,
    callback=_bench_rows,
    help="Which measured rows (FLOPs always).",
)
def bench_train(records, config_path, overrides, steps, warmup, loop_steps, input_batches, peak_tflops, rows):
    """Training ceilings in one run: model, loop overhead, input, end to end, FLOPs per image."""

    click.echo(
        table(
            bench_mod.bench_train(
                records, config_path, overrides, steps, warmup, loop_steps, input_batches, peak_tflops, rows
            )
        )
    )


@runs_tensorflow
@bench.command("predict")
@runs_option
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--cases", default=3, show_default=True, help="Volumes of DATA (image/mask pairs) to predict.")
@click.option(
    "--config",
    "config_path",
    help="Without --run: an untrained network of this recipe (a YAML file or a preset name; speed only).",
)
@click.option("--size", type=int, help="With --config: the network's input size (slices resized to SIZE x SIZE).")
@click.option(
    "--engine",
    "engine_rows",
    multiple=True,
    type=click.Choice(ENGINES),
    help="Engines to measure (default: tensorflow, tensorflow-xla, onnxruntime, openvino).",
)
def bench_predict(run_dirs, data, cases, config_path, size, engine_rows):
    """Whole-volume prediction per engine (s/volume, slices/s, peak RSS, masks against the
    first engine's), and for several --run their ensemble, on the same volumes of DATA."""

    if bool(run_dirs) == bool(config_path):
        raise click.UsageError("give --run RUN (several: also their ensemble) or --config C --size N")
    if config_path and not size:
        raise click.UsageError("--config needs --size N (the network's input size)")
    click.echo(table(bench_mod.bench_predict(run_dirs, data, cases, config_path, size, engine_rows or ENGINE_ROWS)))


@bench.command("metrics")
@click.argument("masks", type=click.Path(exists=True, file_okay=False, path_type=Path))
def bench_metrics(masks):
    """Metric time per case on real *_liver.nii[.gz] masks against a shifted, eroded copy."""

    click.echo(table(bench_mod.bench_metrics(masks)))


@runs_tensorflow
@bench.command("scale")
@click.option("--cases", default="100,1000,10000", show_default=True, help="Case counts N, comma-separated.")
@click.option("--size", default=32, show_default=True, help="In-plane size of the synthetic cases.")
@click.option("--slices", default=8, show_default=True, help="Slices per case.")
@click.option("--no-beam", is_flag=True, help="Skip the conversion on Beam's DirectRunner.")
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the temporary data (default: the system's temporary folder).",
)
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the table as JSON here."
)
@click.option("--force", is_flag=True, help="Replace an earlier bench scale JSON at --json.")
def bench_scale(cases, size, slices, no_beam, work, json_out, force):
    """Every stage from N=100 to 10,000 cases: per-case cost and its growth exponent, against the goals."""

    try:
        counts = tuple(int(c) for c in cases.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{cases!r}: comma-separated case counts, e.g. 100,1000,10000", param_hint="--cases"
        ) from None
    click.echo(scale.check_request(counts, size, slices, work, json_out, force))
    rows, notes, totals = scale.bench_scale(counts, size, slices, beam=not no_beam, work=work)
    click.echo(table(rows))
    for note in notes:
        click.echo(note)
    if json_out:
        scale.write_json(json_out, rows, notes, totals)
