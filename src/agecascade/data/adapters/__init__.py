"""Dataset adapters: a dataset root in its native layout -> (manifest, drop report)."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import pandas as pd

from agecascade.errors import UserError
from ..report import DropReport
from .adience import read_adience
from .agedb import read_agedb
from .fgnet import read_fgnet
from .imdb import read_imdb_wiki
from .utkface import read_utkface

Adapter = Callable[[Path], tuple[pd.DataFrame, DropReport]]

ADAPTERS: dict[str, Adapter] = {
    "imdb": partial(read_imdb_wiki, name="imdb"),
    "wiki": partial(read_imdb_wiki, name="wiki"),
    "agedb": read_agedb,
    "fgnet": read_fgnet,
    "adience": read_adience,
    "utkface": read_utkface,
}


def get_adapter(dataset: str) -> Adapter:
    if dataset not in ADAPTERS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(ADAPTERS)}")
    return ADAPTERS[dataset]
