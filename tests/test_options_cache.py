"""The validated options object handed to the kernel (fastxent._keywords.LossOptions.core):
built once per distinct set of options and reused, which is only right if equal options are
the same options bit for bit; validation therefore turns -0.0 into 0.0."""

import math

import numpy as np

import fastxent as fx
from fastxent import _keywords, _options


def test_equal_options_share_one_core_object():
    a = _options.LossOptions.from_keywords("sum", -100, 0.1, 1e-4, 30.0, 0.9, 2.0, 1)
    b = _options.LossOptions.from_keywords("sum", -100, 0.1, 1e-4, 30.0, 0.9, 2.0, 1)
    c = _options.LossOptions.from_keywords("sum", -100, 0.2, 1e-4, 30.0, 0.9, 2.0, 1)
    assert a.core() is b.core()
    assert c.core() is not a.core() and c.core().label_smoothing == 0.2


def test_negative_zero_options_are_zero():
    o = _options.LossOptions.from_keywords("mean", -100, -0.0, -0.0, None, 1.0, -0.0, None)
    for v in (o.label_smoothing, o.z_loss, o.normalizer):
        assert v == 0.0 and math.copysign(1.0, v) == 1.0


def test_negative_zero_smoothing_gives_the_bits_of_zero(rng):
    # Sample weights of both signs make a * e a negative zero where e underflows in rows of
    # negative weight: the sign of the smoothing offset b (eps / C) then shows in the
    # gradient's zeros (before validation turned -0.0 into 0.0, label_smoothing=-0.0 gave
    # 8 negative zeros here where 0.0 gave none). The cache is cleared before each call so
    # that one call cannot hand its options to the other.
    z = rng.standard_normal((16, 40)).astype(np.float32)
    z[:, 0] = -200.0  # e underflows to 0 in float32
    t = rng.integers(1, 40, 16)
    sw = rng.random(16).astype(np.float32) + 0.5
    sw[::2] *= -0.5
    for name in ("label_smoothing", "z_loss", "normalizer"):
        res = []
        for v in (-0.0, 0.0):
            _keywords._CORE_CACHE.clear()
            loss, g = fx.cross_entropy_with_grad(z, t, sample_weight=sw, **{name: v})
            res.append((np.asarray(loss).tobytes(), g.tobytes()))
        assert res[0] == res[1], name
