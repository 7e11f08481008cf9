"""Command line: parse, load config, call one library function. No logic lives here.

`main` is the entry point: it picks the allocator (tcmalloc for commands that run
TensorFlow, re-executing the process), catches SIGTERM from its first line, and runs the
click group. The commands live along the data flow: `cli.data` (synth, convert, verify,
inspect, data-service), `cli.run` (train, tensorboard, evaluate, predict, export),
`cli.bench` (benchmarks).
"""

from __future__ import annotations

import ctypes.util
import functools
import logging
import os
import signal
import sys
import tempfile
import typing

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


from liverseg.cli import bench, data, run  # noqa: E402,F401 - registers the commands on `cli`
