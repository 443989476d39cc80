"""The README's two set-up commands and the ones CI runs cannot drift apart.

.ci/run runs what .ci/readme-commands reads from the README's "Set up" section, each command
in a fresh venv, before it installs any optional package (PyTorch, JAX). These tests check the
extraction, that the commands are the ones a newcomer needs (the test extra and pytest; the
demo extra and the demo), and the order of .ci/run. They need the source checkout (README.md
and .ci/ beside tests/) and skip, saying so, where only tests/ was copied (the wheel round trip).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXTRACT = ROOT / ".ci" / "readme-commands"
CI_RUN = ROOT / ".ci" / "run"

if not (README.is_file() and EXTRACT.is_file() and CI_RUN.is_file()):
    pytest.skip(
        "needs the source checkout (README.md, .ci/readme-commands and .ci/run beside "
        "tests/); this copy of the suite has tests/ only",
        allow_module_level=True,
    )


def _extractor():
    loader = importlib.machinery.SourceFileLoader("readme_commands", str(EXTRACT))
    spec = importlib.util.spec_from_loader("readme_commands", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_readme_shows_the_two_commands_ci_runs():
    cmds = _extractor().setup_commands(README.read_text(encoding="utf-8"))
    assert len(cmds) == 2
    test_cmd, main_cmd = cmds
    # The test command installs the package with its test extra, then runs the whole default
    # suite; the main command installs the demo extra and runs the demo.
    assert re.fullmatch(r'pip install "\.\[test\]" && pytest', test_cmd), test_cmd
    assert re.fullmatch(r'pip install "\.\[demo\]" && python -m fastxent demo', main_cmd), main_cmd


def test_extraction_refuses_a_section_it_cannot_read():
    mod = _extractor()
    good = "# x\n\n## Set up\n\n```\na\n```\n\ntext\n\n```\nb\n```\n\n## Next\n\n```\nc\n```\n"
    assert mod.setup_commands(good) == ["a", "b"]
    for bad in (
        good.replace("## Set up", "## Setup"),  # no such section
        good.replace("```\nb\n```\n", ""),  # one block only
        good.replace("\nb\n", "\nb\nb2\n"),  # a block of two lines
        good.replace("text\n", "```\nthird\n```\n"),  # three blocks
        good.replace("```\nb\n```", "```\nb\n"),
    ):  # unclosed block
        with pytest.raises(ValueError):
            mod.setup_commands(bad)


def test_ci_runs_the_readme_commands_first_in_fresh_venvs():
    lines = CI_RUN.read_text(encoding="utf-8").splitlines()
    code = [
        (i, ln.strip())
        for i, ln in enumerate(lines)
        if ln.strip() and not ln.lstrip().startswith("#")
    ]

    def first(pattern):
        hits = [i for i, ln in code if re.search(pattern, ln)]
        assert hits, f".ci/run has no line matching {pattern!r}"
        return hits[0]

    extract = first(r"\.ci/readme-commands")
    fresh_venv = first(r"python3 -m venv")
    run_cmd = first(r'bash -euo pipefail -c "\$cmd"')
    # Nothing is installed before the README's commands have run in their own venvs.
    installs = first(r"pip install")
    oracles = min(first(r"pip install .*torch"), first(r"pip install .*jax"))
    assert extract < fresh_venv < run_cmd < installs <= oracles
