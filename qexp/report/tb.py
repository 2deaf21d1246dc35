"""`qexp tb DIR [--port N]`: TensorBoard on this machine only (127.0.0.1), until Ctrl-C."""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"  # never all interfaces: run dirs are not meant to be served to the network
#: the legacy Scalars dashboard keeps its smoothing in the URL (Time Series keeps it in the
#: browser): this link shows a compare folder's few-point lines unsmoothed
UNSMOOTHED = "#scalars&_smoothingWeight=0"


def free_port(host: str = HOST) -> int:
    """A port that is free on ``host`` right now (the OS picks it when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def addresses(logdir: Path, url: str) -> list[str]:
    """What to print once TensorBoard serves ``logdir`` at ``url``."""
    from qexp.report.tb_summary import TB_MARKER

    lines = [f"TensorBoard on {url} (logdir {logdir}); Ctrl-C to stop"]
    if (logdir / TB_MARKER).is_file():
        lines.append(f"the compare charts, unsmoothed: {url}{UNSMOOTHED}")
    return lines


def main(argv: list[str]) -> int:
    """Start TensorBoard on DIR, print its address, serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="qexp tb",
        description=f"Serve TensorBoard for DIR (runs, sweeps, qexp compare output) on {HOST}.",
    )
    parser.add_argument("logdir", type=Path, metavar="DIR")
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    args = parser.parse_args(argv)
    if not args.logdir.is_dir():
        print(f"qexp: error: no such directory: {args.logdir}", file=sys.stderr)
        return 2
    port = args.port if args.port is not None else free_port()

    from tensorboard import program

    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(args.logdir), "--host", HOST, "--port", str(port)])
    try:
        url = board.launch()  # serves from a background thread
    except Exception as exc:  # port taken, bad logdir...: TensorBoard's own message says which
        print(f"qexp: error: TensorBoard did not start: {exc}", file=sys.stderr)
        return 2
    print("\n".join(addresses(args.logdir, url)), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
