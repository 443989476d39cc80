"""One version source: pyproject.toml's [project] version reaches the extension (CMake takes it
from scikit-build-core, or reads the same line in a plain CMake build) and fastxent.__version__.
Needs pyproject.toml beside tests/ (the source checkout and the wheel round trip both have it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fastxent

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _declared_version() -> str:
    if not PYPROJECT.is_file():
        pytest.skip("needs pyproject.toml beside tests/")
    text = PYPROJECT.read_text(encoding="utf-8")
    project = re.search(r"^\[project\]\n(.*?)(?=^\[)", text, re.M | re.S)
    assert project, "pyproject.toml has no [project] table"
    m = re.search(r'^version = "([^"]+)"$', project.group(1), re.M)
    assert m, "[project] has no static version line"
    return m.group(1)


def test_version_comes_from_pyproject():
    assert fastxent.__version__ == _declared_version()
    assert fastxent._core.__version__ == fastxent.__version__


def test_version_is_written_once():
    # CMakeLists.txt must not restate the number (it reads pyproject.toml).
    cmake = PYPROJECT.with_name("CMakeLists.txt")
    if not cmake.is_file():
        pytest.skip("needs CMakeLists.txt beside tests/")
    version = _declared_version()
    assert version not in cmake.read_text(encoding="utf-8")
