"""The exp constants in cpp/src/exp_coeffs.hpp are what tools/gen_exp_coeffs.py computes.

The header is generated (hex floats, each derived in mpmath); a hand edit, or a change to the
script without regenerating, fails here. Skips without mpmath (the test extra has it) and where
only tests/ was copied (the wheel round trip), saying so.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gen_exp_coeffs.py"
HEADER = ROOT / "cpp" / "src" / "exp_coeffs.hpp"

if not (SCRIPT.is_file() and HEADER.is_file()):
    pytest.skip(
        "needs the source checkout (tools/ and cpp/ beside tests/); this copy of the "
        "suite has tests/ only",
        allow_module_level=True,
    )
pytest.importorskip("mpmath")


def test_generated_header_is_up_to_date() -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
