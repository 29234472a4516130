"""Nox sessions: ``nox -s lint typecheck unit contract integration e2e bench``.

``bash scripts/test`` is the single command CI runs; these sessions split it up for local use.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "unit", "contract", "integration", "e2e"]

PYTHON = "3.11"
ROOT = Path(__file__).parent


def _install(session: nox.Session) -> None:
    """The pinned set of ``requirements/dev.lock`` (as ``scripts/bootstrap.sh``), then the project."""
    session.install("--require-hashes", "-r", str(ROOT / "requirements" / "dev.lock"))
    session.install("--no-deps", "--no-build-isolation", "-e", str(ROOT))


def _pytest(session: nox.Session, folder: str) -> None:
    _install(session)
    session.run("pytest", "-q", f"tests/{folder}", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    _install(session)
    session.run("ruff", "check", ".", *session.posargs)
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    _install(session)
    session.run("mypy", *session.posargs)


@nox.session(python=PYTHON)
def unit(session: nox.Session) -> None:
    _pytest(session, "unit")


@nox.session(python=PYTHON)
def contract(session: nox.Session) -> None:
    _pytest(session, "contract")


@nox.session(python=PYTHON)
def integration(session: nox.Session) -> None:
    _pytest(session, "integration")


@nox.session(python=PYTHON)
def e2e(session: nox.Session) -> None:
    _pytest(session, "e2e")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    _install(session)
    session.run("python", "-m", "bench", *session.posargs)
