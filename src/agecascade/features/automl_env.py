"""auto-sklearn's own interpreter, because it cannot share ours.

auto-sklearn 0.15 (the thesis's AutoML system, still its last release) pins scikit-learn 0.24 and
numpy < 1.24, which have no wheels for Python 3.11 and clash with the main environment's
scikit-learn 1.9 / numpy 2. So it lives in an isolated venv on Python 3.8/3.9 (default
``.venv-autosklearn``) and runs out of process (``autosklearn_worker.py``). A stamp file records a
finished, verified install: a venv without it is a half-built one and is never used.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from agecascade.errors import UserError

ENV_VAR = "AGECASCADE_AUTOSKLEARN_PYTHON"
# Where the env is looked for by default: a container image keeps its own outside the mounted
# checkout, whose ``.venv-autosklearn`` (if any) was built for the host's interpreter.
PATH_VAR = "AGECASCADE_AUTOSKLEARN_ENV"
DEFAULT_PATH = Path(os.environ.get(PATH_VAR) or ".venv-autosklearn")
REQUIREMENTS = ("auto-sklearn==0.15.0", "numpy==1.23.5", "scipy==1.10.1")
# scikit-learn 0.24.2, which auto-sklearn 0.15 requires, has wheels up to CPython 3.9 only.
PYTHONS = ((3, 8), (3, 9))
STAMP = "agecascade-autosklearn.json"
_PROBE = "import sys; print(sys.version_info[0], sys.version_info[1], sys.executable)"
# What ensurepip gives Python 3.9.18: installed by hand where the interpreter has no ensurepip
# (Debian's python3.9 without python3.9-venv). auto-sklearn imports pkg_resources (setuptools).
BOOTSTRAP = ("pip==23.0.1", "setuptools==58.1.0")


@dataclass(frozen=True)
class Interpreter:
    executable: Path
    version: tuple[int, int]


def probe(candidate: str) -> Interpreter | str:
    """The real interpreter behind ``candidate`` (a pyenv shim resolves to the one it runs), or
    why it cannot be used."""
    try:
        done = subprocess.run([candidate, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{candidate} does not run ({err})"
    if done.returncode != 0:
        return f"{candidate} does not run: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    major, minor, executable = done.stdout.split(maxsplit=2)
    version = (int(major), int(minor))
    if version not in PYTHONS:
        return (f"{candidate} is Python {major}.{minor}; auto-sklearn 0.15 needs "
                f"{' or '.join(f'{a}.{b}' for a, b in PYTHONS)}")
    return Interpreter(Path(executable.strip()), version)


def find_interpreter() -> Interpreter | str:
    """A Python for auto-sklearn, or why there is none.

    ${AGECASCADE_AUTOSKLEARN_PYTHON} when set (and then only it: an explicit choice that fails is
    reported, not replaced), else ``python3.9`` / ``python3.8`` on PATH, else pyenv's 3.9 / 3.8.
    """
    chosen = os.environ.get(ENV_VAR)
    if chosen:
        found = probe(chosen)
        return found if isinstance(found, Interpreter) else f"{ENV_VAR}={chosen}: {found}"
    candidates = [path for name in ("python3.9", "python3.8") if (path := shutil.which(name))]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for minor in (9, 8):
        candidates += [str(p / "bin" / "python") for p in sorted(pyenv.glob(f"3.{minor}.*"), reverse=True)]
    reasons = []
    for candidate in candidates:
        found = probe(candidate)
        if isinstance(found, Interpreter):
            return found
        reasons.append(found)
    tried = "; ".join(reasons) if reasons else f"no python3.9/python3.8 on PATH nor in {pyenv}"
    return f"no Python 3.8/3.9 for auto-sklearn ({tried}); set {ENV_VAR} to one"


def env_python(path: Path) -> Path:
    return path / "bin" / "python"


def read_stamp(path: Path) -> dict | None:
    stamp = path / STAMP
    return json.loads(stamp.read_text()) if stamp.is_file() else None


def locate(path: Path = DEFAULT_PATH) -> Path | str:
    """The python of a finished auto-sklearn env at ``path``, or why it cannot be used."""
    stamp = read_stamp(path)
    if stamp is None:
        found = find_interpreter()
        can = ("`agecascade automl-env` can build it with " + str(found.executable)
               if isinstance(found, Interpreter) else f"it cannot be built here: {found}")
        return f"no auto-sklearn environment at {path} ({can})"
    if tuple(stamp["requirements"]) != REQUIREMENTS:
        return (f"{path} was built for {stamp['requirements']}, not {list(REQUIREMENTS)}; "
                "rerun `agecascade automl-env`")
    python = env_python(path)
    if not os.access(python, os.X_OK):
        return f"{python} is missing or not executable; rerun `agecascade automl-env`"
    return python


def _run(command: list[str], what: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise UserError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def _make_venv(python: Path, path: Path) -> None:
    """``python -m venv``; without ensurepip, a bare venv into which our own pip installs pip
    from its wheel (``python pip.whl/pip``), so the env ends the same either way."""
    if subprocess.run([str(python), "-c", "import ensurepip"], capture_output=True).returncode == 0:
        _run([str(python), "-m", "venv", "--clear", str(path)], "python -m venv")
        return
    _run([str(python), "-m", "venv", "--clear", "--without-pip", str(path)], "python -m venv")
    wheels = path / "bootstrap-wheels"
    _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
          "--no-deps", "--only-binary", ":all:", "-d", str(wheels), BOOTSTRAP[0]], "pip download")
    (wheel,) = wheels.glob("pip-*.whl")
    _run([str(env_python(path)), str(wheel / "pip"), "install", "--disable-pip-version-check",
          "-q", "--no-index", str(wheel)], "bootstrapping pip")
    shutil.rmtree(wheels)
    _run([str(env_python(path)), "-m", "pip", "install", "--disable-pip-version-check", "-q",
          *BOOTSTRAP[1:]], "pip install setuptools")


def create_env(path: Path = DEFAULT_PATH, log=print) -> Path:
    """Build (or find up to date) the auto-sklearn venv at ``path``; return its python.

    Raises UserError when the install fails (a half-built env is removed) or when ``path`` is
    something other than a venv of ours, which is never overwritten.
    """
    ready = locate(path)
    if isinstance(ready, Path):
        log(f"auto-sklearn environment at {path} is up to date ({read_stamp(path)['autosklearn']})")
        return ready
    if path.exists() and not (path / "pyvenv.cfg").is_file():
        raise UserError(f"{path} exists and is not a virtual environment; remove it or choose "
                         "another --path")
    found = find_interpreter()
    if not isinstance(found, Interpreter):
        raise LookupError(found)
    start = time.perf_counter()
    log(f"building {path} with {found.executable} (Python {found.version[0]}.{found.version[1]}): "
        f"pip install {' '.join(REQUIREMENTS)}")
    try:
        _make_venv(found.executable, path)
        _run([str(env_python(path)), "-m", "pip", "install", "--disable-pip-version-check", "-q",
              *REQUIREMENTS], "pip install")
        version = _run([str(env_python(path)), "-c",
                        "import autosklearn, sklearn; print(autosklearn.__version__, sklearn.__version__)"],
                       "import autosklearn").split()
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    (path / STAMP).write_text(json.dumps({
        "requirements": list(REQUIREMENTS), "python": str(found.executable),
        "autosklearn": version[0], "sklearn": version[1], "seconds": round(seconds, 1)}, indent=2))
    log(f"auto-sklearn {version[0]} (scikit-learn {version[1]}) ready in {path} after {seconds:.0f} s")
    return env_python(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH,
                        help=f"where the venv goes (default {DEFAULT_PATH})")


def main(args: argparse.Namespace) -> int:
    """Exit 0 also when no suitable Python exists: auto-sklearn is optional, and the features
    stage then reports it as unavailable. A failed install is an error (exit 2 via the CLI)."""
    try:
        create_env(args.path)
    except LookupError as missing:
        print(f"auto-sklearn not installed: {missing}. The features stage will report it as "
              "unavailable and run its other engines.")
    return 0


if __name__ == "__main__":  # stdlib only: `make setup` builds it while the main install runs
    cli = argparse.ArgumentParser(prog="python -m agecascade.features.automl_env",
                                  description="build auto-sklearn's own Python 3.9 venv")
    add_arguments(cli)
    sys.exit(main(cli.parse_args()))
