"""The differentiable references of fastxent.torch and fastxent.jax (torch.func transforms,
create_graph, JAX second derivatives and derivatives with respect to the weights): with
class targets and no label smoothing, the weight of a class no row targets has no say, even
an infinite or NaN one (PyTorch's F.cross_entropy: finite there). Regression: the soft target
took (eps / C) * w = 0 * inf = NaN on every row. The kernel's side is in test_options.py."""

from __future__ import annotations

import numpy as np
import pytest


def _weights(C, w1):
    w = np.linspace(0.5, 2.0, C)
    w[1] = w1
    return w


@pytest.mark.parametrize("w1", [np.inf, np.nan])
def test_torch_transforms(w1):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    import fastxent.torch as fxt

    z = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 3, -100])

    def run(w):
        f = lambda a: fxt.cross_entropy(a, y, weight=w)  # noqa: E731
        zz = z.clone().requires_grad_()
        (g,) = torch.autograd.grad(f(zz), zz, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), zz)
        return (
            g.detach(),
            gg,
            torch.func.vmap(f)(z[None]),
            torch.func.grad(f)(z),
        )

    finite = run(torch.tensor(_weights(6, 7.0)))
    bad = run(torch.tensor(_weights(6, w1)))
    for a, b in zip(finite, bad):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    ref = F.cross_entropy(z, y, weight=torch.tensor(_weights(6, 7.0)))
    torch.testing.assert_close(finite[2][0], ref)


@pytest.mark.parametrize("w1", [np.inf, np.nan])
def test_jax_second_order_and_weight_derivatives(w1):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import fastxent.jax as fxj

    z = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6)), jnp.float32)
    y = jnp.asarray([0, 2, 3, -100])

    def run(w):
        w = jnp.asarray(w, jnp.float32)
        f = lambda a: fxj.cross_entropy(a, y, weight=w)  # noqa: E731
        dw = jax.grad(lambda ww: fxj.cross_entropy(z, y, weight=ww))(w)
        return jax.grad(f)(z), jax.hessian(f)(z), dw[np.r_[0, 2:6]]

    finite = run(_weights(6, 7.0))
    bad = run(_weights(6, w1))
    for a, b in zip(finite, bad):
        assert bool(jnp.isfinite(b).all())
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
