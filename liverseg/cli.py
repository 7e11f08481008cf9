"""Command line: parse, load config, call one library function. No logic lives here."""

from __future__ import annotations

import ctypes.util
import dataclasses
import functools
import logging
import os
import signal
import sys
import tempfile
import typing
from pathlib import Path

import click

from liverseg import TERMINATE, LiversegError


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(nothing)"
    keys = list(rows[0])
    cells = [[str(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return "\n".join([line(keys), line(["-" * w for w in widths]), *map(line, cells)])


def runs_tensorflow(cmd: click.Command | None = None, *, import_first: bool = True):
    """Mark a command that runs TensorFlow: it runs under tcmalloc (see wants_tcmalloc) and
    imports TensorFlow quietly before its body (import_first=False: the body does, after the
    checks that need no TensorFlow)."""

    def mark(cmd: click.Command) -> click.Command:
        cmd.runs_tensorflow = True
        if import_first:
            body = cmd.callback

            @functools.wraps(body)
            def quiet_first(*args, **kw):
                import_tensorflow_quietly()
                return body(*args, **kw)

            cmd.callback = quiet_first
        return cmd

    return mark if cmd is None else mark(cmd)


class UserError(click.ClickException):
    """A LiversegError shown as one line (`Error: ...`), exit status 2."""

    exit_code = 2


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LiversegError as e:
            raise UserError(str(e)) from None
        except ImportError as e:
            if "liverseg needs TensorFlow" in str(e):
                raise UserError(str(e)) from None
            raise


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="liverseg")
def cli() -> None:
    """liverseg: liver segmentation in CT with U-Nets, from NIfTI to distributed training.

    Typical flow: synth (or your data) -> convert -> verify -> train -> evaluate -> predict.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # TF's checkpoint timings at INFO


# ------------------------------------------------------------------------- data


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--cases", default=20, show_default=True, help="Number of procedural phantoms.")
@click.option("--size", default=512, show_default=True, help="In-plane matrix size.")
@click.option("--slices", default="40..200", show_default=True, help="Slice count range LO..HI.")
@click.option("--masks", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Build one phantom around each real *_liver.nii[.gz] here, at its real geometry.")
@click.option("--seed", default=0, show_default=True)
@click.option("--layout", type=click.Choice(["flat", "seed", "ircad"]), default="flat", show_default=True,
              help="seed: the tutorial's train/ + test/ folders; ircad: 3D-IRCADb-01's DICOM tree.")
@click.option("--workers", default=1, show_default=True, help="Parallel processes.")
def synth(out, cases, size, slices, masks, seed, layout, workers):
    """Write synthetic CT phantoms (<case>_orig.nii.gz, <case>_liver.nii.gz) to OUT."""
    from liverseg import synth as synth_mod

    try:
        lo, hi = (int(v) for v in slices.split(".."))
    except ValueError:
        raise LiversegError(f"--slices {slices!r}: write LO..HI, e.g. 40..200") from None
    for folder in synth_mod.synthesize(out, cases, size, (lo, hi), masks, seed, layout, workers):
        click.echo(f"wrote {folder}")


def dataclass_options(cls, skip: tuple[str, ...] = ()):
    """Click options generated from a frozen options dataclass: one `--field-name` per field,
    its default and help taken from the field, so each default is written once (in the class).

    Field metadata: "help"; "choices" ({shown value: field value}); "exists" (a file that must exist).
    Returns (decorator, build) where build(**kw) turns the parsed values into an instance.
    """
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]

    def decorator(fn):
        for f in reversed(fields):
            tp = hints[f.name]
            meta, flag = f.metadata, "--" + f.name.replace("_", "-")
            kw = {"help": meta.get("help"), "show_default": f.default is not None}
            if tp is bool:
                fn = click.option(flag, is_flag=True, help=meta.get("help"))(fn)
                continue
            if "choices" in meta:
                shown = {v: k for k, v in meta["choices"].items()}
                kw.update(type=click.Choice(list(meta["choices"])), default=shown.get(f.default))
            else:
                base = next(a for a in (typing.get_args(tp) or (tp,)) if a is not type(None))
                kw.update(type=click.Path(exists=True, dir_okay=False) if meta.get("exists") else base, default=f.default)
            fn = click.option(flag, **kw)(fn)
        return fn

    def build(**kw):
        values = {}
        for f in fields:
            v = kw[f.name]
            if "choices" in f.metadata and v is not None:
                v = f.metadata["choices"][v]
            values[f.name] = v
        return cls(**values)

    return decorator, build


def _convert_cli():
    from liverseg.manifest import ConvertOptions

    return dataclass_options(ConvertOptions)


convert_options, build_convert_options = _convert_cli()


@cli.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@convert_options
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- BEAM PIPELINE OPTIONS]")
def convert(src, out, beam_args, **kw):
    """Convert CT volume/mask pairs in SRC (NIfTI or DICOM, see --layout) to sharded TFRecords + manifest in OUT."""
    from liverseg import convert as convert_mod

    opts = build_convert_options(**kw)
    if opts.runner == "local":
        if beam_args:
            raise LiversegError(f"{' '.join(beam_args)}: Beam pipeline options need --runner (e.g. --runner direct)")
        manifest = convert_mod.convert(src, out, opts)
    else:
        from liverseg.convert.beam import convert_beam

        manifest = convert_beam(src, out, opts, beam_args)
    for split, s in manifest.splits.items():
        click.echo(f"{split}: {s.num_cases} cases, {s.num_examples} slices, {len(s.shards)} shard(s)")
    for s in manifest.skipped:
        click.echo(f"skipped {s.case_id}: {s.error}", err=True)
    click.echo(f"wrote {out / 'dataset.json'}")


@runs_tensorflow(import_first=False)
@cli.command()
@click.argument("root", type=click.Path(path_type=Path))
def verify(root):
    """Read every record of every shard in ROOT and check it against the manifest."""
    from liverseg.manifest import Manifest

    Manifest.load(root, check_shards=False)  # a missing or unreadable manifest needs no TensorFlow
    import_tensorflow_quietly()
    from liverseg import verify as verify_mod

    reports = verify_mod.verify(root)
    click.echo(_table([{"shard": r.file, "examples": r.num_examples, "bytes": r.bytes, "status": r.status} for r in reports]))
    bad = [r for r in reports if not r.ok]
    if bad:
        raise LiversegError(f"{len(bad)} of {len(reports)} shard(s) failed: " + "; ".join(f"{root / r.file}: {r.status}" for r in bad))
    click.echo(f"all {len(reports)} shard(s) ok")


@runs_tensorflow
@cli.command()
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--png", type=click.Path(file_okay=False, path_type=Path), help="Write overlay PNGs of sample cases here.")
@click.option("--max-cases", default=3, show_default=True, help="Cases per split drawn with --png.")
def inspect(root, png, max_cases):
    """Summarise a converted dataset per split; optionally draw overlays."""
    from liverseg import verify as verify_mod

    click.echo(_table(verify_mod.inspect(root, png, max_cases)))
    if png:
        click.echo(f"overlays in {png} (green: liver mask)")


# ------------------------------------------------------------------------- training


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
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. train.lr=3e-4.")
def train(config_path, records, run_dir, overrides):
    """Train (or resume) a U-Net; TensorBoard logs go to RUN/train and RUN/validation."""
    from liverseg import train as train_mod

    cfg = _config(config_path, records, overrides)
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
    from tensorboard import program

    # In this process, not a child: stopping this PID (SIGTERM, Ctrl-C) stops the server and frees its port.
    board = program.TensorBoard()
    board.configure(logdir=str(logdir), host=host, port=port)
    raise SystemExit(board.main())


@cli.group("data-service")
def data_service_group():
    """tf.data service servers: input processing on CPU hosts (set data.service in the config)."""


@runs_tensorflow
@data_service_group.command("dispatcher")
@click.option("--port", default=5050, show_default=True, help="Port (0: any free one).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address given out to trainers and workers (TF's servers listen on every interface).")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Journal folder: a restarted dispatcher resumes its jobs.")
def data_service_dispatcher(port, host, work_dir):
    """Run a tf.data service dispatcher until SIGTERM or Ctrl-C."""
    from liverseg import data_service

    data_service.dispatcher(port, host, work_dir)


@runs_tensorflow
@data_service_group.command("worker")
@click.option("--dispatcher", "dispatcher_address", required=True, help="The dispatcher, grpc://HOST:PORT or HOST:PORT.")
@click.option("--port", default=0, show_default=True, help="Port (0: any free one).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address this worker gives the dispatcher for trainers to fetch from.")
def data_service_worker(dispatcher_address, port, host):
    """Run a tf.data service worker until SIGTERM or Ctrl-C."""
    from liverseg import data_service

    data_service.worker(dispatcher_address, port, host)


# ------------------------------------------------------------------------- evaluation and prediction

_run_option = click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                           help="A training run directory.")
_weights_option = click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                               help="A *.weights.h5 file of this run (default: best, else final).")


@runs_tensorflow
@cli.command()
@_run_option
@_weights_option
@click.option("--records", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Converted dataset (default: the one the run trained on).")
@click.option("--split", default="test", show_default=True, help="Records split to evaluate.")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of image/mask pairs in a convert --layout, scored on each case's own grid instead.")
@click.option("--layout", type=click.Choice(["pattern", "ircad", "msd", "lits"]), default="pattern", show_default=True,
              help="Layout of --data (as for convert).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder (default RUN/eval/<split>).")
def evaluate(run_dir, weights, records, split, data, layout, out):
    """Per-case Dice, IoU, VOE, RVD, HD95, ASSD, MSD (mm): CSV, JSON, overlays, TensorBoard."""
    from liverseg import evaluate as evaluate_mod
    from liverseg import predict as predict_mod

    rows, summary, out = evaluate_mod.evaluate(predict_mod.load_run(run_dir, weights), records, split, data, out,
                                               layout=layout)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) and abs(v) < 1e6 else str(v)  # noqa: E731
    click.echo(_table([{k: fmt(v) for k, v in r.items()} for r in rows]))
    click.echo()
    click.echo(_table([{"metric": k, "mean": fmt(v["mean"]), "sd": fmt(v["sd"]), "median": fmt(v["median"]),
                        "cases": v["n"], "infinite": v["n_inf"]} for k, v in summary.items()]))
    click.echo(f"wrote {out}/cases.csv, {out}/metrics.json and overlays; TensorBoard: {run_dir}/evaluation")


@runs_tensorflow
@cli.command()
@_run_option
@_weights_option
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
@_run_option
@_weights_option
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace a non-empty OUT.")
def export(run_dir, weights, out, force):
    """SavedModel (serving: int16 HU slices -> liver probabilities) + weights + config."""
    from liverseg import predict as predict_mod

    click.echo(f"exported to {predict_mod.export(predict_mod.load_run(run_dir, weights), out, force)}")


# ------------------------------------------------------------------------- benchmarks


@cli.group()
def bench():
    """Throughput benchmarks (figures go in docs/benchmarks.md)."""


@bench.command("convert")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dicom", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The same volumes as 3D-IRCADb-01 DICOM trees (liverseg synth --layout ircad): adds DICOM rows.")
@click.option("--beam", is_flag=True, help="Add the same conversions on Apache Beam's DirectRunner (needs liverseg[beam]).")
@convert_options
def bench_convert(src, dicom, beam, **kw):
    """Time a plain nibabel load of SRC against `convert` with 1 and --workers processes."""
    from liverseg import bench as bench_mod

    workers = kw["workers"] if kw["workers"] > 1 else 2
    click.echo(_table(bench_mod.bench_convert(src, workers, build_convert_options(**kw), dicom, beam)))


@runs_tensorflow
@bench.command("pipeline")
@click.argument("records", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--nifti", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Source NIfTI folder: adds the tutorial's per-slice nib.load loader.")
@click.option("--batches", default=40, show_default=True, help="Batches timed per row (after 5 warm-up batches).")
@click.option("--aug", type=click.Choice(["none", "host"]), default="host", show_default=True)
@click.option("--context", default=0, show_default=True, help="2.5D context k (2k+1 channels).")
@click.option("--batch", default=8, show_default=True, help="Batch size.")
@click.option("--tutorial-batches", default=2, show_default=True, help="Batches timed for the (slow) tutorial loader.")
@click.option("--service", is_flag=True, help="Add the pipeline through a tf.data service of 1 and 2 loopback workers.")
def bench_pipeline(records, nifti, batches, aug, context, batch, tutorial_batches, service):
    """Pipeline throughput against the raw read ceiling, the tutorial loader and the resampling floor."""
    from liverseg import bench as bench_mod

    click.echo(_table(bench_mod.bench_pipeline(records, nifti, batches, aug, context, batch, tutorial_batches,
                                               service=service)))


def _bench_rows(ctx, param, value: str) -> tuple:
    from liverseg.bench import ROWS

    return _choices(value, ROWS, "--rows")


def _choices(value: str, valid: tuple, flag: str) -> tuple:
    picked = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in picked if v not in valid]
    if bad or not picked:
        raise click.BadParameter(f"{bad[0] if bad else value!r} is not one of {', '.join(valid)}", param_hint=flag)
    return picked


@runs_tensorflow
@bench.command("train")
@click.argument("records", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path(__file__).resolve().parents[1] / "configs" / "default.yaml", show_default=True,
              help="YAML preset whose recipe is measured.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. data.batch_size=8.")
@click.option("--steps", default=8, show_default=True, help="Timed steps of the model and end-to-end rows (after --warmup).")
@click.option("--warmup", default=2, show_default=True, help="Untimed calls of train.steps_per_call steps first (compilation; 2 at least).")
@click.option("--loop-steps", default=400, show_default=True, help="Timed steps of the loop-overhead rows.")
@click.option("--input-batches", default=20, show_default=True, help="Batches timed for the input-ceiling row.")
@click.option("--peak-tflops", type=float, help="Accelerator peak (e.g. 989 for an H100 SXM in bf16): adds the 40% MFU target.")
@click.option("--rows", default="model,loop,input,end-to-end", show_default=True, callback=_bench_rows,
              help="Which measured rows (FLOPs always).")
def bench_train(records, config_path, overrides, steps, warmup, loop_steps, input_batches, peak_tflops, rows):
    """Training ceilings in one run: model, loop overhead, input, end to end, FLOPs per image."""
    from liverseg import bench as bench_mod

    click.echo(_table(bench_mod.bench_train(records, config_path, overrides, steps, warmup, loop_steps, input_batches,
                                            peak_tflops, rows)))


@runs_tensorflow
@bench.command("predict")
@_run_option
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--cases", default=5, show_default=True)
def bench_predict(run_dir, data, cases):
    """Whole-volume prediction time and slices/s, and metric time per case, on NIfTI pairs in DATA."""
    from liverseg import bench as bench_mod

    click.echo(_table(bench_mod.bench_predict(run_dir, data, cases)))


@bench.command("metrics")
@click.argument("masks", type=click.Path(exists=True, file_okay=False, path_type=Path))
def bench_metrics(masks):
    """Metric time per case on real *_liver.nii[.gz] masks against a shifted, eroded copy."""
    from liverseg import bench as bench_mod

    click.echo(_table(bench_mod.bench_metrics(masks)))


# ------------------------------------------------------------------------- entry point


ALLOCATORS = ("tcmalloc", "system")


def wants_tcmalloc(argv: list[str], env: typing.Mapping[str, str]) -> bool:
    """Whether `liverseg ARGV` should run under tcmalloc: the command runs TensorFlow (it is
    marked with `runs_tensorflow`), LIVERSEG_MALLOC is "tcmalloc" (the default) and tcmalloc
    is not loaded already.

    With glibc malloc, TensorFlow's large per-slice tensors come from fresh mmaps and the
    input pipeline spends ~25% of its CPU in page faults (perf, 512x512 slices); tcmalloc
    keeps freed memory and raised pipeline throughput 1.7-2.7x (docs/benchmarks.md).
    `synth` and `convert` do not run TensorFlow and were measured slower under it.
    """
    choice = env.get("LIVERSEG_MALLOC", "tcmalloc")
    if choice not in ALLOCATORS:
        raise LiversegError(f"LIVERSEG_MALLOC={choice!r}: choose one of {', '.join(ALLOCATORS)}")
    if choice == "system" or "tcmalloc" in env.get("LD_PRELOAD", ""):
        return False
    return wants_tensorflow(argv)


def wants_tensorflow(argv: list[str]) -> bool:
    """Whether `liverseg ARGV` names a command marked `runs_tensorflow`."""
    cmd: click.Command = cli
    for word in argv:
        if not isinstance(cmd, click.Group) or word.startswith("-"):
            break
        cmd = cmd.commands.get(word)
        if cmd is None:
            return False
    return getattr(cmd, "runs_tensorflow", False)


def _prefer_tcmalloc() -> None:
    """Re-exec under tcmalloc when `wants_tcmalloc` says so and the library is installed."""
    try:
        wanted = wants_tcmalloc(sys.argv[1:], os.environ)
    except LiversegError as e:
        raise SystemExit(f"Error: {e}") from None
    lib = (ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")) if wanted else None
    if lib is None:
        return
    env = {**os.environ, "LD_PRELOAD": f"{lib} {os.environ.get('LD_PRELOAD', '')}".strip()}
    # The blocked signal mask survives execve: a SIGTERM during the new process's start-up stays
    # pending until `main` there has installed its handler, instead of killing it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    if TERMINATE.is_set():  # arrived before the mask was set
        env[_TERMINATED] = "1"
    os.execve(sys.executable, [sys.executable, "-m", "liverseg", *sys.argv[1:]], env)


# What `import tensorflow` prints on stderr before its logging is set up (TF issue 100442:
# TF_CPP_MIN_LOG_LEVEL cannot reach it): notices, not problems. Anything else is passed on.
IMPORT_NOTICES = ("WARNING: All log messages before absl::InitializeLog()", "oneDNN custom operations are on",
                  "cpu_feature_guard.cc", "To enable the following instructions:", "rebuild TensorFlow with the")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its import-time notices filtered out of stderr (file descriptor 2,
    where the C++ side writes); every other line it printed is written back."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(n in line for n in IMPORT_NOTICES)]
            sys.stderr.write("".join(kept))


_TERMINATED = "LIVERSEG_SIGTERM_BEFORE_EXEC"


def _on_sigterm(argv: list[str]) -> None:
    """SIGTERM: `train` checkpoints and exits 42 (it only sets TERMINATE here, from the first
    line, so a SIGTERM while TensorFlow loads is not lost); every other command unwinds as on
    Ctrl-C (exit 143), so its clean-up runs: temporary files removed, worker processes stopped."""
    if argv[:1] == ["train"]:
        signal.signal(signal.SIGTERM, lambda *_: TERMINATE.set())
        if os.environ.pop(_TERMINATED, None):
            TERMINATE.set()
    else:
        def unwind(signum, frame):
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, unwind)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked across a re-exec: deliver it now


def main() -> None:
    # TensorFlow's C++ INFO and WARNING lines drown the CLI's own output; errors still show.
    # Set TF_CPP_MIN_LOG_LEVEL=0 to see everything.
    if not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):  # unset or empty
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    _on_sigterm(sys.argv[1:])
    _prefer_tcmalloc()  # may re-execute this process (SIGTERM blocked across it)
    cli(prog_name="liverseg")


if __name__ == "__main__":
    main()
