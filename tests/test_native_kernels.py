"""The fused C++ CPU kernels (:mod:`gemsjax.models.native_kernels`): attention's and
LayerNorm's values and gradients against the plain formulas, per-device rows under a mesh, the
build cache, and the fallback to XLA's paths when the kernels cannot be built."""

import functools
import logging
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from gemsjax.models import backend, native_kernels
from gemsjax.models.bert import Dropout
from gemsjax.models.registry import build_model, get_model_config

needs_vector_cpu = pytest.mark.skipif(
    not native_kernels.host_supported(native_kernels._cpuinfo()),
    reason="no AVX-512 or AVX2 + FMA here: the kernel is never built (XLA's tiled attention)",
)
needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None
    or not native_kernels.host_supported(native_kernels._cpuinfo()),
    reason="no C++ compiler, or no AVX-512 or AVX2 + FMA, here: only the XLA fallback can run",
)


@pytest.fixture(autouse=True)
def _fresh_load():
    """Each test decides for itself whether the kernel loads."""
    native_kernels.load.cache_clear()
    yield
    native_kernels.load.cache_clear()


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
    assert native_kernels.load()
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
    assert native_kernels.load()
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
    assert native_kernels.load()
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
    assert native_kernels.load()
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
    assert native_kernels.load()
    built = sorted((tmp_path / "native").iterdir())
    assert [p.suffix for p in built] == [".so"], built
    assert built[0] == native_kernels.library_path(os.environ.get("CXX", "c++"))
    stamp = built[0].stat().st_mtime_ns
    native_kernels.load.cache_clear()
    assert native_kernels.load()
    assert sorted((tmp_path / "native").iterdir()) == built
    assert built[0].stat().st_mtime_ns == stamp


def test_the_kernel_is_built_only_for_cpus_with_avx512_or_avx2_and_fma():
    """``/proc/cpuinfo``'s flags decide: AVX-512F, or AVX2 with FMA, yes; AVX2 without FMA,
    AVX only, an ARM host, or no cpuinfo (not Linux) no."""
    intel = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq\n"
    amd = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n"
    assert native_kernels.host_supported(intel) and native_kernels.host_supported(amd)
    assert not any(map(native_kernels.host_supported, (arm, "")))
    assert not native_kernels.host_supported("flags\t\t: fpu sse2 avx avx2 avx512fp16\n")
    assert not native_kernels.host_supported("flags\t\t: fpu sse2 avx fma\n")


@needs_vector_cpu
def test_without_a_compiler_cpu_attention_and_layer_norm_fall_back_to_xla(monkeypatch, caplog):
    """No compiler: one warning naming the compiler and the fix; the CPU attention is XLA's
    tiled path (same values) and the CPU LayerNorm XLA's closed form, with no custom call."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level(logging.WARNING):
        assert not native_kernels.load()
    assert "no C++ compiler (/nonexistent/c++)" in caplog.text and "set CXX" in caplog.text
    q, k, v, _, key_mask = _inputs(2, 6, 8, 2, 8)
    text = jax.jit(backend.attend_fused_cpu).lower(q, k, v, key_mask).as_text()
    assert "gemsjax_attention" not in text
    np.testing.assert_array_equal(
        backend.attend_fused_cpu(q, k, v, key_mask), backend.attend_tiled(q, k, v, key_mask)
    )
    norm = backend.LayerNormLastAxis(16, epsilon=1e-12, use_fast_variance=False, rngs=nnx.Rngs(0))
    x = _norm_inputs((2, 5, 16))[0]
    assert "gemsjax_layer_norm" not in jax.jit(lambda x: norm(x)).lower(x).as_text()
    np.testing.assert_array_equal(
        norm(x), backend.layer_norm(x, norm.scale[...], norm.bias[...], 1e-12)
    )


@needs_vector_cpu
def test_a_failed_build_is_reported_and_falls_back(monkeypatch, caplog, tmp_path):
    """A compiler that fails: a warning with its first error line, no library left behind,
    and the XLA path; ``GEMSJAX_NATIVE_KERNELS=0`` skips the kernel without a warning."""
    fake = tmp_path / "bad-c++"
    fake.write_text("#!/bin/sh\necho 'bad-c++: error: no such flag' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("GEMSJAX_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        assert not native_kernels.load()
    assert "no such flag" in caplog.text and "GEMSJAX_NATIVE_KERNELS=0" in caplog.text
    assert not list((tmp_path / "cache" / "native").iterdir())
    native_kernels.load.cache_clear()
    caplog.clear()
    monkeypatch.setenv("GEMSJAX_NATIVE_KERNELS", "0")
    with caplog.at_level(logging.WARNING):
        assert not native_kernels.load()
    assert not caplog.text


@needs_compiler
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_inside_the_kernel_drops_what_the_einsums_drop(rate):
    """With probability dropout on, the CPU attention hands the kernel the keep mask the
    einsum path draws from the same key: same values and gradients (the scale 1 / (1 - rate)
    included), a different key gives different values."""
    assert native_kernels.load()
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


def _norm_inputs(shape, seed=0):
    """``x`` with rows of mean ~3 and spread ~2, a scale and bias away from 1 and 0, and an
    output cotangent."""
    keys = jax.random.split(jax.random.key(seed), 4)
    x = 3.0 + 2.0 * jax.random.normal(keys[0], shape)
    scale = 1.0 + 0.3 * jax.random.normal(keys[1], shape[-1:])
    bias = 0.3 * jax.random.normal(keys[2], shape[-1:])
    return x, scale, bias, jax.random.normal(keys[3], shape)


def _stock_norm(x, scale, bias):
    """``nnx.LayerNorm`` (two-pass variance) with the given scale and bias."""
    layer = nnx.LayerNorm(x.shape[-1], epsilon=1e-12, use_fast_variance=False, rngs=nnx.Rngs(0))
    layer.scale[...], layer.bias[...] = scale, bias
    return layer(x)


def _norm_values_and_grads(fn, x, scale, bias, g):
    loss = lambda *a: jnp.sum(fn(*a) * g)
    run = jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))
    return run(x, scale, bias)


@needs_compiler
@pytest.mark.parametrize("shape", [(3, 70, 256), (2, 5, 20), (130, 48), (1, 1, 768), (4, 64, 7)])
def test_layer_norm_kernel_values_and_gradients_match_the_stock_layer_norm(shape):
    """Rows in blocks of 64 with and without a remainder, 2-D and 3-D inputs, feature counts on
    and off the 8- and 16-lane vectors (7, 20, 48, 256, 768): the kernel's output and its x,
    scale and bias gradients equal ``nnx.LayerNorm``'s (and the XLA closed form's) within
    float32 rounding; the lowered step calls the kernel both ways."""
    assert native_kernels.load()
    x, scale, bias, g = _norm_inputs(shape)
    fused = lambda x, s, b: backend.layer_norm_fused_cpu(x, s, b, 1e-12)
    closed = lambda x, s, b: backend.layer_norm(x, s, b, 1e-12)
    got, got_grads = _norm_values_and_grads(fused, x, scale, bias, g)
    for reference in (_stock_norm, closed):
        want, want_grads = _norm_values_and_grads(reference, x, scale, bias, g)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(got_grads, want_grads, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * float(jnp.max(jnp.abs(b))))
    loss = lambda *a: jnp.sum(fused(*a) * g)
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, scale, bias).as_text()
    assert "gemsjax_layer_norm_forward" in text and "gemsjax_layer_norm_backward" in text


@needs_compiler
def test_layer_norm_kernel_normalises_constant_rows_to_the_bias():
    """A row whose features are all equal has variance 0: its output is the bias (``x_hat``
    = 0, finite with eps), and its x gradient is finite, as the stock LayerNorm's."""
    assert native_kernels.load()
    x = jnp.full((2, 3, 32), 5.0)
    _, scale, bias, g = _norm_inputs((2, 3, 32))
    fused = lambda x, s, b: backend.layer_norm_fused_cpu(x, s, b, 1e-12)
    got, got_grads = _norm_values_and_grads(fused, x, scale, bias, g)
    np.testing.assert_allclose(got, jnp.broadcast_to(bias, x.shape), atol=1e-6)
    want, want_grads = _norm_values_and_grads(_stock_norm, x, scale, bias, g)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in got_grads)
    np.testing.assert_allclose(got_grads[2], want_grads[2], rtol=1e-5, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("devices", [1, 4])
def test_each_device_normalises_its_own_rows_and_the_parameter_gradients_add_up(devices):
    """Under a mesh the LayerNorm kernel runs inside a shard_map over the batch, scale and bias
    whole on every device; the scale's and bias's gradients are each device's sums added over
    the devices: same values and gradients as without a mesh."""
    assert native_kernels.load()
    x, scale, bias, g = _norm_inputs((8, 12, 32), seed=1)
    fused = lambda x, s, b: backend.layer_norm_fused_cpu(x, s, b, 1e-12)
    want, want_grads = _norm_values_and_grads(fused, x, scale, bias, g)
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):
        got, got_grads = _norm_values_and_grads(fused, x, scale, bias, g)
        text = jax.jit(fused).lower(x, scale, bias).as_text()
    if devices > 1:
        assert "shard_map" in text or "manual" in text, text[:2000]
    np.testing.assert_allclose(got, want, atol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_the_cpu_model_normalises_through_the_kernel():
    """The CPU layers' float32 LayerNorms lower to the kernel's custom calls, forward and
    backward."""
    assert native_kernels.load()
    model = build_model(get_model_config("test"), nnx.Rngs(0))
    ids = jnp.full((2, 16), 7, jnp.int32)
    attention = jnp.ones((2, 16), jnp.int32)
    graphdef, params = nnx.split(model)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(ids, attention))
    text = jax.jit(jax.grad(loss)).lower(params).as_text()
    assert "gemsjax_layer_norm_forward" in text and "gemsjax_layer_norm_backward" in text


@needs_compiler
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize(
    "m, n, k",
    [(1, 1, 1), (7, 17, 5), (100, 50, 300), (616, 256, 3072), (64, 1200, 1800), (3, 40, 0)],
)
def test_matmul_kernel_equals_the_product(m, n, k, transpose_a, transpose_b):
    """``op(a) @ op(b)`` for every transposition, on shapes off the register tile (6 x 16 or
    8 x 48), past one packed depth (256), a LOGO tail product, the path that computes the
    transposed product (more columns than rows, ``op(b)`` over one packed block: 1800 x 1200
    floats) and an empty contraction (zeros); float32 rounding of a float64 reference."""
    assert native_kernels.load()
    keys = jax.random.split(jax.random.key(m * n + k), 2)
    a = jax.random.normal(keys[0], (k, m) if transpose_a else (m, k))
    b = jax.random.normal(keys[1], (n, k) if transpose_b else (k, n))
    call = functools.partial(
        native_kernels.matmul, transpose_a=transpose_a, transpose_b=transpose_b
    )
    got = jax.jit(call)(a, b)
    op_a, op_b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    want = (op_a.T if transpose_a else op_a) @ (op_b.T if transpose_b else op_b)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5 * math.sqrt(max(k, 1)))


@needs_compiler
def test_matmul_kernel_gives_the_same_bits_on_every_call():
    """Each output element sums over k in one order whatever thread computes it: repeated calls
    (threads taking different work items) agree bit for bit."""
    assert native_kernels.load()
    keys = jax.random.split(jax.random.key(5), 2)
    a, b = jax.random.normal(keys[0], (700, 300)), jax.random.normal(keys[1], (300, 500))
    call = jax.jit(native_kernels.matmul)
    first = np.asarray(call(a, b))
    for _ in range(3):
        np.testing.assert_array_equal(call(a, b), first)


@needs_compiler
@pytest.mark.parametrize("shape", [(1, 1), (33, 70), (256, 3072), (64, 5)])
def test_transpose_kernel_writes_the_row_major_transpose(shape):
    """Shapes on and off the 32 x 32 blocks: the kernel's output is ``x.T``, bit for bit."""
    assert native_kernels.load()
    x = jax.random.normal(jax.random.key(0), shape)
    np.testing.assert_array_equal(jax.jit(native_kernels.transpose)(x), x.T)


@needs_compiler
@pytest.mark.parametrize("devices", [1, 4])
def test_a_wide_layers_tall_kernel_gradient_is_transposed_by_the_kernel(devices):
    """A layer wider than ``KERNEL_MAX_WIDTH`` both ways keeps XLA's products; its tall kernel's
    gradient goes through the transpose kernel on one device (not under a multi-device mesh),
    with the values of autodiff through ``x @ w`` either way."""
    assert native_kernels.load()
    width = backend.KERNEL_MAX_WIDTH
    keys = jax.random.split(jax.random.key(2), 3)
    x, w = (
        jax.random.normal(keys[0], (16, 2 * width)),
        jax.random.normal(keys[1], (2 * width, width + 8)),
    )
    g = jax.random.normal(keys[2], (16, width + 8))
    grads = jax.jit(jax.grad(lambda x, w: jnp.sum(backend.matmul_2d(x, w) * g), argnums=(0, 1)))
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):
        got = grads(x, w)
        text = grads.lower(x, w).as_text()
    assert ("gemsjax_transpose" in text) == (devices == 1) and "gemsjax_matmul" not in text
    want = jax.grad(lambda x, w: jnp.sum((x @ w) * g), argnums=(0, 1))(x, w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@needs_compiler
@pytest.mark.parametrize("devices", [1, 4])
def test_dense_products_run_on_the_kernel_on_one_device(devices):
    """``matmul_2d``'s product and both gradients are the kernel's calls on one device for a
    layer at most ``KERNEL_MAX_WIDTH`` wide one way (none under a multi-device mesh, where XLA's
    partitioner places the products), with the values of autodiff through ``x @ w`` either
    way, for wide and tall kernels."""
    assert native_kernels.load()
    keys = jax.random.split(jax.random.key(2), 5)
    x = jax.random.normal(keys[0], (16, 24))
    for w in (jax.random.normal(keys[1], (24, 8)), jax.random.normal(keys[2], (24, 40))):
        g = jax.random.normal(keys[3], (16, w.shape[1]))
        loss = lambda x, w, g=g: jnp.sum(backend.matmul_2d(x, w) * g)
        grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        mesh = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Auto,))
        with jax.set_mesh(mesh):
            got = grads(x, w)
            text = grads.lower(x, w).as_text()
        assert text.count("gemsjax_matmul") == (3 if devices == 1 else 0)
        want = jax.value_and_grad(lambda x, w, g=g: jnp.sum((x @ w) * g), argnums=(0, 1))(x, w)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        for a, b in zip(got[1], want[1], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
