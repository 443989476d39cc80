"""Shared fixtures.

``isa``: parametrizes a test over every instruction set this CPU can run
(``fastxent.available_isas()``), forcing it with ``fastxent._core.set_isa`` for the duration
of the test and restoring the default afterwards. Every numerical test takes it, so the
scalar fallback is held to the same contract as the SIMD kernels.

``vocab_tiles``: shrinks the fused linear planner's tile so that a forward pass alone at test
sizes takes tiles of the vocabulary, and records each call that does.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import fastxent
from fastxent import _core

sys.path.insert(0, os.path.dirname(__file__))  # `import reference` from any rootdir
from reference import default_isa  # noqa: E402

ISAS = fastxent.available_isas()


def pytest_configure(config):
    # .ci/wheel sets FASTXENT_EXPECT_SITE to the test venv's site-packages: a suite that imported
    # fastxent from anywhere else (the source tree, a build directory) must not pass.
    site = os.environ.get("FASTXENT_EXPECT_SITE")
    if site and not os.path.realpath(fastxent.__file__).startswith(os.path.realpath(site) + os.sep):
        raise pytest.UsageError(
            f"fastxent was imported from {fastxent.__file__}, not from FASTXENT_EXPECT_SITE={site}"
        )


@pytest.fixture(params=ISAS)
def isa(request):
    name = request.param
    _core.set_isa(name)
    assert fastxent.active_isa() == name
    try:
        yield name
    finally:
        _core.set_isa(default_isa())


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: deterministic, different per test case."""
    seed = sum(ord(ch) * (i + 1) for i, ch in enumerate(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)


@pytest.fixture
def vocab_tiles(monkeypatch):
    """Shrinks the planner's tile so that a forward pass alone at these small sizes takes
    tiles of the vocabulary (5 classes each for float32 and 37 rows, see tile_cols); returns
    the list of the plans' cols, one per call that ran tiles of the vocabulary."""
    from fastxent import _linear, _linear_plan

    monkeypatch.setattr(_linear_plan, "TILE_BYTES", 740)
    monkeypatch.setattr(_linear_plan, "_MIN_COLS", 3)
    monkeypatch.setattr(_linear_plan, "_ROUND_COLS", 1)
    calls = []
    real = _linear.run_vocab_tiles

    def spy(plan, be, stats=None):
        calls.append(plan.cols)
        return real(plan, be, stats)

    monkeypatch.setattr(_linear, "run_vocab_tiles", spy)
    return calls


def pytest_report_header(config):
    return (
        f"fastxent {fastxent.__version__} from {os.path.dirname(fastxent.__file__)}: "
        f"ISAs {ISAS} (default {fastxent.active_isa()}, "
        f"FASTXENT_ISA={os.environ.get('FASTXENT_ISA', '') or 'unset'}), "
        f"OpenMP {_core.has_openmp()} with {_core.default_num_threads()} threads, "
        f"build {dict(_core.build_info)}"
    )
