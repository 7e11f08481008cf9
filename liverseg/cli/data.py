"""Data commands: synth, convert (local or Beam), verify, inspect, and the tf.data service servers."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import click

from liverseg import LiversegError, data_service
from liverseg import convert as convert_mod
from liverseg import synth as synth_mod
from liverseg import verify as verify_mod
from liverseg.cli.group import Location, cli, runs_tensorflow, table
from liverseg.convert.beam import convert_beam
from liverseg.layouts import LAYOUTS, SYNTH_LAYOUTS
from liverseg.manifest import ConvertOptions


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--cases", default=20, show_default=True, help="Number of procedural phantoms.")
@click.option("--size", default=512, show_default=True, help="In-plane matrix size.")
@click.option("--slices", default="40..200", show_default=True, help="Slice count range LO..HI.")
@click.option(
    "--masks",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Build one phantom around each real *_liver.nii[.gz] here, at its real geometry.",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--layout",
    type=click.Choice(SYNTH_LAYOUTS),
    default="flat",
    show_default=True,
    help="seed: the tutorial's train/ + test/ folders; ircad: 3D-IRCADb-01's DICOM tree.",
)
@click.option("--workers", default=1, show_default=True, help="Parallel processes.")
def synth(out, cases, size, slices, masks, seed, layout, workers):
    """Write synthetic CT phantoms (<case>_orig.nii.gz, <case>_liver.nii.gz) to OUT."""

    try:
        lo, hi = (int(v) for v in slices.split(".."))
    except ValueError:
        raise LiversegError(f"--slices {slices!r}: write LO..HI, e.g. 40..200") from None
    for folder in synth_mod.synthesize(out, cases, size, (lo, hi), masks, seed, layout, workers):
        click.echo(f"wrote {folder}")


def dataclass_options(cls, skip: tuple[str, ...] = (), choices: dict[str, tuple] | None = None):
    """Click options generated from a frozen options dataclass: one `--field-name` per field,
    its default and help taken from the field, so each default is written once (in the class).

    Field metadata: "help"; "choices" ({shown value: field value}); "exists" (a file that must exist).
    `choices` adds choices by field name from the module that owns them (convert's layouts).
    Returns (decorator, build) where build(**kw) turns the parsed values into an instance.
    """
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    given = {name: {v: v for v in values} for name, values in (choices or {}).items()}

    def choices_of(f):
        return f.metadata.get("choices") or given.get(f.name)

    def decorator(fn):
        for f in reversed(fields):
            tp = hints[f.name]
            meta, flag = f.metadata, "--" + f.name.replace("_", "-")
            kw = {"help": meta.get("help"), "show_default": f.default is not None}
            if tp is bool:
                fn = click.option(flag, is_flag=True, help=meta.get("help"))(fn)
                continue
            if choices_of(f):
                shown = {v: k for k, v in choices_of(f).items()}
                kw.update(type=click.Choice(list(choices_of(f))), default=shown.get(f.default))
            else:
                base = next(a for a in (typing.get_args(tp) or (tp,)) if a is not type(None))
                kw.update(
                    type=click.Path(exists=True, dir_okay=False) if meta.get("exists") else base, default=f.default
                )
            fn = click.option(flag, **kw)(fn)
        return fn

    def build(**kw):
        values = {}
        for f in fields:
            v = kw[f.name]
            if choices_of(f) and v is not None:
                v = choices_of(f)[v]
            values[f.name] = v
        return cls(**values)

    return decorator, build


def _convert_cli():

    return dataclass_options(ConvertOptions, choices={"layout": LAYOUTS})


convert_options, build_convert_options = _convert_cli()


@cli.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=Location())
@convert_options
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- BEAM PIPELINE OPTIONS]")
def convert(src, out, beam_args, **kw):
    """Convert the CT volume/mask pairs of SRC (a folder, or with --layout list a case list) to
    sharded TFRecords + manifest in OUT."""

    opts = build_convert_options(**kw)
    if opts.runner == "local":
        if beam_args:
            raise LiversegError(f"{' '.join(beam_args)}: Beam pipeline options need --runner (e.g. --runner direct)")
        manifest = convert_mod.convert(src, out, opts)
    else:
        manifest = convert_beam(src, out, opts, beam_args)
    for split, s in manifest.splits.items():
        click.echo(f"{split}: {s.num_cases} cases, {s.num_examples} slices, {len(s.shards)} shard(s)")
    for s in manifest.skipped:
        click.echo(f"skipped {s.case_id}: {s.error}", err=True)
    click.echo(f"wrote {out / 'dataset.json'}")


@cli.command()
@click.argument("root", type=Location())
def verify(root):
    """Read every record of every shard in ROOT and check it against the manifest (no TensorFlow needed)."""

    reports = verify_mod.verify(root)
    click.echo(
        table([{"shard": r.file, "examples": r.num_examples, "bytes": r.bytes, "status": r.status} for r in reports])
    )
    bad = [r for r in reports if not r.ok]
    if bad:
        raise LiversegError(
            f"{len(bad)} of {len(reports)} shard(s) failed: " + "; ".join(f"{root / r.file}: {r.status}" for r in bad)
        )
    click.echo(f"all {len(reports)} shard(s) ok")


@runs_tensorflow
@cli.command()
@click.argument("root", type=Location())
@click.option(
    "--png", type=click.Path(file_okay=False, path_type=Path), help="Write overlay PNGs of sample cases here."
)
@click.option("--max-cases", default=3, show_default=True, help="Cases per split drawn with --png.")
def inspect(root, png, max_cases):
    """Summarise a converted dataset per split; optionally draw overlays."""

    click.echo(table(verify_mod.inspect(root, png, max_cases)))
    if png:
        click.echo(f"overlays in {png} (green: liver mask)")


@cli.group("data-service")
def data_service_group():
    """tf.data service servers: input processing on CPU hosts (set data.service in the config)."""


@runs_tensorflow
@data_service_group.command("dispatcher")
@click.option("--port", default=5050, show_default=True, help="Port (0: any free one).")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address given out to trainers and workers (TF's servers listen on every interface).",
)
@click.option(
    "--work-dir", type=click.Path(file_okay=False), help="Journal folder: a restarted dispatcher resumes its jobs."
)
def data_service_dispatcher(port, host, work_dir):
    """Run a tf.data service dispatcher until SIGTERM or Ctrl-C."""

    data_service.dispatcher(port, host, work_dir)


@runs_tensorflow
@data_service_group.command("worker")
@click.option(
    "--dispatcher", "dispatcher_address", required=True, help="The dispatcher, grpc://HOST:PORT or HOST:PORT."
)
@click.option("--port", default=0, show_default=True, help="Port (0: any free one).")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address this worker gives the dispatcher for trainers to fetch from.",
)
def data_service_worker(dispatcher_address, port, host):
    """Run a tf.data service worker until SIGTERM or Ctrl-C."""

    data_service.worker(dispatcher_address, port, host)
