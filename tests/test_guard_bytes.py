"""Nothing is written outside out=: guard regions around the gradient (and around the logits in
place) keep their bytes, for every ISA, every tail length of the vector width, every dtype and
the column layout."""

import numpy as np
import pytest

import fastxent as fx
from reference import block_classes

GUARD = 67  # elements of guard on each side (not a multiple of any vector width)


def _guarded(shape, dtype, fill):
    n = int(np.prod(shape))
    buf = np.empty(n + 2 * GUARD, dtype)
    buf.view(np.uint8)[:] = 0xA5
    inner = buf[GUARD : GUARD + n].reshape(shape)
    inner[...] = fill
    return buf, inner


def _guards_intact(buf):
    b = buf.view(np.uint8)
    isz = buf.itemsize
    return (b[: GUARD * isz] == 0xA5).all() and (b[-GUARD * isz :] == 0xA5).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_guard_bytes_rows(isa, dtype):
    rng = np.random.default_rng(0)
    B = block_classes(dtype)  # the kernel's block length: its tails too
    for C in list(range(1, 34)) + [2047, 2048, 2049, B - 1, B, B + 1, 2 * B + 3]:
        N = 3
        z = (rng.standard_normal((N, C)) * 3).astype(dtype)
        y = rng.integers(0, C, N)
        kw = dict(
            label_smoothing=0.1,
            weight=rng.random(C).astype(np.float32 if dtype == np.float16 else dtype),
        )
        buf, out = _guarded((N, C), dtype, 0)
        fx.cross_entropy_with_grad(z, y, out=out, **kw)
        assert _guards_intact(buf), ("out=", C)
        buf, zin = _guarded((N, C), dtype, z)
        fx.cross_entropy_with_grad(zin, y, out=zin, **kw)
        assert _guards_intact(buf), ("in place", C)
        if dtype != np.float16:
            buf, sm = _guarded((N, C), dtype, z)
            fx.softmax(sm)  # reads only; then a guarded sigmoid gradient
            assert _guards_intact(buf)
            buf, g = _guarded((N, C), dtype, 0)
            fx.sigmoid_cross_entropy_with_grad(z, (z > 0).astype(dtype), out=g)
            assert _guards_intact(buf), ("sigmoid", C)


def test_guard_bytes_columns(isa):
    rng = np.random.default_rng(1)
    for inner in (1, 3, 7, 8, 9, 17, 300):
        shape = (2, 5, inner)
        z = rng.standard_normal(shape).astype(np.float32)
        y = rng.integers(0, 5, (2, inner))
        buf, out = _guarded(shape, np.float32, 0)
        fx.cross_entropy_with_grad(z, y, axis=1, out=out, softcap=5.0)
        assert _guards_intact(buf), inner
