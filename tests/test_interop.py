"""Zero-copy inputs from other libraries: PyTorch CPU tensors (incl. requires_grad and
bfloat16 ones) and JAX CPU arrays through DLPack, and buffer-protocol objects (array.array,
memoryview). Every public function accepts them and returns NumPy; out= may be a writable
DLPack array (the gradient lands in its memory); a read-only one is a ValueError; an array on
another device is a TypeError naming the CPU.

Results are compared BITWISE with the same call on NumPy arrays holding the same values: the
kernel sees the same bytes, so anything else is a conversion bug."""

from __future__ import annotations

import array

import numpy as np
import pytest

import fastxent as fx
from fastxent import _api
from reference import assert_bitwise_equal, make_logits, make_target, make_weight

ml_dtypes = pytest.importorskip("ml_dtypes")

REDUCTIONS = ("none", "sum", "mean")
FUNCS = (
    "cross_entropy",
    "cross_entropy_with_grad",
    "softmax",
    "log_softmax",
    "logsumexp",
    "softmax_backward",
    "softmax_jacobian",
)


def call(name, x, extra=None, **kw):
    """Calls public function `name` with logits-like x (and the other operands of `extra`,
    a dict: target / grad) and returns its results as a tuple."""
    f = getattr(fx, name)
    extra = extra or {}
    if name in ("cross_entropy", "cross_entropy_with_grad"):
        res = f(x, extra["target"], **kw)
    elif name == "softmax_backward":
        res = f(x, extra["grad"], **kw)
    else:
        res = f(x, **kw)
    return res if isinstance(res, tuple) else (res,)


def assert_numpy_results(res):
    for r in res:
        assert isinstance(r, (np.ndarray, np.generic)), type(r)


# --------------------------------------------------------------------------------------
# PyTorch


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("tdtype", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "requires_grad"])
def test_torch_tensors(torch, name, tdtype, requires_grad):
    rng = np.random.default_rng(0)
    ndt = {"bfloat16": ml_dtypes.bfloat16}.get(tdtype, np.dtype(tdtype))
    x_np = make_logits(rng, (6, 5), 2.0, ndt)
    # PyTorch tensors holding exactly the same bits.
    t_dtype = getattr(torch, tdtype)
    x_t = (
        torch.from_numpy(x_np.view(np.int16)).view(t_dtype)
        if tdtype == "bfloat16"
        else torch.from_numpy(x_np.copy())
    )
    if requires_grad:
        x_t.requires_grad_(True)
    y_np = make_target(rng, (6,), 5)
    g_np = make_logits(rng, (6, 5), 1.0, ndt)
    g_t = (
        torch.from_numpy(g_np.view(np.int16)).view(t_dtype)
        if tdtype == "bfloat16"
        else torch.from_numpy(g_np.copy())
    )
    extra_np = dict(target=y_np, grad=g_np)
    extra_t = dict(target=torch.from_numpy(y_np.copy()), grad=g_t)
    want = call(name, x_np, extra_np)
    got = call(name, x_t, extra_t)
    assert_numpy_results(got)
    for a, b in zip(got, want):
        assert_bitwise_equal(a, b, f"{name} {tdtype}")
    # The logits were read in place: fastxent's view is the tensor's memory.
    view = _api._to_numpy(x_t, "logits")
    assert view.ctypes.data == x_t.data_ptr()


def test_torch_options_as_tensors(torch):
    """target, weight, sample_weight and probability targets as tensors (weights with
    requires_grad too): the bits of the NumPy call."""
    rng = np.random.default_rng(1)
    z = make_logits(rng, (8, 6), 2.0, np.float32)
    y = make_target(rng, (8,), 6, ignore_frac=0.2)
    w = make_weight(rng, 6, np.float32)
    sw = rng.uniform(0, 2, 8).astype(np.float32)
    p = rng.random((8, 6)).astype(np.float32)
    kw = dict(z_loss=1e-3, softcap=5.0, logit_scale=1.2, label_smoothing=0.1)
    for red in REDUCTIONS:
        for tgt_np in (y, p):
            want = fx.cross_entropy_with_grad(
                z, tgt_np, reduction=red, weight=w, sample_weight=sw, **kw
            )
            got = fx.cross_entropy_with_grad(
                torch.from_numpy(z.copy()).requires_grad_(True),
                torch.from_numpy(tgt_np.copy()),
                reduction=red,
                weight=torch.from_numpy(w.copy()).requires_grad_(True),
                sample_weight=torch.from_numpy(sw.copy()),
                **kw,
            )
            assert_numpy_results(got)
            assert_bitwise_equal(got[0], want[0], f"{red} loss")
            assert_bitwise_equal(got[1], want[1], f"{red} grad")


def test_torch_non_contiguous_and_class_dim_1(torch):
    rng = np.random.default_rng(2)
    base = torch.from_numpy(make_logits(rng, (7, 12), 2.0, np.float64))
    view = base[:, 2:9]  # row stride > C
    y = torch.from_numpy(make_target(rng, (7,), 7))
    for a, b in zip(
        fx.cross_entropy_with_grad(view, y),
        fx.cross_entropy_with_grad(np.ascontiguousarray(view.numpy()), y.numpy()),
    ):
        assert_bitwise_equal(a, b, "sliced tensor")
    t = base.t()  # transposed
    assert_bitwise_equal(
        fx.softmax(t, axis=0), fx.softmax(np.ascontiguousarray(t.numpy()), 0), "transposed tensor"
    )
    z4 = torch.from_numpy(make_logits(rng, (3, 5, 4, 2), 1.0, np.float32))
    y4 = torch.from_numpy(make_target(rng, (3, 4, 2), 5))
    for a, b in zip(
        fx.cross_entropy_with_grad(z4, y4, axis=1, reduction="none"),
        fx.cross_entropy_with_grad(z4.numpy(), y4.numpy(), axis=1, reduction="none"),
    ):
        assert_bitwise_equal(a, b, "(N, C, d1, d2) tensor")


@pytest.mark.parametrize("tdtype", ["float32", "float64", "bfloat16", "float16"])
def test_torch_out_writes_through(torch, tdtype):
    """out= a tensor: the gradient is written into the tensor's memory (and the returned
    array is a view of it); out=the logits tensor is the in-place mode."""
    rng = np.random.default_rng(3)
    t_dtype = getattr(torch, tdtype)
    z = torch.from_numpy(make_logits(rng, (9, 7), 2.0, np.float32)).to(t_dtype)
    y = torch.from_numpy(make_target(rng, (9,), 7))
    for red in REDUCTIONS:
        loss, g = fx.cross_entropy_with_grad(z, y, reduction=red, softcap=4.0, z_loss=1e-3)
        out = torch.full((9, 7), 7.0, dtype=t_dtype)
        l2, g2 = fx.cross_entropy_with_grad(z, y, reduction=red, out=out, softcap=4.0, z_loss=1e-3)
        assert isinstance(g2, np.ndarray) and g2.ctypes.data == out.data_ptr()
        out_np = _api._to_numpy(out, "out")  # the tensor's bits, whatever its dtype
        assert_bitwise_equal(out_np, g, f"{tdtype} {red} out tensor")
        assert_bitwise_equal(l2, loss, f"{tdtype} {red} loss")
        zi = z.clone()
        l3, _ = fx.cross_entropy_with_grad(zi, y, reduction=red, out=zi, softcap=4.0, z_loss=1e-3)
        assert_bitwise_equal(_api._to_numpy(zi, "out"), g, f"{tdtype} {red} in place tensor")
        assert_bitwise_equal(l3, loss, f"{tdtype} {red} in place loss")


def test_torch_out_with_numpy_logits(torch):
    z = make_logits(np.random.default_rng(4), (5, 4), 1.0, np.float64)
    y = np.array([0, 1, 2, 3, 0])
    out = torch.zeros(5, 4, dtype=torch.float64)
    _, g = fx.cross_entropy_with_grad(z, y, out=out)
    np.testing.assert_array_equal(out.numpy(), fx.cross_entropy_with_grad(z, y)[1])
    with pytest.raises(ValueError, match="dtype"):
        fx.cross_entropy_with_grad(z, y, out=torch.zeros(5, 4, dtype=torch.float32))
    with pytest.raises(ValueError, match="shape"):
        fx.cross_entropy_with_grad(z, y, out=torch.zeros(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        fx.cross_entropy_with_grad(z, y, out=torch.zeros(4, 5, dtype=torch.float64).t())


def test_torch_negative_view_is_read_with_its_sign(torch):
    """A tensor with PyTorch's lazy negation bit (e.g. the imaginary part of a conjugate)
    means -memory: fastxent must see the negated values (as fastxent.torch does with
    resolve_neg), not the raw memory."""
    c = torch.randn(3, 4, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    x = c.conj().imag  # real float32, is_neg() is True
    assert x.is_neg()
    want = x.resolve_neg().contiguous().numpy()
    assert_bitwise_equal(fx.logsumexp(x), fx.logsumexp(want), "logsumexp of a neg view")
    assert_bitwise_equal(
        fx.cross_entropy(x, np.array([0, 1, 2])),
        fx.cross_entropy(want, np.array([0, 1, 2])),
        "loss of a neg view",
    )


# --------------------------------------------------------------------------------------
# JAX


@pytest.fixture
def jnp():
    pytest.importorskip("jax")
    import jax.numpy as jnp

    return jnp


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("jdtype", ["float32", "float16"])
def test_jax_arrays(jnp, name, jdtype):
    rng = np.random.default_rng(5)
    x_np = make_logits(rng, (6, 5), 2.0, np.dtype(jdtype))
    g_np = make_logits(rng, (6, 5), 1.0, np.dtype(jdtype))
    y_np = make_target(rng, (6,), 5)
    x_j = jnp.asarray(x_np)
    want = call(name, x_np, dict(target=y_np, grad=g_np))
    got = call(name, x_j, dict(target=jnp.asarray(y_np), grad=jnp.asarray(g_np)))
    assert_numpy_results(got)
    for a, b in zip(got, want):
        assert_bitwise_equal(a, b, f"{name} {jdtype}")
    assert _api._to_numpy(x_j, "logits").ctypes.data == x_j.unsafe_buffer_pointer()


def test_jax_bfloat16_arrays(jnp):
    """JAX's own 16-bit type (its arrays' dtype is ml_dtypes.bfloat16), for every public
    function (one test: one conversion path)."""
    rng = np.random.default_rng(6)
    x_np = make_logits(rng, (6, 5), 2.0, ml_dtypes.bfloat16)
    g_np = make_logits(rng, (6, 5), 1.0, ml_dtypes.bfloat16)
    y_np = make_target(rng, (6,), 5)
    failures = []
    for name in FUNCS:
        want = call(name, x_np, dict(target=y_np, grad=g_np))
        try:
            got = call(
                name, jnp.asarray(x_np), dict(target=jnp.asarray(y_np), grad=jnp.asarray(g_np))
            )
        except Exception as e:  # noqa: BLE001 - collected and reported below
            failures.append(f"{name}: {type(e).__name__}: {e}")
            continue
        for a, b in zip(got, want):
            assert_bitwise_equal(a, b, f"{name} bfloat16")
    assert not failures, "; ".join(failures)


def test_jax_options_and_probability_targets(jnp):
    rng = np.random.default_rng(7)
    z = make_logits(rng, (4, 3, 6), 2.0, np.float32)
    p = rng.random((4, 3, 6)).astype(np.float32)
    w = make_weight(rng, 3, np.float32)
    sw = rng.uniform(0, 2, (4, 6)).astype(np.float32)
    kw = dict(axis=1, z_loss=1e-3, softcap=5.0, label_smoothing=0.1)
    for red in REDUCTIONS:
        want = fx.cross_entropy_with_grad(z, p, reduction=red, weight=w, sample_weight=sw, **kw)
        got = fx.cross_entropy_with_grad(
            jnp.asarray(z),
            jnp.asarray(p),
            reduction=red,
            weight=jnp.asarray(w),
            sample_weight=jnp.asarray(sw),
            **kw,
        )
        assert_bitwise_equal(got[0], want[0], red)
        assert_bitwise_equal(got[1], want[1], red)


def test_jax_out_is_read_only(jnp):
    """JAX arrays are immutable: as out= (or in place) a ValueError, nothing written."""
    z_np = make_logits(np.random.default_rng(8), (5, 4), 1.0, np.float32)
    y = np.array([0, 1, 2, 3, 0])
    z = jnp.asarray(z_np)
    out = jnp.zeros((5, 4), jnp.float32)
    with pytest.raises(ValueError, match="read-only"):
        fx.cross_entropy_with_grad(z_np, y, out=out)
    assert np.all(np.asarray(out) == 0.0)
    with pytest.raises(ValueError, match="read-only"):
        fx.cross_entropy_with_grad(z, y, out=z)
    np.testing.assert_array_equal(np.asarray(z), z_np)


# --------------------------------------------------------------------------------------
# other devices, buffer protocol


class FakeCudaArray:
    """A DLPack exporter that says it lives on a CUDA device (kDLCUDA = 2)."""

    shape = (4, 3)
    dtype = np.dtype(np.float32)

    def __dlpack__(self, *args, **kwargs):
        raise AssertionError("fastxent must check the device before asking for the data")

    def __dlpack_device__(self):
        return (2, 0)


@pytest.mark.parametrize("name", FUNCS)
def test_non_cpu_array_is_a_type_error_naming_the_cpu(name):
    fake = FakeCudaArray()
    y = np.array([0, 1, 2, 0])
    with pytest.raises(TypeError, match="CPU"):
        call(name, fake, dict(target=y, grad=np.zeros((4, 3), np.float32)))
    if name in ("cross_entropy", "cross_entropy_with_grad"):
        z = np.zeros((4, 3), np.float32)
        for kw in (dict(weight=fake), dict(sample_weight=fake)):
            with pytest.raises(TypeError, match="CPU"):
                getattr(fx, name)(z, y, **kw)
        with pytest.raises(TypeError, match="CPU"):
            getattr(fx, name)(z, fake)
    if name == "cross_entropy_with_grad":
        z = np.zeros((4, 3), np.float32)
        with pytest.raises(TypeError, match="CPU"):
            fx.cross_entropy_with_grad(z, y, out=fake)
        assert np.all(z == 0)
    if name == "softmax_backward":
        with pytest.raises(TypeError, match="CPU"):
            fx.softmax_backward(np.zeros((4, 3), np.float32), fake)


def test_buffer_protocol_objects():
    """array.array and memoryview (of any shape) as logits, targets, grads and weights: the
    bits of the same values as NumPy arrays."""
    x = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
    a1 = array.array("d", x.reshape(-1))
    mv = memoryview(x)
    y = np.array([2, 0])
    for name in FUNCS:
        want = call(name, x, dict(target=y, grad=x))
        got = call(name, mv, dict(target=memoryview(y), grad=memoryview(x)))
        assert_numpy_results(got)
        for a, b in zip(got, want):
            assert_bitwise_equal(a, b, f"{name} memoryview")
        want1 = call(name, x.reshape(-1), dict(target=np.int64(2), grad=x.reshape(-1)))
        got1 = call(name, a1, dict(target=2, grad=array.array("d", x.reshape(-1))))
        for a, b in zip(got1, want1):
            assert_bitwise_equal(a, b, f"{name} array.array")
    f32 = array.array("f", [1.0, 2.0, 3.0])
    assert fx.softmax(f32).dtype == np.float32
    loss = fx.cross_entropy(
        x,
        array.array("q", [2, 0]),
        weight=array.array("d", [1, 2, 3]),
        sample_weight=array.array("f", [0.5, 1.0]),
    )
    assert loss == fx.cross_entropy(
        x, y, weight=np.array([1.0, 2.0, 3.0]), sample_weight=np.array([0.5, 1.0])
    )
    # A writable memoryview is still not an out= (not an ndarray, no DLPack): TypeError.
    with pytest.raises(TypeError):
        fx.cross_entropy_with_grad(x, y, out=memoryview(np.zeros_like(x)))
    # Nested lists are array-likes too.
    assert_bitwise_equal(fx.logsumexp(x.tolist()), fx.logsumexp(x), "nested list")


def test_sigmoid_out_may_be_a_torch_tensor():
    """sigmoid_cross_entropy_with_grad shares out= handling with the softmax loss: a writable
    PyTorch tensor receives the gradient in its own memory."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    y = (x > 0).astype(np.float32)
    out = torch.zeros(4, 3)
    _, g = fx.sigmoid_cross_entropy_with_grad(x, y, out=out)
    want = fx.sigmoid_cross_entropy_with_grad(x, y)[1]
    np.testing.assert_array_equal(out.numpy(), want)
    assert np.shares_memory(g, out.numpy())
