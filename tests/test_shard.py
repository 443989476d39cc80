"""Vocabulary-sharded statistics: fx.shard_stats, fx.merge_stats, fx.loss_from_stats,
fx.shard_grad, fx.stats_denominator.

The contract: split the class axis into shards [offset, offset + C_shard), take shard_stats of
each, merge them (any order, any tree), then loss_from_stats and shard_grad per shard give the
loss and gradient fx.cross_entropy(_with_grad) gives on the full logits with the same options.

Oracles: the one-machine kernel (fx.cross_entropy_with_grad on the full logits) and the
independent float64 NumPy references of tests/reference.py (cross_entropy_full_ref for every
option on finite logits, cross_entropy_ref for the -inf / NaN limits).

Error measures: reference.scaled_error against the scales cross_entropy_full_ref returns (the
loss relative to sum_n |s_n| max(|row_n / s_n|, 1), per row for "none"; the gradient relative
to the size of the two terms whose difference it is, see tests/test_options.py).

Tolerances:

* Against the reference: the bounds derived in tests/test_options.py (tolerance() below is
  that function): float64 1e-12; float32 30 u, plus 4 u max|z'| for a logit scale or
  14 u cap + 13 u for a softcap, times 1 + 2 z_loss max lse. The sharded path runs the same
  block and affine passes over the shard's columns (blocks at fixed positions of the shard,
  not of the vocabulary), merges the blocks' (max, sum) in float64 as the kernel merges its
  blocks, and forms the loss in float64 as (Q max - QZ) + Q log(sumexp): the same operations
  as the kernel but the last, whose extra absolute error is a few u64 (Q |max| + |QZ|), below
  1e-14 on these logits (|z'| < 20). So the one-machine bounds hold unchanged. Measured
  over these tests, all ISAs, three seeds: float32 0.03 tol (loss) and 0.11 tol (gradient),
  as the kernel's own 0.04 / 0.13; float64 ~1e-15, 0.001 of the bound.

* Against the kernel: float64 within 1e-13 of each other in the same scaled measure (both
  are ~1e-15 from the reference; measured <= 8e-16 loss, 1.5e-15 gradient). float32 within
  2 tol (both within tol of the reference: the triangle inequality; measured <= 0.11 tol,
  the differences come from the float32 lane sums of a shard's blocks, which do not start
  where the kernel's do).

Anything wrong in a formula (eps / C_shard instead of eps / C, a shard's weights misaligned,
a missing sample weight, a row counted twice) moves the results by >= 1e-3 relative.

Bitwise properties: merge_stats(a, b) == merge_stats(b, a) bit for bit (signed zero maxima
and NaN payloads included); statistics and gradients are the same bits for 1, 2 or 3 threads,
for a strided view and its contiguous copy, and for out= and in-place.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastxent as fx
from reference import (
    BLOCK32,
    BLOCK64,
    U32,
    U64,
    block_classes,
    assert_bitwise_equal,
    cross_entropy_full_ref,
    cross_entropy_ref,
    make_logits,
    make_target,
    make_weight,
    option_tolerance as tolerance,
    scaled_error,
)

REDUCTIONS = ("none", "sum", "mean")
DTYPES = (np.float32, np.float64)
NF = len(fx.STAT_FIELDS)
F = {name: i for i, name in enumerate(fx.STAT_FIELDS)}
STAT_KEYS = ("ignore_index", "label_smoothing", "softcap", "logit_scale", "num_threads")
LOSS_KEYS = ("reduction", "sample_weight", "z_loss", "normalizer")


# ------------------------------------------------------------------------------------------
# sharding helpers


def bounds_from_cuts(C, cuts):
    edges = [0] + sorted(set(int(c) for c in cuts if 0 < c < C)) + [C]
    return list(zip(edges[:-1], edges[1:]))


def random_bounds(rng, C, nshards):
    """Up to nshards uneven shards: cuts drawn at random, near the kernel's block sizes
    (relative to the vocabulary and to other cuts) and next to each other (1-column shards)."""
    if C == 1 or nshards == 1:
        return [(0, C)]
    cand = list(rng.integers(1, C, size=4))
    for b in sorted({B * k + d for B in (BLOCK32, BLOCK64) for k in (1, 2) for d in (-1, 0, 1)}):
        if b < C:
            cand.append(b)
    cuts = set()
    while len(cuts) < min(nshards - 1, C - 1):
        if rng.random() < 0.5:
            c = int(cand[rng.integers(len(cand))]) + int(rng.integers(-1, 2))
        else:
            c = int(rng.integers(1, C))
        if 0 < c < C:
            cuts.add(c)
            if rng.random() < 0.3 and c + 1 < C and len(cuts) < nshards - 1:
                cuts.add(c + 1)  # a shard of one column
    return bounds_from_cuts(C, cuts)


def merge_tree(rng, stats):
    """Merges the list in a random order and a random tree shape."""
    items = [stats[i] for i in rng.permutation(len(stats))]
    while len(items) > 1:
        i, j = (int(v) for v in rng.choice(len(items), 2, replace=False))
        m = fx.merge_stats(items[i], items[j])
        items = [s for k, s in enumerate(items) if k not in (i, j)] + [m]
    return items[0]


def shard_kw(kw, a, b):
    """shard_stats / shard_grad keywords of shard [a, b): the class weights sliced."""
    out = {k: kw[k] for k in STAT_KEYS if k in kw}
    if kw.get("weight") is not None:
        out["weight"] = kw["weight"][a:b]
    return out


def shard_target(t, a, b):
    t = np.asarray(t)
    return t[..., a:b] if t.dtype.kind == "f" else t


def sharded(x, t, bounds, kw, rng=None, scale=1.0, stats_only=False):
    """(loss, grad, merged stats, per-shard stats) of the sharded computation. rng: merge in a
    random tree; None: fx.merge_stats(*stats) in shard order."""
    C = x.shape[-1]
    sts = [
        fx.shard_stats(
            x[..., a:b], shard_target(t, a, b), offset=a, num_classes=C, **shard_kw(kw, a, b)
        )
        for a, b in bounds
    ]
    merged = fx.merge_stats(*sts) if rng is None else merge_tree(rng, sts)
    if stats_only:
        return None, None, merged, sts
    lkw = {k: kw[k] for k in LOSS_KEYS if k in kw}
    loss = fx.loss_from_stats(merged, num_classes=C, **lkw)
    grads = [
        fx.shard_grad(
            x[..., a:b],
            shard_target(t, a, b),
            merged,
            offset=a,
            num_classes=C,
            scale=scale,
            **lkw,
            **shard_kw(kw, a, b),
        )
        for a, b in bounds
    ]
    return loss, np.concatenate(grads, axis=-1), merged, sts


def reference(x, t, kw, scale=1.0):
    rkw = {k: v for k, v in kw.items() if k != "num_threads"}
    loss, grad, lsc, gsc = cross_entropy_full_ref(x, t, scales=True, **rkw)
    return loss, grad * scale, lsc, gsc * abs(scale)


def kernel(x, t, kw, scale=1.0):
    loss, grad = fx.cross_entropy_with_grad(x, t, **kw)
    return loss, grad.astype(np.float64) * scale


def check_all(x, t, bounds, kw, rng=None, scale=1.0, what=""):
    """The sharded loss and gradient against the reference and the kernel."""
    loss, grad, merged, _ = sharded(x, t, bounds, kw, rng, scale)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    if np.asarray(t).dtype.kind != "f":  # ignored rows: exactly 0, in every shard
        ignored = np.asarray(t) == kw.get("ignore_index", -100)
        assert (grad[ignored] == 0).all() and not np.signbit(grad[ignored]).any()
        assert (merged[ignored][:, F["count"]] == 0).all()
    red = kw.get("reduction", "mean")
    if red == "none":
        assert loss.dtype == np.float64 and loss.shape == x.shape[:-1]
    else:
        assert isinstance(loss, np.float64)
    ref_l, ref_g, lsc, gsc = reference(x, t, kw, scale)
    tol = tolerance(x.dtype, x, kw)
    el, eg = scaled_error(loss, ref_l, lsc), scaled_error(grad, ref_g, gsc)
    assert el <= tol, f"{what} {red}: loss vs reference {el:.3g} > {tol:.3g}"
    assert eg <= tol, f"{what} {red}: gradient vs reference {eg:.3g} > {tol:.3g}"
    k_l, k_g = kernel(x, t, kw, scale)
    ktol = 1e-13 if x.dtype == np.float64 else 2 * tol
    el, eg = scaled_error(loss, k_l, lsc), scaled_error(grad, k_g, gsc)
    assert el <= ktol, f"{what} {red}: loss vs kernel {el:.3g} > {ktol:.3g}"
    assert eg <= ktol, f"{what} {red}: gradient vs kernel {eg:.3g} > {ktol:.3g}"
    return loss, grad, merged


# ------------------------------------------------------------------------------------------
# random shardings, block boundaries, merge orders


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_shardings(isa, dtype, rng):
    for C, N in ((1, 5), (2, 4), (7, 6), (300, 5), (2048, 3), (2049, 3), (4500, 3), (10000, 2)):
        for nshards in (1, 2, 3, 6):
            bounds = random_bounds(rng, C, nshards)
            x = make_logits(rng, (N, C), 3.0, dtype)
            t = make_target(rng, (N,), C, ignore_frac=0.2)
            for red in REDUCTIONS:
                check_all(x, t, bounds, dict(reduction=red), rng, what=f"[{isa}] C={C} {bounds}")


# Shards straddling the kernel's B-column blocks (of the vocabulary and of a shard), shards of
# one column at both ends and in the middle, one shard of everything. C = 3 B + 104.
def block_shardings(B):
    C = 3 * B + 104
    return C, [
        [(0, C)],
        [(0, B - 1), (B - 1, B + 1), (B + 1, 2 * B), (2 * B, 2 * B + 1), (2 * B + 1, C)],
        [(0, 1), (1, 2 * B + 4), (2 * B + 4, C)],  # a shard whose blocks sit at 1, B + 1, ...
        [(0, 1), (1, C - 1), (C - 1, C)],
        [(0, 3 * B // 2), (3 * B // 2, 3 * B // 2 + 1), (3 * B // 2 + 1, C)],
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_boundaries_and_targets_in_every_shard(isa, dtype, rng):
    """Targets at the first and last column of every shard (and inside), ignored rows."""
    C, shardings = block_shardings(block_classes(dtype))
    for bounds in shardings:
        t = []
        for a, b in bounds:
            t += [a, b - 1, (a + b) // 2]
        t += [-100, -100]
        t = np.array(t, dtype=np.int64)
        x = make_logits(rng, (len(t), C), 3.0, dtype)
        for red in REDUCTIONS:
            check_all(x, t, bounds, dict(reduction=red), rng, what=f"[{isa}] {bounds}")
        # The row losses land in the shard that owns the target: count and wy there only.
        _, _, merged, sts = sharded(x, t, bounds, {})
        for (a, b), st in zip(bounds, sts):
            own = (t >= a) & (t < b)
            np.testing.assert_array_equal(st[:, F["count"]], own.astype(float))
            np.testing.assert_array_equal(st[:, F["wy"]], own.astype(float))
            np.testing.assert_array_equal(st[:, F["columns"]], float(b - a))
        np.testing.assert_array_equal(merged[:, F["count"]], (t != -100).astype(float))
        np.testing.assert_array_equal(merged[:, F["columns"]], float(C))


def test_merge_orders_and_trees(isa, rng):
    """Every order and tree shape: the loss within float64 rounding of each other (the merge
    is associative up to rounding), the gradients within a few ULPs."""
    C, N = 5000, 6
    bounds = [(0, 700), (700, 701), (701, 2900), (2900, 4999), (4999, 5000)]
    x = make_logits(rng, (N, C), 4.0, np.float64)
    t = make_target(rng, (N,), C)
    kw = dict(label_smoothing=0.1, reduction="none")
    l0, g0, _, sts = sharded(x, t, bounds, kw)
    for _ in range(8):
        l1, g1, _, _ = sharded(x, t, bounds, kw, rng=rng)
        np.testing.assert_allclose(l1, l0, rtol=1e-14, atol=0)
        np.testing.assert_allclose(g1, g0, rtol=0, atol=4 * U64 * np.abs(g0).max())
    # Sequential merges in a reversed order: merge_stats(*s) is a left fold.
    m_rev = fx.merge_stats(*sts[::-1])
    np.testing.assert_allclose(fx.loss_from_stats(m_rev, reduction="none"), l0, rtol=1e-14)


def _stat_rows(rng, dtype):
    """Shard statistics with the awkward values: signed-zero maxima, NaN (different
    payloads: NaN logits and +inf logits, inf - inf), -inf shards, ignored rows, ±3e38."""
    C = 12
    x = make_logits(rng, (9, C), 2.0, dtype)
    x[0] = 0.0
    x[0, :6] = -0.0  # shard maxima -0.0 and +0.0
    x[1, 2] = np.nan  # NaN in shard 0
    x[1, 8] = np.inf  # inf in shard 1: NaN from inf - inf
    x[2, 6:] = -np.inf  # shard 1 masked
    x[3] = -np.inf  # all -inf
    x[4, 0], x[4, 11] = 3e38, -3e38
    x[5, 1] = np.nan  # ignored row with NaN
    x[6, 7] = -np.nan if dtype == np.float64 else np.nan
    t = np.array([0, 3, 1, 5, 0, -100, 7, 11, 6])
    return x, t


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_is_bitwise_commutative(isa, dtype, rng):
    x, t = _stat_rows(rng, dtype)
    C = x.shape[1]
    for kw in (
        {},
        dict(label_smoothing=0.2),
        dict(weight=make_weight(rng, C, dtype), label_smoothing=0.1, softcap=3.0),
    ):
        for bounds in ([(0, 6), (6, 12)], [(0, 1), (1, 7), (7, 12)], [(0, 3), (3, 4), (4, 12)]):
            _, _, _, sts = sharded(x, t, bounds, kw, stats_only=True)
            for i in range(len(sts)):
                for j in range(len(sts)):
                    assert_bitwise_equal(
                        fx.merge_stats(sts[i], sts[j]),
                        fx.merge_stats(sts[j], sts[i]),
                        f"{bounds} {i} {j}",
                    )
            if len(sts) == 3:
                a, b, c = sts
                ab_c = fx.merge_stats(fx.merge_stats(a, b), c)
                assert_bitwise_equal(ab_c, fx.merge_stats(c, fx.merge_stats(b, a)))
                assert_bitwise_equal(ab_c, fx.merge_stats(a, b, c))
    # Synthetic statistics: NaN payloads of both signs in every field, signed zeros.
    a = rng.standard_normal((64, NF))
    b = rng.standard_normal((64, NF))
    for arr in (a, b):
        bits = arr.view(np.uint64)
        pick = rng.random(arr.shape) < 0.2
        payload = rng.integers(1, 2**51, size=arr.shape, dtype=np.uint64)
        sign = rng.integers(0, 2, size=arr.shape, dtype=np.uint64) << np.uint64(63)
        bits[pick] = (np.uint64(0x7FF8000000000000) | payload | sign)[pick]
        arr[rng.random(arr.shape) < 0.1] = 0.0
        arr[rng.random(arr.shape) < 0.1] = -0.0
        arr[rng.random(arr.shape) < 0.05] = -np.inf
    assert_bitwise_equal(fx.merge_stats(a, b), fx.merge_stats(b, a), "synthetic")


def test_merge_of_one_and_field_rules(rng):
    """merge_stats of one array is a copy; the merge rules field by field."""
    a = np.array(
        [[1.0, 2.0, 0.5, -1.0, 1.0, 1.0, 3.0], [-np.inf, 0.0, 0.1, -np.inf, 0.0, 0.0, 4.0]]
    )
    b = np.array([[3.0, 1.5, 0.25, 2.0, 0.0, 0.0, 5.0], [2.0, 4.0, 0.2, 1.0, 2.0, 1.0, 1.0]])
    m1 = fx.merge_stats(a)
    assert m1 is not a and m1.dtype == np.float64
    assert_bitwise_equal(m1, a)
    m = fx.merge_stats(a, b)
    np.testing.assert_array_equal(m[:, 0], [3.0, 2.0])
    np.testing.assert_allclose(m[:, 1], [2.0 * math.exp(-2.0) + 1.5, 4.0], rtol=1e-15)
    np.testing.assert_array_equal(m[:, 2:], a[:, 2:] + b[:, 2:])


# ------------------------------------------------------------------------------------------
# special values


def _special(rng, dtype, C, bounds, extremes=True):
    """Rows with a masked shard, all -inf, NaN, +inf, ±3e38, ignored rows full of NaN."""
    (a0, b0), (a1, b1), (a2, b2) = bounds[0], bounds[1], bounds[-1]
    rows = []
    t = []

    def row():
        rows.append(make_logits(rng, (C,), 3.0, np.float64))
        return rows[-1]

    row()
    t.append(b1 - 1)  # plain
    r = row()
    r[a1:b1] = -np.inf
    t.append(a0)  # shard 1 masked
    r = row()
    r[a2:b2] = -np.inf
    t.append(b0 - 1)  # last shard masked
    r = row()
    r[:] = -np.inf
    t.append(a1)  # all -inf
    r = row()
    r[a2] = np.nan
    t.append(a0)  # NaN away from the target
    r = row()
    r[a1] = np.nan
    t.append(a1)  # NaN at the target
    r = row()
    r[b0 - 1] = np.inf
    t.append(a2)  # +inf: NaN, as the kernel
    r = row()
    r[:] = np.nan
    t.append(-100)  # ignored: 0 whatever it holds
    r = row()
    r[a1] = -np.inf
    t.append(a1)  # target masked: loss +inf
    if extremes:
        r = row()
        r[a0] = 3e38
        r[b2 - 1] = 3e38
        r[a1] = -3e38
        t.append(a0)  # loss log 2
        r = row()
        r[a0] = 3e38
        r[b2 - 1] = -3e38
        t.append(b2 - 1)  # loss 6e38
    return np.array(rows).astype(dtype), np.array(t, dtype=np.int64)


def _compare_special(got_l, got_g, ref_l, ref_g, tol, what):
    """Row losses: the same NaN and inf entries, finite ones within tol (relative to
    max(|ref|, 1)); gradients: NaN rows NaN in every column, the others finite and within
    tol of max |ref|. A scalar loss (reduced) is checked for its NaN / inf only."""
    got_l, ref_l = np.asarray(got_l, np.float64), np.asarray(ref_l, np.float64)
    np.testing.assert_array_equal(np.isnan(got_l), np.isnan(ref_l), err_msg=what)
    np.testing.assert_array_equal(np.isinf(got_l), np.isinf(ref_l), err_msg=what)
    np.testing.assert_array_equal(np.sign(got_l[np.isinf(ref_l)]), np.sign(ref_l[np.isinf(ref_l)]))
    fin = np.isfinite(ref_l)
    err = np.abs(got_l[fin] - ref_l[fin]) / np.maximum(np.abs(ref_l[fin]), 1.0)
    assert err.max(initial=0) <= tol, (what, err.max())
    nan_rows = np.isnan(ref_g).any(axis=-1)
    assert np.isnan(got_g[nan_rows]).all(), what  # NaN propagates to every shard
    ok = ~nan_rows
    assert np.isfinite(got_g[ok]).all(), what
    ge = np.abs(got_g[ok] - ref_g[ok]).max(initial=0) / max(np.abs(ref_g[ok]).max(initial=0), 1)
    assert ge <= tol, (what, ge)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(isa, dtype, rng):
    """Masked shards, rows of -inf, NaN propagation, ±3e38 against cross_entropy_ref (which
    spells out the limits) and the kernel. Class weights are 0 on the masked shards where
    smoothing is on (smoothing puts mass on every class: a masked class with a nonzero weight
    makes the loss +inf, tested separately)."""
    C = 4500
    tol = 1e-13 if dtype == np.float64 else 30 * U32
    for bounds in (
        [(0, 3), (3, 2100), (2100, 2101), (2101, 4500)],
        [(0, 2049), (2049, 2050), (2050, 4500)],
    ):
        masked = np.zeros(C, bool)
        masked[bounds[1][0] : bounds[1][1]] = True
        masked[bounds[-1][0] : bounds[-1][1]] = True
        for kw in (
            {},
            dict(weight=make_weight(rng, C, dtype)),
            dict(
                weight=np.where(masked, 0, make_weight(rng, C, dtype)).astype(dtype),
                label_smoothing=0.1,
            ),
        ):
            smooth = "label_smoothing" in kw
            # ±3e38 with smoothing: z' - max overflows float32 inside one block (the
            # one-machine kernel alike); without smoothing the row only needs max - z'_y.
            x, t = _special(rng, dtype, C, bounds, extremes=not smooth)
            for red in REDUCTIONS:
                kwr = dict(kw, reduction=red)
                loss, grad, _, _ = sharded(x, t, bounds, kwr, rng=rng)
                ref_l, ref_g = cross_entropy_ref(x, t, **kwr)
                what = f"[{isa}] {bounds} {sorted(kw)} {red}"
                if red == "none":
                    _compare_special(loss, grad, ref_l, ref_g, tol, what)
                    # The kernel agrees wherever its float32 row loss does not overflow.
                    k_l, k_g = fx.cross_entropy_with_grad(x, t, **kwr)
                    fin = np.isfinite(k_l) | ~np.isfinite(ref_l)
                    _compare_special(loss[fin], grad[fin], k_l[fin], k_g[fin], 2 * tol, what)
                else:
                    # NaN rows make the reduced loss NaN (+inf rows +inf), as the reference.
                    _compare_special(loss, grad, ref_l, ref_g, tol, what)


def test_masked_shard_with_weight_and_smoothing_is_inf(isa):
    """Smoothing spreads eps / C over every class: a masked (-inf) class of nonzero weight in
    another shard makes the loss +inf, as on one machine; its zero weight makes it finite."""
    rng = np.random.default_rng(5)
    C = 40
    x = make_logits(rng, (3, C), 2.0, np.float64)
    x[:, 30:] = -np.inf
    t = np.array([0, 5, 29])
    bounds = [(0, 30), (30, 40)]
    loss, _, _, _ = sharded(x, t, bounds, dict(label_smoothing=0.1, reduction="none"))
    assert np.isposinf(loss).all()
    assert np.isposinf(fx.cross_entropy(x, t, label_smoothing=0.1, reduction="none")).all()
    w = np.ones(C)
    w[30:] = 0.0
    kw = dict(label_smoothing=0.1, weight=w, reduction="none")
    loss, grad, _, _ = sharded(x, t, bounds, kw)
    ref_l, ref_g = cross_entropy_ref(x, t, **kw)
    np.testing.assert_allclose(loss, ref_l, rtol=1e-14)
    np.testing.assert_allclose(grad, ref_g, rtol=0, atol=1e-15)
    assert (grad[:, 30:] == 0).all()


def test_large_logits_keep_a_small_loss(isa):
    """±3e38 and 1e8 + O(1) logits: the loss log 2 of a tie at the max is not lost against
    lse ~ 3e38 (the loss is formed as (Q max - QZ) + Q log(sumexp), max - z'_y first)."""
    for dtype in DTYPES:
        x = np.array(
            [
                [3e38, 3e38, 1.0, -3e38, 0.0, 2.0],
                [1e8, 1e8, 0.0, 0.0, 1e8 - 1, 5.0],
                [-3e38, 3e38, 0.0, 0.0, 0.0, 0.0],
            ],
            dtype,
        )
        t = np.array([0, 4, 0])
        for bounds in ([(0, 1), (1, 3), (3, 6)], [(0, 4), (4, 6)], [(0, 6)]):
            loss, grad, _, _ = sharded(x, t, bounds, dict(reduction="none"))
            ref_l, ref_g = cross_entropy_ref(x, t, reduction="none")
            tol = 1e-15 if dtype == np.float64 else 4 * U32
            np.testing.assert_allclose(loss, ref_l, rtol=tol, err_msg=str(bounds))
            np.testing.assert_allclose(grad, ref_g, rtol=0, atol=tol, err_msg=str(bounds))


def test_all_rows_ignored(isa):
    rng = np.random.default_rng(2)
    C = 50
    x = make_logits(rng, (4, C), 3.0, np.float32)
    x[1, 3] = np.nan
    t = np.full(4, -100)
    bounds = [(0, 20), (20, 21), (21, 50)]
    for red in REDUCTIONS:
        for kw in (
            {},
            dict(label_smoothing=0.3, z_loss=0.1, weight=make_weight(rng, C, np.float32)),
        ):
            loss, grad, merged, _ = sharded(x, t, bounds, dict(kw, reduction=red), scale=2.5)
            assert (np.asarray(loss) == 0).all()
            assert (grad == 0).all() and not np.signbit(grad).any()
            assert fx.stats_denominator(merged) == 0.0
            assert (merged[:, F["count"]] == 0).all()


# ------------------------------------------------------------------------------------------
# the options


OPTION_CASES = {
    "weight": dict(weight=True),
    "smoothing": dict(label_smoothing=0.3),
    "weight+smoothing": dict(weight=True, label_smoothing=0.2, ignore_frac=0.25),
    "sample_weight": dict(sample_weight=True, ignore_frac=0.2),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=5.0),
    "logit_scale": dict(logit_scale=1.7),
    "normalizer": dict(normalizer=7.5),
    "ignore_index_0": dict(ignore_index=0, weight=True, label_smoothing=0.1),
    "all": dict(
        weight=True,
        label_smoothing=0.1,
        ignore_frac=0.2,
        sample_weight=True,
        z_loss=1e-2,
        softcap=5.0,
        logit_scale=1.7,
        normalizer=11.0,
    ),
}


def make_case(rng, shape, dtype, opts, probs):
    """(logits, target, keywords); weights in the logits' dtype (what every oracle sees)."""
    x = make_logits(rng, shape, 3.0, dtype)
    C = shape[-1]
    kw = {k: v for k, v in opts.items() if k not in ("weight", "sample_weight", "ignore_frac")}
    if opts.get("weight"):
        kw["weight"] = make_weight(rng, C, dtype)
    if opts.get("sample_weight"):
        sw = rng.uniform(0.0, 2.0, size=shape[:-1]).astype(dtype)
        sw.reshape(-1)[0] = 0.0
        kw["sample_weight"] = sw
    if probs:
        kw.pop("ignore_index", None)
        t = rng.random(shape).astype(dtype)  # need not sum to 1
        t[..., :3] = 0.0
    else:
        t = make_target(
            rng,
            shape[:-1],
            C,
            ignore_frac=opts.get("ignore_frac", 0.0),
            ignore_index=opts.get("ignore_index", -100),
        )
    return x, t, kw


@pytest.mark.parametrize("probs", [False, True], ids=["class", "probs"])
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options(isa, case, probs, rng):
    """Each option and all at once, both dtypes, every reduction, an upstream scale; class
    and probability targets (sharded columns)."""
    C = 2600
    bounds = [(0, 1), (1, 1300), (1300, 2050), (2050, 2600)]
    for dtype in DTYPES:
        x, t, kw = make_case(rng, (5, C), dtype, OPTION_CASES[case], probs)
        for red in REDUCTIONS:
            for scale in (1.0, -0.75):
                check_all(
                    x,
                    t,
                    bounds,
                    dict(kw, reduction=red),
                    rng,
                    scale=scale,
                    what=f"[{isa}] {case} {np.dtype(dtype).name}",
                )


def test_label_smoothing_uses_the_whole_vocabulary(isa):
    """eps / C with C = num_classes, not the shard's C (Megatron-LM #737): a shard's q field
    is exactly eps * C_shard / C (no weights, target elsewhere), its non-target gradient
    entries s (Q softmax - eps / C), and the loss that of the full logits. With eps / C_shard
    the loss would move by O(eps) and the gradient by eps (1 / C_shard - 1 / C)."""
    rng = np.random.default_rng(737)
    C, eps = 1000, 0.5
    bounds = [(0, 100), (100, 900), (900, 1000)]
    x = make_logits(rng, (4, C), 2.0, np.float64)
    t = np.array([5, 150, 950, 899])
    loss, grad, merged, sts = sharded(x, t, bounds, dict(label_smoothing=eps, reduction="sum"))
    for (a, b), st in zip(bounds, sts):
        own = (t >= a) & (t < b)
        expect_q = eps * (b - a) / C + np.where(own, 1.0 - eps, 0.0)
        np.testing.assert_allclose(st[:, F["q"]], expect_q, rtol=1e-15)
    np.testing.assert_allclose(merged[:, F["q"]], 1.0, rtol=1e-15)
    ref_l, ref_g = cross_entropy_ref(x, t, label_smoothing=eps, reduction="sum")
    np.testing.assert_allclose(loss, ref_l, rtol=1e-13)
    np.testing.assert_allclose(grad, ref_g, rtol=0, atol=1e-15)
    # The wrong normalisation is far outside these tolerances.
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    wrong = p[1, 0] - eps / 100  # row 1's target is in shard 1; column 0 in shard 0
    assert abs(grad[1, 0] - wrong) > 1e-3
    assert abs(grad[1, 0] - (p[1, 0] - eps / C)) < 1e-15
    # Probability targets: q0 = eps / C on every shard's columns too.
    pt = rng.random((4, C))
    loss, grad, _, _ = sharded(x, pt, bounds, dict(label_smoothing=eps, reduction="sum"))
    ref_l, ref_g = cross_entropy_full_ref(x, pt, label_smoothing=eps, reduction="sum")
    np.testing.assert_allclose(loss, ref_l, rtol=1e-13)
    np.testing.assert_allclose(grad, ref_g, rtol=0, atol=1e-13)


def test_stats_denominator_and_normalizer_across_row_blocks(isa):
    """stats_denominator is PyTorch's D (sum of s_n w[y_n] over counted rows); the row blocks
    of a batch (e.g. Dask chunks) add up, and shard_grad with the global D as normalizer
    gives each block its part of the full "mean" gradient."""
    rng = np.random.default_rng(3)
    C, N = 300, 10
    x = make_logits(rng, (N, C), 3.0, np.float64)
    t = make_target(rng, (N,), C, ignore_frac=0.3)
    w = make_weight(rng, C, np.float64)
    sw = rng.uniform(0.5, 2.0, N)
    bounds = [(0, 100), (100, 300)]
    kw = dict(weight=w, label_smoothing=0.1)
    _, _, merged, _ = sharded(x, t, bounds, kw, stats_only=True)
    counted = t != -100
    D = float(np.sum(sw[counted] * w[t[counted]]))
    np.testing.assert_allclose(fx.stats_denominator(merged, sample_weight=sw), D, rtol=1e-15)
    np.testing.assert_allclose(fx.stats_denominator(merged), np.sum(w[t[counted]]), rtol=1e-15)
    blocks = [slice(0, 4), slice(4, 10)]
    Ds = [fx.stats_denominator(merged[b], sample_weight=sw[b]) for b in blocks]
    np.testing.assert_allclose(sum(Ds), D, rtol=1e-15)
    full_l, full_g = fx.cross_entropy_with_grad(x, t, sample_weight=sw, **kw)
    parts_l = sum(fx.loss_from_stats(merged[b], sample_weight=sw[b], normalizer=D) for b in blocks)
    np.testing.assert_allclose(parts_l, full_l, rtol=1e-14)
    for b in blocks:
        g = np.concatenate(
            [
                fx.shard_grad(
                    x[b, lo:hi],
                    t[b],
                    merged[b],
                    offset=lo,
                    num_classes=C,
                    sample_weight=sw[b],
                    normalizer=D,
                    **shard_kw(kw, lo, hi),
                )
                for lo, hi in bounds
            ],
            1,
        )
        np.testing.assert_allclose(g, full_g[b], rtol=0, atol=1e-16)
    # Probability targets: D = sum_n s_n, counted once (in the shard at offset 0).
    pt = rng.random((N, C))
    _, _, merged, _ = sharded(x, pt, bounds, {}, stats_only=True)
    np.testing.assert_allclose(fx.stats_denominator(merged, sample_weight=sw), sw.sum(), rtol=1e-15)


# ------------------------------------------------------------------------------------------
# layouts, buffers, threads


def test_leading_batch_dims(isa, rng):
    C = 2100
    bounds = [(0, 5), (5, 2055), (2055, 2100)]
    for dtype in DTYPES:
        x = make_logits(rng, (2, 3, C), 3.0, dtype)
        t = make_target(rng, (2, 3), C, ignore_frac=0.2)
        sw = rng.uniform(0.5, 2.0, (2, 3)).astype(dtype)
        for red in REDUCTIONS:
            kw = dict(reduction=red, sample_weight=sw, label_smoothing=0.1, z_loss=1e-3)
            loss, grad, merged = check_all(x, t, bounds, kw, rng, what=f"3-D {red}")
            assert merged.shape == (2, 3, NF)
        pt = rng.random((2, 3, C)).astype(dtype)
        check_all(x, pt, bounds, dict(reduction="none", label_smoothing=0.1), rng, what="3-D p")


def test_strided_views_match_contiguous_copies_bitwise(isa, rng):
    """Shards as x[:, a:b] slices of the full array (row stride C, not C_shard), probability
    targets likewise, a transposed and a step-2 view: the same bits as contiguous copies."""
    C, N = 3000, 5
    for dtype in DTYPES:
        x = make_logits(rng, (N, C), 3.0, dtype)
        t = make_target(rng, (N,), C)
        pt = rng.random((N, C)).astype(dtype)
        w = make_weight(rng, C, dtype)
        for a, b in ((0, 1), (1, 2049), (2049, 3000)):
            for tgt_v, tgt_c in ((t, t), (pt[:, a:b], np.ascontiguousarray(pt[:, a:b]))):
                xv, xc = x[:, a:b], np.ascontiguousarray(x[:, a:b])
                assert not xv.flags.c_contiguous or b - a == C
                kw = dict(offset=a, num_classes=C, weight=w[a:b], label_smoothing=0.1)
                sv = fx.shard_stats(xv, tgt_v, **kw)
                sc = fx.shard_stats(xc, tgt_c, **kw)
                assert_bitwise_equal(sv, sc, "stats")
                # Statistics of the other rows' shards do not matter for the bits here: the
                # merged stats of all shards, taken from copies.
                _, _, merged, _ = sharded(
                    x,
                    t if tgt_v is t else pt,
                    [(0, 1), (1, 2049), (2049, 3000)],
                    dict(weight=w, label_smoothing=0.1),
                    stats_only=True,
                )
                gv = fx.shard_grad(xv, tgt_v, merged, **kw)
                gc = fx.shard_grad(xc, tgt_c, merged, **kw)
                assert gv.flags.c_contiguous
                assert_bitwise_equal(gv, gc, "grad")
        # Step-2 rows and a Fortran-ordered shard (copied by the wrapper): same bits.
        xs = np.asfortranarray(x[::2, 10:40])
        kw = dict(offset=10, num_classes=C)
        assert_bitwise_equal(
            fx.shard_stats(xs, t[::2], **kw), fx.shard_stats(np.ascontiguousarray(xs), t[::2], **kw)
        )


def test_out_and_in_place(isa, rng):
    """out= buffers and out=logits on a contiguous shard: the same bits as a fresh gradient,
    with softcap (tanh kept aside) and the target inside the shard."""
    for dtype in DTYPES:
        B = block_classes(dtype)  # a first shard one column longer than a block
        C = B + 452
        bounds = [(0, B + 1), (B + 1, C)]
        x = make_logits(rng, (4, C), 3.0, dtype)
        t = np.array([0, B, B + 1, C - 1])
        for kw in (
            dict(),
            dict(softcap=4.0, label_smoothing=0.1, z_loss=1e-3),
            dict(logit_scale=0.7, reduction="sum"),
        ):
            _, _, merged, _ = sharded(x, t, bounds, kw, stats_only=True)
            for a, b in bounds:
                skw = dict(
                    shard_kw(kw, a, b),
                    offset=a,
                    num_classes=C,
                    **{k: kw[k] for k in LOSS_KEYS if k in kw},
                )
                fresh = fx.shard_grad(x[:, a:b], t, merged, **skw)
                out = np.full((4, b - a), 7, dtype)
                r = fx.shard_grad(x[:, a:b], t, merged, out=out, **skw)
                assert r is out
                assert_bitwise_equal(out, fresh, "out=")
                xs = np.ascontiguousarray(x[:, a:b])
                r = fx.shard_grad(xs, t, merged, out=xs, **skw)
                assert r is xs
                assert_bitwise_equal(xs, fresh, "in place")


def test_thread_count_independence(isa):
    rng = np.random.default_rng(11)
    C, N = 4300, 37
    bounds = [(0, 2), (2, 2051), (2051, 4300)]
    for dtype in DTYPES:
        x = make_logits(rng, (N, C), 3.0, dtype)
        t = make_target(rng, (N,), C, ignore_frac=0.1)
        pt = rng.random((N, C)).astype(dtype)
        for tgt, kw in (
            (
                t,
                dict(
                    weight=make_weight(rng, C, dtype), label_smoothing=0.1, softcap=6.0, z_loss=1e-3
                ),
            ),
            (pt, dict(label_smoothing=0.2, logit_scale=1.3)),
        ):
            results = []
            for nt in (1, 2, 3):
                kwt = dict(kw, num_threads=nt)
                loss, grad, merged, sts = sharded(x, tgt, bounds, kwt)
                results.append((loss, grad, merged, sts))
            for loss, grad, merged, sts in results[1:]:
                assert_bitwise_equal(loss, results[0][0], "loss")
                assert_bitwise_equal(grad, results[0][1], "grad")
                assert_bitwise_equal(merged, results[0][2], "merged")
                for s, s0 in zip(sts, results[0][3]):
                    assert_bitwise_equal(s, s0, "stats")


def test_single_shard_is_the_kernel(isa, rng):
    """One shard of everything: the same block and affine passes as the kernel, so the
    gradient is the kernel's bit for bit without options; with class weights it may differ in
    the last bit (the kernel sums the weights in one run, a shard block by block)."""
    C = 5000
    for dtype in DTYPES:
        x = make_logits(rng, (6, C), 3.0, dtype)
        t = make_target(rng, (6,), C, ignore_frac=0.2)
        for kw in (
            dict(),
            dict(label_smoothing=0.1, softcap=5.0, z_loss=1e-3, reduction="sum"),
            dict(weight=make_weight(rng, C, dtype), label_smoothing=0.1),
        ):
            _, grad, _, _ = sharded(x, t, [(0, C)], kw)
            _, k_g = fx.cross_entropy_with_grad(x, t, **kw)
            what = f"{np.dtype(dtype).name} {sorted(kw)}"
            if "weight" not in kw:
                assert_bitwise_equal(grad, k_g, what)
            else:
                u = U64 if dtype == np.float64 else U32
                np.testing.assert_allclose(
                    grad, k_g, rtol=0, atol=4 * u * np.abs(k_g).max(), err_msg=what
                )


# ------------------------------------------------------------------------------------------
# errors: type, and nothing written


def _setup(dtype=np.float32):
    rng = np.random.default_rng(9)
    C = 20
    x = make_logits(rng, (4, C), 2.0, dtype)
    t = np.array([0, 7, 19, -100])
    bounds = [(0, 8), (8, 20)]
    _, _, merged, sts = sharded(x, t, bounds, {}, stats_only=True)
    return x, t, bounds, merged, sts


def _grad_raises(exc, x, t, st, match=None, **kw):
    """shard_grad raises exc, with out= and in place, and writes nothing."""
    xs = np.ascontiguousarray(x)
    out = np.full(xs.shape, 3, xs.dtype)
    with pytest.raises(exc, match=match):
        fx.shard_grad(xs, t, st, out=out, **kw)
    assert (out == 3).all()
    before = xs.copy()
    with pytest.raises(exc, match=match):
        fx.shard_grad(xs, t, st, out=xs, **kw)
    assert_bitwise_equal(xs, before, "in-place logits")


@pytest.mark.parametrize("offset,num_classes", [(13, 20), (-1, 20), (0, 7), (0, 0), (21, 20)])
def test_bad_offset_or_num_classes(offset, num_classes):
    x, t, _, merged, _ = _setup()
    xs = x[:, 0:8]
    with pytest.raises(ValueError, match="does not fit"):
        fx.shard_stats(xs, t, offset=offset, num_classes=num_classes)
    _grad_raises(
        ValueError, xs, t, merged, match="does not fit", offset=offset, num_classes=num_classes
    )
    with pytest.raises(TypeError):
        fx.shard_stats(xs, t, offset=1.5, num_classes=20)
    with pytest.raises(TypeError):
        fx.shard_stats(xs, t, offset=0, num_classes="20")


@pytest.mark.parametrize("bad", [20, -1, 10**6, -101])
def test_target_out_of_range(bad):
    """A target outside [0, num_classes) that is not ignore_index: IndexError naming it, from
    every shard (also those that do not own the column), nothing written."""
    x, t, _, merged, _ = _setup()
    t2 = t.copy()
    t2[1] = bad
    for a, b in ((0, 8), (8, 20)):
        with pytest.raises(IndexError, match=r"target\[1\]"):
            fx.shard_stats(x[:, a:b], t2, offset=a, num_classes=20)
        _grad_raises(
            IndexError, x[:, a:b], t2, merged, match=r"target\[1\]", offset=a, num_classes=20
        )
    # A target >= C_shard but < num_classes is fine (owned by another shard).
    fx.shard_stats(x[:, 0:8], t, offset=0, num_classes=20)


def test_stats_wrong_shape_or_dtype():
    x, t, _, merged, _ = _setup()
    xs = x[:, 0:8]
    kw = dict(offset=0, num_classes=20)
    for bad, exc in (
        (merged[:3], ValueError),
        (merged[:, :6], ValueError),
        (merged[None], ValueError),
        (merged[0], ValueError),
        (merged.astype(np.float32), TypeError),
        (np.zeros((4, NF), np.int64), TypeError),
        (np.float64(1.0), ValueError),
    ):
        _grad_raises(exc, xs, t, bad, **kw)
        if not (
            isinstance(bad, np.ndarray)
            and bad.ndim >= 1
            and bad.shape[-1] == NF
            and bad.dtype == np.float64
        ):
            with pytest.raises(exc):
                fx.loss_from_stats(bad)
            with pytest.raises(exc):
                fx.stats_denominator(bad)
            with pytest.raises(exc):
                fx.merge_stats(bad, bad)


def test_stats_not_covering_num_classes():
    """A shard missing from the merge, or one merged twice: ValueError from
    loss_from_stats(num_classes=...) and from shard_grad (nothing written)."""
    x, t, bounds, merged, (s0, s1) = _setup()
    for bad in (
        s0,
        s1,
        fx.merge_stats(s0, s1, s1),
        fx.merge_stats(s0, s0, s1),
        fx.merge_stats(merged, merged),
    ):
        with pytest.raises(ValueError, match="cover|count"):
            fx.loss_from_stats(bad, num_classes=20)
        for a, b in bounds:
            _grad_raises(
                ValueError, x[:, a:b], t, bad, match="cover|count", offset=a, num_classes=20
            )
    # Without num_classes the loss is not checked: that is the caller's choice.
    fx.loss_from_stats(s0)
    with pytest.raises(ValueError):
        fx.loss_from_stats(merged, num_classes=0)
    # A row whose statistics count it twice although the columns add up.
    twice = merged.copy()
    twice[0, F["count"]] = 2.0
    with pytest.raises(ValueError, match="count"):
        fx.loss_from_stats(twice, num_classes=20)


def test_stats_with_another_ignore_index():
    """Statistics computed with ignore_index=7 (row 1 not counted) used with the default: the
    target says row 1 counts, the statistics say it does not -> ValueError, nothing written;
    and the other way round."""
    x, t, bounds, merged, _ = _setup()
    t7 = np.where(t == -100, 3, t)
    _, _, m7, _ = sharded(x, t7, bounds, dict(ignore_index=7), stats_only=True)
    assert m7[1, F["count"]] == 0
    for a, b in bounds:
        _grad_raises(ValueError, x[:, a:b], t7, m7, match="ignore_index", offset=a, num_classes=20)
    t2 = t.copy()
    t2[3] = 0  # stats ignored row 3 (-100); the target now counts it
    for a, b in bounds:
        _grad_raises(
            ValueError, x[:, a:b], t2, merged, match="ignore_index", offset=a, num_classes=20
        )


def test_float16_shards_raise_type_error():
    x, t, _, merged, _ = _setup()
    for dt in (np.float16, np.int32):
        xh = x[:, 0:8].astype(dt)
        with pytest.raises(TypeError):
            fx.shard_stats(xh, t, offset=0, num_classes=20)
        with pytest.raises(TypeError):
            fx.shard_grad(xh, t, merged, offset=0, num_classes=20)


def test_bad_options():
    x, t, _, merged, _ = _setup()
    xs = x[:, 0:8]
    kw = dict(offset=0, num_classes=20)
    for bad in ("avg", None, 2):
        with pytest.raises(ValueError):
            fx.loss_from_stats(merged, reduction=bad)
        _grad_raises(ValueError, xs, t, merged, reduction=bad, **kw)
    for z in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError):
            fx.loss_from_stats(merged, z_loss=z)
        _grad_raises(ValueError, xs, t, merged, z_loss=z, **kw)
    for s in (math.inf, -math.inf, math.nan):
        _grad_raises(ValueError, xs, t, merged, scale=s, match="scale", **kw)
    _grad_raises(TypeError, xs, t, merged, scale=None, **kw)
    for n in (-1.0, math.nan):
        with pytest.raises(ValueError):
            fx.loss_from_stats(merged, normalizer=n)
        _grad_raises(ValueError, xs, t, merged, normalizer=n, **kw)
    for eps in (-0.1, 1.5):
        with pytest.raises(ValueError):
            fx.shard_stats(xs, t, label_smoothing=eps, **kw)
        _grad_raises(ValueError, xs, t, merged, label_smoothing=eps, **kw)
    for cap in (0.0, -1.0):
        with pytest.raises(ValueError):
            fx.shard_stats(xs, t, softcap=cap, **kw)
    with pytest.raises(ValueError):
        fx.shard_stats(xs, t, logit_scale=0.0, **kw)
    with pytest.raises(ValueError):
        fx.shard_stats(xs, t, weight=np.ones(20, np.float32), **kw)  # the full weights
    _grad_raises(ValueError, xs, t, merged, weight=np.ones(20, np.float32), **kw)
    with pytest.raises(ValueError):
        fx.loss_from_stats(merged, sample_weight=np.ones(3))
    _grad_raises(ValueError, xs, t, merged, sample_weight=np.ones(3, np.float32), **kw)
    with pytest.raises(ValueError):
        fx.shard_stats(xs, t[:3], **kw)
    with pytest.raises(ValueError):  # probability targets of the full width
        fx.shard_stats(xs, np.ones((4, 20), np.float32), **kw)
    with pytest.raises(ValueError):
        fx.shard_stats(xs, np.ones((4, 8), np.float32), ignore_index=0, **kw)
    with pytest.raises(ValueError):
        fx.shard_stats(np.zeros((4, 0), np.float32), t, **kw)
    with pytest.raises(ValueError):
        fx.shard_stats(np.float32(1.0), t, **kw)


def test_merge_stats_bad_arguments():
    _, _, _, merged, (s0, s1) = _setup()
    with pytest.raises(TypeError):
        fx.merge_stats()
    with pytest.raises(ValueError, match="shape"):
        fx.merge_stats(s0, s1[:3])
    with pytest.raises(ValueError, match="shape"):
        fx.merge_stats(s0, s1[None])
    with pytest.raises(ValueError):
        fx.merge_stats(s0[:, :6], s1[:, :6])
    s0c, s1c = s0.copy(), s1.copy()
    fx.merge_stats(s0, s1)
    assert_bitwise_equal(s0, s0c)  # the inputs are not merged into
    assert_bitwise_equal(s1, s1c)


def test_out_wrong_shape_dtype_or_read_only():
    x, t, _, merged, _ = _setup()
    xs = x[:, 0:8]
    kw = dict(offset=0, num_classes=20)
    for out, exc in (
        (np.zeros((4, 9), np.float32), ValueError),
        (np.zeros((4, 8), np.float64), ValueError),
        (np.zeros((8, 4), np.float32).T, ValueError),
        ([[0.0] * 8] * 4, TypeError),
    ):
        before = np.array(out, copy=True)
        with pytest.raises(exc):
            fx.shard_grad(xs, t, merged, out=out, **kw)
        np.testing.assert_array_equal(np.asarray(out), before)
    ro = np.zeros((4, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fx.shard_grad(xs, t, merged, out=ro, **kw)
    assert (ro == 0).all()
    # out= overlapping the stats, or in place on a strided shard (not C-contiguous).
    xv = x[:, 0:8]
    before = x.copy()
    with pytest.raises(ValueError):
        fx.shard_grad(xv, t, merged, out=xv, **kw)
    assert_bitwise_equal(x, before)
