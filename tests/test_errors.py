"""Bad input: the right exception, raised before anything is written.

Every case is run three ways -- loss only, with a separate out= buffer, and in place
(out=logits) -- and each time the logits and the out= buffer must come back byte for byte as
they were (a kernel that wrote rows before finding a bad label would fail here).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import fastxent as fx
from reference import assert_bitwise_equal, make_logits, make_target

N, C = 6, 5


def _base(dtype=np.float32):
    rng = np.random.default_rng(0)
    return make_logits(rng, (N, C), 1.0, dtype), make_target(rng, (N,), C)


def _call_all_ways(z, y, exc, match=None, **kw):
    """Calls loss-only, with out=, and in place; each must raise `exc` and leave the logits
    and out= untouched."""
    z = np.asarray(z)
    z_before = z.copy()
    with pytest.raises(exc, match=match):
        fx.cross_entropy(z, y, **kw)
    assert_bitwise_equal(z, z_before, "logits after a failed loss-only call")

    with pytest.raises(exc, match=match):
        fx.cross_entropy_with_grad(z, y, **kw)
    assert_bitwise_equal(z, z_before, "logits after a failed call")

    if z.dtype in (np.float32, np.float64):
        out = np.full(z.shape, 12345.0, z.dtype)
        out_before = out.copy()
        with pytest.raises(exc, match=match):
            fx.cross_entropy_with_grad(z, y, out=out, **kw)
        assert_bitwise_equal(out, out_before, "out= after a failed call")
        assert_bitwise_equal(z, z_before, "logits after a failed call with out=")

        if z.flags.c_contiguous and z.flags.writeable:
            with pytest.raises(exc, match=match):
                fx.cross_entropy_with_grad(z, y, out=z, **kw)
            assert_bitwise_equal(z, z_before, "logits after a failed in-place call")


# --------------------------------------------------------------------------------------
# TypeError


# float16 was on this list in the original contract; commit 71356bf made float16 (and
# bfloat16) logits valid input, so it is no longer a TypeError case.
@pytest.mark.parametrize(
    "ldtype",
    [
        np.int32,
        np.int64,
        np.uint8,
        np.complex64,
        np.complex128,
        np.bool_,
        np.object_,
        np.longdouble,
    ],
    ids=lambda d: np.dtype(d).name,
)
def test_non_float_logits_raise_type_error(ldtype):
    z, y = _base()
    bad = z.astype(ldtype) if ldtype is not np.bool_ else z > 0
    _call_all_ways(bad, y, TypeError, match=r"float32.*float64")


def test_non_float_logits_python_objects():
    with pytest.raises(TypeError):
        fx.cross_entropy([[1, 2, 3]], [0])  # a list of ints is int64 logits
    with pytest.raises(TypeError):
        fx.cross_entropy([["a", "b"]], [0])


@pytest.mark.parametrize(
    "target",
    [
        np.array([0.0, 1, 2, 3, 4, 0]),
        np.array([0, 1, 2, 3, 4, 0], np.float32),
        np.array([True, False, True, False, True, False]),
        [0.0, 1.0, 2.0, 3.0, 4.0, 0.0],
        np.array([0, 1, 2, 3, 4, 0], np.complex64),
        np.array(["0", "1", "2", "3", "4", "0"]),
    ],
    ids=["float64", "float32", "bool", "float-list", "complex", "str"],
)
def test_non_integer_target_raises_type_error(target):
    z, _ = _base()
    _call_all_ways(z, target, TypeError, match="target")


# --------------------------------------------------------------------------------------
# ValueError


@pytest.mark.parametrize("tshape", [(N + 1,), (N - 1,), (N, 1), (1, N), (), (0,)], ids=str)
def test_target_shape_mismatch(tshape):
    z, _ = _base()
    _call_all_ways(z, np.zeros(tshape, np.int64), ValueError, match="shape")


def test_target_shape_mismatch_multi_dim():
    z = np.zeros((3, 4, C), np.float32)
    for tshape in [(12,), (4, 3), (3, 4, 1), (3,)]:
        _call_all_ways(z, np.zeros(tshape, np.int64), ValueError, match="shape")


@pytest.mark.parametrize("wshape", [(C + 1,), (C - 1,), (C, 1), (1, C), (), (1,), (0,)], ids=str)
def test_weight_shape_mismatch(wshape):
    z, y = _base()
    _call_all_ways(z, y, ValueError, match="weight", weight=np.ones(wshape))


@pytest.mark.parametrize(
    "reduction", ["avg", "", "MEAN", "Sum", "elementwise_mean", "mean ", None, 0, 2]
)
def test_unknown_reduction(reduction):
    z, y = _base()
    _call_all_ways(z, y, ValueError, match="reduction", reduction=reduction)


@pytest.mark.parametrize("shape", [(3, 0), (0,), (2, 3, 0), (0, 0)], ids=str)
def test_zero_classes(shape):
    z = np.zeros(shape, np.float32)
    _call_all_ways(z, np.zeros(shape[:-1], np.int64), ValueError, match="C = 0|class")


@pytest.mark.parametrize(
    "eps",
    [-0.1, -1e-300, 1.0000001, 2.0, float("nan"), float("inf"), float("-inf"), np.float32("nan")],
    ids=repr,
)
def test_label_smoothing_out_of_range(eps):
    z, y = _base()
    _call_all_ways(z, y, ValueError, match="label_smoothing", label_smoothing=eps)


@pytest.mark.parametrize("nt", [0, -1, -7])
def test_bad_num_threads(nt):
    z, y = _base()
    _call_all_ways(z, y, ValueError, match="num_threads", num_threads=nt)


@pytest.mark.parametrize("nt", [True, False, np.True_, 2.0, "2"], ids=repr)
def test_num_threads_not_an_integer(nt):
    # A bool is an int to operator.index (True was read as 1 thread): refused like a float.
    z, y = _base()
    _call_all_ways(
        z, y, TypeError, match="num_threads must be None or a positive integer", num_threads=nt
    )


@pytest.mark.parametrize("nt", [2**31, 2**40, 2**64])
def test_num_threads_beyond_a_c_int(nt):
    # The kernel's count is a C int: above it, the library's ValueError (it was pybind11's
    # TypeError listing the constructor's signatures); 2**31 - 1 itself is accepted.
    z, y = _base()
    _call_all_ways(z, y, ValueError, match="num_threads must be at most 2147483647", num_threads=nt)
    fx.cross_entropy(z, y, num_threads=2**31 - 1)


def test_ignore_index_outside_int64():
    z, y = _base()
    for ii in (2**63, -(2**63) - 1):
        _call_all_ways(z, y, ValueError, match="ignore_index", ignore_index=ii)


def test_axis_out_of_bounds():
    z, y = _base()
    for axis in (2, -3):
        _call_all_ways(z, y, ValueError, axis=axis)


# --------------------------------------------------------------------------------------
# the class axis
#
# The original contract had only the last axis (others: NotImplementedError); commit c17fbcd
# made any axis the class axis (PyTorch's (N, C, d1, ...) layout with axis=1), so the checks
# here are the errors that remain; the values are in test_cross_entropy.py (test_any_axis*).


@pytest.mark.parametrize("axis", [-1, 1, np.int64(1)])
def test_last_axis_spelled_any_way(axis):
    z, y = _base(np.float64)
    assert_bitwise_equal(fx.cross_entropy(z, y, axis=axis), fx.cross_entropy(z, y), "axis")


@pytest.mark.parametrize("axis", [1.0, "1", None])
def test_axis_must_be_an_integer(axis):
    z, y = _base()
    _call_all_ways(z, y, TypeError, axis=axis)


def test_target_shape_must_drop_the_class_axis():
    z = np.zeros((3, C, 4), np.float32)
    for tshape in [(3, C), (3, 4, C), (C, 4), (12,), (4, 3)]:
        _call_all_ways(z, np.zeros(tshape, np.int64), ValueError, match="shape", axis=1)


def test_bad_label_with_a_middle_class_axis_writes_nothing():
    z = np.random.default_rng(3).standard_normal((8, C, 3000)).astype(np.float32)
    y = np.zeros((8, 3000), np.int64)
    y[7, 2999] = C
    for red in ("none", "mean"):
        _call_all_ways(
            z,
            y,
            IndexError,
            match=rf"target\[7, 2999\] = {C}\b",
            axis=1,
            reduction=red,
            num_threads=2,
        )


# --------------------------------------------------------------------------------------
# IndexError: a target outside [0, C) that is not ignore_index


@pytest.mark.parametrize("row,value", [(0, C), (3, -1), (5, 10**6), (2, -101), (4, 2**62)])
def test_target_out_of_range_names_row_and_value(row, value):
    z, y = _base()
    y = y.copy()
    y[row] = value
    _call_all_ways(z, y, IndexError, match=rf"target\[{row}\] = {value}\b")


@pytest.mark.parametrize(
    "tdtype",
    [np.int8, np.int16, np.int32, np.uint8, np.uint16, np.uint32, np.uint64, np.longlong],
    ids=lambda d: np.dtype(d).name + np.dtype(d).char,
)
def test_target_out_of_range_any_dtype(tdtype):
    z, y = _base()
    bad = y.astype(tdtype)
    bad[4] = 7 if np.dtype(tdtype).kind == "u" else -3
    _call_all_ways(z, bad, IndexError, match=rf"target\[4\] = {int(bad[4])}\b")


@pytest.mark.parametrize("value", [2**63, 2**64 - 1, 2**63 + 100])
def test_huge_uint64_target(value):
    z, y = _base()
    bad = y.astype(np.uint64)
    bad[1] = value
    _call_all_ways(z, bad, IndexError, match=rf"target\[1\] = {value}\b")


def test_target_out_of_range_multi_dim_names_position():
    z = np.zeros((3, 4, C), np.float32)
    y = np.zeros((3, 4), np.int64)
    y[2, 1] = C + 2
    _call_all_ways(z, y, IndexError, match=rf"target\[2, 1\] = {C + 2}\b")


def test_first_bad_target_is_reported():
    z, y = _base()
    y = y.copy()
    y[1], y[4] = 99, -5
    _call_all_ways(z, y, IndexError, match=r"target\[1\] = 99\b")


def test_ignore_index_is_exactly_what_is_skipped():
    """-100 is only ignored while it is ignore_index; the chosen ignore_index may be any
    value (in range or not) and is not an error."""
    z, y = _base()
    y = y.copy()
    y[2] = -100
    _call_all_ways(z, y, IndexError, match=r"target\[2\] = -100\b", ignore_index=-1)
    y[2] = 17
    fx.cross_entropy(z, y, ignore_index=17)
    _call_all_ways(z, y, IndexError, match=r"target\[2\] = 17\b")


@pytest.mark.parametrize(
    "shape,nt", [((3000, 20), 2), ((3000, 20), 7), ((2, 50000), 4), ((64, 50257), 3)], ids=str
)
@pytest.mark.parametrize("where", ["first", "last"])
def test_bad_label_in_big_parallel_call_writes_nothing(shape, nt, where):
    """Large, multi-threaded calls (row-parallel and class-split paths) with one bad label
    (first or last row): in place, the logits must come back intact; with out=, out too."""
    rng = np.random.default_rng(1)
    z = make_logits(rng, shape, 1.0, np.float32)
    y = make_target(rng, shape[:-1], shape[-1])
    row = 0 if where == "first" else shape[0] - 1
    y[row] = shape[-1]
    for red in ("none", "sum", "mean"):
        _call_all_ways(
            z,
            y,
            IndexError,
            match=rf"target\[{row}\] = {shape[-1]}\b",
            reduction=red,
            num_threads=nt,
            label_smoothing=0.1,
        )


def test_scalar_target_out_of_range():
    z = np.zeros(C, np.float32)
    _call_all_ways(z, np.int64(C), IndexError, match=rf"= {C}\b")


# --------------------------------------------------------------------------------------
# out=


def _check_out_rejected(z, y, out, exc=ValueError, match=None, **kw):
    z_before, out_before = z.copy(), np.array(out, copy=True)
    with pytest.raises(exc, match=match):
        fx.cross_entropy_with_grad(z, y, out=out, **kw)
    assert_bitwise_equal(z, z_before, "logits after a rejected out=")
    if isinstance(out, np.ndarray):
        assert_bitwise_equal(out, out_before, "out= after being rejected")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_read_only(dtype):
    z, y = _base(dtype)
    out = np.zeros_like(z)
    out.flags.writeable = False
    _check_out_rejected(z, y, out, match="read-only")
    # in place on read-only logits
    zr = z.copy()
    zr.flags.writeable = False
    _check_out_rejected(zr, y, zr, match="read-only")
    # a broadcast (never writable) array
    _check_out_rejected(z, y, np.broadcast_to(np.zeros(C, dtype), z.shape))


@pytest.mark.parametrize(
    "oshape", [(N, C + 1), (N * C,), (C, N), (1, N, C), (N, C, 1), (N,)], ids=str
)
def test_out_wrong_shape(oshape):
    z, y = _base()
    _check_out_rejected(z, y, np.zeros(oshape, np.float32), match="shape")


@pytest.mark.parametrize(
    "odtype", [np.float64, np.float16, np.int32, np.complex64], ids=lambda d: np.dtype(d).name
)
def test_out_wrong_dtype(odtype):
    z, y = _base(np.float32)
    _check_out_rejected(z, y, np.zeros((N, C), odtype), match="dtype")
    z64, _ = _base(np.float64)
    _check_out_rejected(z64, y, np.zeros((N, C), np.float32), match="dtype")


def test_out_not_c_contiguous():
    z, y = _base()
    _check_out_rejected(z, y, np.zeros((N, C), np.float32, order="F"), match="contiguous")
    _check_out_rejected(z, y, np.zeros((N, 2 * C), np.float32)[:, ::2], match="contiguous")
    _check_out_rejected(z, y, np.zeros((N, C + 3), np.float32)[:, :C], match="contiguous")
    _check_out_rejected(z, y, np.zeros((2 * N, C), np.float32)[::2], match="contiguous")
    # in place on non-contiguous logits is not possible either
    zf = np.asfortranarray(z)
    _check_out_rejected(zf, y, zf, match="contiguous")
    zs = np.zeros((N, 2 * C), np.float32)[:, ::2]
    _check_out_rejected(zs, y, zs, match="contiguous")


def test_out_not_an_array():
    z, y = _base()
    _check_out_rejected(z, y, np.zeros((N, C), np.float32).tolist(), exc=TypeError)


@pytest.mark.parametrize("shift", [1, C, 3 * C - 1])
def test_out_partially_overlapping_logits(shift):
    z0, y = _base()
    buf = np.zeros(N * C + shift, np.float32)
    buf[: N * C] = z0.reshape(-1)
    z = buf[: N * C].reshape(N, C)
    out = buf[shift : shift + N * C].reshape(N, C)
    buf_before = buf.copy()
    with pytest.raises(ValueError, match="overlap"):
        fx.cross_entropy_with_grad(z, y, out=out)
    assert_bitwise_equal(buf, buf_before, "buffer after a rejected overlapping out=")
    # the other way round
    z2 = buf[shift : shift + N * C].reshape(N, C)
    out2 = buf[: N * C].reshape(N, C)
    with pytest.raises(ValueError, match="overlap"):
        fx.cross_entropy_with_grad(z2, y, out=out2)
    assert_bitwise_equal(buf, buf_before, "buffer after a rejected overlapping out=")


def test_out_overlapping_target_or_weight():
    z, y = _base(np.float64)
    mem = np.zeros(N * C, np.int64)
    mem[:N] = y
    out = mem.view(np.float64).reshape(N, C)
    t = mem[:N]
    with pytest.raises(ValueError, match="overlap"):
        fx.cross_entropy_with_grad(z, t, out=out)
    assert np.array_equal(mem[:N], y)
    wmem = np.ones(N * C, np.float64)
    with pytest.raises(ValueError, match="overlap"):
        fx.cross_entropy_with_grad(z, y, weight=wmem[:C], out=wmem.reshape(N, C))
    assert np.all(wmem == 1.0)


# --------------------------------------------------------------------------------------
# messages are useful


def test_messages_name_the_problem():
    z, y = _base()
    with pytest.raises(ValueError, match=re.escape("(7,)")):
        fx.cross_entropy(z, np.zeros(7, np.int64))  # names the bad shape
    with pytest.raises(ValueError, match="'avg'"):
        fx.cross_entropy(z, y, reduction="avg")
    with pytest.raises(TypeError, match="complex64"):
        fx.cross_entropy(z.astype(np.complex64), y)
    with pytest.raises(IndexError, match=r"\[0, 5\)"):  # and the valid range
        fx.cross_entropy(z, np.full(N, 5))
