"""Fused CPU kernels in C++ (``native/*.cc``) behind XLA FFI custom calls: attention and
LayerNorm, each a forward and a backward call, a matrix product and a 2-D transpose.

XLA's CPU backend runs attention as separate small matmuls and elementwise passes over
``[c, Lq, Lk]`` tiles (:func:`gemsjax.models.backend.attend_tiled`); the attention kernel
computes one (row, head) pair's scores, softmax and output in one pass over a 64-query block held
in the core's cache, spread over XLA's intra-op thread pool, and its backward pass recomputes the
probabilities from q and k. Same function as :func:`gemsjax.models.backend.attend` without
dropout (float32; equal within float rounding, see tests/test_native_kernels.py). The LayerNorm
kernel reads and writes each array once per pass, where XLA's fusions of the same formula
materialise broadcasts of the row statistics and of the scale (:func:`layer_norm_forward`). The
matrix product (:func:`matmul`) packs its operands into the register tile's panels as it goes,
reading a transposed operand in place, where XLA's CPU backend sends a product that contracts
the lhs's first dimension (a dense layer's kernel gradient) to a slower library. The transpose
writes a row-major copy once, where XLA would leave a transposed layout for every consumer to
read with strided loads (:func:`transpose`).

The kernels are for x86 CPUs with AVX-512, or AVX2 with FMA (Linux). They are compiled on first
use with the host's C++ compiler (``$CXX``, default ``c++``; ``-O3 -march=native``, about 5 s)
into one library in ``$GEMSJAX_CACHE/native/`` (default ``~/.cache/gemsjax``), one per source,
compiler, jaxlib and CPU, and reused after. On other CPUs, with no compiler, or with
``GEMSJAX_NATIVE_KERNELS=0``, :func:`load` says why once and returns False, and the CPU layers
use XLA's formulations instead (same results, slower).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemsjax.data.genome_cache import cache_root

_log = logging.getLogger(__name__)

SOURCES = tuple(sorted(pathlib.Path(__file__).with_name("native").glob("*.[ch]*")))
"""The kernels' C++ files (``.cc``, compiled together into one library) and their header."""
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-w")
SWITCH_ENV = "GEMSJAX_NATIVE_KERNELS"
"""Set to ``0`` to run the CPU layers' XLA attention, LayerNorm and products instead of these
kernels."""
_FORWARD, _BACKWARD = "gemsjax_attention_forward", "gemsjax_attention_backward"
_NORM_FORWARD, _NORM_BACKWARD = "gemsjax_layer_norm_forward", "gemsjax_layer_norm_backward"
_MATMUL = "gemsjax_matmul"
_TRANSPOSE = "gemsjax_transpose"
_HANDLERS = {
    _FORWARD: "GemsjaxAttentionForward",
    _BACKWARD: "GemsjaxAttentionBackward",
    _FORWARD + "_dropout": "GemsjaxAttentionForwardDropout",
    _BACKWARD + "_dropout": "GemsjaxAttentionBackwardDropout",
    _NORM_FORWARD: "GemsjaxLayerNormForward",
    _NORM_BACKWARD: "GemsjaxLayerNormBackward",
    _MATMUL: "GemsjaxMatmul",
    _TRANSPOSE: "GemsjaxTranspose",
}


def _cpuinfo() -> str:
    try:
        return pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _host_signature() -> str:
    """The CPU's model name and feature flags (``-march=native`` code is only valid there)."""
    keep = ("model name", "flags", "Features", "CPU part")
    lines = _cpuinfo().splitlines()
    return "\n".join(dict.fromkeys(line for line in lines if line.startswith(keep)))


def host_supported(cpuinfo: str) -> bool:
    """Whether ``cpuinfo`` (``/proc/cpuinfo``'s text) lists AVX-512F, or AVX2 and FMA: the
    vector widths the kernels are written for (16 and 8 floats)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split())
            return "avx512f" in flags or {"avx2", "fma"} <= flags
    return False


def library_path(compiler: str) -> pathlib.Path:
    """Where the kernels built by ``compiler`` for this host live:
    ``<cache>/native/kernels-<digest of sources, flags, compiler, jaxlib, CPU>.so``."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    key = "\n".join(
        (*(f.read_text() for f in SOURCES), " ".join(FLAGS), version, jax.__version__)
        + (_host_signature(),)
    )
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return cache_root() / "native" / f"kernels-{digest}.so"


def _build(compiler: str, target: pathlib.Path) -> None:
    """Compile :data:`SOURCES` into ``target`` (through a per-process temporary file, so that
    processes building at once never load a half-written library)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    units = [str(f) for f in SOURCES if f.suffix == ".cc"]
    command = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), *units, "-o", str(partial)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        partial.unlink(missing_ok=True)
        first = (done.stderr.strip().splitlines() or ["no output"])[0]
        raise RuntimeError(f"{' '.join(command[:2])} ... failed: {first}")
    os.replace(partial, target)


@functools.cache
def load() -> bool:
    """Build (or find) the kernels for this host and register its custom calls with XLA's CPU
    backend; True when it is ready. False, with one warning naming the reason and the fix,
    when it is switched off or cannot be built."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        _log.info("%s=0: CPU attention, LayerNorm and products run on XLA's paths", SWITCH_ENV)
        return False
    if not host_supported(_cpuinfo()):
        _log.info(
            "no AVX-512 or AVX2 + FMA on this CPU: attention, LayerNorm and products run on "
            "XLA's paths"
        )
        return False
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        _log.warning(
            "no C++ compiler (%s) on PATH: CPU attention, LayerNorm and products fall back to "
            "XLA's paths (same results, slower); install g++ or set CXX",
            compiler,
        )
        return False
    try:
        target = library_path(compiler)
        if not target.exists():
            _build(compiler, target)
        _register(str(target))
    except (OSError, RuntimeError) as error:
        _log.warning(
            "CPU kernels not built (%s): attention, LayerNorm and products fall back to XLA's "
            "paths; set %s=0 to skip the build",
            error,
            SWITCH_ENV,
        )
        return False
    return True


_registered: list[str] = []


def _register(library_file: str) -> None:
    """Load the built library and register its handlers with XLA, once per process (XLA keeps
    the first registration of a name; every library built from :data:`SOURCES` has the same
    kernels)."""
    if _registered:
        return
    library = ctypes.cdll.LoadLibrary(library_file)
    for name, symbol in _HANDLERS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), "cpu")
    _registered.append(library_file)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    kept: jax.Array | None = None,
    scale: float = 1.0,
) -> jax.Array:
    """``softmax(where(key_mask, q k^T, float32 min)) v`` per (row, head) pair, the scale
    already folded into ``q`` (call :func:`load` first; one device's arrays); with ``kept``,
    the probabilities dropped where it is False and the rest multiplied by ``scale``
    (dropout at rate ``1 - 1 / scale``).

    Args:
      q: ``float32[B, Lq, N, D]``; k, v: ``float32[B, Lk, N, D]``; key_mask: ``bool[B, Lk]``.
      kept: ``bool[B, N, Lq, Lk]`` (the probabilities' layout in
        :func:`gemsjax.models.backend.attend`), or None for no dropout.
      scale: a Python float, ``1 / (1 - rate)``.
    Returns:
      ``float32[B, Lq, N, D]``.
    """
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return _call(_FORWARD, out, (q, k, v, key_mask), kept, scale)


def _call(target: str, out: Any, args: tuple, kept: jax.Array | None, scale: float):
    """The custom call ``target`` on ``args`` (the dropout variant, with ``kept`` inserted
    after the key mask, when ``kept`` is given)."""
    if kept is None:
        return jax.ffi.ffi_call(target, out, vmap_method="sequential")(*args)
    call = jax.ffi.ffi_call(target + "_dropout", out, vmap_method="sequential")
    return call(*args[:4], kept, *args[4:], scale=np.float32(scale))


def _attend_fwd(q, k, v, key_mask, kept, scale):
    return attend(q, k, v, key_mask, kept, scale), (q, k, v, key_mask, kept)


def _attend_bwd(scale, residuals, d_out):
    q, k, v, key_mask, kept = residuals
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    d_q, d_k, d_v = _call(_BACKWARD, shapes, (q, k, v, key_mask, d_out), kept, scale)
    return d_q, d_k, d_v, None, None


attend.defvjp(_attend_fwd, _attend_bwd)


def layer_norm_forward(
    x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array]:
    """The LayerNorm kernel's forward call (call :func:`load` first; one device's arrays):
    ``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis with the two-pass
    variance (:func:`gemsjax.models.backend.layer_norm`'s function), and each row's
    ``(mean, 1 / sqrt(var + eps))``.

    Args:
      x: ``float32[..., H]``; scale, bias: ``float32[H]``; eps: a Python float.
    Returns:
      ``(float32[..., H], float32[..., 2])``.
    """
    shapes = (
        jax.ShapeDtypeStruct(x.shape, jnp.float32),
        jax.ShapeDtypeStruct((*x.shape[:-1], 2), jnp.float32),
    )
    call = jax.ffi.ffi_call(_NORM_FORWARD, shapes, vmap_method="sequential")
    return call(x, scale, bias, eps=np.float32(eps))


def layer_norm_backward(
    x: jax.Array, stats: jax.Array, scale: jax.Array, d_out: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The LayerNorm kernel's backward call: ``x``'s gradient ``float32[..., H]`` and
    ``float32[2, H]``, the row sums of ``d_out * x_hat`` and of ``d_out`` (the scale's and the
    bias's gradients, added in a fixed order: the same bits for any number of threads), from
    the forward call's ``stats: float32[..., 2]``; ``d_out`` like ``x``."""
    shapes = (
        jax.ShapeDtypeStruct(x.shape, jnp.float32),
        jax.ShapeDtypeStruct((2, x.shape[-1]), jnp.float32),
    )
    call = jax.ffi.ffi_call(_NORM_BACKWARD, shapes, vmap_method="sequential")
    return call(x, stats, scale, d_out)


def matmul(
    a: jax.Array, b: jax.Array, *, transpose_a: bool = False, transpose_b: bool = False
) -> jax.Array:
    """``op(a) @ op(b)`` by the kernel (call :func:`load` first; one device's arrays), ``op(x)``
    being ``x.T`` where its flag is set: ``a: float32[M, K]`` (``[K, M]`` transposed),
    ``b: float32[K, N]`` (``[N, K]`` transposed) -> ``float32[M, N]``, row-major, with no
    transposed copy of either operand."""
    m = a.shape[1] if transpose_a else a.shape[0]
    n = b.shape[0] if transpose_b else b.shape[1]
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    call = jax.ffi.ffi_call(_MATMUL, out, vmap_method="sequential")
    return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def transpose(x: jax.Array) -> jax.Array:
    """``x: float32[M, N]`` -> ``float32[N, M]``, ``x.T`` written row-major by the kernel (call
    :func:`load` first; one device's array)."""
    out = jax.ShapeDtypeStruct(x.shape[::-1], jnp.float32)
    return jax.ffi.ffi_call(_TRANSPOSE, out, vmap_method="sequential")(x)
