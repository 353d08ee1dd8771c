"""Developer entry points: ``nox -s lint typecheck tests``."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "aiomq", "tests", "examples", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "aiomq", "tests", "examples", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict")


@nox.session
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
