"""The alternative gradient paths, off by default, give the same bits as the default one, for
every ISA, aligned and misaligned outputs, in place, with options and probability targets:
non-temporal stores (FASTXENT_STREAM_BYTES=N) and the two-pass gradient that recomputes the
exponentials per block (FASTXENT_RECOMPUTE_BYTES=N)."""

import os
import subprocess
import sys
import textwrap

import pytest


@pytest.mark.parametrize("var", ["FASTXENT_STREAM_BYTES", "FASTXENT_RECOMPUTE_BYTES"])
def test_alternative_paths_are_bit_identical(var):
    code = textwrap.dedent("""
        import numpy as np, fastxent as fx
        from fastxent import _core
        rng = np.random.default_rng(0)
        results = {}
        for isa in fx.available_isas():
            _core.set_isa(isa)
            # One block per row, and several (blocks of 4096 float32 / 2048 float64 classes);
            # rows over 1 MiB, streamed one at a time instead of pipelined over two.
            for C, dt, N in ((1000, np.float32, 97), (2053, np.float32, 97),
                             (8253, np.float32, 97), (4099, np.float64, 97),
                             (262200, np.float32, 12)):
                x = (rng.standard_normal((N, C)) * 3).astype(dt)
                y = rng.integers(0, C, N)
                y[5] = -100             # ignored rows: between two streamed rows, and the last
                y[N - 1] = -100
                x[7] = -np.inf          # a row of all -inf (uniform limit)
                x[9, 3] = np.nan        # a NaN row
                w = rng.random(C).astype(dt)
                # Options with the softcap's fixed shift (20), and with the block max (50).
                for kw in ({}, dict(weight=w, label_smoothing=0.1, softcap=20.0, z_loss=1e-3),
                           dict(weight=w, softcap=50.0, logit_scale=0.7)):
                    for off in (0, 1, 3):   # misaligned out= starts
                        buf = np.empty(N * C + off, dt)
                        out = buf[off:].reshape(N, C)
                        for nt in (1, 2):
                            loss, g = fx.cross_entropy_with_grad(
                                x, y, out=out, num_threads=nt, **kw
                            )
                            key = (isa, C, len(kw), off, nt)
                            assert np.isnan(g[9]).all() and np.isnan(g[7]).sum() == 0
                            results[key] = (np.float64(loss).tobytes(), g.tobytes())
                    work = x.copy()
                    loss, g = fx.cross_entropy_with_grad(work, y, out=work, **kw)
                    results[(isa, C, len(kw), "in place")] = (
                        np.float64(loss).tobytes(),
                        g.tobytes(),
                    )
                p = rng.random((N, C)).astype(dt)
                loss, g = fx.cross_entropy_with_grad(x, p, label_smoothing=0.2, softcap=9.0)
                results[(isa, C, "probs")] = (np.float64(loss).tobytes(), g.tobytes())
                loss, g = fx.cross_entropy_with_grad(x, p, weight=w, softcap=60.0)
                results[(isa, C, "probs, weights")] = (np.float64(loss).tobytes(), g.tobytes())
            # Class weights of both signs without smoothing, a negative sample weight, entries
            # that underflow to 0: the zero entries' signs (a e - b w with b = -0) must agree
            # between the streamed rows' two writers of the gradient (inside the block loop
            # and at its edges) and the plain path.
            x = np.full((4, 40000), -200.0, np.float32)
            x[:, 0] = 0.0
            w = np.where(np.arange(40000) % 2 == 0, 1.0, -1.0).astype(np.float32)
            for nt in (1, 2):
                out = np.empty_like(x)
                loss, g = fx.cross_entropy_with_grad(x, np.zeros(4, np.int64), out=out,
                                                     weight=w,
                                                     sample_weight=-np.ones(4, np.float32),
                                                     reduction="none", num_threads=nt)
                results[(isa, "signed zeros", nt)] = (loss.tobytes(), g.tobytes())
            # The class axis 1 (column kernel): planes of 640 / 320 positions (64-byte class
            # rows: streamed, with a first tile up to the first aligned position when out= is
            # misaligned) and of 300 (not streamable), several tiles of 256 positions each.
            for shape, dt in (((2, 7, 640), np.float32), ((2, 5, 320), np.float64),
                              ((3, 6, 300), np.float32)):
                x = (rng.standard_normal(shape) * 3).astype(dt)
                y = rng.integers(0, shape[1], (shape[0], shape[2]))
                y[0, 5] = -100                  # an ignored position
                x[1, :, 7] = -np.inf            # a position of all -inf (uniform limit)
                x[0, 2, 9] = np.nan             # a NaN position
                w = rng.random(shape[1]).astype(dt)
                for kw in ({}, dict(weight=w, label_smoothing=0.1, softcap=20.0, z_loss=1e-3)):
                    for off in (0, 1, 3):
                        buf = np.empty(x.size + off, dt)
                        out = buf[off:].reshape(shape)
                        for nt in (1, 2):
                            loss, g = fx.cross_entropy_with_grad(x, y, axis=1, out=out,
                                                                 num_threads=nt, **kw)
                            assert np.isnan(g[0, :, 9]).all() and not np.isnan(g[1, :, 7]).any()
                            results[(isa, shape, len(kw), off, nt)] = (
                                np.float64(loss).tobytes(), g.tobytes())
                    work = x.copy()
                    loss, g = fx.cross_entropy_with_grad(work, y, axis=1, out=work, **kw)
                    results[(isa, shape, len(kw), "in place")] = (np.float64(loss).tobytes(),
                                                                  g.tobytes())
        import pickle, sys
        sys.stdout.buffer.write(pickle.dumps(results))
    """)
    outs = []
    for env_value in ("0", "1"):
        env = dict(os.environ)
        env.pop("FASTXENT_STREAM_BYTES", None)
        env.pop("FASTXENT_RECOMPUTE_BYTES", None)
        if env_value:
            env[var] = env_value
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, env=env, timeout=300
        )
        assert res.returncode == 0, res.stderr.decode()
        import pickle

        outs.append(pickle.loads(res.stdout))
    plain, streamed = outs
    assert plain.keys() == streamed.keys()
    for k in plain:
        assert plain[k] == streamed[k], k
