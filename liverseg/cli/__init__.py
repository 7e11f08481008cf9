"""The `liverseg` command: the entry point, and the click group with its commands.

`main` runs the process start-up first (`cli.startup`: SIGTERM caught from its first line,
tcmalloc for commands that run TensorFlow, TensorFlow's start-up notices filtered from
stderr), and only then imports the commands: the click group (`cli.group`) and the command
modules along the data flow, `cli.data` (synth, convert, verify, inspect, data-service),
`cli.run` (train, tensorboard, evaluate, predict, export) and `cli.bench` (benchmarks).
Each command parses its options and calls one library function. `from liverseg.cli import
cli` gives the group with every command registered.
"""

from __future__ import annotations

import os
import sys


def _commands():
    from liverseg.cli import bench, data, run  # noqa: F401 - each registers its commands on the group
    from liverseg.cli.group import cli

    return cli


def __getattr__(name: str):
    if name == "cli":
        return _commands()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    from liverseg.cli import startup

    startup.catch_sigterm(sys.argv[1:])  # first: a SIGTERM from here on is not lost
    # TensorFlow's C++ INFO and WARNING lines drown the CLI's own output; errors still show.
    # Set TF_CPP_MIN_LOG_LEVEL=0 to see everything.
    if not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):  # unset or empty
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    from liverseg.cli import group

    cli = _commands()
    runs_tensorflow = group.runs_tensorflow_command(sys.argv[1:])
    if runs_tensorflow:
        try:
            startup.require_tensorflow()
        except ImportError as e:  # one line, exit status 2, as every bad-input error
            print(f"Error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    startup.prefer_tcmalloc(runs_tensorflow)  # may re-execute this process
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0":
        startup.quiet_stderr()
    cli(prog_name="liverseg")


__all__ = ["cli", "main"]
