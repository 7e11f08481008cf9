"""Process start-up of the `liverseg` command, in the order `cli.main` calls it:

1. `catch_sigterm`: from the first line, so a SIGTERM while TensorFlow loads is not lost;
2. `prefer_tcmalloc`: re-execute under tcmalloc for commands that run TensorFlow (SIGTERM
   stays blocked across the exec, and is delivered by step 1 of the new process), or where
   it is not installed tune glibc malloc to keep freed memory;
3. `quiet_stderr`: file descriptor 2 through a filter process that drops TensorFlow's
   start-up notices whenever they come.

Nothing here imports TensorFlow. `import_tensorflow_quietly` is for library users and tests
(the CLI's filter already covers it).
"""

from __future__ import annotations

import atexit
import ctypes.util
import importlib.util
import os
import signal
import sys
import tempfile
import typing

from liverseg import TERMINATE, LiversegError

ALLOCATORS = ("tcmalloc", "glibc", "system")
_TERMINATED = "LIVERSEG_SIGTERM_BEFORE_EXEC"  # set across the re-exec when SIGTERM arrived before its mask

# What TensorFlow prints on stderr at start-up whatever TF_CPP_MIN_LOG_LEVEL says (TF issue
# 100442: its logging is not set up yet): notices, not problems. The absl preamble comes once
# per native library, at the first line that library logs, which may be long after the import.
# oneDNN's "supports DT_X only on platforms with AVX-512 ... Falling back to the default
# Eigen-based implementation" (util.cc) says an op of that dtype runs in Eigen instead, with
# the same result; which dtypes it names depends on the CPU (the pipeline's float16-bits
# transpose on CPUs without AVX512-FP16).
# A multi-worker peer that died: every collective in flight logs its abort and the gRPC
# detail, in C++, before the Python error that `train.lost_workers_explained` says in one line.
NOTICES = (
    b"WARNING: All log messages before absl::InitializeLog()",
    b"oneDNN custom operations are on",
    b"cpu_feature_guard.cc",
    b"To enable the following instructions:",
    b"rebuild TensorFlow with the",
    b"Falling back to the default Eigen-based implementation",
    b"BaseCollectiveExecutor::StartAbort",
    b"] Aborting Ring",
    b"Additional GRPC error information from remote target",
    b":UNKNOWN:Error received from peer",
)


def catch_sigterm(argv: list[str]) -> None:
    """SIGTERM: `train` checkpoints and exits 42 (here it only sets TERMINATE, which the
    trainer polls); every other command unwinds as on Ctrl-C (exit 143), so its clean-up
    runs: temporary files removed, worker processes stopped."""
    if argv[:1] == ["train"]:
        signal.signal(signal.SIGTERM, lambda *_: TERMINATE.set())
        if os.environ.pop(_TERMINATED, None):
            TERMINATE.set()
    else:

        def unwind(signum, frame):
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, unwind)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked across a re-exec: deliver it now


def allocator(runs_tensorflow: bool, env: typing.Mapping[str, str], tcmalloc_installed: bool) -> str:
    """How a command's memory is allocated: "tcmalloc" (re-execute under it), "glibc" (glibc
    malloc, tuned by `tune_glibc_malloc`) or "" (left as it is).

    TensorFlow's large per-slice tensors, allocated and freed for every batch, come from
    fresh mmaps under glibc's defaults: the input pipeline then spends a third of its CPU in
    the kernel, in page faults (512x512x5 int16 pipeline: ~260-400 minor faults per slice).
    tcmalloc keeps freed memory (it raised pipeline throughput 1.7-2.7x, docs/benchmarks.md);
    where it is not installed, glibc is told to keep freed memory too, which removes most of
    those faults. LIVERSEG_MALLOC: "tcmalloc" (the default: tcmalloc, else tuned glibc),
    "glibc" (tuned glibc) or "system" (nothing changed). Only for commands that run
    TensorFlow: `synth` and `convert` were measured slower under tcmalloc.
    """
    choice = env.get("LIVERSEG_MALLOC", "tcmalloc")
    if choice not in ALLOCATORS:
        raise LiversegError(f"LIVERSEG_MALLOC={choice!r}: choose one of {', '.join(ALLOCATORS)}")
    if choice == "system" or not runs_tensorflow or "tcmalloc" in env.get("LD_PRELOAD", ""):
        return ""
    return "tcmalloc" if choice == "tcmalloc" and tcmalloc_installed else "glibc"


def _tcmalloc() -> str | None:
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def prefer_tcmalloc(runs_tensorflow: bool) -> None:
    """Re-execute this command under tcmalloc, or tune glibc malloc, as `allocator` says."""
    lib = _tcmalloc()
    try:
        plan = allocator(runs_tensorflow, os.environ, lib is not None)
    except LiversegError as e:
        raise SystemExit(f"Error: {e}") from None
    if plan == "glibc":
        tune_glibc_malloc()
    if plan != "tcmalloc":
        return
    env = {**os.environ, "LD_PRELOAD": f"{lib} {os.environ.get('LD_PRELOAD', '')}".strip()}
    # The blocked signal mask survives execve: a SIGTERM during the new process's start-up stays
    # pending until `catch_sigterm` there has installed its handler, instead of killing it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    if TERMINATE.is_set():  # arrived before the mask was set
        env[_TERMINATED] = "1"
    os.execve(sys.executable, [sys.executable, "-m", "liverseg", *sys.argv[1:]], env)


# glibc's mallopt parameters (malloc.h) and the values that keep freed memory in the process:
# blocks up to 32 MiB (glibc's largest mmap threshold) from the heap instead of fresh mmaps,
# and freed memory kept (trimmed only past 1 GiB; 256 MiB added per heap growth).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
GLIBC_TUNING = ((M_MMAP_THRESHOLD, 32 * 2**20), (M_TRIM_THRESHOLD, 2**30), (M_TOP_PAD, 256 * 2**20))


def tune_glibc_malloc() -> bool:
    """Set GLIBC_TUNING through mallopt (for every later allocation, in every thread); False
    where the C library is not glibc."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(param, value) == 1 for param, value in GLIBC_TUNING)


def quiet_stderr(notices: tuple[bytes, ...] = NOTICES) -> None:
    """From now on, this process's file descriptor 2 (Python's and C++'s stderr) goes through
    a filter that drops the lines containing one of `notices` and passes everything else on.

    The filter is a forked process, not a thread: it drains the pipe until every writer has
    closed it, so what a crashing process printed last (a C++ "Check failed", a fatal signal)
    still reaches the console. It ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole
    process group) and ends with the last writer; at exit this process waits (briefly) for it,
    so its output comes before the shell's prompt.
    """
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    # SIGINT and SIGTERM blocked across the fork: a Ctrl-C of the process group arriving before
    # the filter ignores them would end it, and with it everything this process prints later.
    stopping = {signal.SIGINT, signal.SIGTERM}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    pid = os.fork()
    if pid == 0:  # the filter
        try:
            os.close(write_end)
            for sig in stopping:
                signal.signal(sig, signal.SIG_IGN)  # a pending one is discarded here
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            _filter(read_end, 2, notices)
        finally:
            os._exit(0)
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    os.close(read_end)
    real = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(real, 2)  # closes this process's write end: the filter sees EOF once children have closed theirs
        _wait(pid, seconds=2.0)

    atexit.register(restore)


def _filter(src: int, dst: int, notices: tuple[bytes, ...]) -> None:
    """Copy src to dst, dropping whole lines that contain a notice.

    A C++ log line is one write() shorter than PIPE_BUF, so it arrives whole: only complete
    lines need checking, and a partial one (a progress bar's carriage-return update) is
    passed on at once rather than held back until its newline. A notice that lands after
    such a partial line (TensorFlow logging while tqdm draws) arrives as its own write, so
    it is dropped with its newline, and the bar's next update redraws the line.
    """
    while chunk := os.read(src, 1 << 16):
        parts = chunk.split(b"\n")
        out = []
        for i, part in enumerate(parts):
            complete = i < len(parts) - 1
            if complete and any(n in part for n in notices):
                continue
            out.append(part + b"\n" if complete else part)
        data = b"".join(out)
        try:
            while data:
                data = data[os.write(dst, data) :]
        except OSError:  # the console is gone: keep draining, so writers never block
            pass


def _wait(pid: int, seconds: float) -> None:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.01)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with the notices it prints while importing filtered out of stderr
    (file descriptor 2, where the C++ side writes); every other line is written back."""
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
            kept = [line for line in captured.read().splitlines(keepends=True) if not any(n in line for n in NOTICES)]
            sys.stderr.write(b"".join(kept).decode(errors="replace"))


def require_tensorflow() -> None:
    """Raise a one-line ImportError naming the extra to install when TF is missing."""
    try:
        found = importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):  # a finder that refuses it: as good as missing
        found = False
    if not found:
        raise ImportError(
            "liverseg needs TensorFlow: pip install 'liverseg[cpu]' (CPU) or 'liverseg[gpu]' (NVIDIA GPU, CUDA wheels)"
        )
