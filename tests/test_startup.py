"""Process start-up (liverseg.cli.startup): the allocator choice, SIGTERM from the first line,
and stderr kept free of TensorFlow's start-up notices whenever they come."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from liverseg import LiversegError
from liverseg.cli import cli as _registered, group, startup  # noqa: F401 - the group with its commands


@pytest.mark.parametrize("argv, env, installed, expected", [
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
])
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
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, timeout=60, **kw)


def test_stderr_drops_notices_whenever_they_come_and_keeps_everything_else():
    proc = _python("""
        import os, sys, time
        from liverseg.cli import startup
        startup.quiet_stderr()
        os.write(2, b"I0000 00:00:17.1 12 port.cc:153] oneDNN custom operations are on. You may see ...\\n")
        sys.stderr.write("kept: liverseg's own line\\n")
        sys.stderr.flush()
        time.sleep(0.3)  # long after the import: the absl preamble of a library that logs late
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n"
                    b"E0000 00:00:18.2 12 some.cc:1] a real error\\n")
        sys.stderr.write("train:  50%|#####     | 1/2\\r")  # a progress bar: no newline, shown at once
        sys.stderr.flush()
        time.sleep(0.3)
        sys.stderr.write("\\rtrain:   0%|          | 0/3")  # and a notice logged while the bar is drawn
        sys.stderr.flush()
        time.sleep(0.3)
        os.write(2, b"E0000 00:00:19.3 12 util.cc:131] oneDNN supports DT_HALF only on platforms with AVX-512. "
                    b"Falling back to the default Eigen-based implementation if present.\\n")
        time.sleep(0.3)
        sys.stderr.write("\\rtrain: 100%|##########| 2/2\\n")
    """)
    assert proc.returncode == 0
    assert proc.stderr.decode() == ("kept: liverseg's own line\n" "E0000 00:00:18.2 12 some.cc:1] a real error\n"
                                    "train:  50%|#####     | 1/2\r\rtrain:   0%|          | 0/3"
                                    "\rtrain: 100%|##########| 2/2\n")


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
    proc = _python("""
        import os, signal, sys, time
        from liverseg.cli import startup
        startup.quiet_stderr()
        os.killpg(0, signal.SIGINT)  # as a Ctrl-C in a terminal: every process of the group
        time.sleep(0.2)
    """, start_new_session=True)
    assert proc.returncode == -signal.SIGINT and b"KeyboardInterrupt" in proc.stderr  # its traceback got through


def test_import_tensorflow_quietly_drops_only_the_notices():
    proc = _python("""
        import os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"  # TensorFlow prints its oneDNN notice at this level
        from liverseg.cli import startup
        startup.import_tensorflow_quietly()
    """)
    assert proc.returncode == 0 and b"oneDNN" not in proc.stderr and b"absl::InitializeLog" not in proc.stderr
