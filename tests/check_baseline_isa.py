"""Fails when an object file compiled for the baseline contains an instruction beyond it.

Usage: check_baseline_isa.py OBJECT...   (objects named isa_<name> other than isa_scalar are
skipped: they are the ISA-specific kernels of isa_list.hpp). On x86-64 the baseline is SSE2:
any VEX/EVEX-encoded instruction (mnemonics starting with 'v', ymm/zmm registers, AVX-512
mask registers) is a leak, typically an inline function or a template instantiated with ISA
flags and picked by the linker for baseline code, or LTO moving ISA code into baseline objects."""

import re
import shutil
import subprocess
import sys

BAD = re.compile(r"^\s*[0-9a-f]+:\s+(v[a-z0-9]+|kmov[a-z]*)\b|%[yz]mm\d+|%k[0-7]\b")


def main(paths):
    objdump = shutil.which("objdump")
    if objdump is None:
        print("objdump not found: cannot check", file=sys.stderr)
        return 1
    checked, leaks = 0, []
    for path in paths:
        base = path.replace("\\", "/").rsplit("/", 1)[-1]
        if base.startswith("isa_") and not base.startswith("isa_scalar"):
            continue
        out = subprocess.run(
            [objdump, "-d", "--no-show-raw-insn", path], capture_output=True, text=True, check=True
        ).stdout
        checked += 1
        func = "?"
        for line in out.splitlines():
            if line.endswith(">:"):
                func = line
            elif BAD.search(line):
                leaks.append(f"{path}: {func} {line.strip()}")
    for leak in leaks[:50]:
        print(leak)
    print(f"{checked} baseline objects checked, {len(leaks)} instructions beyond the baseline")
    return 1 if leaks or checked == 0 else 0


if __name__ == "__main__":
    # CMake passes $<TARGET_OBJECTS:...> as one ;-separated argument.
    sys.exit(main([p for arg in sys.argv[1:] for p in arg.split(";") if p]))
