"""Float64 NumPy reference for fastxent, plus the helpers the tests share.

The reference follows the contract literally (PyTorch ``F.cross_entropy`` semantics). For
every counted row n (``target[n] != ignore_index``), with logp = log_softmax(z_n):

    row_n = (1 - eps) * (-w[y_n] * logp[y_n]) + (eps / C) * sum_c (-w_c * logp[c])
    "sum"  = sum_n row_n
    "mean" = sum_n row_n / sum_n w[y_n]      (0 when that denominator is 0: fastxent's choice)
    "none" = row_n, 0 for ignored rows

    grad[n, c] = s * (Q_n * softmax(z_n)_c - q_nc)
    q_nc = (1 - eps) * w[y_n] * [c == y_n] + (eps / C) * w_c,   Q_n = sum_c q_nc
    s = 1 / sum_n w[y_n] for "mean", 1 for "sum" and "none"; ignored rows: 0.

Limits the library defines (and the reference therefore spells out):
- a term with a zero factor is 0, even when its other factor is inf (0 * inf := 0): that is
  the limit of the formula as a masked logit goes to -inf with a zero weight on it;
- a row whose logits are all -inf has loss +inf and the gradient of equal logits
  (uniform softmax), the limit of a row of equal finite logits;
- NaN anywhere in a counted row makes that row's loss and gradient NaN.

Accuracy of the reference itself: log-sum-exp by max shift with log1p of the sum of the
non-maximal terms, so a loss close to 0 (target = argmax with large logits) keeps its relative
accuracy; the target entry of the gradient uses 1 - p_y = sum_{c != y} p_c (no cancellation).
Everything is float64, so the reference is good to a few 1e-16 relative: far below every
tolerance used against it.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Optional, Tuple, Union

import numpy as np

# Unit roundoffs (half an ULP of 1): the natural scale of every tolerance in the tests.
U32 = float(np.finfo(np.float32).eps) / 2  # 5.96e-8


def block_classes(dtype) -> int:
    """The kernel's block length (classes) for logits of `dtype`: float64 has its own, every
    other dtype is computed in float32. Tests put class counts and shard cuts around it."""
    from fastxent import _core

    return int(_core.block_classes(8 if np.dtype(dtype).itemsize == 8 else 4))


BLOCK32 = block_classes(np.float32)  # 4096
BLOCK64 = block_classes(np.float64)  # 2048
U64 = float(np.finfo(np.float64).eps) / 2  # 1.11e-16


def _mul0(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a * b with 0 * anything = 0 (the limit convention above), NaN * x stays NaN."""
    with np.errstate(invalid="ignore"):
        prod = a * b
    return np.where((a == 0) & ~np.isnan(b), 0.0, prod)


def cross_entropy_ref(
    logits,
    target,
    *,
    weight=None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tuple[Union[float, np.ndarray], np.ndarray]:
    """(loss, grad) in float64. loss is a float for "mean"/"sum", an array of
    logits.shape[:-1] for "none"; grad has logits' shape."""
    z_in = np.asarray(logits)
    shape = z_in.shape
    C = shape[-1]
    z = z_in.astype(np.float64).reshape(-1, C)
    N = z.shape[0]
    # Targets as Python ints first: uint64 values above 2**63 must not wrap.
    y_obj = np.asarray(target).reshape(-1)
    counted = np.array([int(v) != ignore_index for v in y_obj], dtype=bool)
    y = np.array([int(v) if c else 0 for v, c in zip(y_obj, counted)], dtype=np.int64)
    if np.any(counted & ((y < 0) | (y >= C))):
        raise IndexError("reference: target out of range")
    w = np.ones(C) if weight is None else np.asarray(weight).astype(np.float64)
    eps = float(label_smoothing)
    rows = np.arange(N)

    wy = np.where(counted, w[y], 0.0)
    D = float(np.sum(wy))
    if reduction == "mean":
        s = 1.0 / D if D != 0 else 0.0
    else:
        s = 1.0

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.max(z, axis=1) if C else np.zeros(N)  # NaN propagates through np.max
        dead = np.isneginf(m)  # all -inf: the limit of equal logits
        zs = np.where(dead[:, None], 0.0, z - np.where(dead, 0.0, m)[:, None])  # <= 0
        e = np.exp(zs)
        am = np.argmax(np.where(np.isnan(zs), -np.inf, zs), axis=1)
        e_rest = e.copy()
        e_rest[rows, am] = 0.0
        rest = e_rest.sum(axis=1)  # S - 1, S = sum_c exp(z_c - m)
        log_s = np.log1p(rest)  # log S
        S = 1.0 + rest
        nlogp = log_s[:, None] - zs  # -log softmax >= 0; +inf on -inf classes
        p = e / S[:, None]  # softmax
        nll = nlogp[rows, y]
        smooth = np.sum(_mul0(np.broadcast_to(w, (N, C)), nlogp), axis=1)
        row = np.zeros(N)
        if eps < 1.0:
            row = row + _mul0((1.0 - eps) * wy, nll)
        if eps > 0.0:
            row = row + (eps / C) * smooth
        row = np.where(dead & ~np.isnan(row), np.inf, row)
        row = np.where(counted, row, 0.0)

        # Gradient. Target entry without cancellation:
        # Q p_y - q_y = (Q - q_y) - Q (1 - p_y), 1 - p_y = (S - e_y) / S.
        W = float(np.sum(w))
        Q = (1.0 - eps) * wy + (eps / C) * W
        q = np.broadcast_to((eps / C) * w, (N, C)).copy()
        q[rows, y] += (1.0 - eps) * wy
        g = Q[:, None] * p - q
        e_not_y = e.copy()
        e_not_y[rows, y] = 0.0
        one_minus_py = e_not_y.sum(axis=1) / S
        gy = (Q - q[rows, y]) - Q * one_minus_py
        g[rows, y] = gy
        g = s * g
        g = np.where(counted[:, None], g, 0.0)
        if reduction == "mean" and D == 0:
            g = np.zeros_like(g)

    g = g.reshape(shape)
    if reduction == "none":
        return row.reshape(shape[:-1]), g
    with np.errstate(invalid="ignore"):
        total = float(np.sum(row))
    if reduction == "sum":
        return total, g
    if reduction == "mean":
        return (total / D if D != 0 else 0.0), g
    raise ValueError(reduction)


def torch_cross_entropy(
    logits,
    target,
    *,
    weight=None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    dtype=np.float64,
):
    """(loss, grad) from PyTorch's F.cross_entropy + autograd, computed in `dtype`, returned
    as float64 arrays ("none": gradient of the sum of the row losses). Import torch only
    through pytest.importorskip in the calling test."""
    import torch
    import torch.nn.functional as F

    z = np.array(logits, dtype=dtype, copy=True)
    C = z.shape[-1]
    zt = torch.from_numpy(z.reshape(-1, C)).requires_grad_(True)
    yt = torch.from_numpy(np.array(target, dtype=np.int64, copy=True).reshape(-1))
    wt = None if weight is None else torch.from_numpy(np.array(weight, dtype=dtype, copy=True))
    loss = F.cross_entropy(
        zt,
        yt,
        weight=wt,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    loss.sum().backward()
    l_np = loss.detach().numpy().astype(np.float64)
    g_np = zt.grad.numpy().astype(np.float64).reshape(z.shape)
    if reduction == "none":
        return l_np.reshape(z.shape[:-1]), g_np
    return float(l_np), g_np


# ----------------------------------------------------------------------------------------
# error measures and comparisons


def loss_error(got, ref) -> float:
    """max_n |got_n - ref_n| / max(|ref_n|, 1).

    The loss is m - z_y + log S (S = sum_c exp(z_c - m) >= 1): the float rounding of S is a
    *relative* error on S, i.e. an *absolute* error on the loss, so a loss below 1 can only be
    expected to be right to an absolute error of a few ULPs of 1; above 1, relative."""
    g = np.asarray(got, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if g.size == 0:
        return 0.0
    return float(np.max(np.abs(g - r) / np.maximum(np.abs(r), 1.0)))


def grad_error(got, ref, terms=None) -> float:
    """max |got - ref| / max |ref|: every entry of a row's gradient is a * e_c - b * w_c with
    the same a, so its error is relative to the size of the row's largest entries, not to the
    (possibly tiny) entry itself. ``terms``: a gradient whose entries show the size of those
    terms where ``ref`` is a cancellation of them (label smoothing: see
    check_against_reference); the scale is then the larger of the two."""
    g = np.asarray(got, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if r.size == 0:
        return 0.0
    scale = float(np.max(np.abs(r)))
    if terms is not None:
        scale = max(scale, float(np.max(np.abs(np.asarray(terms, dtype=np.float64)))))
    err = float(np.max(np.abs(g - r)))
    return err / scale if scale > 0 else err


def bits(a) -> bytes:
    """The exact bytes of an array or NumPy scalar, with its dtype and shape."""
    arr = np.asarray(a)
    return repr((arr.dtype.str, arr.shape)).encode() + np.ascontiguousarray(arr).tobytes()


def run_ok(script: str, timeout: float = 300) -> None:
    """Runs a Python script in a fresh interpreter that sees this test run's modules (for
    settings fixed at start-up, such as XLA_FLAGS); it must exit 0 and print "ok"."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def assert_bitwise_equal(a, b, what: str = "") -> None:
    aa, bb = np.asarray(a), np.asarray(b)
    assert aa.dtype == bb.dtype, f"{what}: dtype {aa.dtype} != {bb.dtype}"
    assert aa.shape == bb.shape, f"{what}: shape {aa.shape} != {bb.shape}"
    if bits(aa) != bits(bb):
        ua = np.ascontiguousarray(aa).view(np.uint8).reshape(-1)
        ub = np.ascontiguousarray(bb).view(np.uint8).reshape(-1)
        k = int(np.flatnonzero(ua != ub)[0]) // aa.itemsize
        raise AssertionError(
            f"{what}: not bitwise identical; first difference at flat index "
            f"{k}: {aa.reshape(-1)[k]!r} != {bb.reshape(-1)[k]!r}"
        )


def make_logits(rng: np.random.Generator, shape, scale: float, dtype) -> np.ndarray:
    """scale * randn, rounded to dtype (the reference then sees exactly the same values)."""
    return (scale * rng.standard_normal(shape)).astype(dtype)


def make_target(
    rng: np.random.Generator, shape, C: int, ignore_frac: float = 0.0, ignore_index: int = -100
) -> np.ndarray:
    y = rng.integers(0, C, size=shape, dtype=np.int64)
    if ignore_frac:
        y = np.where(rng.random(shape) < ignore_frac, ignore_index, y)
    return y


def make_weight(rng: np.random.Generator, C: int, dtype) -> np.ndarray:
    return rng.uniform(0.25, 2.0, size=C).astype(dtype)


Weight = Optional[np.ndarray]


def option_kwargs(case: dict, rng: np.random.Generator, N: int, C: int, dtype) -> dict:
    """The keywords of a test case, its "w" / "s" placeholders drawn as class weights (C) and
    sample weights (N) in [0.2, 2)."""
    kw = dict(case)
    if kw.get("weight") == "w":
        kw["weight"] = rng.uniform(0.2, 2.0, C).astype(dtype)
    if kw.get("sample_weight") == "s":
        kw["sample_weight"] = rng.uniform(0.2, 2.0, N).astype(dtype)
    return kw


def default_isa() -> str:
    """The ISA `import fastxent` selected: FASTXENT_ISA when the suite runs under it (the
    same normalisation as fastxent/__init__.py), else "auto" (the best)."""
    return os.environ.get("FASTXENT_ISA", "").strip().lower() or "auto"


# ----------------------------------------------------------------------------------------
# The full option set: sample weights, z-loss, softcap, logit scale, normalizer, probability
# targets, any class axis. Float64 NumPy (analytic gradient) and PyTorch float64 (autograd).


def transform_ref(z: np.ndarray, softcap=None, logit_scale: float = 1.0):
    """(z', dz'/dz) in float64: softcap * tanh(logit_scale * z / softcap), or logit_scale * z."""
    z = np.asarray(z, dtype=np.float64)
    if softcap is None:
        return logit_scale * z, np.full(z.shape, float(logit_scale))
    with np.errstate(invalid="ignore"):
        t = np.tanh(logit_scale * z / softcap)
    return softcap * t, logit_scale * (1.0 - t * t)


def is_probability_target(logits, target) -> bool:
    t = np.asarray(target)
    return t.dtype.kind == "f" or (t.dtype.itemsize == 2 and t.dtype.name == "bfloat16")


def cross_entropy_full_ref(
    logits,
    target,
    *,
    axis: int = -1,
    reduction: str = "mean",
    weight=None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    sample_weight=None,
    z_loss: float = 0.0,
    softcap=None,
    logit_scale: float = 1.0,
    normalizer=None,
    scales: bool = False,
):
    """(loss, grad) in float64 for the whole contract, literally:

        z' = softcap * tanh(logit_scale * z / softcap)   (or logit_scale * z),
        lse_n = logsumexp(z'_n),
        class targets:  row_n = s_n [(1-eps) w[y_n] (lse_n - z'_{n,y_n})
                                     + (eps/C) sum_c w_c (lse_n - z'_{n,c}) + z_loss lse_n^2]
                        (0 for ignored rows), D = sum over counted rows of s_n w[y_n];
        prob. targets:  q = p (1-eps) + eps/C,
                        row_n = s_n [sum_c w_c q_{n,c} (lse_n - z'_{n,c}) + z_loss lse_n^2],
                        D = sum_n s_n;
        normalizer overrides D; "mean" = sum row_n / D (0 with a zero gradient if D = 0).

    The gradient is analytic: d row_n / d z'_{n,c} = s_n [(Q_n + 2 z_loss lse_n) softmax_c
    - u_{n,c}] with u the soft target (u = (1-eps) w[y] [c = y] + (eps/C) w_c, or w_c q_{n,c})
    and Q_n = sum_c u_{n,c}; then times dz'/dz. For finite inputs only (the -inf / NaN limits
    are cross_entropy_ref's business). loss is a float for "mean"/"sum", an array of the rows'
    shape for "none"; grad has the logits' shape ("none": gradient of the sum of rows).

    With scales=True also returns (loss_scale, grad_scale), the sizes errors are measured
    against (see scaled_error): loss_scale = the reduction of |s_n| max(|row_n / s_n|, 1)
    (per row for "none": an absolute error on lse and z' is what float rounding makes);
    grad_scale = max over entries of |s_n / D| ((Q_n + 2 z_loss |lse_n|) softmax_c + u_c) *
    logit_scale, the size of the two terms whose difference is the gradient, times the largest
    chain factor (the gradient cancels where softmax matches the target, and the softcap's
    1 - tanh^2 is only known to an absolute error)."""
    z_in = np.asarray(logits).astype(np.float64)
    ax = axis % z_in.ndim
    zm = np.moveaxis(z_in, ax, -1)
    rshape = zm.shape[:-1]
    C = zm.shape[-1]
    z = zm.reshape(-1, C)
    N = z.shape[0]
    zp, dz = transform_ref(z, softcap, logit_scale)
    w = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64).reshape(C)
    s = (
        np.ones(N)
        if sample_weight is None
        else np.asarray(sample_weight, dtype=np.float64).reshape(N)
    )
    eps = float(label_smoothing)
    probs = is_probability_target(logits, target)
    m = zp.max(axis=1, keepdims=True) if C else np.zeros((N, 1))
    ex = np.exp(zp - m)
    S = ex.sum(axis=1, keepdims=True)
    lse = (m + np.log(S))[:, 0]
    p = ex / S
    nlogp = lse[:, None] - zp  # lse - z' >= 0
    if probs:
        q = np.moveaxis(np.asarray(target).astype(np.float64), ax, -1).reshape(N, C)
        u = w * (q * (1.0 - eps) + eps / C)
        counted = np.ones(N, dtype=bool)
        den_w = s
    else:
        y_all = np.asarray(target).astype(np.int64).reshape(N)
        counted = y_all != ignore_index
        y = np.where(counted, y_all, 0)
        u = np.broadcast_to((eps / C) * w, (N, C)).copy()
        u[np.arange(N), y] += (1.0 - eps) * w[y]
        den_w = np.where(counted, s * w[y], 0.0)
    Q = u.sum(axis=1)
    row = s * ((u * nlogp).sum(axis=1) + z_loss * lse * lse)
    row = np.where(counted, row, 0.0)
    gz = s[:, None] * ((Q + 2.0 * z_loss * lse)[:, None] * p - u)
    gz = np.where(counted[:, None], gz, 0.0)
    D = float(np.sum(den_w)) if normalizer is None else float(normalizer)
    if reduction == "mean":
        scale = 1.0 / D if D != 0 else 0.0
    else:
        scale = 1.0
    g = (scale * gz * dz).reshape(zm.shape)
    g = np.moveaxis(g, -1, ax)
    inner = (u * nlogp).sum(axis=1) + z_loss * lse * lse
    lsc = np.where(counted, np.abs(s) * np.maximum(np.abs(inner), 1.0), 0.0)
    terms = np.abs(s)[:, None] * ((Q + 2.0 * z_loss * np.abs(lse))[:, None] * p + np.abs(u))
    gsc = float(np.max(np.where(counted[:, None], terms, 0.0), initial=0.0)) * abs(scale)
    gsc *= float(logit_scale)
    if reduction == "none":
        out = (row.reshape(rshape), g)
        lsc = np.where(counted, lsc, 1.0).reshape(rshape)
    else:
        total = float(np.sum(row))
        out = ((total * scale if reduction == "mean" else total), g)
        lsc = float(np.sum(lsc)) * (abs(scale) if reduction == "mean" else 1.0)
    if scales:
        return out + (lsc, gsc)
    return out


def scaled_error(got, ref, scale) -> float:
    """max |got - ref| / scale (elementwise scale allowed; a zero scale counts as 1)."""
    g = np.asarray(got, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if r.size == 0:
        return 0.0
    sc = np.asarray(scale, dtype=np.float64)
    sc = np.where(sc > 0, sc, 1.0)
    with np.errstate(invalid="ignore"):
        d = np.where(g == r, 0.0, np.abs(g - r))
    return float(np.max(d / sc))


def torch_cross_entropy_full(
    logits,
    target,
    *,
    axis: int = -1,
    reduction: str = "mean",
    weight=None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    sample_weight=None,
    z_loss: float = 0.0,
    softcap=None,
    logit_scale: float = 1.0,
    normalizer=None,
    torch_layout: bool = False,
):
    """(loss, grad) from PyTorch in float64: F.cross_entropy(z', ..., reduction="none") with
    weight / label_smoothing / ignore_index, plus z_loss * logsumexp(z')^2 on counted rows,
    times sample_weight, reduced by hand (D as in the contract); the gradient w.r.t. z by
    autograd. Without torch_layout the class axis is moved last and the rows flattened to
    (rows, C); with torch_layout (axis must be 1) the logits go to PyTorch as
    (N, C, d1, ..., dk) directly, PyTorch's class dimension 1. Import torch only through
    pytest.importorskip in the calling test."""
    import torch
    import torch.nn.functional as F

    z_np = np.array(logits, dtype=np.float64, copy=True)
    ax = axis % z_np.ndim
    C = z_np.shape[ax]
    rshape = z_np.shape[:ax] + z_np.shape[ax + 1 :]
    zt = torch.from_numpy(z_np).requires_grad_(True)
    if torch_layout:
        assert ax == 1 and z_np.ndim >= 2
        zz = zt
    else:
        zz = torch.movedim(zt, ax, -1).reshape(-1, C)
    zp = (
        softcap * torch.tanh(logit_scale * zz / softcap)
        if softcap is not None
        else logit_scale * zz
    )
    wt = None if weight is None else torch.tensor(np.asarray(weight, dtype=np.float64))
    probs = is_probability_target(logits, target)
    if probs:
        tt = torch.from_numpy(np.array(target, dtype=np.float64, copy=True))
        if not torch_layout:
            tt = torch.movedim(tt, ax, -1).reshape(-1, C)
        ce = F.cross_entropy(zp, tt, weight=wt, label_smoothing=label_smoothing, reduction="none")
        counted = torch.ones(ce.shape, dtype=torch.bool)
    else:
        ty = torch.from_numpy(np.array(target, dtype=np.int64, copy=True))
        ty = ty if torch_layout else ty.reshape(-1)
        ce = F.cross_entropy(
            zp,
            ty,
            weight=wt,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction="none",
        )
        counted = ty != ignore_index
    lse = torch.logsumexp(zp, dim=1)
    zero = torch.zeros((), dtype=torch.float64)
    if sample_weight is None:
        sw = torch.ones(ce.shape, dtype=torch.float64)
    else:
        sw = torch.from_numpy(np.array(sample_weight, dtype=np.float64, copy=True))
        sw = sw.reshape(ce.shape)
    row = torch.where(counted, sw * (ce + z_loss * lse * lse), zero)
    if reduction == "none":
        out = row
    elif reduction == "sum":
        out = row.sum()
    else:
        if normalizer is not None:
            D = torch.tensor(float(normalizer), dtype=torch.float64)
        elif probs:
            D = sw.sum()
        else:
            wy = (
                torch.ones(ce.shape, dtype=torch.float64)
                if wt is None
                else wt[torch.where(counted, ty, 0)]
            )
            D = torch.where(counted, sw * wy, zero).sum()
        out = row.sum() / D if float(D) != 0 else row.sum() * 0.0
    out.sum().backward()
    g = zt.grad.numpy().copy()
    if reduction == "none":
        return out.detach().numpy().reshape(rshape), g
    return float(out.detach()), g


def central_difference_grad(f, z: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Central differences (f(z + h e_i) - f(z - h e_i)) / 2h of a scalar float64 function,
    entry by entry. Truncation error h^2 |f'''| / 6 plus rounding ~ u |f| / h: with h = 1e-5
    on O(1) functions both are ~1e-10 absolute."""
    z = np.array(z, dtype=np.float64, copy=True)
    g = np.empty_like(z)
    flat, gf = z.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        v = flat[i]
        flat[i] = v + h
        fp = float(f(z))
        flat[i] = v - h
        fm = float(f(z))
        flat[i] = v
        gf[i] = (fp - fm) / (2.0 * h)
    return g


def option_tolerance(dtype, z, kw) -> float:
    """The error bound of the kernel against the float64 reference with options kw (derived in
    tests/test_options.py's docstring): 1e-12 in float64; in float32 30 u, plus 19 u cap + 15 u
    with a softcap or 4 u max|z'| with a logit scale, times 1 + 2 z_loss max(lse)."""
    cap = kw.get("softcap")
    alpha = kw.get("logit_scale", 1.0)
    lam = kw.get("z_loss", 0.0)
    zp, _ = transform_ref(z, cap, alpha)
    zmax = float(np.max(np.abs(zp), initial=0.0))
    lse_max = zmax + math.log(z.shape[kw.get("axis", -1)])
    if np.dtype(dtype) == np.float64:
        base = 1e-12
    else:
        base = 30 * U32
        if cap is not None:
            base += 19 * U32 * cap + 15 * U32
        elif alpha != 1.0:
            base += 4 * U32 * zmax
    return base * (1.0 + 2.0 * lam * lse_max)


def check_weight_derivative(f, g, w, h: float = 1e-7, rtol: float = 1e-5) -> None:
    """g (the derivative of the float64 scalar f at the row weights w, from autodiff) against
    forward differences, each weight moved up by h (a weight of 0 cannot move down: negative
    weights are refused); the loss is linear or a ratio of linear functions of the weights,
    so the difference's error is O(h)."""
    w = np.asarray(w, np.float64)
    f0 = float(f(w))
    for j in range(w.size):
        e = np.zeros_like(w)
        e.reshape(-1)[j] = h
        fd = (float(f(w + e)) - f0) / h
        assert abs(float(np.asarray(g).reshape(-1)[j]) - fd) <= rtol * max(1.0, abs(fd)), (j, g, fd)
