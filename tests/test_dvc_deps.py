"""Every DVC stage lists, as deps, exactly the project code its command runs.

The imports are read from the code (AST), transitively: function-level imports, relative imports,
parent packages, imported stage modules, and sibling scripts a module runs by file name (the
auto-sklearn worker). A missing dep lets `dvc repro` say "up to date" after a change that alters
results; a dep on code the stage never runs retrains networks for nothing.
"""
from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

from agecascade.cli import COMMANDS
from conftest import REPO

CODE_ROOTS = ("src/", "pipelines/")
ENTRY = "agecascade.cli"  # every stage's command is `agecascade <subcommand> ...`
# MLflow logging alone does not change a stage's outputs, and a change to it (or to the pyfunc
# it logs models with) must not retrain every network: the import reader does not follow it.
LOGGING_ONLY = {"agecascade.tracking"}


def module_file(name: str) -> Path | None:
    """The file a project module name loads from (None: not project code, or a namespace)."""
    parts = name.split(".")
    if parts[0] != "agecascade":
        return None
    if parts[1:2] == ["pipelines"]:  # installed from the top-level pipelines/ folder
        base = REPO.joinpath("pipelines", *parts[2:])
    else:
        base = REPO.joinpath("src", *parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    parts = ["agecascade", "pipelines", *parts[1:]] if parts[0] == "pipelines" else parts[1:]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def direct_imports(path: Path) -> frozenset[Path]:
    """Project files that running ``path`` loads directly: imports anywhere in it (each with
    its parent packages) and sibling ``.py`` files it names as strings (scripts it runs)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # submodules
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.endswith(".py") and (path.parent / node.value).is_file()):
            names.add(f"{package}.{node.value[:-3]}")
    files = set()
    for imported in names - LOGGING_ONLY:
        parts = imported.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            if ".".join(parts[:depth]) in LOGGING_ONLY:
                break
            found = module_file(".".join(parts[:depth]))
            if found is not None and found != path:
                files.add(found)
    return frozenset(files)


def closure(start: list[Path]) -> set[Path]:
    seen: set[Path] = set()
    todo = list(start)
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(direct_imports(path))
    return seen


def stage_code(cmd: str) -> set[str]:
    """Repo-relative project files that ``agecascade <subcommand> ...`` runs."""
    words = cmd.split()
    assert words[0] == "agecascade", f"not an agecascade command: {cmd}"
    subcommand = words[1]
    # cli.py imports its command's module by name (importlib), only that one, and the packages
    # above it
    parts = COMMANDS[subcommand][0].split(".")
    entry = [module_file(ENTRY)] + [module_file(".".join(parts[:depth]))
                                    for depth in range(1, len(parts) + 1)]
    return {str(p.relative_to(REPO)) for p in closure([p for p in entry if p is not None])}


def stages() -> list:
    from dvc.repo import Repo

    return list(Repo(str(REPO)).index.stages)


def covered(file: str, deps: list[str]) -> bool:
    return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.fixture(scope="module")
def resolved_stages():
    return [(s.addressing, s.cmd, [d.def_path for d in s.deps]) for s in stages() if s.cmd]


def test_every_stage_lists_the_code_it_imports(resolved_stages):
    problems = []
    for name, cmd, deps in resolved_stages:
        code = stage_code(cmd)
        missing = sorted(f for f in code if not covered(f, deps))
        if missing:
            problems.append(f"{name}: missing deps {missing}")
    assert not problems, "\n".join(problems)


def test_no_stage_depends_on_code_it_never_runs(resolved_stages):
    """A directory dep is fine only when the stage runs every module in it."""
    problems = []
    for name, cmd, deps in resolved_stages:
        code = stage_code(cmd)
        for dep in deps:
            if not dep.startswith(CODE_ROOTS):
                continue
            path = REPO / dep
            files = ([str(p.relative_to(REPO)) for p in path.rglob("*.py")] if path.is_dir()
                     else [dep])
            unused = sorted(f for f in files if f not in code)
            if unused:
                problems.append(f"{name}: dep {dep} holds code the stage never runs: {unused}")
    assert not problems, "\n".join(problems)


def test_the_import_reader_follows_what_python_follows():
    """Function-level, relative and stage-module imports, and the worker script run by path."""
    lopo = stage_code("agecascade lopo --mode b")
    assert "pipelines/lopo.py" in lopo and "src/agecascade/cli.py" in lopo
    assert "src/agecascade/nets/backbones.py" in lopo  # via agecascade.nets' __init__
    assert "pipelines/train.py" not in stage_code("agecascade report")
    features = stage_code("agecascade features")
    assert "src/agecascade/features/autosklearn_worker.py" in features  # run by file name
    train = stage_code("agecascade train")
    assert "src/agecascade/tracking.py" not in train and "src/agecascade/serving.py" not in train


def test_bytecode_is_not_a_dependency():
    ignored = (REPO / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored


def minimal_deps(files: set[str]) -> list[str]:
    """``files`` as dvc.yaml deps: a folder where the stage runs every module in it."""
    folders = sorted({str(Path(f).parent) for f in files}, key=len)
    whole = []
    for folder in folders:
        inside = {str(p.relative_to(REPO)) for p in (REPO / folder).rglob("*.py")}
        if inside <= files and not any(folder.startswith(w + "/") for w in whole):
            whole.append(folder)
    return sorted(whole + [f for f in files if not covered(f, whole)])


if __name__ == "__main__":  # prints each stage's code deps, ready for dvc.yaml
    shown: set[str] = set()
    for stage in stages():
        group = stage.addressing.split("@")[0]
        if stage.cmd and group not in shown:
            shown.add(group)
            print(f"{group}:\n" + "".join(f"  - {d}\n" for d in minimal_deps(stage_code(stage.cmd))))
