"""The CLI's error contract: a user's mistake is one line and exit 2; a bug keeps its traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from agecascade import cli
from agecascade.errors import UserError


def test_a_missing_input_is_one_line_and_exit_2(tmp_path, capsys):
    code = cli.main(["evaluate", "--model", str(tmp_path / "gone.pt"),
                     "--manifest", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "gone.pt" in err[0], err


def test_a_bug_is_not_swallowed(monkeypatch):
    """Only UserError becomes one line: a ValueError from numpy or torch is a bug to report."""
    def broken(args):
        raise ValueError("a bug deep in the library")

    parser = cli.build_parser("demo-data")
    monkeypatch.setattr(cli, "build_parser", lambda command: parser)
    parser._subparsers._group_actions[0].choices["demo-data"].set_defaults(run=broken)
    with pytest.raises(ValueError, match="a bug deep"):
        cli.main(["demo-data", "--out", "x"])
    assert issubclass(UserError, ValueError)  # library callers catching ValueError still do


def test_options_are_not_abbreviated():
    """`tune --lr 0.01` must be refused, not read as `--lrs 0.01`."""
    done = subprocess.run([sys.executable, "-m", "agecascade.cli", "tune", "--manifest", "m",
                           "--backbone", "vgg16", "--out", "o", "--lr", "0.01"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "unrecognized arguments: --lr" in done.stderr, done.stderr
