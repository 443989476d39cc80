"""The small-call fast path (_core.fast_call): it takes exactly the calls it can check, gives
the general path's bits, and hands everything else (with its error messages) to the general
path."""

import numpy as np
import pytest

import fastxent as fx
from fastxent import _core

RED = {"none": 0, "sum": 1, "mean": 2}


def _data(dtype=np.float32, N=32, C=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, C)).astype(dtype), rng.integers(0, C, N)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_fast_equals_general(dtype, reduction):
    x, t = _data(dtype)
    fast = _core.fast_call(x, t, RED[reduction], True, None, 0)
    assert fast is not None
    # A strided view of the same values goes through the general path.
    wide = np.zeros((x.shape[0], x.shape[1] + 3), dtype)
    wide[:, : x.shape[1]] = x
    loss, g = fx.cross_entropy_with_grad(wide[:, : x.shape[1]], t, reduction=reduction)
    np.testing.assert_array_equal(fast[1], g)
    np.testing.assert_array_equal(np.asarray(fast[0]), np.asarray(loss))
    assert np.asarray(fast[0]).dtype == dtype
    assert type(fx.cross_entropy(x, t, reduction=reduction)) is type(loss)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_scalar_is_numpys_and_holds_no_reference(dtype):
    """The fast path builds its scalar loss with NumPy's C API (PyArray_Scalar): exactly
    numpy.float32 / float64, the general path's value, owned by the caller alone, and no
    reference to the dtype gained or lost over many calls."""
    import sys

    x, t = _data(dtype)
    wide = np.zeros((x.shape[0], x.shape[1] + 3), dtype)
    wide[:, : x.shape[1]] = x
    for red in ("sum", "mean"):
        loss = _core.fast_call(x, t, RED[red], False, None, 0)
        assert type(loss) is np.dtype(dtype).type
        assert loss == fx.cross_entropy(wide[:, : x.shape[1]], t, reduction=red)
        assert sys.getrefcount(loss) == 2  # loss and getrefcount's argument
    d = np.dtype(dtype)
    before = sys.getrefcount(d)
    for _ in range(2000):
        _core.fast_call(x, t, RED["mean"], True, None, 0)
    assert sys.getrefcount(d) == before


def test_fast_declines_what_it_cannot_check():
    x, t = _data()
    g = np.empty_like(x)
    declined = [
        (x.astype(">f4"), t, None),  # big-endian logits
        (x, t.astype(">i8"), None),  # big-endian targets
        (x, t.astype(np.int32), None),  # another integer type
        (np.asfortranarray(x), t, None),  # not C-contiguous
        (x.astype(np.float16), t, None),  # 16-bit logits
        (x[None], t, None),  # 3-D
        (x, t, np.empty((32, 10), np.float64)),  # out of another dtype
        (x, t, np.asfortranarray(g)),  # out not C-contiguous
        (x, t, x[:, :5]),  # out of another shape
        (np.zeros((4, 0), np.float32), t[:4], None),  # no classes
    ]
    ro = np.empty_like(x)
    ro.flags.writeable = False
    declined.append((x, t, ro))
    overlap = np.empty(x.size + 1, np.float32)
    declined.append((overlap[1:].reshape(x.shape), t, overlap[:-1].reshape(x.shape)))
    for xx, tt, out in declined:
        assert _core.fast_call(xx, tt, 2, True, out, 0) is None


def test_fast_in_place_and_out():
    x, t = _data()
    ref_loss, ref_g = fx.cross_entropy_with_grad(x, t)
    out = np.full_like(x, 7.0)
    loss, g = fx.cross_entropy_with_grad(x, t, out=out)
    assert g is out
    np.testing.assert_array_equal(out, ref_g)
    w = x.copy()
    loss2, g2 = fx.cross_entropy_with_grad(w, t, out=w)
    assert g2 is w
    np.testing.assert_array_equal(w, ref_g)
    assert loss == loss2 == ref_loss


def test_fast_bad_target_gives_the_detailed_error_and_writes_nothing():
    x, t = _data()
    t[5] = 10
    out = np.full_like(x, 7.0)
    with pytest.raises(IndexError, match=r"target\[5\] = 10"):
        fx.cross_entropy_with_grad(x, t, out=out)
    assert (out == 7.0).all()
    w = x.copy()
    with pytest.raises(IndexError, match=r"target\[5\] = 10"):
        fx.cross_entropy_with_grad(w, t, out=w)
    np.testing.assert_array_equal(w, x)


def test_fast_out_overlapping_target_is_refused():
    x, t = _data(np.float64)
    out = t.view(np.float64)[:0]  # empty: cannot overlap, wrong shape -> general path error
    with pytest.raises(ValueError):
        fx.cross_entropy_with_grad(x, t, out=out)
    buf = np.zeros(x.size, np.float64)
    tt = buf[:32].view(np.int64)
    tt[:] = t
    assert _core.fast_call(x, tt, 2, True, buf.reshape(x.shape), 0) is None
    with pytest.raises(ValueError, match="overlaps target"):
        fx.cross_entropy_with_grad(x, tt, out=buf.reshape(x.shape))


@pytest.mark.parametrize("nt", [1, 2, 3])
def test_fast_num_threads(nt):
    x, t = _data(N=300, C=700)
    a = fx.cross_entropy_with_grad(x, t, num_threads=nt)
    b = fx.cross_entropy_with_grad(x, t)
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0] == b[0]


class _Sub(np.ndarray):
    pass


def test_fast_declines_ndarray_subclasses_and_the_general_path_takes_them():
    # Exactly numpy.ndarray: a subclass (here a trivial one, and a memmap-like view) goes to
    # the general path, which returns plain arrays; the public functions give the same bits.
    x, t = _data()
    g = np.empty_like(x)
    xs, ts, gs = x.view(_Sub), t.view(_Sub), g.view(_Sub)
    for args in ((xs, t, None), (x, ts, None), (x, t, gs), ([[1.0, 2.0]], np.array([0]), None)):
        assert _core.fast_call(args[0], args[1], 2, True, args[2], 0) is None
    ref_loss, ref_g = fx.cross_entropy_with_grad(x, t)
    loss, grad = fx.cross_entropy_with_grad(xs, ts)
    assert type(grad) is np.ndarray
    np.testing.assert_array_equal(grad, ref_g)
    assert loss == ref_loss
    loss, grad = fx.cross_entropy_with_grad(x, t, out=gs)
    np.testing.assert_array_equal(np.asarray(grad), ref_g)
    assert fx.cross_entropy(xs, t) == fx.cross_entropy(x, t)


def test_public_fast_path_keywords_at_their_defaults():
    # The no-keyword call and the spelled-out defaults give the same bits as the general path
    # (a strided view of the same values).
    x, t = _data()
    wide = np.zeros((x.shape[0], x.shape[1] + 1), np.float32)
    wide[:, :-1] = x
    ref = fx.cross_entropy_with_grad(wide[:, :-1], t)
    for kw in ({}, {"reduction": "mean"}, {"ignore_index": -100}, {"num_threads": 1}):
        loss, g = fx.cross_entropy_with_grad(x, t, **kw)
        np.testing.assert_array_equal(g, ref[1])
        assert loss == ref[0]
    with pytest.raises(ValueError, match="reduction"):
        fx.cross_entropy(x, t, reduction="avg")


def test_one_keyword_fast_branch_matches_the_general_path_and_its_errors():
    # One keyword, num_threads or reduction, is checked in _api._fast itself: the same bits as
    # the general path (a strided view), and every value it does not take goes on to the
    # general path's checks and messages.
    x, t = _data()
    wide = np.zeros((x.shape[0], x.shape[1] + 1), np.float32)
    wide[:, :-1] = x
    view = wide[:, :-1]
    for kw in ({"num_threads": 1}, {"num_threads": 3}, {"reduction": "sum"}, {"reduction": "none"}):
        want_l, want_g = fx.cross_entropy_with_grad(view, t, **kw)
        for out in (None, np.empty_like(x)):
            loss, g = fx.cross_entropy_with_grad(x, t, out=out, **kw)
            np.testing.assert_array_equal(g, want_g)
            np.testing.assert_array_equal(loss, want_l)
            assert type(loss) is type(want_l)
        np.testing.assert_array_equal(fx.cross_entropy(x, t, **kw), fx.cross_entropy(view, t, **kw))
    for nt in (0, -1, 2**31):
        with pytest.raises(ValueError, match="num_threads"):
            fx.cross_entropy_with_grad(x, t, num_threads=nt)
    with pytest.raises(TypeError, match="num_threads"):
        fx.cross_entropy(x, t, num_threads=2.0)
    for red in ("avg", ["mean"], None):
        with pytest.raises((ValueError, TypeError), match="reduction"):
            fx.cross_entropy(x, t, reduction=red)
    # num_threads=None (the default spelled out) is not an int: it goes on to _fast_ok.
    assert fx.cross_entropy(x, t, num_threads=None) == fx.cross_entropy(view, t)
