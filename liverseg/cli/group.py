"""The `liverseg` click group and what its commands share: the one-line error, the
`runs_tensorflow` mark, the options several commands take, the console table.

The command modules (`cli.data`, `cli.run`, `cli.bench`) import this module and register
their commands on `cli`; `cli/__init__` imports them all and holds the entry point.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import click

from liverseg import LiversegError, storage

# What a file system refuses for reasons outside liverseg: permissions, immutable files,
# read-only mounts, a full disk or quota.
FILE_SYSTEM_REFUSALS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


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
        except OSError as e:  # the file system said no where no check foresaw it: one line naming the file
            if e.errno not in FILE_SYSTEM_REFUSALS:
                raise
            where = e.filename or "a file"
            raise UserError(
                f"{where}: {e.strerror or e}; fix its permissions or free space, or choose another folder"
            ) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="liverseg")
def cli() -> None:
    """liverseg: liver segmentation in CT with U-Nets, from NIfTI to distributed training.

    Typical flow: synth (or your data) -> convert -> verify -> train -> evaluate -> predict.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # TF's checkpoint timings at INFO
    logging.getLogger("tensorflow").setLevel(logging.WARNING)  # multi-worker: a line per collective group, watchers
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # a line per module it copies into a SEG


def runs_tensorflow(cmd: click.Command) -> click.Command:
    """Mark a command that runs TensorFlow: `cli.main` runs it under tcmalloc (startup.prefer_tcmalloc)."""
    cmd.runs_tensorflow = True
    return cmd


def runs_tensorflow_without(option: str):
    """Mark a command that runs TensorFlow unless `option` is given and --run is not
    (`predict --model EXPORT` runs exported models without TensorFlow)."""

    def mark(cmd: click.Command) -> click.Command:
        cmd.runs_tensorflow = lambda argv: not (option in argv and "--run" not in argv)
        return cmd

    return mark


def runs_tensorflow_command(argv: list[str]) -> bool:
    """Whether `liverseg ARGV` names a command marked `runs_tensorflow`."""
    cmd: click.Command = cli
    for word in argv:
        if not isinstance(cmd, click.Group) or word.startswith("-"):
            break
        cmd = cmd.commands.get(word)
        if cmd is None:
            return False
    marked = getattr(cmd, "runs_tensorflow", False)
    return marked(argv) if callable(marked) else marked


def table(rows: list[dict]) -> str:
    """Rows of dicts as an aligned text table (the first row's keys are the columns)."""
    if not rows:
        return "(nothing)"
    keys = list(rows[0])
    cells = [[str(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]

    def line(vals):
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))

    return "\n".join([line(keys), line(["-" * w for w in widths]), *map(line, cells)])


class Location(click.ParamType):
    """A local path, checked as click.Path checks it, or a bucket URI (gs://...) for records,
    runs and outputs (checked by the command that reads it)."""

    name = "path"

    def __init__(self, exists: bool = False, file_okay: bool = True, dir_okay: bool = True):
        self.local = click.Path(exists=exists, file_okay=file_okay, dir_okay=dir_okay, path_type=Path)

    def convert(self, value, param, ctx):
        if storage.is_remote(value):
            try:
                return storage.path(value)
            except LiversegError as e:
                self.fail(str(e), param, ctx)
        return self.local.convert(value, param, ctx)


# ------------------------------------------------------------------------- shared options

run_option = click.option(
    "--run",
    "run_dir",
    required=True,
    type=Location(exists=True, file_okay=False),
    help="A training run directory.",
)
runs_option = click.option(
    "--run",
    "run_dirs",
    multiple=True,
    type=Location(exists=True, file_okay=False),
    help="A training run directory; several: their ensemble (probabilities averaged).",
)
weights_option = click.option(
    "--weights",
    type=Location(exists=True, dir_okay=False),
    help="A *.weights.h5 file of this run (default: best, else final).",
)
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. train.lr=3e-4."
)
