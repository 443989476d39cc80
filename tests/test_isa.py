"""Instruction-set dispatch: fastxent.available_isas / active_isa, fastxent._core.set_isa, and
the FASTXENT_ISA environment variable (read once, at import: tested in subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastxent as fx
from fastxent import _core
from fastxent.bench import cpu_fields
from reference import U32, default_isa, make_logits, make_target, make_weight

KNOWN = ("scalar", "neon", "avx2", "avx512")  # best last; neon on aarch64 only


def _run_python(code: str, isa_env=None, tmp_path=None):
    """Runs `code` in a fresh interpreter (this one's sys.executable) with FASTXENT_ISA set
    to isa_env (or removed when None); returns (returncode, stdout, stderr)."""
    env = dict(os.environ)
    env.pop("FASTXENT_ISA", None)
    if isa_env is not None:
        env["FASTXENT_ISA"] = isa_env
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path) if tmp_path else None,
    )
    return proc.returncode, proc.stdout, proc.stderr


REPORT = (
    "import json, fastxent as fx; "
    "print(json.dumps({'active': fx.active_isa(), 'available': fx.available_isas()}))"
)


def test_available_isas_shape():
    isas = fx.available_isas()
    assert isinstance(isas, list) and isas and all(isinstance(s, str) for s in isas)
    assert isas[0] == "scalar", "the portable fallback is always there, and worst (first)"
    assert len(set(isas)) == len(isas)
    assert set(isas) <= set(KNOWN), isas
    assert [s for s in KNOWN if s in isas] == isas, "best last"
    assert fx.available_isas() is not fx.available_isas()  # a fresh list each time
    assert isinstance(fx.active_isa(), str) and fx.active_isa() in isas


def test_default_is_the_best(tmp_path):
    rc, out, err = _run_python(REPORT, None, tmp_path)
    assert rc == 0, err
    info = json.loads(out)
    assert info["active"] == info["available"][-1]
    assert info["available"] == fx.available_isas()


@pytest.mark.parametrize("name", fx.available_isas())
def test_set_isa_switches(name):
    try:
        _core.set_isa(name)
        assert fx.active_isa() == name
        z = np.linspace(-3, 3, 21).reshape(3, 7)
        assert np.isfinite(fx.cross_entropy(z, [0, 3, 6]))
    finally:
        _core.set_isa(default_isa())


@pytest.mark.parametrize("auto", ["auto", ""])
def test_set_isa_auto_restores_the_best(auto):
    try:
        _core.set_isa("scalar")
        _core.set_isa(auto)
        assert fx.active_isa() == fx.available_isas()[-1]
    finally:
        _core.set_isa(default_isa())


def _unusable_names():
    names = ["bogus", "AVX3", "sse2", "avx", "scalar,avx2"]
    names += [k for k in KNOWN if k not in fx.available_isas()]  # not built here, or CPU lacks it
    return names


@pytest.mark.parametrize("name", _unusable_names() + ["scalar ", "SCALAR"])
def test_set_isa_unknown_raises_and_keeps_the_current_one(name):
    try:
        _core.set_isa("scalar")
        with pytest.raises(ValueError) as info:
            _core.set_isa(name)
        for isa in fx.available_isas():
            assert isa in str(info.value), f"message should list {isa}: {info.value}"
        assert fx.active_isa() == "scalar"
    finally:
        _core.set_isa(default_isa())


@pytest.mark.parametrize("name", fx.available_isas())
def test_env_var_forces_isa(name, tmp_path):
    rc, out, err = _run_python(REPORT, name, tmp_path)
    assert rc == 0, err
    assert json.loads(out)["active"] == name


@pytest.mark.parametrize("value", ["auto", "", "  ", " AUTO "])
def test_env_var_auto_or_empty_is_the_best(value, tmp_path):
    rc, out, err = _run_python(REPORT, value, tmp_path)
    assert rc == 0, err
    info = json.loads(out)
    assert info["active"] == info["available"][-1]


@pytest.mark.parametrize("value", _unusable_names())
def test_env_var_unknown_fails_import_listing_the_isas(value, tmp_path):
    code = (
        "import sys\n"
        "try:\n"
        "    import fastxent\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR:', e)\n"
        "    sys.exit(3)\n"
        "except BaseException as e:\n"
        "    print('OTHER:', type(e).__name__, e)\n"
        "    sys.exit(4)\n"
        "print('IMPORTED', fastxent.active_isa())\n"
    )
    rc, out, err = _run_python(code, value, tmp_path)
    assert rc == 3, f"expected ImportError, got rc={rc}: {out}{err}"
    assert "FASTXENT_ISA" in out
    for isa in fx.available_isas():
        assert isa in out.split(":", 2)[-1], f"message should list {isa}: {out}"


def test_isa_results_agree(rng):
    """Every ISA computes the same function: results agree to the accuracy the tests demand
    of each against the reference (they need not be bitwise equal: vector widths differ)."""
    results = {}
    # Each ISA is within TOL of the exact value (test_cross_entropy.py): two of them within
    # twice that of each other.
    for dtype, tol in ((np.float64, 2e-12), (np.float32, 2 * 24 * U32)):
        z = make_logits(rng, (64, 3001), 4.0, dtype)
        y = make_target(rng, (64,), 3001, ignore_frac=0.1)
        w = make_weight(rng, 3001, dtype)
        try:
            for isa in fx.available_isas():
                _core.set_isa(isa)
                results[isa] = fx.cross_entropy_with_grad(
                    z, y, weight=w, label_smoothing=0.1, reduction="none"
                )
        finally:
            _core.set_isa(default_isa())
        base_l, base_g = results["scalar"]
        for isa, (l, g) in results.items():
            np.testing.assert_allclose(l, base_l, rtol=tol, err_msg=isa)
            np.testing.assert_allclose(
                g, base_g, rtol=0, atol=tol * np.max(np.abs(base_g)), err_msg=isa
            )


STREAM_CODE = (
    "import json, fastxent as fx; from fastxent import _core; out = {}\n"
    "for isa in fx.available_isas():\n"
    "    _core.set_isa(isa); out[isa] = _core.stream_bytes()\n"
    "print(json.dumps(out))"
)


def _stream_bytes_by_isa(env_value, tmp_path):
    """_core.stream_bytes() under each available ISA, in a fresh interpreter whose
    FASTXENT_STREAM_BYTES is env_value (unset when None)."""
    env = dict(os.environ)
    env.pop("FASTXENT_STREAM_BYTES", None)
    if env_value is not None:
        env["FASTXENT_STREAM_BYTES"] = env_value
    proc = subprocess.run(
        [sys.executable, "-c", STREAM_CODE],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.skipif(
    not cpu_fields().get("vendor_id"), reason="the vendor comes from /proc/cpuinfo (Linux only)"
)
def test_stream_default_follows_cpu_vendor_and_isa(tmp_path):
    """Non-temporal stores by default (64 MiB and more) on Intel CPUs and under the AVX-512
    kernel, else never; the active kernel decides per call (measurements: ce_detail.hpp)."""
    got = _stream_bytes_by_isa(None, tmp_path)
    assert list(got) == fx.available_isas()
    intel = cpu_fields()["vendor_id"] == "GenuineIntel"
    assert got == {isa: (64 << 20 if intel or isa == "avx512" else 0) for isa in got}, got


@pytest.mark.parametrize(
    "value, expected", [("0", 0), ("1", 1), ("123456789", 123456789), ("-5", 0)]
)
def test_stream_env_overrides_for_every_isa(value, expected, tmp_path):
    assert _stream_bytes_by_isa(value, tmp_path) == {isa: expected for isa in fx.available_isas()}
