"""The non-temporal store path (off by default, FASTXENT_STREAM_BYTES=N turns it on) gives the
same bits as plain stores, for every ISA, aligned and misaligned outputs, with options."""

import os
import subprocess
import sys
import textwrap


def test_streaming_stores_are_bit_identical():
    code = textwrap.dedent("""
        import numpy as np, fastxent as fx
        from fastxent import _core
        rng = np.random.default_rng(0)
        results = {}
        for isa in fx.available_isas():
            _core.set_isa(isa)
            for C in (1000, 2053, 5000):
                x = (rng.standard_normal((97, C)) * 3).astype(np.float32)
                y = rng.integers(0, C, 97)
                y[5] = -100
                w = rng.random(C).astype(np.float32)
                for kw in ({}, dict(weight=w, label_smoothing=0.1, softcap=20.0, z_loss=1e-3)):
                    for off in (0, 1, 3):   # misaligned out= starts
                        buf = np.empty(97 * C + off, np.float32)
                        out = buf[off:].reshape(97, C)
                        for nt in (1, 2):
                            loss, g = fx.cross_entropy_with_grad(x, y, out=out, num_threads=nt, **kw)
                            key = (isa, C, len(kw), off, nt)
                            results[key] = (float(loss), g.tobytes())
        import pickle, sys
        sys.stdout.buffer.write(pickle.dumps(results))
    """)
    outs = []
    for env_value in (None, "1"):
        env = dict(os.environ)
        env.pop("FASTXENT_STREAM_BYTES", None)
        if env_value:
            env["FASTXENT_STREAM_BYTES"] = env_value
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env,
                             timeout=300)
        assert res.returncode == 0, res.stderr.decode()
        import pickle
        outs.append(pickle.loads(res.stdout))
    plain, streamed = outs
    assert plain.keys() == streamed.keys()
    for k in plain:
        assert plain[k] == streamed[k], k
