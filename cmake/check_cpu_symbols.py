"""Check that each CPU-capability build of the kernels defines only symbols of its own.

Every kernel file is compiled once per capability (CMakeLists.txt). A function that is not
specific to the capability (a std::vector member, a helper outside the capability templates)
is emitted by every build with that build's instructions, and the linker keeps one copy for
all of them: an AVX-512 copy could then run on a CPU without AVX-512. This lists the code
symbols of the avx2/avx512 builds whose names carry neither the capability template argument
nor the capability namespace (csrc/common/cpu_capability.h), and their static initialisers,
which run when the module loads, before anything knows what the CPU can do.

usage: check_cpu_symbols.py NM STRICT @CAPABILITY OBJECT... [@CAPABILITY OBJECT...]
Exits 1 when STRICT is ON and a shared symbol was found; otherwise only reports it.
"""

from __future__ import annotations

import subprocess
import sys

CODES = {"default": 0, "avx2": 1, "avx512": 2}
CODE_TYPES = {"T", "W", "i", "u"}  # global, weak, indirect and unique code symbols


def shared_symbols(nm: str, cap: str, obj: str) -> list[str]:
    out = subprocess.run([nm, "-C", "--defined-only", obj], capture_output=True, text=True, check=True).stdout
    own = (f"(retain::CpuCapability){CODES[cap]}", f"retain::cpu_{cap}::")
    found = []
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) != 3:
            continue
        if parts[2].startswith("_GLOBAL__sub_I"):  # a static initialiser: runs at load on any CPU
            found.append(f"{parts[2]} (code run at load time: make the global constexpr)")
        elif parts[1] in CODE_TYPES and not any(tag in parts[2] for tag in own):
            found.append(parts[2])
    return found


def main(argv: list[str]) -> int:
    nm, strict = argv[0], argv[1].upper() in {"ON", "1", "TRUE", "YES"}
    problems, cap = [], None
    for arg in argv[2:]:
        if arg.startswith("@"):
            cap = arg[1:]
        elif cap != "default":  # the baseline's code runs everywhere
            problems += [f"{cap}: {sym}  ({obj})" for obj in [arg] for sym in shared_symbols(nm, cap, arg)]
    if not problems:
        return 0
    print("retain: CPU kernel builds define symbols shared across capabilities (an AVX-512 copy could run "
          "on a CPU without it); keep such code inside the capability templates or use common/buffer.h:")
    for p in problems:
        print("  " + p)
    return 1 if strict else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
