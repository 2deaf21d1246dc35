"""The `qexp` console script: `qexp <command> [args]`."""

from __future__ import annotations

import importlib
import os
import sys

#: subcommand -> (module:function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("qexp.cli:train", "train one run or a sweep (-m) from Hydra config overrides"),
    "compare": ("qexp.report.compare:main", "table + figure of accuracy against bit width"),
    "study": ("qexp.study.pipeline:main", "fair comparison: FP refs, equal tuning, seeds, stats"),
    "tb": ("qexp.report.tb:main", "serve TensorBoard for a run/sweep dir on 127.0.0.1"),
    "export": ("qexp.export.write:main", "write a run's network as a bit-packed file (+ ONNX)"),
    "verify": ("qexp.export.verify:main", "evaluate an exported file independently of qexp"),
    "sensitivity": (
        "qexp.analysis.command:main",
        "per-layer bit-width sensitivity of a run, and overrides that meet a weight budget",
    ),
}

USAGE = "usage: qexp <command> [args]   (qexp <command> --help for details)"


def _fix_completion_env(command: str) -> None:
    """Drop the subcommand from COMP_LINE so Hydra's tab completion sees only overrides."""
    line = os.environ.get("COMP_LINE")
    if line:
        parts = line.split(" ", 2)
        if len(parts) >= 2 and parts[1] == command:
            os.environ["COMP_LINE"] = " ".join([parts[0]] + parts[2:])
            if "COMP_POINT" in os.environ:
                point = int(os.environ["COMP_POINT"]) - len(command) - 1
                os.environ["COMP_POINT"] = str(max(point, 0))


def train(argv: list[str]) -> int:
    """`qexp train [hydra args] [overrides]`."""
    from qexp.config.schema import register_schemas
    from qexp.errors import QexpError
    from qexp.train.preflight import check_command_line

    register_schemas()
    try:
        check_command_line(argv)
    except QexpError as exc:
        print(f"qexp: error: {exc}", file=sys.stderr)
        return 2
    from qexp.train.app import hydra_main

    sys.argv = [sys.argv[0], *argv]
    hydra_main()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-sc"], ["--shell-completion"]) and "COMP_LINE" in os.environ:
        # Hydra's completion script calls `qexp -sc query=bash` with the typed line in
        # COMP_LINE: complete subcommand names, or hand over to the subcommand's Hydra app.
        words = os.environ["COMP_LINE"].split()
        typed = os.environ["COMP_LINE"]
        if len(words) < 2 or (len(words) == 2 and not typed.endswith(" ")):
            prefix = words[1] if len(words) == 2 else ""
            print(" ".join(c for c in COMMANDS if c.startswith(prefix)))
            return 0
        if words[1] != "train":
            return 0  # only the Hydra-based subcommand completes overrides
        argv = [words[1], *argv]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE + "\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(
            f"qexp: error: unknown command {command!r}; commands: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    _fix_completion_env(command)
    module, _, func = COMMANDS[command][0].partition(":")
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except KeyboardInterrupt:
        print(
            "qexp: interrupted (resume with resume=true hydra.run.dir=<run dir>)", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
