#!/usr/bin/env python3
"""Run a liverseg command as N MultiWorkerMirroredStrategy workers on this machine.

Each worker gets its own TF_CONFIG (free localhost ports); worker 0 is the chief and the
only one writing into the run directory. Output is prefixed by worker. For real clusters
set TF_CONFIG per host instead (see README, "Several hosts").

    python tools/launch_local_workers.py 2 -- liverseg train --config configs/smoke.yaml \
        --records records/demo --run runs/mw --set train.strategy=multi_worker
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print(__doc__, file=sys.stderr)
        return 2
    n, command = int(argv[0]), argv[2:]
    cluster = {"worker": [f"localhost:{p}" for p in free_ports(n)]}
    procs = []
    for i in range(n):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    def relay(i: int, p: subprocess.Popen) -> None:
        for line in p.stdout:
            print(f"[worker {i}] {line}", end="", flush=True)

    threads = [threading.Thread(target=relay, args=(i, p)) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    codes = [p.wait() for p in procs]
    for t in threads:
        t.join()
    print(f"exit codes: {codes}")
    return max(codes, key=abs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
