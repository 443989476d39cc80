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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--linear", "--linear-dtypes", "float8"], "--linear-dtypes: expected some of"),
        (["--linear", "--linear-dtypes", ","], "--linear-dtypes: expected some of"),
        (["--linear", "--linear-shapes", "4096x32000"], "bad linear shape"),
        (["--linear-shapes", "8x2x3"], "need --linear"),
        (["--linear-plot", "x.png"], "need --linear"),
    ],
)
def test_linear_flags_refused(argv, message, capsys):
    assert cli.main(["bench", "--quick", "--peers", "", *argv]) == 2
    assert message in capsys.readouterr().err


def test_linear_section_from_the_command_line_with_its_plot(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    png = tmp_path / "linear.png"
    argv = ["bench", "--shapes", "8x10", "--threads", "1", "--repeats", "1", "--peers", "torch"]
    argv += ["--linear", "--linear-shapes", "40x8x300,24x4x130", "--linear-dtypes", "float32"]
    assert cli.main([*argv, "--linear-plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "N=40 H=8 V=300 float32" in out and "N=24 H=4 V=130 float32" in out
    assert "bfloat16" not in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_linear_refuses_no_rows(tmp_path):
    with pytest.raises(RuntimeError, match="no linear results"):
        bench_linear.plot_linear([], str(tmp_path / "x.png"))


def test_default_tile_rows():
    from fastxent._linear_plan import tile_rows

    # a multiple of 32 rows (the byte budget's 682 at 4096 x 32000 bfloat16 was a slow GEMM)
    assert tile_rows(4096, 32000, 2) == 672
    assert tile_rows(4096, 32000, 4) == 512
    # long rows: past 64 MiB towards 512 rows, within 1/6 of the logits
    assert tile_rows(2048, 128256, 4) == 320
    assert tile_rows(8192, 256000, 4) == 512
    for n, v, size in [(2048, 128256, 4), (2048, 128256, 2), (700, 900000, 4)]:
        t = tile_rows(n, v, size)
        assert t % 32 == 0 and t * v * size <= n * v * size // 6
    # small inputs: at least 16 rows, at most n
    assert tile_rows(100, 50, 4) == 16 and tile_rows(10, 50, 4) == 10
    # a forward pass alone: within 2/9 of the logits (448 rows there instead of 320); shapes
    # whose 64 MiB tile holds 512 rows or more are unchanged
    assert tile_rows(2048, 128256, 4, forward_only=True) == 448
    for n, v, size in [(2048, 128256, 4), (2048, 128256, 2), (700, 900000, 4)]:
        t = tile_rows(n, v, size, forward_only=True)
        assert t % 32 == 0 and t >= tile_rows(n, v, size)
        assert t * v * size <= n * v * size * 2 // 9
    assert tile_rows(4096, 32000, 4, forward_only=True) == tile_rows(4096, 32000, 4) == 512
    # float32 / float64 inputs with gradients (the gradient tile is the logits tile): 2/9 too
    assert tile_rows(2048, 128256, 4, one_tile=True) == 448
    assert tile_rows(4096, 32000, 4, one_tile=True) == 512
    assert tile_rows(4096, 32000, 4, 100, forward_only=True) == 100


def test_forward_only_calls_plan_the_forward_tile(monkeypatch):
    # The loss alone (NumPy's linear_cross_entropy, PyTorch's without a gradient) plans its
    # tile as a forward pass; the calls with gradients do not, and float32 / float64 inputs
    # (here) plan one tile (the gradient tile is the logits tile), bfloat16 inputs do not.
    import numpy as np

    import fastxent as fx
    from fastxent import _linear_plan

    seen, ones = [], []
    real = _linear_plan.tile_rows

    def spy(n, v, itemsize, tile=None, forward_only=False, one_tile=False):
        seen.append(forward_only)
        ones.append(one_tile)
        return real(n, v, itemsize, tile, forward_only, one_tile)

    monkeypatch.setattr(_linear_plan, "tile_rows", spy)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    w = rng.standard_normal((30, 8)).astype(np.float32)
    y = rng.integers(0, 30, 40)
    loss = fx.linear_cross_entropy(x, w, y)
    loss2 = fx.linear_cross_entropy_with_grad(x, w, y)[0]
    assert seen == [True, False] and loss == loss2 and ones == [True, True]
    import ml_dtypes

    ones.clear()
    fx.linear_cross_entropy_with_grad(x.astype(ml_dtypes.bfloat16), w.astype(ml_dtypes.bfloat16), y)
    assert ones == [False]
    torch = pytest.importorskip("torch")
    from fastxent import torch as fxt

    seen.clear()
    xt, wt, yt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(y)
    with torch.no_grad():
        a = fxt.linear_cross_entropy(xt, wt, yt)
    b = fxt.linear_cross_entropy(xt, wt.clone().requires_grad_(), yt)
    assert seen == [True, False] and float(a) == float(b.detach())
