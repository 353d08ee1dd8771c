"""Developer entry points: ``nox -s lint typecheck tests`` (``tests`` on Python 3.11, 3.12 and 3.13;
``nox -s tests-3.13`` for one; a missing interpreter is skipped with a line saying so)."""

from __future__ import annotations

import os
import shutil
import subprocess

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHONS = ["3.11", "3.12", "3.13"]


def _let_pyenv_answer() -> None:
    """With pyenv, ``python3.12`` on PATH is a shim that answers only for the active versions: make
    every installed 3.11-3.13 active for nox's own run (unless PYENV_VERSION already says)."""
    pyenv = shutil.which("pyenv")
    if pyenv is None or "PYENV_VERSION" in os.environ:
        return
    installed = subprocess.run([pyenv, "versions", "--bare"], capture_output=True, text=True).stdout.split()
    newest: dict[str, str] = {}
    for full in sorted(installed, key=lambda v: [int(p) if p.isdigit() else 0 for p in v.split(".")]):
        minor = ".".join(full.split(".")[:2])
        if minor in PYTHONS:
            newest[minor] = full
    if newest:
        os.environ["PYENV_VERSION"] = ":".join(newest[m] for m in PYTHONS if m in newest)


_let_pyenv_answer()


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "aiomq", "tests", "examples", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "aiomq", "tests", "examples", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def chaos(session: nox.Session) -> None:
    """Kill workers, connections and the database (CHAOS_SCALE=10 for the long form)."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "chaos", "tests/chaos", *session.posargs)
