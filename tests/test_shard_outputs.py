"""Per-row outputs across vocabulary shards (issue #23 section 1, "sharded"):
fx.shard_stats(..., outputs=...), fx.merge_output_stats and fx.outputs_from_stats give the
lse, entropy, argmax, target_logprob and accuracy of whole rows, as fx.cross_entropy's
outputs= does on the full logits.

Oracles: the float64 NumPy reference of tests/test_row_outputs.py (ref_rows, through its
_check_stats and the same tolerances) and the one-machine call (argmax and accuracy exactly;
the floats within the same tolerance: both are within it of the reference).

Why the one-machine tolerances hold: each shard merges its blocks' (max, sum e, sum e (z' - m))
in float64 exactly as the one-machine row does (stats_only), and the shards merge the same
way (merge_output_stats); the blocks sit at other positions (a shard's own), so only the
float32 lane sums inside a block differ. The finish (outputs_from_stats) is the one-machine
formula in float64, rounded once to the dtype asked for. Measured over the first test's
cases, every ISA, three seeds, relative to max(1, |one-machine value|): float32 lse and
target_logprob 1.2e-7, entropy 1.9e-6 (its lane sums cancel against log S); float64 1.1e-14.
The comparison uses the reference tolerance (4e-6, 1e-13), which both paths meet.

Bitwise: the loss statistics are the same bits with and without outputs=; merge_output_stats
is commutative bit for bit; output statistics are the same bits for 1, 2 and 3 threads.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastxent as fx
from reference import assert_bitwise_equal, option_kwargs
from test_row_outputs import ALL, OPTION_CASES, TOL, _check_stats

SHARD_KEYS = ("weight", "ignore_index", "label_smoothing", "softcap", "logit_scale", "num_threads")
F = {name: i for i, name in enumerate(fx.OUTPUT_STAT_FIELDS)}


def _cuts(rng, C, k=3):
    """k shards (fewer for tiny C) at random cut points, as [0, c1, ..., C]."""
    inner = sorted(rng.choice(np.arange(1, C), size=min(k - 1, C - 1), replace=False).tolist())
    return [0] + inner + [C]


def _shard_kw(kw, a, b):
    out = {k: v for k, v in kw.items() if k in SHARD_KEYS}
    if out.get("weight") is not None:
        out["weight"] = out["weight"][a:b]
    return out


def sharded(z, y, cuts, kw=None, names=ALL, order=None, **finish):
    """(loss statistics per shard, output statistics per shard, merged output statistics)."""
    kw = kw or {}
    C = z.shape[-1]
    pieces = [
        fx.shard_stats(
            z[..., a:b], y, offset=a, num_classes=C, outputs=names, **_shard_kw(kw, a, b)
        )
        for a, b in zip(cuts, cuts[1:])
    ]
    outs = [p[1] for p in pieces]
    merged = fx.merge_output_stats(*(outs if order is None else [outs[i] for i in order]))
    return [p[0] for p in pieces], outs, merged


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [7, 100, 5000])
@pytest.mark.parametrize("case", range(len(OPTION_CASES)))
def test_outputs_match_reference_and_the_one_machine_call(isa, rng, dtype, C, case):
    N = 13
    z = (rng.standard_normal((N, C)) * 3.0).astype(dtype)
    y = rng.integers(0, C, N)
    y[1] = -100
    kw = option_kwargs(OPTION_CASES[case], rng, N, C, dtype)
    cuts = _cuts(rng, C)
    order = rng.permutation(len(cuts) - 1)
    base, _, merged = sharded(z, y, cuts, kw, order=order)
    st = fx.outputs_from_stats(merged, y, num_classes=C, dtype=dtype)
    _check_stats(st, z, y, kw, dtype)
    _, one = fx.cross_entropy(z, y, outputs=ALL, **kw)
    np.testing.assert_array_equal(st.argmax, one.argmax)
    assert st.accuracy == one.accuracy
    for name in ("lse", "entropy", "target_logprob"):
        a = getattr(st, name).astype(np.float64)
        b = getattr(one, name).astype(np.float64)
        assert np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))) < TOL[dtype], name
    # The loss statistics are those of the call without outputs=, bit for bit.
    for (a, b), s in zip(zip(cuts, cuts[1:]), base):
        plain = fx.shard_stats(z[:, a:b], y, offset=a, num_classes=C, **_shard_kw(kw, a, b))
        assert_bitwise_equal(s, plain)


def test_float64_logits_in_float32_outputs_round_once(rng):
    z = rng.standard_normal((5, 40)) * 4.0
    y = rng.integers(0, 40, 5)
    _, _, m = sharded(z, y, [0, 17, 40])
    s64 = fx.outputs_from_stats(m, y)
    s32 = fx.outputs_from_stats(m, y, dtype=np.float32)
    assert s64.lse.dtype == np.float64 and s32.lse.dtype == np.float32
    for name in ("lse", "entropy", "target_logprob"):
        assert_bitwise_equal(getattr(s32, name), getattr(s64, name).astype(np.float32))


def test_argmax_ties_nan_and_infinite_rows_across_shards(isa):
    z = np.array(
        [
            [1.0, 3.0, 3.0, 2.0, 0.0, 3.0],  # a tie inside the first shard and across shards
            [5.0, 5.0, 5.0, 5.0, 5.0, 5.0],
            [0.0, 1.0, 9.0, np.nan, 2.0, np.nan],  # the first NaN is in the second shard
            [-np.inf] * 6,
            [-np.inf, -np.inf, -np.inf, 2.0, -np.inf, 2.0],  # a first shard of -inf
            [np.inf, 1.0, np.inf, 0.0, 1.0, 1.0],
            [-0.0, -1.0, -2.0, 0.0, -3.0, 0.0],  # -0.0 == 0.0: the first index
            [3e38, -3e38, 0.0, 3e38, 1.0, 0.0],
        ],
        dtype=np.float32,
    )
    y = np.array([2, 0, 0, 1, 3, 0, 3, 0])
    _, one = fx.cross_entropy(z, y, reduction="none", outputs=ALL)
    for cuts in ([0, 2, 4, 6], [0, 1, 5, 6], [0, 3, 6], [0, 6]):
        for order in (None, list(range(len(cuts) - 2, -1, -1))):
            _, _, m = sharded(z, y, cuts, order=order)
            st = fx.outputs_from_stats(m, y, num_classes=6, dtype=np.float32)
            np.testing.assert_array_equal(st.argmax, one.argmax, err_msg=str(cuts))
            np.testing.assert_array_equal(st.argmax, [1, 0, 3, 0, 3, 0, 0, 0])
            assert st.accuracy == one.accuracy
            for name in ("lse", "entropy", "target_logprob"):
                np.testing.assert_allclose(
                    getattr(st, name), getattr(one, name), rtol=1e-6, atol=1e-6, err_msg=name
                )
    _, _, m = sharded(z, y, [0, 2, 4, 6])
    st = fx.outputs_from_stats(m, y)
    assert np.isnan(st.lse[2]) and np.isnan(st.entropy[2]) and np.isnan(st.target_logprob[2])
    assert np.isnan(st.lse[5])  # +inf logits: NaN, as the one-machine call
    assert st.lse[3] == -np.inf and st.target_logprob[3] == -np.inf
    assert st.entropy[3] == np.log(6.0)


def test_argmax_in_long_rows_across_blocks_and_shards(isa):
    for dtype in (np.float32, np.float64):
        B = fx._core.block_classes(np.dtype(dtype).itemsize)
        C = 3 * B + 5
        zz = np.zeros((3, C), dtype)
        zz[0, B + 17] = zz[0, 2 * B + 3] = 4.0
        zz[1, 5] = zz[1, 3 * B + 2] = 1.0
        zz[2, 2 * B + 1] = np.nan
        y = np.zeros(3, np.int64)
        for softcap in (None, 10.0):
            _, _, m = sharded(zz, y, [0, B + 20, 2 * B + 2, C], kw={"softcap": softcap})
            st = fx.outputs_from_stats(m, y, outputs=("argmax",))
            np.testing.assert_array_equal(st.argmax, [B + 17, 5, 2 * B + 1])


def test_merge_is_bitwise_commutative_and_associative_up_to_rounding(isa, rng):
    C = 3000
    z = (rng.standard_normal((20, C)) * 5.0).astype(np.float32)
    z[3, :1000] = -np.inf
    z[4, 2500] = np.nan
    z[5, 10] = z[5, 2990] = 100.0
    y = rng.integers(0, C, 20)
    y[6] = -100
    _, outs, _ = sharded(z, y, [0, 1000, 1700, C])
    a, b, c = outs
    assert_bitwise_equal(fx.merge_output_stats(a, b), fx.merge_output_stats(b, a))
    left = fx.merge_output_stats(fx.merge_output_stats(a, b), c)
    right = fx.merge_output_stats(a, fx.merge_output_stats(b, c))
    exact = [F[k] for k in ("nan", "argval", "argidx", "zy", "columns")]
    assert_bitwise_equal(left[:, exact], right[:, exact])
    np.testing.assert_allclose(left, right, rtol=1e-14, equal_nan=True)
    # One operand: a copy of it.
    one = fx.merge_output_stats(a)
    assert_bitwise_equal(one, a)
    assert one is not a


def test_signed_zero_maxima_and_huge_float64_rows():
    # Shard maxima -0.0 and +0.0: the merge takes +0.0 whichever side it is on (bitwise
    # commutative), as merge_stats.
    z = np.array([[-0.0, -5.0, 0.0, -7.0]])
    y = np.array([0])
    _, a = fx.shard_stats(z[:, :2], y, offset=0, num_classes=4, outputs=ALL)
    _, b = fx.shard_stats(z[:, 2:], y, offset=2, num_classes=4, outputs=ALL)
    ab, ba = fx.merge_output_stats(a, b), fx.merge_output_stats(b, a)
    assert_bitwise_equal(ab, ba)
    assert not np.signbit(ab[0, F["max"]]) and ab[0, F["argidx"]] == 0.0
    # A side whose rescale underflows to 0 adds nothing to h ((m - M) S is -inf there): the
    # entropy of (1.7e308, -1.7e308, 0, 5) is 0, not NaN.
    z = np.array([[1.7e308, -1.7e308, 0.0, 5.0]])
    _, one = fx.cross_entropy(z, y, outputs=ALL)
    for cut in (1, 2, 3):
        _, _, m = sharded(z, y, [0, cut, 4])
        st = fx.outputs_from_stats(m, y, num_classes=4)
        assert st.entropy[0] == one.entropy[0] == 0.0 and st.lse[0] == one.lse[0]


def test_thread_counts_give_the_same_bits(rng):
    C = 4000
    z = (rng.standard_normal((31, C)) * 3.0).astype(np.float32)
    y = rng.integers(0, C, 31)
    res = [
        fx.shard_stats(z[:, 1000:], y, offset=1000, num_classes=C, outputs=ALL, num_threads=t)
        for t in (1, 2, 3)
    ]
    for r in res[1:]:
        assert_bitwise_equal(r[0], res[0][0])
        assert_bitwise_equal(r[1], res[0][1])


def test_ignored_rows_get_outputs_and_keep_their_loss_statistics(isa, rng):
    C = 50
    z = rng.standard_normal((4, C))
    y = np.array([-100, 3, -100, 49])
    base, _, m = sharded(z, y, [0, 20, C])
    st = fx.outputs_from_stats(m, y)
    _, one = fx.cross_entropy(z, y, outputs=ALL)
    np.testing.assert_allclose(st.lse, one.lse, rtol=1e-14)
    np.testing.assert_allclose(st.entropy, one.entropy, rtol=1e-14)
    assert st.target_logprob[0] == 0.0 and st.target_logprob[2] == 0.0
    assert st.accuracy == one.accuracy
    merged = fx.merge_stats(*base)
    assert np.all(merged[[0, 2], fx.STAT_FIELDS.index("count")] == 0.0)
    assert fx.loss_from_stats(merged, num_classes=C) == pytest.approx(
        fx.cross_entropy(z, y), rel=1e-14
    )
    # Every row ignored: accuracy 0 over no counted rows, as the one-machine call.
    yi = np.full(4, -100)
    _, _, m = sharded(z, yi, [0, 20, C])
    assert fx.outputs_from_stats(m, yi).accuracy == 0.0


def test_probability_targets(isa, rng):
    C = 300
    z = rng.standard_normal((6, C)).astype(np.float32)
    p = rng.dirichlet(np.ones(C), 6).astype(np.float32)
    names = ("lse", "entropy", "argmax")
    pieces = [
        fx.shard_stats(z[:, a:b], p[:, a:b], offset=a, num_classes=C, outputs=names)
        for a, b in ((0, 100), (100, C))
    ]
    m = fx.merge_output_stats(*(q[1] for q in pieces))
    st = fx.outputs_from_stats(m, outputs=names, num_classes=C, dtype=np.float32)
    _, one = fx.cross_entropy(z, p, outputs=names)
    np.testing.assert_array_equal(st.argmax, one.argmax)
    np.testing.assert_allclose(st.lse, one.lse, rtol=1e-6)
    np.testing.assert_allclose(st.entropy, one.entropy, rtol=1e-6)
    assert np.all(m[:, F["zy"]] == 0.0)
    for bad in ("target_logprob", "accuracy"):
        with pytest.raises(ValueError, match="class-index targets"):
            fx.shard_stats(z[:, :100], p[:, :100], offset=0, num_classes=C, outputs=(bad,))


def test_leading_axes(rng):
    C = 90
    z = rng.standard_normal((2, 3, C))
    y = rng.integers(0, C, (2, 3))
    base, outs, m = sharded(z, y, [0, 40, C])
    assert base[0].shape == (2, 3, len(fx.STAT_FIELDS))
    assert outs[0].shape == m.shape == (2, 3, len(fx.OUTPUT_STAT_FIELDS))
    st = fx.outputs_from_stats(m, y, num_classes=C)
    _, one = fx.cross_entropy(z, y, outputs=ALL)
    assert st.lse.shape == st.argmax.shape == (2, 3)
    np.testing.assert_array_equal(st.argmax, one.argmax)
    np.testing.assert_allclose(st.entropy, one.entropy, rtol=1e-14)


def test_no_rows():
    z = np.zeros((0, 10), np.float32)
    y = np.zeros(0, np.int64)
    _, _, m = sharded(z, y, [0, 4, 10])
    assert m.shape == (0, len(fx.OUTPUT_STAT_FIELDS))
    st = fx.outputs_from_stats(m, y, num_classes=10)
    assert st.lse.shape == (0,) and st.accuracy == 0.0


def test_only_the_requested_outputs():
    z = np.arange(12.0).reshape(2, 6)
    y = np.array([5, 0])
    _, _, m = sharded(z, y, [0, 3, 6])
    st = fx.outputs_from_stats(m, outputs=("entropy",))
    assert st.lse is None and st.argmax is None and st.accuracy is None
    assert st.entropy is not None
    st = fx.outputs_from_stats(m, y, outputs=("accuracy",))
    assert st.accuracy == 0.5 and st.argmax is None


def test_errors():
    z = np.zeros((2, 6), np.float32)
    y = np.array([1, 2])
    _, _, m = sharded(z, y, [0, 3, 6])
    with pytest.raises(ValueError, match="unknown output"):
        fx.shard_stats(z, y, offset=0, num_classes=6, outputs=("nope",))
    with pytest.raises(TypeError, match="tuple of names"):
        fx.shard_stats(z, y, offset=0, num_classes=6, outputs="lse")
    with pytest.raises(TypeError, match="at least one"):
        fx.merge_output_stats()
    with pytest.raises(ValueError, match="same rows"):
        fx.merge_output_stats(m, m[:1])
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        fx.merge_output_stats(np.zeros((2, 7)))
    with pytest.raises(TypeError, match="float64"):
        fx.merge_output_stats(m.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        fx.outputs_from_stats(np.zeros((2, 7)), y)
    with pytest.raises(TypeError, match="float64"):
        fx.outputs_from_stats(m.astype(np.float32), y)
    with pytest.raises(ValueError, match="cover 3.0 columns"):
        fx.outputs_from_stats(sharded(z, y, [0, 3, 6])[1][0], y, num_classes=6)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        fx.outputs_from_stats(m, y, num_classes=0)
    with pytest.raises(ValueError, match="need the class targets"):
        fx.outputs_from_stats(m)
    with pytest.raises(ValueError, match="need the class targets"):
        fx.outputs_from_stats(m, outputs=("target_logprob",))
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        fx.outputs_from_stats(m, y, dtype=np.float16)
    with pytest.raises(IndexError):
        fx.outputs_from_stats(m, np.array([1, 6]), num_classes=6)
    with pytest.raises(ValueError, match="target has shape"):
        fx.outputs_from_stats(m, np.array([1, 2, 3]))
    with pytest.raises(TypeError):
        fx.outputs_from_stats(m, y, ignore_index=1.5)
    # Not output statistics: an argmax index that is no class index.
    for bad in (np.nan, 2.5, 6.0, -1.0):
        mm = m.copy()
        mm[0, F["argidx"]] = bad
        with pytest.raises(ValueError, match="argmax index"):
            fx.outputs_from_stats(mm, y, outputs=("argmax",))
    # A merge of one shard twice is caught by the column count.
    twice = fx.merge_output_stats(m, m)
    with pytest.raises(ValueError, match="cover 12.0 columns"):
        fx.outputs_from_stats(twice, y, num_classes=6)
