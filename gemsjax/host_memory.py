"""Host memory that a process keeps for reuse: glibc's allocator tuned so that large freed blocks
are not handed back to the kernel.

XLA's CPU runtime allocates a jitted program's temporaries as one block per execution and frees
it afterwards (the LOGO train step at 8 x 512: 429 MB). glibc serves a block that large with a
fresh ``mmap`` and returns it with ``munmap``: a thread's own arena cannot hold it, whatever
``M_MMAP_THRESHOLD`` says. So every step the kernel maps new pages and zero-fills each on first
touch: ~60,000 page faults (235 MB) per LOGO step, the step's first writes to its largest arrays
up to 4x slower than on reused memory (BENCHMARKS.md, Train step). :func:`keep_freed_memory` has
glibc serve every thread from its main heap (``M_ARENA_MAX`` 1), never ``mmap`` (``M_MMAP_MAX``
0) and never trim the heap (``M_TRIM_THRESHOLD``), so the next step reuses the same pages: no
page faults after the first steps (on a loaded machine an execution dispatched asynchronously
may still allocate before the previous one has freed, and fault then: in a test under load 8 of
36 executions, 1 of 36 with synchronous dispatch). The cost: the heap keeps its peak size
until the process ends, and threads share one arena's lock for allocations larger than glibc's
per-thread cache (XLA allocates per execution, not per operation).

Call it at the start of a process, before JAX runs anything (a thread that has allocated already
keeps its own arena). ``python -m gemsjax.main`` and ``benchmarks/bench_train_step.py`` do (the
benchmark's PyTorch contenders, in the same process, get the same allocator).
``GEMSJAX_KEEP_FREED_MEMORY=0`` leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

_log = logging.getLogger(__name__)

SWITCH_ENV = "GEMSJAX_KEEP_FREED_MEMORY"
"""Set to ``0`` to leave glibc's allocator at its defaults."""
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
"""``mallopt`` parameters (``<malloc.h>``)."""
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
"""What :func:`keep_freed_memory` sets: one arena, no ``mmap``, no trimming."""


def keep_freed_memory() -> bool:
    """Tune glibc's allocator as the module docstring says; True when it is done. False (and
    nothing changed) with ``GEMSJAX_KEEP_FREED_MEMORY=0`` or where the C library has no
    ``mallopt`` (not glibc: macOS, musl)."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        _log.info("no glibc mallopt: the allocator is left as it is")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
