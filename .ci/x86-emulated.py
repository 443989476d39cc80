"""Smoke run of the installed package on an emulated x86-64 CPU without AVX-512 (qemu-user's
TCG CPU "max": AVX2 at most), run by .ci/x86-emulated. On an AVX-512 CI machine it catches an
AVX-512 instruction reached before the CPU check (version 0053cfa built the AVX-512 kernel
table to compare its address and died with SIGILL on every AVX2-only CPU, at the first call
with a gradient). Every dispatch path runs once per ISA the emulated CPU offers, checked
against a float64 NumPy reference: rows, short rows, the column layout, classes split across
threads, streamed stores, 16-bit logits, sigmoid, shard statistics and the companions."""

import os
import sys

import numpy as np

import fastxent as fx


def ref(z, t):
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(-1)) + m[..., 0]
    rows = lse - np.take_along_axis(z, t[..., None], -1)[..., 0]
    g = np.exp(z - lse[..., None])
    np.put_along_axis(g, t[..., None], np.take_along_axis(g, t[..., None], -1) - 1, -1)
    return rows.mean(), g / rows.size


def check(name, z, t, **kw):
    loss, g = fx.cross_entropy_with_grad(z, t, num_threads=2, **kw)
    rl, rg = ref(np.asarray(z, np.float64), t)
    tol = 2e-2 if z.dtype.itemsize == 2 else 1e-5
    assert abs(float(loss) - rl) <= tol * max(1.0, abs(rl)), (name, float(loss), rl)
    err = np.abs(np.asarray(g, np.float64) - rg).max()
    assert err <= tol * max(np.abs(rg).max(), 1e-30), (name, err)
    assert abs(float(fx.cross_entropy(z, t)) - rl) <= tol * max(1.0, abs(rl)), name


isas = fx.available_isas()
assert "avx512" not in isas, f"the emulated CPU has no AVX-512, yet available_isas() = {isas}"
rng = np.random.default_rng(0)
for isa in isas:
    fx._core.set_isa(isa)  # (what FASTXENT_ISA does at import)
    for N, C in [(32, 10), (300, 1000), (2, 70000), (5, 3)]:
        check(
            f"{isa} {N}x{C}", rng.standard_normal((N, C), dtype=np.float32), rng.integers(0, C, N)
        )
    x = rng.standard_normal((4, 7, 33), dtype=np.float32)
    t = rng.integers(0, 7, (4, 33))
    loss, g = fx.cross_entropy_with_grad(x, t, axis=1)
    l2, g2 = fx.cross_entropy_with_grad(np.moveaxis(x, 1, -1), t)
    assert np.allclose(loss, l2, rtol=1e-6) and np.allclose(g, np.moveaxis(g2, -1, 1), atol=1e-7)
    check(
        f"{isa} float16",
        rng.standard_normal((64, 500)).astype(np.float16),
        rng.integers(0, 500, 64),
    )
    try:
        import ml_dtypes

        h = rng.standard_normal((64, 500)).astype(ml_dtypes.bfloat16)
        check(f"{isa} bfloat16", h, rng.integers(0, 500, 64))
    except ImportError:
        pass
    z = rng.standard_normal((64, 300), dtype=np.float32)
    y = (rng.random((64, 300)) < 0.5).astype(np.float32)
    fx.sigmoid_cross_entropy_with_grad(z, y)
    fx.log_softmax(z)
    st = fx.shard_stats(z, rng.integers(0, 300, 64), offset=0, num_classes=300)
    assert np.all(np.isfinite(st))
stream = os.environ.get("FASTXENT_STREAM_BYTES")
print(f"x86-emulated smoke: passed on {isas} (FASTXENT_STREAM_BYTES={stream})")
sys.exit(0)
