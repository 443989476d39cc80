"""The benchmark's description of the machine and build (``python -m fastxent info`` and the
header of ``python -m fastxent bench``): the CPU's name and fields, the logical CPU count,
the OpenMP version, the compiler and its flags, the gradient streaming threshold and the
environment variables that change the timings. Re-exported by fastxent.bench.
"""

from __future__ import annotations

import os
import platform
from typing import Dict

import numpy as np

from . import _core

_OMP_VERSIONS = {
    200505: "2.5",
    200805: "3.0",
    201107: "3.1",
    201307: "4.0",
    201511: "4.5",
    201811: "5.0",
    202011: "5.1",
    202111: "5.2",
    202411: "6.0",
}
_ENV_SHOWN = (
    "OMP_NUM_THREADS",
    "OMP_PROC_BIND",
    "OMP_WAIT_POLICY",
    "FASTXENT_ISA",
    "FASTXENT_STREAM_BYTES",
    "FASTXENT_RECOMPUTE_BYTES",
    "FASTXENT_SHORT_ROWS",
)


# ----------------------------------------------------------------------------- environment
def cpu_fields() -> Dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key and value:
                    fields.setdefault(key, value)
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's name, with CPUID's vendor, family and model where Linux reports them (a VM's
    name, e.g. "AMD EPYC", does not say which generation it is)."""
    fields = cpu_fields()
    name = (
        next(
            (fields[k] for k in ("model name", "Model", "cpu model", "Processor") if k in fields),
            "",
        )
        or platform.processor()
        or platform.machine()
        or "unknown"
    )
    if "vendor_id" in fields and "cpu family" in fields and "model" in fields:
        name += f" [{fields['vendor_id']} family {fields['cpu family']} model {fields['model']}]"
    return name


def all_threads() -> int:
    """What "all" means for --threads: the logical CPUs (else the OpenMP default)."""
    return os.cpu_count() or _core.default_num_threads() or 1


def system_info() -> Dict[str, str]:
    """Label -> value lines describing this build and machine (``python -m fastxent info``)."""
    from . import __version__, active_isa, available_isas

    bi = dict(getattr(_core, "build_info", {}))
    omp = int(bi.get("openmp") or 0)
    if _core.has_openmp():
        ver = _OMP_VERSIONS.get(omp, "?")
        omp_s = f"yes (_OPENMP {omp} = OpenMP {ver}), default threads {_core.default_num_threads()}"
    else:
        omp_s = "no (single-threaded build)"
    env = ", ".join(
        f"{k}={os.environ[k]}"
        for k in sorted(os.environ)
        if k.startswith("OPENBLAS_") or k in _ENV_SHOWN
    )
    return {
        "fastxent": __version__,
        "ISA": f"{active_isa()} active (available: {', '.join(available_isas())})",
        "stream": _stream_text(_core.stream_bytes()),
        "OpenMP": omp_s,
        "compiler": str(bi.get("compiler", "?")),
        "flags": str(bi.get("cxx_flags", "?")).strip() or "(none)",
        "numpy": np.__version__,
        "python": platform.python_version(),
        "CPU": f"{cpu_model()} ({os.cpu_count() or '?'} logical CPUs, {platform.machine()})",
        "env": env or "(no OPENBLAS_*/OMP_*/FASTXENT_* set)",
    }


def _stream_text(nbytes: int) -> str:
    if nbytes <= 0:
        return "plain stores for every gradient (no non-temporal stores)"
    size = f"{nbytes >> 20} MiB" if nbytes % (1 << 20) == 0 else f"{nbytes} bytes"
    return f"non-temporal gradient stores from {size} (out=, not in place)"


def format_info(info: Dict[str, str]) -> str:
    w = max(map(len, info))
    return "\n".join(f"{k:<{w}}  {v}" for k, v in info.items())
