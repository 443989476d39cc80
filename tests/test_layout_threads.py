"""Memory layout, output buffers and threads: everything here must be BIT-IDENTICAL.

- strided / sliced / Fortran / broadcast / multi-dim logits give exactly the bits of their
  C-contiguous copy (loss and gradient);
- every integer dtype and layout of the target gives exactly the bits of int64 targets;
- out= and the in-place mode (out=logits) give exactly the bits of the out-of-place call;
- every num_threads (1, 2, 3, 4, 7, None) gives exactly the same bits, on shapes big enough
  for the kernel to go parallel (it runs serially below 32768 logits), including few-row
  shapes (rows < threads) with C above the kernel's block length (4096 float32, 2048 float64).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastxent as fx
from reference import assert_bitwise_equal, block_classes, make_logits, make_target, make_weight

REDUCTIONS = ("none", "sum", "mean")
DTYPES = (np.float32, np.float64)


def run_all(z, y, **kw):
    """{(what, reduction): result} for the loss-only and the with-grad entry points."""
    res = {}
    for red in REDUCTIONS:
        res[("loss-only", red)] = fx.cross_entropy(z, y, reduction=red, **kw)
        loss, grad = fx.cross_entropy_with_grad(z, y, reduction=red, **kw)
        assert grad.flags.c_contiguous and grad.shape == np.shape(z)
        res[("loss", red)] = loss
        res[("grad", red)] = grad
    return res


def assert_same_results(a, b, what):
    assert a.keys() == b.keys()
    for k in a:
        assert_bitwise_equal(a[k], b[k], f"{what}: {k}")


def _options(rng, C, dtype, N):
    """Weights + smoothing + some ignored rows: every code path of a row at once."""
    y = make_target(rng, (N,), C, ignore_frac=0.1)
    return y, dict(weight=make_weight(rng, C, dtype), label_smoothing=0.1)


# --------------------------------------------------------------------------------------
# logits layouts


def _layouts(rng, dtype):
    """(name, logits, target-shape-builder) triples of non-contiguous logits."""
    out = []
    wide = make_logits(rng, (64, 1200), 2.0, dtype)
    out.append(("cols-slice", wide[:, :500]))  # row stride > C, parallel-size
    out.append(("cols-offset", wide[:, 3:1003]))  # start not vector-aligned
    out.append(("cols-step", wide[:, ::2]))  # class axis strided
    out.append(("cols-reversed", wide[:, ::-1]))  # negative class stride
    out.append(("rows-step", wide[::2]))
    out.append(("rows-reversed", wide[::-1]))
    out.append(("fortran", np.asfortranarray(wide[:, :700])))
    out.append(("single-col", wide[:, 5:6]))  # C = 1, strided
    B = block_classes(dtype)
    many = make_logits(rng, (9, B + 900), 1.0, dtype)  # C > B: several blocks
    out.append(("multiblock-slice", many[:, 7 : B + 11]))
    out.append(("multiblock-rows-step", many[::2]))
    cube = make_logits(rng, (4, 10, 40), 1.0, dtype)
    out.append(("3d-contiguous", cube))
    out.append(("3d-mid-step", cube[:, ::3, :]))
    out.append(("3d-class-slice", cube[:, :, 5:22]))
    out.append(("3d-transposed", cube.transpose(1, 0, 2)))
    out.append(("3d-fortran", np.asfortranarray(cube)))
    out.append(("4d-sliced", make_logits(rng, (3, 4, 5, 30), 1.0, dtype)[1:, ::2, :, ::3]))
    out.append(("size1-axes", wide[:20, None, :33]))
    row = make_logits(rng, (1, 300), 1.0, dtype)
    out.append(("broadcast-rows", np.broadcast_to(row, (200, 300))))  # row stride 0
    out.append(("read-only", _read_only(wide[:30, :50])))
    return out


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts_bit_identical_to_contiguous_copy(isa, dtype, rng):
    for name, x in _layouts(rng, dtype):
        C = x.shape[-1]
        y = make_target(rng, x.shape[:-1], C, ignore_frac=0.1)
        kw = dict(weight=make_weight(rng, C, dtype), label_smoothing=0.1)
        before = x.copy()
        got = run_all(x, y, **kw)
        want = run_all(np.ascontiguousarray(x), y, **kw)
        assert_same_results(got, want, name)
        assert_bitwise_equal(x, before, f"{name}: the logits were modified")
        plain = run_all(x, y)
        assert_same_results(plain, run_all(np.ascontiguousarray(x), y), name + " (plain)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_dim_equals_flattened_rows(isa, dtype, rng):
    x = make_logits(rng, (6, 7, 8, 300), 1.0, dtype)
    y = make_target(rng, (6, 7, 8), 300, ignore_frac=0.1)
    flat = run_all(x.reshape(-1, 300), y.reshape(-1))
    got = run_all(x, y)
    for k, v in got.items():
        if k[0] == "grad":
            v = v.reshape(-1, 300)
        elif k[1] == "none":
            assert v.shape == (6, 7, 8)
            v = v.reshape(-1)
        assert_bitwise_equal(v, flat[k], str(k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset_bytes", [1, 2, 3])
def test_byte_misaligned_logits(isa, dtype, offset_bytes, rng):
    """Logits at an address that is not a multiple of the itemsize (NumPy allows it, e.g.
    from a buffer or a packed record): same bits as an aligned copy."""
    src = make_logits(rng, (40, 1001), 1.0, dtype)
    buf = np.zeros(src.nbytes + 16, np.uint8)
    buf[offset_bytes : offset_bytes + src.nbytes] = src.view(np.uint8).reshape(-1)
    x = buf[offset_bytes : offset_bytes + src.nbytes].view(dtype).reshape(src.shape)
    assert_bitwise_equal(x, src, "setup")
    assert not x.flags.aligned
    y = make_target(rng, (40,), 1001)
    assert_same_results(run_all(x, y), run_all(src, y), "misaligned")


# --------------------------------------------------------------------------------------
# targets

# Every integer type NumPy has, by type character: on Linux np.int64 is 'l' (C long) while
# np.longlong is 'q' -- the same 64 bits but a distinct dtype object -- and the byte-swapped
# forms are integer dtypes too.
INT_DTYPES = [np.dtype(c) for c in "bhilqBHILQ"] + [
    np.dtype(">i4"),
    np.dtype(">i8"),
    np.dtype(">u2"),
]


@pytest.mark.parametrize("tdtype", INT_DTYPES, ids=lambda d: f"{d.name}-{d.str}{d.char}")
def test_target_integer_dtypes(isa, tdtype, rng):
    C = 100  # fits every integer dtype
    z = make_logits(rng, (3000, C), 1.0, np.float32)
    y64 = make_target(rng, (3000,), C)
    signed = np.dtype(tdtype).kind == "i"
    # ignore_index must fit int64: for the unsigned types, their largest value up to 2**63 - 1.
    ignore = -100 if signed else min(int(np.iinfo(tdtype).max), 2**63 - 1)
    y64[::7] = ignore
    y = y64.astype(tdtype)
    assert np.array_equal(y.astype(object), y64.astype(object))
    kw = dict(ignore_index=ignore, weight=make_weight(rng, C, np.float32), label_smoothing=0.1)
    assert_same_results(run_all(z, y, **kw), run_all(z, y64, **kw), np.dtype(tdtype).name)
    # ignore_index naming a real class works with every dtype too.
    kw2 = dict(ignore_index=5)
    assert_same_results(
        run_all(z, np.where(y64 == ignore, 5, y64).astype(tdtype), **kw2),
        run_all(z, np.where(y64 == ignore, 5, y64), **kw2),
        "ignore 5",
    )


def test_target_layouts(isa, rng):
    z = make_logits(rng, (5, 6, 70), 1.0, np.float64)
    y = make_target(rng, (5, 6), 70)
    want = run_all(z, y)
    variants = {
        "fortran": np.asfortranarray(y),
        "strided": np.repeat(y, 2, axis=1)[:, ::2],
        "reversed-copy-view": y[::-1][::-1],
        "list": y.tolist(),
        "tuple": tuple(map(tuple, y.tolist())),
        "int32-fortran": np.asfortranarray(y.astype(np.int32)),
        "read-only": _read_only(y),
    }
    for name, yv in variants.items():
        assert_same_results(run_all(z, yv), want, name)
    # 1-D logits: the target is a scalar (Python int, NumPy scalar or 0-d array)
    z1 = z[0, 0]
    want1 = run_all(z1, np.int64(3))
    for yv in (3, np.int8(3), np.uint64(3), np.array(3, np.int16)):
        assert_same_results(run_all(z1, yv), want1, f"scalar target {yv!r}")


# --------------------------------------------------------------------------------------
# out= and in place

INPLACE_SHAPES = [(33, 7), (4, 10, 17), (513, 1000), (64, 50257), (3, 50257), (2, 128256)]


@pytest.mark.parametrize("shape", INPLACE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_bit_identical(isa, dtype, shape, rng):
    """out=logits overwrites the logits with the gradient: same bits as the out-of-place call
    (which, above 8 MB, writes through a different store path), for every reduction and
    thread count (few rows + C above the kernel's block takes the class-split parallel path)."""
    C = shape[-1]
    base = make_logits(rng, shape, 3.0, dtype)
    y = make_target(rng, shape[:-1], C, ignore_frac=0.1)
    w = make_weight(rng, C, dtype)
    for kw in (dict(), dict(weight=w, label_smoothing=0.1)):
        for red in REDUCTIONS:
            for nt in (1, 4):
                want_l, want_g = fx.cross_entropy_with_grad(
                    base, y, reduction=red, num_threads=nt, **kw
                )
                x = base.copy()
                loss, g = fx.cross_entropy_with_grad(
                    x, y, reduction=red, num_threads=nt, out=x, **kw
                )
                assert g is x
                what = f"{red}, num_threads={nt}, options={sorted(kw)}"
                assert_bitwise_equal(loss, want_l, f"in-place loss ({what})")
                assert_bitwise_equal(x, want_g, f"in-place grad ({what})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_through_an_identical_view(isa, dtype, rng):
    """out= a different array object over exactly the same memory and strides (x[...],
    x.view()) is the in-place mode too, not a partial overlap."""
    base = make_logits(rng, (50, 300), 1.0, dtype)
    y = make_target(rng, (50,), 300)
    want = fx.cross_entropy_with_grad(base, y)
    for make_view in (lambda a: a[...], lambda a: a.view(), lambda a: a[:]):
        x = base.copy()
        out = make_view(x)
        loss, g = fx.cross_entropy_with_grad(x, y, out=out)
        assert g is out
        assert_bitwise_equal(loss, want[0], "loss")
        assert_bitwise_equal(x, want[1], "grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_ignored_rows_become_zero(isa, dtype, rng):
    x = make_logits(rng, (6, 50), 1.0, dtype)
    x[1] = np.nan
    x[2] = np.inf
    x[3, ::3] = -np.inf
    y = np.array([0, -100, -100, -100, 4, 49])
    want_l, want_g = fx.cross_entropy_with_grad(x.copy(), y, label_smoothing=0.2)
    loss, g = fx.cross_entropy_with_grad(x, y, label_smoothing=0.2, out=x)
    assert np.all(x[1:4] == 0)
    assert_bitwise_equal(loss, want_l, "loss")
    assert_bitwise_equal(x, want_g, "grad")


@pytest.mark.parametrize("shape", [(33, 7), (4, 10, 17), (64, 50257), (2, 128256)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_buffer(isa, dtype, shape, rng):
    """out= a separate buffer (pre-filled with NaN, so nothing may be left unwritten): the
    same object comes back holding the out-of-place gradient bits; also when the buffer does
    not start on a vector boundary (the large-gradient path uses aligned streaming stores)."""
    C = shape[-1]
    z = make_logits(rng, shape, 2.0, dtype)
    y = make_target(rng, shape[:-1], C, ignore_frac=0.1)
    kw = dict(weight=make_weight(rng, C, dtype), label_smoothing=0.05)
    size = int(np.prod(shape))
    for red in REDUCTIONS:
        want_l, want_g = fx.cross_entropy_with_grad(z, y, reduction=red, **kw)
        for offset in (0, 1, 3, 5):  # elements: misaligned starts for the 32/64-byte vectors
            buf = np.full(size + 8, np.nan, dtype)
            out = buf[offset : offset + size].reshape(shape)
            assert out.flags.c_contiguous
            loss, g = fx.cross_entropy_with_grad(z, y, reduction=red, out=out, **kw)
            assert g is out
            what = f"{red}, weight+smoothing, out= at element offset {offset}"
            assert_bitwise_equal(loss, want_l, f"loss ({what})")
            assert_bitwise_equal(out, want_g, f"grad ({what})")
            assert np.all(np.isnan(buf[:offset])) and np.all(np.isnan(buf[offset + size :])), (
                "wrote outside out="
            )


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_of_place_leaves_inputs_alone_and_returns_fresh_grad(isa, dtype, rng):
    z = make_logits(rng, (300, 257), 1.0, dtype)
    y = make_target(rng, (300,), 257, ignore_frac=0.1)
    w = make_weight(rng, 257, dtype)
    copies = [a.copy() for a in (z, y, w)]
    _, g = fx.cross_entropy_with_grad(z, y, weight=w, label_smoothing=0.1)
    for a, c in zip((z, y, w), copies):
        assert_bitwise_equal(a, c, "input modified")
    assert not np.may_share_memory(g, z)
    assert g.flags.c_contiguous and g.flags.writeable
    _, gf = fx.cross_entropy_with_grad(np.asfortranarray(z), y)
    assert gf.flags.c_contiguous


# --------------------------------------------------------------------------------------
# threads

THREAD_SHAPES = [
    (513, 1000),
    (3000, 1000),
    (64, 50257),
    (3, 50257),
    (2, 128256),
    (5000, 17),
    (40000, 1),
]
THREADS = (None, 1, 2, 3, 4, 7)


@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_identical_for_every_num_threads(isa, dtype, shape, rng):
    N, C = shape
    assert N * C >= 32768  # the kernel's serial grain: these shapes go parallel
    z = make_logits(rng, shape, 3.0, dtype)
    y, kw = _options(rng, C, dtype, N)
    want = run_all(z, y, num_threads=1, **kw)
    for nt in THREADS[2:] + (None,):
        assert_same_results(
            run_all(z, y, num_threads=nt, **kw), want, f"weight+smoothing, num_threads={nt} vs 1"
        )
    # And without weights / smoothing (other kernel variants).
    want = run_all(z, y, num_threads=1)
    for nt in (3,):
        assert_same_results(run_all(z, y, num_threads=nt), want, f"plain, num_threads={nt} vs 1")


def test_threadpoolctl_limit_gives_same_bits(isa, rng):
    """num_threads=None follows the OpenMP default, which threadpoolctl can cap: the bits do
    not change."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    z = make_logits(rng, (513, 1000), 1.0, np.float32)
    y, kw = _options(rng, 1000, np.float32, 513)
    want = run_all(z, y, **kw)
    for limit in (1, 3):
        with threadpoolctl.threadpool_limits(limits=limit, user_api="openmp"):
            assert_same_results(run_all(z, y, **kw), want, f"threadpool_limits({limit})")


def test_concurrent_calls_from_python_threads(isa, rng):
    """The kernel releases the GIL: concurrent calls on shared inputs give the serial bits."""
    z = make_logits(rng, (256, 2000), 2.0, np.float32)
    y, kw = _options(rng, 2000, np.float32, 256)
    want = fx.cross_entropy_with_grad(z, y, **kw)

    def job(i):
        return fx.cross_entropy_with_grad(z, y, num_threads=1 + i % 3, **kw)

    with ThreadPoolExecutor(max_workers=4) as ex:
        results = list(ex.map(job, range(12)))
    for loss, g in results:
        assert_bitwise_equal(loss, want[0], "concurrent loss")
        assert_bitwise_equal(g, want[1], "concurrent grad")


def test_repeated_calls_identical(isa, rng):
    z = make_logits(rng, (100, 3000), 5.0, np.float64)
    y, kw = _options(rng, 3000, np.float64, 100)
    first = run_all(z, y, **kw)
    for _ in range(3):
        assert_same_results(run_all(z, y, **kw), first, "repeat")


# --------------------------------------------------------------------------------------
# a class axis other than the last (column kernel)

AXIS_LAYOUT_SHAPES = [((8, 1000, 64), 1), ((2, 3000, 33), 1), ((64, 40, 50), 1), ((300, 20, 30), 0)]


@pytest.mark.parametrize("shape,axis", AXIS_LAYOUT_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_middle_axis_threads_in_place_and_layouts(isa, dtype, shape, axis, rng):
    """axis != -1: bitwise identical for every num_threads, in place (out=logits) equal to
    out-of-place, and a non-contiguous input equal to its contiguous copy."""
    z = make_logits(rng, shape, 2.0, dtype)
    C = shape[axis]
    tshape = shape[:axis] + shape[axis + 1 :]
    y = make_target(rng, tshape, C, ignore_frac=0.1)
    kw = dict(axis=axis, weight=make_weight(rng, C, dtype), label_smoothing=0.1)
    want = run_all(z, y, num_threads=1, **kw)
    for nt in (2, 3, 4, 7, None):
        assert_same_results(run_all(z, y, num_threads=nt, **kw), want, f"num_threads={nt}")
    for red in REDUCTIONS:
        x = z.copy()
        loss, g = fx.cross_entropy_with_grad(x, y, reduction=red, out=x, **kw)
        assert g is x
        assert_bitwise_equal(loss, want[("loss", red)], f"in-place loss {red}")
        assert_bitwise_equal(x, want[("grad", red)], f"in-place grad {red}")
    wide = np.zeros(shape[:-1] + (shape[-1] + 7,), dtype)
    wide[..., 3 : 3 + shape[-1]] = z
    sliced = wide[..., 3 : 3 + shape[-1]]
    assert not sliced.flags.c_contiguous
    assert_same_results(run_all(sliced, y, num_threads=1, **kw), want, "sliced input")
    f_order = np.asfortranarray(z)
    assert_same_results(run_all(f_order, y, num_threads=1, **kw), want, "Fortran input")


def test_block_classes():
    """The block length the tests cut around: 16 KiB of float32 or float64; other sizes are an
    error."""
    from fastxent import _core

    assert _core.block_classes(4) == 4096 and _core.block_classes(8) == 2048
    for bad in (0, 2, 3, 16, -4):
        with pytest.raises(ValueError, match="itemsize must be 4 or 8"):
            _core.block_classes(bad)
