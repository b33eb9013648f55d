"""Every module of the package is short enough to read in one sitting and opens by saying its one job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kis_lens"
MODULES = sorted(PACKAGE.rglob("*.py"))
MOST_LINES = 500  # any module of the package
MOST_LINES_DRIVERS_AND_EDITING = 400  # reproduce.py and every editing module


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def most_lines(path: Path) -> int:
    """Return the line limit of a module: tighter for the reproduction driver and the editing package."""
    relative = path.relative_to(PACKAGE)
    tight = relative.parts[0] == "editing" or relative.name == "reproduce.py"
    return MOST_LINES_DRIVERS_AND_EDITING if tight else MOST_LINES


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_module_is_within_its_line_limit(path: Path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= most_lines(path), f"{_name(path)} has {lines} lines: split it by job (limit {most_lines(path)})"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_module_docstring_says_its_job(path: Path):
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert docstring, f"{_name(path)} has no module docstring: open it with one line saying the module's one job"
    first_line = docstring.splitlines()[0]
    assert len(first_line.split()) >= 4, f"{_name(path)}'s docstring opens with {first_line!r}: say what it does"


def test_the_limits_single_out_the_tight_modules():
    """The editing package and the reproduction driver get the tighter limit; the rest the general one."""
    assert most_lines(PACKAGE / "reproduce.py") == most_lines(PACKAGE / "editing" / "values.py") == 400
    assert most_lines(PACKAGE / "runner.py") == most_lines(PACKAGE / "docs" / "reproduction.py") == 500
