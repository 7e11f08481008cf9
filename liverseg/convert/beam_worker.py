"""A Beam SDK worker process of `liverseg convert --runner direct --workers N`, which ends
with the converter.

Beam's FnApiRunner starts each worker from a shell command; if the converter is killed
(SIGKILL: nothing runs its clean-up), Beam's own workers would wait minutes for their gRPC
peer. This entry point watches the converter's PID (LIVERSEG_CONVERTER_PID), exits once it
is gone, and otherwise is Beam's worker main itself.
"""

from __future__ import annotations

import os
import runpy
import threading
import time


def watch(pid: int, every: float = 1.0) -> None:
    """End this process (in a daemon thread) once process `pid` no longer exists."""

    def loop() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # alive, another user's: cannot be ours
                pass
            time.sleep(every)

    threading.Thread(target=loop, daemon=True).start()


if __name__ == "__main__":
    converter = int(os.environ.get("LIVERSEG_CONVERTER_PID", "0"))
    if converter:
        watch(converter)
    runpy.run_module("apache_beam.runners.worker.sdk_worker_main", run_name="__main__", alter_sys=True)
