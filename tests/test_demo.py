"""``python -m fastxent demo``: NumPy models on sklearn's digits trained from fastxent's
gradient."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import fastxent as fx
from fastxent import demo
from fastxent.__main__ import main


def _need_demo_deps():
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")


def test_numpy_loss_grad_matches_fused():
    rng = np.random.default_rng(0)
    z = (3 * rng.standard_normal((64, 10))).astype(np.float32)
    t = rng.integers(0, 10, 64)
    loss, grad = fx.cross_entropy_with_grad(z, t)
    np_loss, np_grad = demo.numpy_loss_grad(z, t)
    assert np_grad.dtype == grad.dtype == np.float32
    np.testing.assert_allclose(loss, np_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, np_grad, rtol=1e-4, atol=1e-7)


def test_net_backward_is_the_gradient():
    """Net.backward against a finite difference of fastxent's loss (float64)."""
    rng = np.random.default_rng(1)
    net = demo.Net((5, 7, 3), rng)
    net.params = [p.astype(np.float64) for p in net.params]
    x, t = rng.standard_normal((4, 5)), rng.integers(0, 3, 4)
    grads = net.backward(fx.cross_entropy_with_grad(net.forward(x), t)[1])
    for p, g in zip(net.params, grads):
        i = np.unravel_index(np.argmax(np.abs(g)), g.shape)
        old, h = p[i], 1e-6
        p[i] = old + h
        up = fx.cross_entropy(net.forward(x), t)
        p[i] = old - h
        down = fx.cross_entropy(net.forward(x), t)
        p[i] = old
        assert abs((up - down) / (2 * h) - g[i]) < 1e-6


def test_run_demo_learns_and_agrees():
    _need_demo_deps()
    res = demo.run_demo(epochs=5, seed=0, progress=False)
    assert list(res.history) == list(demo.MODELS)
    for h in res.history.values():
        assert len(h.train_loss) == len(h.test_acc) == 5
        assert h.test_acc[-1] > 0.9
        assert h.train_loss[-1] < h.train_loss[0]
    assert res.agree and res.max_grad_diff < 1e-6 and res.max_loss_diff < 1e-5
    assert res.steps == 2 * 5 * -(-res.n_train // res.batch_size)
    assert res.fused_s > 0 and res.numpy_s > 0
    again = demo.run_demo(epochs=5, seed=0, progress=False)
    assert again.history == res.history  # deterministic given the seed


def test_progress_bar(capsys):
    _need_demo_deps()
    demo.run_demo(epochs=1, progress=True)
    err = capsys.readouterr().err
    assert all(name in err for name in demo.MODELS)


def test_cli_subprocess():
    _need_demo_deps()
    env = dict(os.environ, PYTHONWARNINGS="error")
    p = subprocess.run(
        [sys.executable, "-m", "fastxent", "demo", "--epochs", "1", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    assert "test accuracy" in p.stdout and "fastxent fused" in p.stdout
    assert ": agree" in p.stdout


def test_plot(tmp_path, capsys):
    _need_demo_deps()
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    assert main(["demo", "--epochs", "2", "--quiet", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot saved to {path}" in capsys.readouterr().out


@pytest.mark.parametrize("missing", ["sklearn.datasets", "tqdm"])
def test_missing_extra(monkeypatch, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes the import fail
    assert main(["demo", "--quiet"]) == 2
    assert 'pip install "fastxent[demo]"' in capsys.readouterr().err


def test_bad_epochs(capsys):
    assert main(["demo", "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
