"""The `liverseg` command: the entry point and the command modules.

`main` runs the process start-up (`cli.startup`: SIGTERM caught from the first line,
tcmalloc for commands that run TensorFlow, TensorFlow's start-up notices filtered from
stderr), then the click group (`cli.group`). The commands live along the data flow:
`cli.data` (synth, convert, verify, inspect, data-service), `cli.run` (train, tensorboard,
evaluate, predict, export), `cli.bench` (benchmarks); each parses its options and calls one
library function.
"""

from __future__ import annotations

import os
import sys

from liverseg.cli import bench, data, group, run, startup  # noqa: F401 - the command modules register their commands
from liverseg.cli.group import cli


def main() -> None:
    # TensorFlow's C++ INFO and WARNING lines drown the CLI's own output; errors still show.
    # Set TF_CPP_MIN_LOG_LEVEL=0 to see everything.
    if not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):  # unset or empty
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    argv = sys.argv[1:]
    startup.catch_sigterm(argv)
    startup.prefer_tcmalloc(group.runs_tensorflow_command(argv))  # may re-execute this process
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0":
        startup.quiet_stderr()
    cli(prog_name="liverseg")


__all__ = ["cli", "main"]
