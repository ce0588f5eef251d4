"""gemsjax.host_memory: with freed memory kept, a jitted program's temporaries reuse the same
pages from one execution to the next instead of being mapped and zero-filled afresh."""

import os
import pathlib
import platform
import subprocess
import sys

import pytest

from gemsjax import host_memory

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")

# A program with 128 MiB of temporaries (exp(x) and tanh(x.T), each read by a matmul); prints
# whether the allocator was tuned, the median page faults of 9 executions after warm-up, and the
# temporaries' size. Dispatch is synchronous and the median is taken because with asynchronous
# dispatch, on a loaded machine, XLA may free one execution's temporaries after the next one has
# allocated its own (measured under load: 8 of 36 executions faulting in full, 1 of 36 with
# synchronous dispatch).
SCRIPT = """
import resource
from gemsjax import host_memory
kept = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
jax.config.update("jax_cpu_enable_async_dispatch", False)

@jax.jit
def f(x):
    y, z = jnp.exp(x), jnp.tanh(x.T)
    return y[:, :8].sum() + z[:, :8].sum() + (y @ z[:, :4]).sum()

x = jnp.ones((2048, 8192), jnp.float32)
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
for _ in range(3):
    f(x).block_until_ready()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(9):
    before = faults()
    f(x).block_until_ready()
    counts.append(faults() - before)
print(kept, sorted(counts)[4], temp)
"""


def _faults(keep: str) -> tuple[bool, float, int]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", host_memory.SWITCH_ENV: keep}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    kept, faults, temp = done.stdout.split()
    return kept == "True", float(faults), int(temp)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_kept_memory_takes_no_page_faults_per_execution():
    """The median execution faults on at most 1 % of its temporaries' pages with the memory
    kept, on most of them with glibc's defaults (4 KiB pages)."""
    kept, faults, temp = _faults("1")
    default_kept, default_faults, _ = _faults("0")
    pages = temp / PAGE
    assert temp >= 128 << 20
    assert kept and not default_kept
    assert faults <= 0.01 * pages, (faults, pages)
    assert default_faults > faults
    if THP.exists() and "[always]" not in THP.read_text():
        # 4 KiB pages: glibc maps the temporaries afresh, so most of them fault every time.
        assert default_faults >= 0.5 * pages, (default_faults, pages)


def test_switched_off_changes_nothing(monkeypatch):
    monkeypatch.setenv(host_memory.SWITCH_ENV, "0")
    assert host_memory.keep_freed_memory() is False
