"""fastxent.torch inside a training loop: the reused gradient buffer (and that a gradient
somebody holds is never overwritten), 16-bit logits on the kernel's own 16-bit path, autocast,
the lean call path, torch.compile / FakeTensor / meta through the custom op, and PyTorch's
signatures and error messages."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastxent as fx  # noqa: E402
import fastxent.torch as fxt  # noqa: E402

# A gradient of at least 1 MiB is written into a kept buffer (smaller ones are allocated).
BIG = (64, 5000)  # 1.28 MB in float32


@pytest.fixture(autouse=True)
def _fresh_pool():
    fxt.release_buffers()
    yield
    fxt.release_buffers()


def _step(lin, h, y, **kw):
    """One training step's loss part: (loss, d loss / d logits) with the logits produced by
    a Linear head (a non-leaf, as in a model)."""
    logits = lin(h)
    loss = fxt.cross_entropy(logits, y, **kw)
    (g,) = torch.autograd.grad(loss, logits)
    return loss, g


def test_buffer_is_reused_once_free_and_never_while_held():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, BIG[1])
    y = torch.randint(0, BIG[1], (BIG[0],))
    loss, g = _step(lin, torch.randn(BIG[0], 8), y)
    ptr = g.data_ptr()
    assert fxt.kept_buffer_bytes() == BIG[0] * BIG[1] * 4
    del g
    # Free again: the next step writes into the same memory (no fresh pages).
    _, g2 = _step(lin, torch.randn(BIG[0], 8), y)
    assert g2.data_ptr() == ptr
    # Held: the next step must not touch it.
    held = g2.clone()
    _, g3 = _step(lin, torch.randn(BIG[0], 8), y)
    assert g3.data_ptr() != g2.data_ptr()
    assert torch.equal(g2, held)
    # A view keeps the whole buffer busy too.
    view = g3[3:5, 10:20]
    del g3
    _, g4 = _step(lin, torch.randn(BIG[0], 8), y)
    assert g4.data_ptr() != view.data_ptr() - (3 * BIG[1] + 10) * 4
    assert fxt.kept_buffer_bytes() <= 2 * BIG[0] * BIG[1] * 4  # at most two kept


def test_leaf_grad_and_unbackwarded_graph_keep_their_buffer():
    y = torch.randint(0, BIG[1], (BIG[0],))
    x1 = torch.randn(BIG, requires_grad=True)
    fxt.cross_entropy(x1, y).backward()
    keep = x1.grad.clone()
    x2 = torch.randn(BIG, requires_grad=True)
    fxt.cross_entropy(x2, y).backward()
    assert torch.equal(x1.grad, keep)
    assert x1.grad.data_ptr() != x2.grad.data_ptr()
    # A loss whose graph is alive (backward not yet run) holds its gradient.
    x3 = torch.randn(BIG, requires_grad=True)
    pending = fxt.cross_entropy(x3, y)
    x4 = torch.randn(BIG, requires_grad=True)
    fxt.cross_entropy(x4, y).backward()
    pending.backward()
    ref = x3.detach().clone().requires_grad_(True)
    F.cross_entropy(ref, y).backward()
    torch.testing.assert_close(x3.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_release_buffers():
    y = torch.randint(0, BIG[1], (BIG[0],))
    x = torch.randn(BIG, requires_grad=True)
    fxt.cross_entropy(x, y, label_smoothing=0.1).backward()
    assert fxt.kept_buffer_bytes() > 0
    assert fxt.release_buffers() == BIG[0] * BIG[1] * 4
    assert fxt.kept_buffer_bytes() == 0
    torch.testing.assert_close(
        x.grad,
        torch.autograd.grad(F.cross_entropy(x, y, label_smoothing=0.1), x)[0],
        rtol=1e-5,
        atol=1e-7,
    )


def test_small_gradients_are_not_kept():
    x = torch.randn(32, 10, requires_grad=True)
    fxt.cross_entropy(x, torch.randint(0, 10, (32,))).backward()
    assert fxt.kept_buffer_bytes() == 0


def test_threads_sharing_the_pool_get_their_own_buffers():
    torch.manual_seed(1)
    y = torch.randint(0, BIG[1], (BIG[0],))
    xs = [torch.randn(BIG) for _ in range(4)]
    refs = [torch.autograd.grad(F.cross_entropy(x.requires_grad_(True), y), x)[0] for x in xs]
    errors = []

    def work(i):
        try:
            for _ in range(5):
                x = xs[i].detach().requires_grad_(True)
                (g,) = torch.autograd.grad(fxt.cross_entropy(x, y), x)
                torch.testing.assert_close(g, refs[i], rtol=1e-5, atol=1e-7)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(6, 11), BIG, (3, 7, 4)])
def test_half_logits_take_the_16_bit_kernel(dtype, shape):
    pytest.importorskip("ml_dtypes")
    torch.manual_seed(2)
    x = (torch.randn(shape) * 3).to(dtype).requires_grad_(True)
    rows = (shape[0],) + tuple(shape[2:])
    y = torch.randint(0, shape[1], rows)
    loss = fxt.cross_entropy(x, y, label_smoothing=0.1)
    loss.backward()
    assert loss.dtype == dtype and x.grad.dtype == dtype
    # Bit for bit the kernel's 16-bit path on the same memory (fastxent's NumPy API on the
    # ml_dtypes / float16 view), not a float32 round trip.
    import ml_dtypes

    xn = (
        x.detach()
        .view(torch.int16)
        .numpy()
        .view(ml_dtypes.bfloat16 if dtype == torch.bfloat16 else np.float16)
    )
    ref_loss, ref_g = fx.cross_entropy_with_grad(
        xn, y.numpy(), axis=1 if len(shape) > 2 else -1, label_smoothing=0.1
    )
    g_bits = x.grad.view(torch.int16).numpy()
    assert np.array_equal(g_bits, ref_g.view(np.int16))
    assert float(loss.detach()) == float(torch.tensor(float(ref_loss)).to(dtype))
    # And close to PyTorch in float32.
    xr = x.detach().float().requires_grad_(True)
    F.cross_entropy(xr, y, label_smoothing=0.1).backward()
    torch.testing.assert_close(x.grad.float(), xr.grad, rtol=1e-2, atol=1e-2 / shape[1])


def test_autocast_gives_a_float32_loss_as_pytorch():
    torch.manual_seed(3)
    lin = torch.nn.Linear(16, 50)
    h = torch.randn(8, 16)
    y = torch.randint(0, 50, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(h)
        assert logits.dtype == torch.bfloat16
        loss = fxt.cross_entropy(logits, y)
        ref = F.cross_entropy(logits, y)
    assert loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(loss, logits)
    (gr,) = torch.autograd.grad(ref, logits)
    assert g.dtype == gr.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), gr.float(), rtol=1e-2, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert fxt.cross_entropy(lin(h), y).dtype == torch.float32


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_path_is_the_general_path_bit_for_bit(reduction, dtype):
    torch.manual_seed(4)
    x = torch.randn(40, 13, dtype=dtype)
    y = torch.randint(0, 13, (40,))
    y[3] = -100
    a = x.clone().requires_grad_(True)
    la = fxt.cross_entropy(a, y, reduction=reduction)  # lean
    la.sum().backward()
    b = x.clone().requires_grad_(True)
    lb = fxt.cross_entropy(b, y, reduction=reduction, num_threads=1)  # general path
    lb.sum().backward()
    assert torch.equal(la, lb) and torch.equal(a.grad, b.grad)
    with torch.no_grad():
        assert torch.equal(fxt.cross_entropy(x, y, reduction=reduction), lb.detach())
    # A bad label leaves the lean path for the general one, which names the row.
    with pytest.raises(IndexError, match=r"target\[1\] = 13"):
        fxt.cross_entropy(x.requires_grad_(True), torch.tensor([0, 13] + [0] * 38))


# Inductor's own imports call torch.jit.script(_method), deprecated in torch 2.13: a warning
# from PyTorch's internals, an error under this suite's filterwarnings.
@pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")
def test_compile_fullgraph_without_graph_breaks_and_matching():
    torch.manual_seed(5)
    lin = torch.nn.Linear(8, 11)
    h = torch.randn(6, 8)
    y = torch.randint(0, 11, (6,))

    def f(h, y):
        return fxt.cross_entropy(lin(h), y, label_smoothing=0.1, z_loss=1e-3)

    import torch._dynamo as dynamo

    dynamo.reset()
    explain = dynamo.explain(f)(h, y)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(h, y)
    loss.backward()
    gw = lin.weight.grad.clone()
    lin.zero_grad()
    ref = f(h, y)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gw, lin.weight.grad, rtol=1e-5, atol=1e-7)
    # The (N, C, d) layout with reduction="none".
    x3 = torch.randn(2, 5, 3, requires_grad=True)
    y3 = torch.randint(0, 5, (2, 3))
    c3 = torch.compile(lambda a, b: fxt.cross_entropy(a, b, reduction="none"), fullgraph=True)
    out = c3(x3, y3)
    (g,) = torch.autograd.grad(out.sum(), x3)
    (gr,) = torch.autograd.grad(F.cross_entropy(x3, y3, reduction="none").sum(), x3)
    torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-7)


def test_fake_and_meta_tensors_get_shape_inference():
    m = torch.empty(4, 7, 3, device="meta", requires_grad=True)
    t = torch.empty(4, 3, dtype=torch.long, device="meta")
    out = fxt.cross_entropy(m, t, reduction="none")
    assert out.shape == (4, 3) and out.device.type == "meta"
    assert fxt.cross_entropy(m, t).shape == ()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.randn(3, 5)
        b = torch.zeros(3, dtype=torch.long)
        assert fxt.cross_entropy(a, b, reduction="none", label_smoothing=0.1).shape == (3,)
        with pytest.raises(ValueError, match="target has shape"):
            fxt.cross_entropy(a, torch.zeros(2, dtype=torch.long))


def test_errors_name_the_users_shapes_and_axes():
    with pytest.raises(
        ValueError,
        match=r"expected \(2, 11\) \(the logits' shape without "
        r"the class axis 1\)",
    ):
        fxt.cross_entropy(torch.randn(2, 7, 11), torch.zeros(2, 11, dtype=torch.long)[:, :3])
    with pytest.raises(ValueError, match=r"expected \(2, 11\).*class axis 1"):
        fxt.cross_entropy(torch.randn(2, 7, 11), torch.zeros(2, 7, dtype=torch.long))


def test_module_checks_its_options_at_construction():
    with pytest.raises(TypeError, match="CrossEntropyLoss.*'zloss'"):
        fxt.CrossEntropyLoss(zloss=1e-4)
    with pytest.raises(ValueError, match="z_loss"):
        fxt.CrossEntropyLoss(z_loss=-1.0)
    with pytest.raises(ValueError, match="softcap"):
        fxt.CrossEntropyLoss(softcap=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        fxt.CrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction"):
        fxt.CrossEntropyLoss(reduction="avg")
    with pytest.raises(TypeError, match="ignore_index"):
        fxt.CrossEntropyLoss(ignore_index="x")
    with pytest.raises(ValueError, match="num_threads"):
        fxt.CrossEntropyLoss(num_threads=0)


def test_pytorch_positional_signature_and_legacy_arguments():
    x = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 1])
    w = torch.rand(4) + 0.5
    # F.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
    # label_smoothing), positionally.
    got = fxt.cross_entropy(x, y, w, None, 1, None, "sum", 0.1)
    ref = F.cross_entropy(x, y, w, None, 1, None, "sum", 0.1)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for sa, rd in ((False, None), (None, False), (True, True)):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            got = fxt.cross_entropy(x, y, None, sa, -100, rd)
            ref = F.cross_entropy(x, y, None, sa, -100, rd)
        assert any("size_average and reduce args will be deprecated" in str(r.message) for r in rec)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        m = fxt.CrossEntropyLoss(None, None, -100, False)
    assert m.reduction == "none"
    m = fxt.CrossEntropyLoss(w, None, 2, None, "sum", 0.2, z_loss=1e-3)
    torch.testing.assert_close(
        m(x, y),
        fxt.cross_entropy(
            x, y, w, ignore_index=2, reduction="sum", label_smoothing=0.2, z_loss=1e-3
        ),
    )
