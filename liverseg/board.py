"""`liverseg tensorboard RUN`: TensorBoard for a run (or a folder of runs), in this process.

In this process, not a child: stopping this PID (SIGTERM, Ctrl-C) stops the server and frees
its port. TensorBoard's own start-up chatter (its data server's INFO lines, the fast-loading
advisory) is kept off the console: the address line is what a user needs.
"""

from __future__ import annotations

import logging
from pathlib import Path


def serve(logdir: str | Path, host: str = "127.0.0.1", port: int = 6006) -> int:
    """Serve until stopped; returns TensorBoard's exit status."""
    from tensorboard import program
    from tensorboard.data import server_ingester

    for name in ("", "tensorboard"):  # its INFO lines, and the --verbose it passes its data server at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    try:  # the fast (Rust) data server when it is installed, asked for by name: no advisory printed
        server_ingester.get_server_binary()
        load_fast = "true"
    except server_ingester.NoDataServerError:
        load_fast = "false"
    board = program.TensorBoard()
    board.configure(logdir=str(logdir), host=host, port=port, load_fast=load_fast)
    return board.main()
