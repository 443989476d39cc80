"""64-bit indexing: N * C > 2**31 float32 logits (8.6 GB), for every ISA.

Two shapes: many rows of an odd class count (row offsets n * C past 2**31, a SIMD tail on every
row) and a single row longer than 2**31 (column offsets past 2**31, the class-split path).
The only N x C buffer is the logits: the forward (reduction="none") reads them, then the
in-place call (out=logits) overwrites them with the gradient, after which they are generated
again from the same seed for the next ISA. The float64 reference is computed block by block
(never a float64 copy of the whole array): every row loss, and the gradient at sampled
positions, the last elements of the buffer included.

Marked slow (run with ``pytest -m slow``); skipped when /proc/meminfo's MemAvailable cannot
hold the logits plus working room.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastxent as fx
from fastxent import _core
from reference import default_isa

pytestmark = pytest.mark.slow

ELEMS = 2**31 + 2**21  # past 2**31 by 2M elements: the last ~2000 rows of 1003 lie beyond it
BLOCK = 1 << 22  # elements per float64 reference block (32 MB)
SHAPES = {
    "rows": ((ELEMS + 1002) // 1003, 1003),
    "one_row": (1, ELEMS + 5),
}


def _mem_available() -> int:
    """MemAvailable in bytes, or 0 when /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _fill(z: np.ndarray, seed: int) -> None:
    """Uniform logits in [-8, 8), written block by block (the same values for the same seed)."""
    rng = np.random.default_rng(seed)
    flat = z.reshape(-1)
    for s in range(0, flat.size, BLOCK):
        part = flat[s : s + BLOCK]
        rng.random(out=part, dtype=np.float32)
        part *= 16
        part -= 8


def _row_lse(z: np.ndarray) -> np.ndarray:
    """log-sum-exp of every row in float64, over blocks of at most BLOCK elements."""
    N, C = z.shape
    out = np.empty(N)
    if C <= BLOCK:
        rows = max(1, BLOCK // C)
        for s in range(0, N, rows):
            b = z[s : s + rows].astype(np.float64)
            m = b.max(axis=1, keepdims=True)
            out[s : s + rows] = m[:, 0] + np.log(np.exp(b - m).sum(axis=1))
    else:
        for n in range(N):
            row = z[n]
            m = max(float(row[s : s + BLOCK].max()) for s in range(0, C, BLOCK))
            total = sum(
                float(np.exp(row[s : s + BLOCK].astype(np.float64) - m).sum())
                for s in range(0, C, BLOCK)
            )
            out[n] = m + np.log(total)
    return out


def _sample_positions(N: int, C: int, rng) -> list:
    """(row, column) positions to check the gradient at: the first and last elements, those
    around flat index 2**31, and random ones (the caller adds some target entries)."""
    total = N * C
    flat = [0, 1, C - 1, 2**31 - 1, 2**31, 2**31 + 1, total - C, total - 2, total - 1]
    flat += [int(v) for v in rng.integers(0, total, 40)]
    return sorted({(f // C, f % C) for f in flat if 0 <= f < total})


@pytest.mark.parametrize("kind", list(SHAPES))
def test_more_than_2_pow_31_elements(kind):
    N, C = SHAPES[kind]
    assert N * C > 2**31
    need = N * C * 4 + (3 << 30)  # the logits, float64 blocks, targets, and headroom
    have = _mem_available()
    if have < need:
        pytest.skip(
            f"needs {need / 2**30:.1f} GiB of available memory, MemAvailable is "
            f"{have / 2**30:.1f} GiB"
        )

    seed = 20240607 + N
    rng = np.random.default_rng(seed + 1)
    y = rng.integers(0, C, N)
    # The last rows' targets at the last column: the very last element is a target entry.
    y[-1] = C - 1
    z = np.empty((N, C), np.float32)
    _fill(z, seed)

    lse = _row_lse(z)
    ref_rows = lse - z[np.arange(N), y].astype(np.float64)
    ref_mean = float(ref_rows.mean())
    pos = _sample_positions(N, C, rng)
    pos += [(n, int(y[n])) for n in {0, N // 2, N - 1}]  # target entries (p - 1)
    pos = sorted(set(pos))
    rows_at = np.array([p[0] for p in pos])
    cols_at = np.array([p[1] for p in pos])
    z_at = z[rows_at, cols_at].astype(np.float64)
    # grad of "mean" = (softmax - onehot) / N
    g_ref = (np.exp(z_at - lse[rows_at]) - (y[rows_at] == cols_at)) / N

    try:
        for i, isa in enumerate(fx.available_isas()):
            _core.set_isa(isa)
            if i:
                _fill(z, seed)  # the previous ISA's in-place call overwrote the logits
                assert np.array_equal(z[rows_at, cols_at], z_at.astype(np.float32))
            rows = fx.cross_entropy(z, y, reduction="none")
            np.testing.assert_allclose(
                rows, ref_rows, rtol=2e-6, atol=2e-6, err_msg=f"{isa}: row losses"
            )
            loss, g = fx.cross_entropy_with_grad(z, y, out=z)
            assert g is z
            assert abs(float(loss) - ref_mean) <= 2e-6 * abs(ref_mean), (isa, loss, ref_mean)
            np.testing.assert_allclose(
                z[rows_at, cols_at],
                g_ref,
                rtol=2e-5,
                atol=1e-6 / (N * C),
                err_msg=f"{isa}: gradient",
            )
            # Rows that are all gradient: each sums to 0 (softmax sums to 1, minus the one-hot).
            for n in {0, N - 1}:
                s = sum(
                    float(z[n, c : c + BLOCK].astype(np.float64).sum()) for c in range(0, C, BLOCK)
                )
                assert abs(s) <= 1e-5 / N, (isa, n, s)
    finally:
        _core.set_isa(default_isa())
