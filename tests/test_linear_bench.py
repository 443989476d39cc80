"""The benchmark's fused linear + cross-entropy section (python -m fastxent bench --linear)."""

from __future__ import annotations

import pytest

from fastxent import __main__ as cli
from fastxent import bench_linear


def test_parse_shapes():
    assert bench_linear.parse_shapes("4096x1024x32000, 8x2x3") == [(4096, 1024, 32000), (8, 2, 3)]
    with pytest.raises(ValueError):
        bench_linear.parse_shapes("4096x32000")


def test_section_rows_and_flag():
    pytest.importorskip("torch")
    lines: list = []
    rows = bench_linear.run_linear(
        (1,), repeats=1, shapes=[(64, 8, 300)], dtypes=("float32",), rss=False, log=lines.append
    )
    names = {r["contestant"] for r in rows}
    assert {"one matmul X.W^T", "three matmuls", "fastxent fwd+bwd", "fastxent fwd"} <= names
    assert names <= set(bench_linear.NAMES)
    assert all(r["median_s"] > 0 for r in rows)
    args = cli.build_parser().parse_args(["bench", "--linear"])
    assert args.linear is True
    assert cli.build_parser().parse_args(["bench"]).linear is None


def test_peak_rss_child():
    pytest.importorskip("torch")
    peak = bench_linear._peak_rss("fastxent fwd", (32, 4, 100), "float32", 1)
    assert peak is None or peak >= 0
