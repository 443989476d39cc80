#!/usr/bin/env python3
"""Generate cpp/src/exp_coeffs.hpp: every constant of the kernel's exp, from first principles.

    python tools/gen_exp_coeffs.py            # rewrite the header
    python tools/gen_exp_coeffs.py --check    # exit 1 if the committed header differs
    python tools/gen_exp_coeffs.py --fit      # print the Remez fits beside the shipped sets only

Needs mpmath (the test extra). Each value is computed in 300-bit arithmetic and rounded once
to the nearest float32/float64 (ties to even), then written as a C++17 hex-float literal. The
exp variants (cpp/src/kernel_exp.hpp):
  rr2-p6    float: x = n ln2 + r (two-constant Cody-Waite), |r| <= ln2/2, exp(r) = 1 + r P(r),
            P of degree 5 (scalar and AVX2 kernels).
  lut16-p3  float: n in sixteenths, |r| <= ln2/32, exp(r) = 2^(j/16) (1 + r q(r)), q of degree 2
            (AVX-512 kernel: one vpermps looks up the table).
  taylor13  double: x = n ln2 + r, |r| <= ln2/2, Taylor series of exp to r^13 (every kernel).

The one set this script does not derive is rr2-p6's P: the shipped coefficients are a relative-
error minimax fit made when the kernel was written, whose procedure was not recorded. They are
kept bit for bit (the kernel's results must not change) and checked exhaustively by
tests/cpp/test_exp_ulp.cpp; --fit recomputes the fit they describe (Remez on the relative error
of 1 + r P(r) against exp(r), P(0) = 1, |r| <= ln2/2) and prints how far the shipped set is.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from math import factorial
from pathlib import Path

try:
    import mpmath as mp
except ImportError:  # pragma: no cover - the test skips without mpmath
    sys.exit("gen_exp_coeffs.py needs mpmath: pip install mpmath")

mp.mp.prec = 300
HEADER = Path(__file__).resolve().parent.parent / "cpp" / "src" / "exp_coeffs.hpp"

F32 = (24, -126)  # significand bits, smallest normal exponent
F64 = (53, -1022)


def rn(x, fmt) -> mp.mpf:
    """x rounded to the nearest value of the binary format fmt (ties to even; normal range)."""
    bits, emin = fmt
    x = mp.mpf(x)
    if x == 0:
        return x
    _, e = mp.frexp(x)  # |x| = m 2^e, 1/2 <= m < 1
    assert e - 1 >= emin, "subnormal results are not needed here"
    scale = mp.mpf(2) ** (bits - e)
    y = x * scale
    q = mp.floor(y)
    d = y - q
    if d > 0.5 or (d == 0.5 and int(q) % 2 == 1):
        q += 1
    return q / scale


def hexf(v, fmt) -> str:
    """C++17 hex-float literal of v, which must be exactly representable in fmt."""
    assert rn(v, fmt) == v, "not representable"
    s = float(v).hex()  # a double holds every float32 and float64 value exactly
    sign = "-" if s.startswith("-") else ""
    mant, exp = s.lstrip("-")[2:].split("p")
    lead, _, frac = mant.partition(".")
    frac = frac.rstrip("0")
    lit = f"{sign}0x{lead}{'.' + frac if frac else ''}p{exp}"
    return lit + ("f" if fmt is F32 else "")


LN2 = mp.log(2)

# rr2-p6's P, highest degree first (Horner order), as shipped: see the module docstring.
SHIPPED_P6 = [
    "0x1.6ae72ep-10",
    "0x1.126784p-7",
    "0x1.555822p-5",
    "0x1.55541ap-3",
    "0x1.fffffcp-2",
    "0x1p+0",
]


def constants():
    """(name, C++ type, values, fmt, comment lines) for every emitted constant."""
    ln2_hi32 = mp.nint(LN2 * 2**9) / 2**9
    ln2_hi64 = mp.floor(LN2 * 2**32) / 2**32
    out = [
        (
            "kF32Lo",
            "float",
            [rn(mp.log(mp.mpf(2) ** -126), F32)],
            F32,
            ["float: RN(ln 2^-126) = RN(ln FLT_MIN); below it exp flushes to +0."],
        ),
        ("kF32Log2e", "float", [rn(1 / LN2, F32)], F32, ["RN(1 / ln 2)."]),
        (
            "kF32Ln2Hi",
            "float",
            [ln2_hi32],
            F32,
            [
                "ln 2 rounded to a multiple of 2^-9 (9 significant bits): n ln2_hi is exact for",
                "|n| < 2^15, and for n in sixteenths (lut16-p3), 16 n < 2^11.",
            ],
        ),
        ("kF32Ln2Lo", "float", [rn(LN2 - ln2_hi32, F32)], F32, ["RN(ln 2 - kF32Ln2Hi)."]),
        (
            "kF32Magic",
            "float",
            [mp.mpf(3) * 2**22],
            F32,
            ["1.5 * 2^23: adding it rounds to an integer, held in the low significand bits."],
        ),
        (
            "kF32Magic16",
            "float",
            [mp.mpf(3) * 2**18],
            F32,
            ["1.5 * 2^19: adding it rounds to a multiple of 1/16 (lut16-p3)."],
        ),
        (
            "kF64Lo",
            "double",
            [rn(mp.log(mp.mpf(2) ** -1022), F64)],
            F64,
            ["double: RN(ln 2^-1022) = RN(ln DBL_MIN); below it exp flushes to +0."],
        ),
        ("kF64Log2e", "double", [rn(1 / LN2, F64)], F64, ["RN(1 / ln 2)."]),
        (
            "kF64Ln2Hi",
            "double",
            [ln2_hi64],
            F64,
            [
                "ln 2 truncated to 32 fractional bits (fdlibm's split): n ln2_hi is exact for",
                "|n| < 2^21.",
            ],
        ),
        ("kF64Ln2Lo", "double", [rn(LN2 - ln2_hi64, F64)], F64, ["RN(ln 2 - kF64Ln2Hi)."]),
        (
            "kF64Magic",
            "double",
            [mp.mpf(3) * 2**51],
            F64,
            ["1.5 * 2^52: adding it rounds to an integer, held in the low significand bits."],
        ),
        (
            "kRr2P6",
            "float",
            [mp.mpf(float.fromhex(h)) for h in SHIPPED_P6],
            F32,
            [
                "rr2-p6: exp(r) ~ 1 + r P(r), P(r) = sum c_k r^k; _0 .. _5 hold c_5 .. c_0",
                "(Horner order). c_0 = 1 exactly, so exp(0) = 1 exactly. The shipped relative-error",  # noqa: E501 (the header's text)
                "minimax set (see tools/gen_exp_coeffs.py --fit): relative error 1.7e-8 in exact",
                "arithmetic.",
            ],
        ),
        (
            "kLut16P3",
            "float",
            [rn(mp.mpf(1) / 6, F32), mp.mpf(1) / 2, mp.mpf(1)],
            F32,
            [
                "lut16-p3: exp(r) ~ 1 + r q(r), q(r) = 1 + r/2 + r^2/6 (Taylor, RN(1/k!)), here",
                "_0 .. _2 hold 1/6, 1/2, 1 (Horner order); truncation <= 0.15 ULP on |r| <= ln2/32.",  # noqa: E501 (the header's text)
            ],
        ),
        (
            "kTaylor13",
            "double",
            [rn(mp.mpf(1) / factorial(k), F64) for k in range(13, -1, -1)],
            F64,
            [
                "taylor13: exp(r) ~ sum_{k<=13} RN(1/k!) r^k; _0 .. _13 hold 1/13! .. 1/0!",
                "(Horner order); truncation < 4e-18 relative on |r| <= ln2/2.",
            ],
        ),
        (
            "kExp2Sixteenths",
            "float",
            [rn(mp.mpf(2) ** (mp.mpf(j) / 16), F32) for j in range(16)],
            F32,
            [
                "lut16-p3's table: _j = RN(2^(j/16)), j = 0 .. 15 (vpermps index = the low 4 bits",
                "of t = x log2e + kF32Magic16).",
            ],
        ),
    ]
    return out


def render() -> str:
    lines = [
        "// Generated by tools/gen_exp_coeffs.py (mpmath); do not edit. Regenerate with",
        "//   python tools/gen_exp_coeffs.py          (--check: fail if this file is stale)",
        "// Every constant of the kernel's exp variants (kernel_exp.hpp: rr2-p6, lut16-p3,",
        "// taylor13) and of the AVX-512 2^(j/16) table (simd/vec_avx512.hpp), each rounded once",
        "// to nearest from a 300-bit value and written as a hex-float literal. ISA-neutral:",
        "// constants only, included by every ISA's translation unit.",
        "#pragma once",
        "",
        "namespace fastxent {",
        "namespace exp_coeffs {",
    ]
    for name, ctype, values, fmt, comment in constants():
        lines.append("")
        lines += [f"// {c}" for c in comment]
        # One scalar per value (a set's members suffixed by their index in the comment's order),
        # a set in one declaration: scalars fold to literals in the compiler's front end, so the
        # kernels' object code is that of literals written in place (array elements changed
        # GCC's inlining).
        if len(values) == 1:
            lines.append(f"inline constexpr {ctype} {name} = {hexf(values[0], fmt)};")
            continue
        decls = [f"{name}_{i} = {hexf(v, fmt)}" for i, v in enumerate(values)]
        row = f"inline constexpr {ctype}"
        for i, d in enumerate(decls):
            piece = f" {d}{';' if i == len(decls) - 1 else ','}"
            if len(row) + len(piece) > 99:
                lines.append(row)
                row = "   "
            row += piece
        lines.append(row)
    lines += ["", "}  // namespace exp_coeffs", "}  // namespace fastxent", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- --fit
def remez(f, w, fixed, free, lo, hi, grid=600):
    """Minimise max |w(r) (p(r) - f(r))| on [lo, hi] over the coefficients of the powers in free
    (the powers in fixed keep their values). Returns (coefficients, levelled error)."""
    with mp.workprec(120):
        n = len(free)

        def err(c, r):
            p = sum(v * r**k for k, v in fixed.items()) + sum(ci * r**k for ci, k in zip(c, free))
            return w(r) * (p - f(r))

        mid, rad = (lo + hi) / 2, (hi - lo) / 2
        pts = [mid - rad * mp.cos(mp.pi * (2 * i + 1) / (2 * (n + 1))) for i in range(n + 1)]
        for _ in range(30):
            a = mp.matrix(n + 1, n + 1)
            b = mp.matrix(n + 1, 1)
            for i, x in enumerate(pts):
                for j, k in enumerate(free):
                    a[i, j] = x**k
                a[i, n] = (-1) ** i / w(x)
                b[i] = f(x) - sum(v * x**k for k, v in fixed.items())
            s = mp.lu_solve(a, b)
            c, lev = [s[j] for j in range(n)], s[n]
            # One extremum per run of equal sign (a grid, then Newton on err'), n + 1 of them.
            runs = []
            for i in range(grid + 1):
                x = lo + (hi - lo) * i / grid
                v = err(c, x)
                if v == 0:
                    continue
                if runs and mp.sign(v) == mp.sign(runs[-1][1]):
                    if abs(v) > abs(runs[-1][1]):
                        runs[-1] = (x, v)
                else:
                    runs.append((x, v))

            def slope(t, c=c):
                return mp.diff(lambda u: err(c, u), t)

            ext = []
            for x, v in runs:
                if lo < x < hi:
                    try:
                        y = mp.findroot(slope, x)
                        if lo < y < hi and abs(err(c, y)) >= abs(v) and err(c, y) * v > 0:
                            x, v = y, err(c, y)
                    except (ValueError, ZeroDivisionError):
                        pass
                ext.append((x, v))
            while len(ext) > n + 1:
                ext.pop(0 if abs(ext[0][1]) < abs(ext[-1][1]) else -1)
            assert len(ext) == n + 1, "Remez lost the alternation"
            pts = [x for x, _ in ext]
            top = max(abs(v) for _, v in ext)
            if top / abs(lev) - 1 < mp.mpf(10) ** -12:
                break
        return c, abs(lev)


def max_rel(coeffs, lo, hi, form, n=2000):
    """Max relative error of exp(r) ~ form(poly(r), r) on [lo, hi] in exact arithmetic."""
    worst = mp.mpf(0)
    for i in range(n + 1):
        r = lo + (hi - lo) * i / n
        p = mp.mpf(0)
        for c in coeffs:  # Horner order
            p = p * r + c
        worst = max(worst, abs(form(p, r) / mp.exp(r) - 1))
    return worst


def ulp_diff(a, b, fmt):
    """(a - b) in units of b's last place in fmt."""
    _, e = mp.frexp(b)
    return float((a - b) / mp.mpf(2) ** (e - fmt[0]))


def fit_report() -> None:
    h = LN2 / 2
    shipped = [mp.mpf(float.fromhex(x)) for x in SHIPPED_P6]
    c, lev = remez(mp.exp, lambda r: 1 / mp.exp(r), {0: 1, 1: 1}, [2, 3, 4, 5, 6], -h, h)
    fit = [rn(x, F32) for x in reversed(c)] + [mp.mpf(1)]  # c_5 .. c_1, then c_0 = 1
    print(
        f"rr2-p6: Remez (1 + r P(r) vs exp, P(0) = 1, |r| <= ln2/2): levelled relative "
        f"error {mp.nstr(lev, 4)}"
    )
    print("  k  shipped          fit rounded      exact fit - shipped (ULP of c_k)")
    for k, (s, exact, f) in enumerate(zip(shipped, list(reversed(c)) + [mp.mpf(1)], fit)):
        print(f"  {5 - k}  {hexf(s, F32):16} {hexf(f, F32):16} {ulp_diff(exact, s, F32):+.2f}")

    def one_plus_rp(p, r):
        return 1 + r * p

    err_shipped = mp.nstr(max_rel(shipped, -h, h, one_plus_rp), 4)
    err_fit = mp.nstr(max_rel(fit, -h, h, one_plus_rp), 4)
    print(
        f"  relative error, exact arithmetic: shipped {err_shipped}, fit rounded to float {err_fit}"
    )
    s = LN2 / 32
    q, lev = remez(mp.exp, lambda r: 1 / mp.exp(r), {0: 1, 1: 1}, [2, 3], -s, s)
    taylor = [rn(mp.mpf(1) / 6, F32), mp.mpf(1) / 2, mp.mpf(1), mp.mpf(1)]
    err_taylor = mp.nstr(max_rel(taylor, -s, s, lambda p, r: p), 4)
    print(
        f"lut16-p3: shipped = Taylor (RN(1/6), 1/2, 1): relative error {err_taylor} on "
        f"|r| <= ln2/32; a Remez fit (1/2 -> {mp.nstr(q[0], 10)}, 1/6 -> {mp.nstr(q[1], 10)}) "
        f"levels it at {mp.nstr(lev, 4)}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if the header is not up to date")
    ap.add_argument("--fit", action="store_true", help="print the Remez fits (slow, ~10 s)")
    ap.add_argument("--output", type=Path, default=HEADER)
    args = ap.parse_args()
    text = render()
    if args.fit:
        fit_report()
    if args.check:
        old = args.output.read_text() if args.output.exists() else ""
        if old != text:
            sys.stdout.writelines(
                difflib.unified_diff(
                    old.splitlines(True), text.splitlines(True), str(args.output), "generated"
                )
            )
            print(f"{args.output} is stale: run python tools/gen_exp_coeffs.py", file=sys.stderr)
            return 1
        print(f"{args.output}: up to date")
        return 0
    if not args.fit:
        args.output.write_text(text)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
