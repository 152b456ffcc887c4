"""The CPU's vector flags, printed beside every benchmark figure (the machines of this
workplace differ: some have AVX-512 and AMX with native bf16, some only AVX2)."""

from __future__ import annotations

import re
from pathlib import Path

_WIDE = re.compile(r"avx512[a-z_0-9]*|amx[a-z_0-9]*")
_NARROW = re.compile(r"avx2|avx|fma|f16c")


def cpu_flags() -> str:
    """The CPU's AVX-512 and AMX flags (``grep -o -E 'avx512…|amx…' /proc/cpuinfo``); on
    a CPU with none, its AVX flags and a note saying so."""
    path = Path("/proc/cpuinfo")
    text = path.read_text() if path.exists() else ""
    flags = set(text.split())
    wide = sorted(f for f in flags if _WIDE.fullmatch(f))
    if wide:
        return " ".join(wide)
    narrow = sorted(f for f in flags if _NARROW.fullmatch(f))
    return " ".join(narrow) + " (no AVX-512, no AMX)" if narrow else "none"
