"""Content fingerprints (agecascade.cache) and atomic writes (agecascade.atomic): what resume and
fold caches trust."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agecascade.atomic import to_csv_atomic, torch_save_atomic, write_text_atomic
from agecascade.cache import (code_version, fingerprint, state_fingerprint, store_fingerprint,
                              weights_fingerprint)
from agecascade.data.store import CROPS, MANIFEST, create_store


def write_store(folder: Path, rows: int = 40, size: int = 16) -> Path:
    folder.mkdir(parents=True)
    store = create_store(folder / CROPS, rows, size)
    store[:] = np.random.default_rng(0).integers(0, 255, store.shape, dtype=np.uint8)
    store.flush()
    pd.DataFrame({"path": [f"{i}.jpg" for i in range(rows)], "age": np.arange(rows, dtype=float)}
                 ).to_parquet(folder / MANIFEST, index=False)
    return folder


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_fingerprint_is_order_free_and_refuses_paths():
    assert fingerprint(a=1, b=[1.5, "x"]) == fingerprint(b=[1.5, "x"], a=1)
    assert fingerprint(a=1) != fingerprint(a=2) != fingerprint(b=2)
    with pytest.raises(TypeError, match="plain data"):
        fingerprint(init=Path("model.pt"))  # a path says nothing about what the file holds


def test_state_fingerprint_follows_the_tensors_not_their_storage():
    torch.manual_seed(0)
    state = {"w": torch.randn(3, 4), "b": torch.zeros(3), "n": torch.tensor(7)}
    copy = {k: v.clone() for k, v in reversed(state.items())}
    assert state_fingerprint(state) == state_fingerprint(copy)
    copy["w"][1, 2] += 1e-6
    assert state_fingerprint(state) != state_fingerprint(copy)
    assert state_fingerprint(state) != state_fingerprint({**state, "b": torch.zeros(3).double()})
    assert state_fingerprint(state) != state_fingerprint({**state, "b": torch.zeros(1, 3)})


def test_store_fingerprint_follows_content_not_path(tmp_path):
    store = write_store(tmp_path / "a")
    assert store_fingerprint(store) == store_fingerprint(shutil.copytree(store, tmp_path / "b"))
    changed = shutil.copytree(store, tmp_path / "c")
    flip_byte(changed / CROPS, -5)  # one pixel of the last crop: small stores are hashed whole
    assert store_fingerprint(changed) != store_fingerprint(store)
    relabelled = shutil.copytree(store, tmp_path / "d")
    manifest = pd.read_parquet(relabelled / MANIFEST)
    manifest.loc[3, "age"] = 99.0
    manifest.to_parquet(relabelled / MANIFEST, index=False)
    assert store_fingerprint(relabelled) != store_fingerprint(store)


def test_a_large_store_is_sampled_header_and_blocks(tmp_path):
    store = write_store(tmp_path / "a", rows=64)     # 48 KiB of crops
    sampled = {"block": 256, "blocks": 8}            # so above 2 KiB, 8 blocks of 256 bytes
    size = (store / CROPS).stat().st_size
    base = store_fingerprint(store, **sampled)
    in_block = shutil.copytree(store, tmp_path / "b")
    flip_byte(in_block / CROPS, 3 * (size - 256) // 7 + 10)  # inside the fourth sampled block
    assert store_fingerprint(in_block, **sampled) != base
    shape = shutil.copytree(store, tmp_path / "c")
    data = (shape / CROPS).read_bytes()
    (shape / CROPS).write_bytes(data.replace(b"(64, 16, 16, 3)", b"(64, 16, 48, 1)"))
    assert store_fingerprint(shape, **sampled) != base  # the header sits in the first block
    between = shutil.copytree(store, tmp_path / "d")
    flip_byte(between / CROPS, (size - 256) // 7 + 300)  # between two samples: not read
    assert store_fingerprint(between, **sampled) == base
    assert store_fingerprint(between) != store_fingerprint(store)  # hashed whole by default


def test_weights_fingerprint_is_the_choice_and_the_file_content(tmp_path):
    a = tmp_path / "a.pth"
    a.write_bytes(b"weights one")
    b = tmp_path / "elsewhere.pth"
    b.write_bytes(b"weights one")
    assert weights_fingerprint("vggface2", a) == weights_fingerprint("vggface2", b)
    b.write_bytes(b"weights two")
    assert weights_fingerprint("vggface2", a) != weights_fingerprint("vggface2", b)
    assert len({weights_fingerprint("none"), weights_fingerprint("imagenet"),
                weights_fingerprint("vggface2", a)}) == 3


def test_code_version_follows_sources_not_bytecode(tmp_path, monkeypatch):
    package = tmp_path / "toypkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("X = 1\n")
    (package / "sub" / "mod.py").write_text("Y = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("toypkg", None)

    def version() -> str:
        code_version.cache_clear()
        return code_version(("toypkg",))

    before = version()
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"bytecode")
    (package / "notes.txt").write_text("not code")
    assert version() == before
    (package / "sub" / "mod.py").write_text("Y = 3\n")
    assert version() != before
    (package / "sub" / "mod.py").write_text("Y = 2\n")
    (package / "sub" / "mod.py").rename(package / "sub" / "other.py")  # same bytes, other module
    assert version() != before
    code_version.cache_clear()
    assert code_version() == code_version()  # the project's own: stable within a process


def test_atomic_writes_leave_the_old_file_when_a_write_fails(tmp_path):
    target = tmp_path / "last.pt"
    torch_save_atomic({"epoch": 1}, target)
    with pytest.raises(Exception):
        # a tensor is written first, then the lambda fails to pickle: a half-written file
        torch_save_atomic({"model": torch.zeros(1000), "bad": lambda: 0}, target)
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no stray temp file

    csv = tmp_path / "000.csv"
    to_csv_atomic(pd.DataFrame({"a": [1, 2]}), csv)
    assert pd.read_csv(csv)["a"].tolist() == [1, 2]
    write_text_atomic(tmp_path / "metrics.json", "{}\n")
    assert (tmp_path / "metrics.json").read_text() == "{}\n"
