"""Test-only: `agecascade prepare` whose workers die on chosen files, as an OOM kill would.

A real out-of-memory kill cannot be provoked reliably in a test, so the crop function is swapped
for one that sends SIGKILL to its own process on files whose name holds ``DIE_MARK``. The swap
happens in the parent, before the pool starts: the pool pickles the crop function by reference,
so spawned workers import this module (tests/ must be on ``PYTHONPATH``) and run it. Nothing in
the package reads an environment variable or flag for this: production has no way to trigger it.

    PYTHONPATH=tests python -c "import prepare_hooks; prepare_hooks.run()" prepare imdb ...
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import agecascade.data.prepare as library
from agecascade.cli import main
from agecascade.data.cropper import CropJob, CropResult, CropSettings, crop_file

DIE_MARK = "sigkill"


def crop_or_die(job: CropJob, settings: CropSettings) -> CropResult:
    if DIE_MARK in Path(job.file).name:
        os.kill(os.getpid(), signal.SIGKILL)
    return crop_file(job, settings)


def run() -> None:
    """The CLI with ``crop_or_die`` in place of ``crop_file``; arguments from ``sys.argv``."""
    library.crop_file = crop_or_die
    sys.exit(main(sys.argv[1:]))
