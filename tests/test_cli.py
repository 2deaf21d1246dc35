"""The console script: subcommand dispatch and tab completion through Hydra."""

import subprocess

from conftest import qexp_cmd


def _complete(line: str, tmp_path) -> list[str]:
    env = {"COMP_LINE": line, "COMP_POINT": str(len(line)), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(qexp_cmd("-sc", "query=bash"), env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_completion_of_subcommands_and_group_options(tmp_path):
    assert "train" in _complete("qexp tr", tmp_path)
    options = _complete("qexp train estimator=", tmp_path)
    assert {"estimator=ste", "estimator=clipped_ste"} <= set(options)
    assert "train" not in options  # the subcommand is not mistaken for an override


def test_help_lists_commands(capsys):
    from qexp.cli import main

    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
