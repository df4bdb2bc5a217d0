"""A stage's command line built from its frozen config dataclass: each default lives in one place.

A field becomes ``--field-name``. Its type picks the parser: ``bool`` a ``--flag/--no-flag``
pair, ``Path`` a path, ``tuple[X, ...]`` a list (``nargs="+"``, or one option per value with
``repeat``), ``X | None`` an optional value. Field metadata adds ``help``, ``choices``,
``metavar`` and ``required``; a field without a default is required.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", choices: Any = None,
           required: bool = False, metavar: str | None = None, repeat: bool = False) -> Any:
    """A dataclass field carrying its command-line help (and choices).

    ``repeat``: a tuple given as one option per value (``--model A --model B``), where
    ``nargs="+"`` would keep only the last option's values.
    """
    meta = {"help": help, "choices": choices, "required": required, "metavar": metavar,
            "repeat": repeat}
    if isinstance(default, (list, dict, set)):
        raise TypeError("config defaults must be immutable: use a tuple")
    if repeat and default is not dataclasses.MISSING:  # argparse's "append" adds to the default
        raise TypeError("a repeated option takes no default")
    return dataclasses.field(default=default, metadata=meta)


def device_option() -> Any:
    """The ``--device`` every stage that runs a network takes."""
    return option("auto", help="auto (CUDA when available), cpu, or a torch device such as cuda:1")


def _base(kind: Any) -> tuple[Any, bool, bool]:
    """(element type, optional, sequence) of a field's annotation."""
    optional = False
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional, kind = len(args) < len(typing.get_args(kind)), args[0]
    if typing.get_origin(kind) is tuple:
        return typing.get_args(kind)[0], optional, True
    return kind, optional, False


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One option per field of ``cls`` (except ``skip``), with the field's default."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        kind, optional, sequence = _base(hints[field.name])
        meta = field.metadata
        has_default = field.default is not dataclasses.MISSING
        kwargs: dict[str, Any] = {"help": meta.get("help", ""), "dest": field.name}
        if has_default:
            kwargs["default"] = field.default
        else:
            kwargs["required"] = True
        if meta.get("required"):
            kwargs["required"] = True
        flag = "--" + field.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        kwargs["type"] = Path if kind is Path else kind
        if meta.get("choices") is not None:
            kwargs["choices"] = meta["choices"]
        if sequence and meta.get("repeat"):
            kwargs["action"] = "append"
        elif sequence:
            kwargs["nargs"] = "+"
        if optional and has_default and field.default is None:
            kwargs["metavar"] = field.name.upper()
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag, **kwargs)


def from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """The config ``args`` spell out (lists become tuples), with ``overrides`` on top."""
    values = {}
    for field in dataclasses.fields(cls):
        if hasattr(args, field.name):
            value = getattr(args, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**(values | overrides))
