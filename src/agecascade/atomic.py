"""Atomic file writes: a kill at any moment leaves the old file or the new one, never half of one.

A file that marks work as finished (a manifest, a report, a fold's CSV, ``last.pt``,
``metrics.json``) is written into a
temporary sibling and renamed over its path with ``os.replace``. This module imports nothing but
the standard library, so code that only writes files (``prepare``) neither loads torch nor
depends on the fingerprint code in ``agecascade.cache``.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _fsync(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; once the block ends without error it is flushed
    to disk and renamed over ``path``, otherwise removed.

    The temporary name is fixed (not random), so a write killed halfway leaves one stray file
    that the next write of the same path reuses, instead of one more per kill.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)  # the rename itself survives a power cut, not only the bytes


def write_text_atomic(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def to_csv_atomic(frame, path: Path, **kwargs) -> None:
    """``frame.to_csv(path, **kwargs)`` (a pandas DataFrame), atomically; ``index=False`` unless
    told otherwise."""
    kwargs.setdefault("index", False)
    with replacing(path) as tmp:
        frame.to_csv(tmp, **kwargs)


def torch_save_atomic(obj: object, path: Path) -> None:
    import torch  # here, not above: writers of text files need not load torch

    with replacing(path) as tmp:
        torch.save(obj, tmp)
