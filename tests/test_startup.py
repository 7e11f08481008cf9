"""Process start-up (liverseg.cli.startup): the allocator choice, SIGTERM from the first line,
and stderr kept free of TensorFlow's start-up notices whenever they come."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import HANG
from liverseg import LiversegError
from liverseg.cli import cli as _registered  # noqa: F401 - the group with its commands
from liverseg.cli import group, startup


@pytest.mark.parametrize(
    "argv, env, installed, expected",
    [
        (["train", "--run", "r"], {}, True, "tcmalloc"),
        (["train", "--run", "r"], {}, False, "glibc"),  # no tcmalloc: glibc told to keep freed memory
        (["bench", "train", "x"], {}, True, "tcmalloc"),
        (["convert", "a", "b"], {}, True, ""),  # no TensorFlow: measured slower under tcmalloc
        (["synth", "out"], {}, False, ""),
        (["train"], {"LIVERSEG_MALLOC": "system"}, True, ""),
        (["train"], {"LIVERSEG_MALLOC": "glibc"}, True, "glibc"),
        (["train"], {"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, True, ""),  # already loaded
        (["--help"], {}, True, ""),
        (["nope"], {}, True, ""),
    ],
)
def test_allocator_choice(argv, env, installed, expected):
    assert startup.allocator(group.runs_tensorflow_command(argv), env, installed) == expected


def test_allocator_choice_refuses_an_unknown_allocator():
    with pytest.raises(LiversegError, match="LIVERSEG_MALLOC='jemalloc': choose one of tcmalloc, glibc, system"):
        startup.allocator(True, {"LIVERSEG_MALLOC": "jemalloc"}, True)


def test_tuned_glibc_keeps_freed_memory():
    """mallopt takes the settings (a freed 16 MiB block is reused, not unmapped and faulted in again)."""
    proc = _python("""
        import ctypes, resource
        from liverseg.cli import startup
        assert startup.tune_glibc_malloc()
        libc = ctypes.CDLL(None)
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        def touch(n):
            p = libc.malloc(n)
            ctypes.memset(p, 1, n)
            libc.free(p)
        touch(16 << 20)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            touch(16 << 20)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) < 200  # glibc's defaults: 4,095 (measured), the heap grown again for the block


def _python(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, timeout=HANG, **kw)


def test_stderr_drops_notices_whenever_they_come_and_keeps_everything_else():
    """The filter on file descriptor 2 of a process: notices dropped (also the absl preamble of
    a library that logs late), its own lines and real errors kept."""
    proc = _python("""
        import os, sys
        from liverseg.cli import startup
        startup.quiet_stderr()
        os.write(2, b"I0000 00:00:17.1 12 port.cc:153] oneDNN custom operations are on. You may see ...\\n")
        sys.stderr.write("kept: liverseg's own line\\n")
        sys.stderr.flush()
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n"
                    b"E0000 00:00:18.2 12 some.cc:1] a real error\\n")
    """)
    assert proc.returncode == 0
    assert proc.stderr.decode() == "kept: liverseg's own line\nE0000 00:00:18.2 12 some.cc:1] a real error\n"


def test_the_filter_passes_each_write_on_as_it_comes():
    """Write by write, each one sent only once the filter has passed the last one on (an event,
    not a sleep): a progress bar's partial line at once, a notice logged while the bar is drawn
    dropped with its newline, the bar's next update kept."""
    import select
    import threading

    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    threading.Thread(target=startup._filter, args=(src_r, dst_w, startup.NOTICES), daemon=True).start()

    def send(data: bytes, expect: bytes) -> None:
        os.write(src_w, data)
        got = b""
        while len(got) < len(expect):
            ready, _, _ = select.select([dst_r], [], [], 30)
            assert ready, f"the filter passed {got!r} of {expect!r} on, then nothing"
            got += os.read(dst_r, 1 << 16)
        assert got == expect

    send(b"I0000 12 port.cc:153] oneDNN custom operations are on.\nkept: own line\n", b"kept: own line\n")
    send(b"train:  50%|#####     | 1/2\r", b"train:  50%|#####     | 1/2\r")  # no newline: shown at once
    send(b"\rtrain:   0%|          | 0/3", b"\rtrain:   0%|          | 0/3")
    os.write(
        src_w,
        b"E0000 12 util.cc:131] oneDNN supports DT_HALF only on platforms with AVX-512. Falling back to "
        b"the default Eigen-based implementation if present.\n",
    )
    send(b"\rtrain: 100%|##########| 2/2\n", b"\rtrain: 100%|##########| 2/2\n")  # nothing of the notice before it
    os.close(src_w)


def test_what_a_crashing_process_printed_last_still_reaches_the_console():
    proc = _python("""
        import os, signal
        from liverseg.cli import startup
        startup.quiet_stderr()
        os.write(2, b"F0000 00:00:01.0 12 some.cc:9] Check failed: the reason\\n")
        os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no flush: only the filter process can pass it on
    """)
    assert proc.returncode == -signal.SIGKILL
    assert proc.stderr.decode() == "F0000 00:00:01.0 12 some.cc:9] Check failed: the reason\n"


def test_the_filter_survives_ctrl_c_of_the_process_group_and_ends_with_the_command():
    proc = _python(
        """
        import os, signal, sys, time
        from liverseg.cli import startup
        startup.quiet_stderr()
        os.killpg(0, signal.SIGINT)  # as a Ctrl-C in a terminal: every process of the group
        while True:  # the KeyboardInterrupt arrives (not signal.pause(): one handled before it would wait for ever)
            time.sleep(0.05)
    """,
        start_new_session=True,
    )
    assert proc.returncode == -signal.SIGINT and b"KeyboardInterrupt" in proc.stderr  # its traceback got through


def test_a_ctrl_c_just_after_the_fork_does_not_end_the_filter():
    """A SIGINT that reaches the filter before it ignores SIGINT (here: sent by the filter to
    itself as fork returns) is discarded: what the process prints afterwards still arrives."""
    proc = _python("""
        import os, signal, sys
        from liverseg.cli import startup
        real_fork = os.fork
        def fork():
            pid = real_fork()
            if pid == 0:
                os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C, before the filter's first line
            return pid
        os.fork = fork
        startup.quiet_stderr()
        sys.stderr.write("printed after the Ctrl-C\\n")
    """)
    assert proc.returncode == 0 and proc.stderr == b"printed after the Ctrl-C\n", proc.stderr


def test_import_tensorflow_quietly_drops_only_the_notices():
    proc = _python("""
        import os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"  # TensorFlow prints its oneDNN notice at this level
        from liverseg.cli import startup
        startup.import_tensorflow_quietly()
    """)
    assert proc.returncode == 0 and b"oneDNN" not in proc.stderr and b"absl::InitializeLog" not in proc.stderr
