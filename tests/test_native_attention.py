"""The fused C++ CPU attention kernel (:mod:`gemsjax.models.native_attention`): values and
gradients against the plain formula, per-device rows under a mesh, the build cache, and the
fallback to XLA's tiled path when the kernel cannot be built."""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from gemsjax.models import backend, native_attention
from gemsjax.models.bert import Dropout
from gemsjax.models.registry import build_model, get_model_config

needs_vector_cpu = pytest.mark.skipif(
    not native_attention.host_supported(native_attention._cpuinfo()),
    reason="no AVX-512 or AVX2 + FMA here: the kernel is never built (XLA's tiled attention)",
)
needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None
    or not native_attention.host_supported(native_attention._cpuinfo()),
    reason="no C++ compiler, or no AVX-512 or AVX2 + FMA, here: only the XLA fallback can run",
)


@pytest.fixture(autouse=True)
def _fresh_load():
    """Each test decides for itself whether the kernel loads."""
    native_attention.load.cache_clear()
    yield
    native_attention.load.cache_clear()


def _inputs(rows, len_q, len_k, heads, depth, seed=0):
    """q ``[B, Lq, N, D]``, k, v ``[B, Lk, N, D]``, an output cotangent like q, and a key mask
    with every key kept (row 0), none (row 1) and a prefix (the others)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q, g = (jax.random.normal(key, (rows, len_q, heads, depth)) for key in keys[:2])
    k, v = (jax.random.normal(key, (rows, len_k, heads, depth)) for key in keys[2:])
    kept = jnp.array([len_k, 0, *(len_k // (i + 2) + 1 for i in range(rows - 2))])[:rows]
    return q, k, v, g, jnp.arange(len_k)[None, :] < kept[:, None]


def _plain(q, k, v, key_mask):
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / jnp.sqrt(float(q.shape[-1]))
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(scores, axis=-1), v)


def _values_and_grads(fn, q, k, v, g, key_mask):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, key_mask) * g)
    return jax.jit(fn)(q, k, v, key_mask), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@needs_compiler
@pytest.mark.parametrize(
    "shape",
    [
        (3, 9, 9, 2, 8),
        (3, 70, 45, 2, 40),
        (2, 130, 512, 3, 64),
        (2, 5, 17, 1, 16),
        (4, 64, 33, 8, 32),
    ],
)
def test_kernel_values_and_gradients_match_the_plain_formula(shape):
    """Query blocks with and without a remainder (64 per block), key counts off the 8- and
    16-lane vectors, head sizes 8-64, a row whose keys are all padding (uniform over them, as the
    formula gives) and rows with a kept prefix: the output within 1e-5, q/k/v gradients
    within 2e-5 of autodiff through the formula."""
    assert native_attention.load()
    q, k, v, g, key_mask = _inputs(*shape)
    got, got_grads = _values_and_grads(backend.attend_fused_cpu, q, k, v, g, key_mask)
    want, want_grads = _values_and_grads(_plain, q, k, v, g, key_mask)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
    text = jax.jit(backend.attend_fused_cpu).lower(q, k, v, key_mask).as_text()
    assert "gemsjax_attention_forward" in text


@needs_compiler
def test_bfloat16_inputs_are_attended_in_float32_and_returned_in_their_dtype():
    assert native_attention.load()
    q, k, v, _, key_mask = _inputs(2, 16, 24, 2, 16)
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = jax.jit(backend.attend_fused_cpu)(*half, key_mask)
    assert got.dtype == jnp.bfloat16
    want = _plain(*(x.astype(jnp.float32) for x in half), key_mask)
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2)


@needs_compiler
@pytest.mark.parametrize("devices", [1, 4])
def test_each_device_runs_the_kernel_on_its_own_rows(devices):
    """Under a mesh the kernel runs inside a shard_map over the batch: same values and
    gradients as without one."""
    assert native_attention.load()
    q, k, v, g, key_mask = _inputs(4, 12, 20, 2, 16, seed=1)
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):
        got, got_grads = _values_and_grads(backend.attend_fused_cpu, q, k, v, g, key_mask)
        text = jax.jit(backend.attend_fused_cpu).lower(q, k, v, key_mask).as_text()
    if devices > 1:
        assert "shard_map" in text or "manual" in text, text[:2000]
    want, want_grads = _values_and_grads(_plain, q, k, v, g, key_mask)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


@needs_compiler
def test_the_cpu_model_attends_through_the_kernel():
    """The CPU layers' attention (no dropout) lowers to the kernel's custom call."""
    assert native_attention.load()
    model = build_model(get_model_config("test"), nnx.Rngs(0))
    ids = jnp.full((2, 16), 7, jnp.int32)
    attention = jnp.ones((2, 16), jnp.int32)
    text = jax.jit(lambda i, a: model(i, a)).lower(ids, attention).as_text()
    assert "gemsjax_attention_forward" in text


@needs_compiler
def test_the_kernel_is_built_once_per_host_and_reused(tmp_path, monkeypatch):
    """The library lands in ``$GEMSJAX_CACHE/native`` under a digest of source, flags,
    compiler, jaxlib and CPU; a second load finds it instead of compiling again, and no
    temporary file is left."""
    monkeypatch.setenv("GEMSJAX_CACHE", str(tmp_path))
    assert native_attention.load()
    built = sorted((tmp_path / "native").iterdir())
    assert [p.suffix for p in built] == [".so"], built
    assert built[0] == native_attention.library_path(os.environ.get("CXX", "c++"))
    stamp = built[0].stat().st_mtime_ns
    native_attention.load.cache_clear()
    assert native_attention.load()
    assert sorted((tmp_path / "native").iterdir()) == built
    assert built[0].stat().st_mtime_ns == stamp


def test_the_kernel_is_built_only_for_cpus_with_avx512_or_avx2_and_fma():
    """``/proc/cpuinfo``'s flags decide: AVX-512F, or AVX2 with FMA, yes; AVX2 without FMA,
    AVX only, an ARM host, or no cpuinfo (not Linux) no."""
    intel = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq\n"
    amd = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n"
    assert native_attention.host_supported(intel) and native_attention.host_supported(amd)
    assert not any(map(native_attention.host_supported, (arm, "")))
    assert not native_attention.host_supported("flags\t\t: fpu sse2 avx avx2 avx512fp16\n")
    assert not native_attention.host_supported("flags\t\t: fpu sse2 avx fma\n")


@needs_vector_cpu
def test_without_a_compiler_cpu_attention_falls_back_to_xla(monkeypatch, caplog):
    """No compiler: one warning naming the compiler and the fix, and the CPU attention is
    XLA's tiled path (same values), with no custom call."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level(logging.WARNING):
        assert not native_attention.load()
    assert "no C++ compiler (/nonexistent/c++)" in caplog.text and "set CXX" in caplog.text
    q, k, v, _, key_mask = _inputs(2, 6, 8, 2, 8)
    text = jax.jit(backend.attend_fused_cpu).lower(q, k, v, key_mask).as_text()
    assert "gemsjax_attention" not in text
    np.testing.assert_array_equal(
        backend.attend_fused_cpu(q, k, v, key_mask), backend.attend_tiled(q, k, v, key_mask)
    )


@needs_vector_cpu
def test_a_failed_build_is_reported_and_falls_back(monkeypatch, caplog, tmp_path):
    """A compiler that fails: a warning with its first error line, no library left behind,
    and the XLA path; ``GEMSJAX_NATIVE_ATTENTION=0`` skips the kernel without a warning."""
    fake = tmp_path / "bad-c++"
    fake.write_text("#!/bin/sh\necho 'bad-c++: error: no such flag' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("GEMSJAX_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        assert not native_attention.load()
    assert "no such flag" in caplog.text and "GEMSJAX_NATIVE_ATTENTION=0" in caplog.text
    assert not list((tmp_path / "cache" / "native").iterdir())
    native_attention.load.cache_clear()
    caplog.clear()
    monkeypatch.setenv("GEMSJAX_NATIVE_ATTENTION", "0")
    with caplog.at_level(logging.WARNING):
        assert not native_attention.load()
    assert not caplog.text


@needs_compiler
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_inside_the_kernel_drops_what_the_einsums_drop(rate):
    """With probability dropout on, the CPU attention hands the kernel the keep mask the
    einsum path draws from the same key: same values and gradients (the scale 1 / (1 - rate)
    included), a different key gives different values."""
    assert native_attention.load()
    dropout = Dropout(rate, deterministic=False, platform="cpu")
    q, k, v, g, key_mask = _inputs(3, 70, 24, 2, 16, seed=2)

    def run(fn, seed):
        call = lambda q, k, v: fn(q, k, v, key_mask, dropout, jax.random.key(seed))
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(call(*a) * g), argnums=(0, 1, 2)))(q, k, v)
        return jax.jit(call)(q, k, v), grads

    got, got_grads = run(backend.attend_cpu, 5)
    want, want_grads = run(backend.attend, 5)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=3e-5, rtol=1e-5)
    assert not np.allclose(run(backend.attend_cpu, 6)[0], got, atol=1e-3)
    text = (
        jax.jit(lambda q, k, v: backend.attend_cpu(q, k, v, key_mask, dropout, jax.random.key(5)))
        .lower(q, k, v)
        .as_text()
    )
    assert "gemsjax_attention_forward_dropout" in text
