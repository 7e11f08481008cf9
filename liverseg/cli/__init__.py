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

from liverseg.cli import startup


def _commands():
    """The module of the click group, with every command registered on it. Imported here, not
    at the top: the command modules load numpy, nibabel and click, and `main` must catch
    SIGTERM and set TensorFlow's log level before anything else is imported (the one place
    liverseg imports its own modules inside a function without TensorFlow behind them)."""
    from liverseg.cli import bench, data, group, run  # noqa: F401 - each registers its commands on the group

    return group


def __getattr__(name: str):
    if name == "cli":
        return _commands().cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    startup.catch_sigterm(sys.argv[1:])  # first: a SIGTERM from here on is not lost
    # TensorFlow's C++ INFO and WARNING lines drown the CLI's own output; errors still show.
    # Set TF_CPP_MIN_LOG_LEVEL=0 to see everything.
    if not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):  # unset or empty
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    group = _commands()
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
    group.cli(prog_name="liverseg")


__all__ = ["cli", "main"]
