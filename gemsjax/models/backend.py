"""Platform-specific layer implementations, behind one switch: :func:`layers`.

The model (:mod:`gemsjax.models.bert`) asks ``layers(config.platform)`` for its dense layer and
LayerNorm classes, GELU, attention, dropout keep-mask and tied-decoder matmul. Every platform's
implementations compute the same functions with the same parameters, so checkpoints move
between platforms.

- ``"cpu"``: XLA's CPU backend is memory-bound on the shapes a BERT step makes; these versions
  avoid its slow paths (timings in BENCHMARKS.md): 2-D matmuls (a C++ product for layers up to
  256 features wide; else a tall kernel's gradient computed transposed, then copied
  row-major), an ``erf`` GELU whose derivative is computed in the backward pass, LayerNorm,
  attention, those products and that copy in C++ kernels
  (:mod:`gemsjax.models.native_kernels`; where they cannot be built, a LayerNorm with a
  closed-form backward pass, XLA's attention a few (row, head) pairs at a time, XLA's
  products and its transposed layout), attention with a recomputing backward pass (the
  masked-token step's last layer: only as many query slots as its fullest row uses), the
  masked-token step's tail (after the last layer's attention) on only as many packed slots as
  its fullest shard uses, and 16-bit dropout draws.
- every other platform (``"gpu"``, ``"tpu"``): the stock formulations, left to XLA's fusion.

Attention has a second switch, ``attention`` (``BertConfig.attention``, ``model.attention``):

- ``"xla"``: :func:`attend`, two einsums around a float32 softmax (the CPU tiled version on
  CPU is its exact equivalent);
- ``"fused"``: one fused kernel, wherever the attention probabilities get no dropout (evaluation,
  embeddings, and training with ``attn_dropout`` 0; the kernels have no dropout): on GPU
  ``jax.nn.dot_product_attention`` (XLA picks cuDNN's fused kernel for bf16 / fp16), on TPU
  jax's Pallas splash-attention kernel (:func:`attend_splash`; sequence lengths a multiple of
  128, others take :func:`attend`), on CPU the same splash kernel run by the Pallas interpreter
  (slow: for tests of the TPU kernel);
- ``"auto"`` (default): ``fused`` on GPU and TPU, the CPU versions above on CPU.

The platform defaults to ``jax.default_backend()``; naming it lets a CPU host build the model it
would compile for a TPU.
"""

from __future__ import annotations

import functools
import math
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gemsjax import random_bits
from gemsjax.models import native_kernels


class Layers(NamedTuple):
    """One platform's implementations.

    Attributes:
      dense: the ``nnx.Linear`` class the model's dense layers use.
      norm: the ``nnx.LayerNorm`` class the model's LayerNorms use.
      gelu: exact (erf) GELU, ``float[...] -> float[...]``.
      attention: ``(q, k, v, key_mask, dropout, rngs, query_rows) -> float[B, Lq, N, D]``
        (see :func:`attend`).
      keep_mask: ``(key, keep_prob: float, shape) -> bool[shape]`` for dropout.
      unembed: ``(hidden: float[..., H], table: float[V, H]) -> float32[..., V]``.
      leading_sums: ``(fn, leading, params, rows, data) -> fn(params, rows, data)``, a dict of
        float32 sums over rows that ``fn`` computes row by row along axis 1 of ``rows`` and
        ``data`` (``[G, P, ...]``), of which only the first ``leading`` (``int32[]``) per group
        carry weight; ``"loss_sum"`` is differentiated (:func:`sums_on_leading_rows` on CPU,
        ``fn`` on every row elsewhere).
    """

    dense: type[nnx.Linear]
    norm: type[nnx.LayerNorm]
    gelu: Callable[[jax.Array], jax.Array]
    attention: Callable[..., jax.Array]
    keep_mask: Callable[[jax.Array, float, tuple[int, ...]], jax.Array]
    unembed: Callable[[jax.Array, jax.Array], jax.Array]
    leading_sums: Callable[..., dict]


ATTENTIONS = ("auto", "xla", "fused")


def layers(platform: str | None = None, attention: str = "auto") -> Layers:
    """The implementations for ``platform`` (default ``jax.default_backend()``), with the
    ``attention`` choice of the module docstring (one of :data:`ATTENTIONS`)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r}; valid: {ATTENTIONS}")
    platform = platform or jax.default_backend()
    chosen = CPU if platform == "cpu" else ACCELERATOR
    if attention == "xla":
        return chosen._replace(attention=attend)
    if attention == "fused" or (attention == "auto" and platform != "cpu"):
        fused = attend_dot_product if platform == "gpu" else attend_splash
        return chosen._replace(attention=functools.partial(fused, interpret=platform == "cpu"))
    return chosen


def inference_compiler_options(platform: str | None = None) -> dict[str, str] | None:
    """XLA options for a jitted forward-only program on ``platform`` (default
    ``jax.default_backend()``), for ``jax.jit(..., compiler_options=...)``.

    On CPU: no YNNPACK fusions (``xla_cpu_experimental_ynn_fusion_type`` empty). Without
    backward ops in between, XLA's default fuses a whole encoder layer (output projection,
    LayerNorms, both feed-forward matmuls, the erf GELU) into one YNNPACK fusion and writes the
    GELU's constants out as ``[tokens, ffn]`` arrays for it: embeddings on the Intel Xeon host
    of BENCHMARKS.md (Embeddings) 0.89 -> 0.64 s for LOGO at 32 x 512, 1.17 -> 1.07 s for the
    BarcodeMAE encoder at 32 x 110. Training steps keep XLA's default (the LOGO step is no
    faster without the fusions: 0.387 against 0.404 s). None elsewhere.
    """
    if (platform or jax.default_backend()) != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": ""}


# --------------------------------------------------------------------- stock formulations


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    dropout: Any,
    rngs: nnx.Rngs | None,
    query_rows: Any = None,
) -> jax.Array:
    """Bidirectional scaled dot-product attention over heads: two einsums around a float32
    softmax (``jax.nn.dot_product_attention``'s XLA path computes the same).

    Args:
      q, k, v: ``float[B, L, N, D]`` (L may differ between q and k/v).
      key_mask: ``bool[B, L]``, True where a position may be attended to (as a key).
      dropout: the model's ``Dropout`` on the attention probabilities (a no-op when
        deterministic or rate 0).
      rngs: dropout key source (only read when dropout is on).
      query_rows: the queries are these ``Rows`` (axis 1) of the full sequence; the probability
        dropout then drops what it would drop at those rows of the full computation.
    Returns:
      ``float[B, Lq, N, D]`` in ``v``'s dtype.
    """
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q.shape[-1])
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    rows = None if query_rows is None else query_rows._replace(axis=2, pack=None)
    probs = dropout(jax.nn.softmax(scores, axis=-1).astype(v.dtype), rngs=rngs, rows=rows)
    return jnp.einsum("bnqk,bknd->bqnd", probs, v)


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _keep_mask(key: jax.Array, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.bernoulli(key, keep_prob, shape)


def _unembed(hidden: jax.Array, table: jax.Array) -> jax.Array:
    return jnp.einsum(
        "...h,vh->...v", hidden, table.astype(hidden.dtype), preferred_element_type=jnp.float32
    )


def _sums_on_all_rows(fn: Callable[..., dict], leading: jax.Array, params, rows, data) -> dict:
    del leading  # every row computed; JAX differentiates fn
    return fn(params, rows, data)


ACCELERATOR = Layers(
    dense=nnx.Linear,
    norm=nnx.LayerNorm,
    gelu=_gelu,
    attention=attend,
    keep_mask=_keep_mask,
    unembed=_unembed,
    leading_sums=_sums_on_all_rows,
)


# ----------------------------------------------------------------------------- fused kernels


def _dropout_on(dropout: Any) -> bool:
    return dropout.rate > 0.0 and not dropout.deterministic


def attend_dot_product(q, k, v, key_mask, dropout, rngs, query_rows=None, *, interpret=False):
    """:func:`attend` through ``jax.nn.dot_product_attention`` (on GPU, XLA runs cuDNN's fused
    kernel for bf16 / fp16 inputs); with probability dropout on, :func:`attend` itself. A row
    without any key (a padding row of an evaluation batch) attends to all of its keys, as in
    :func:`attend_splash`; its output is unused. ``interpret`` is unused (the signature of
    :func:`attend_splash`)."""
    if _dropout_on(dropout):
        return attend(q, k, v, key_mask, dropout, rngs, query_rows)
    keys = key_mask | ~key_mask.any(axis=1, keepdims=True)  # an empty row: no all-masked softmax
    return jax.nn.dot_product_attention(q, k, v, mask=keys[:, None, None, :])


SPLASH_BLOCK = 128
"""Splash attention tiles queries and keys in blocks of this many positions."""


def attend_splash(q, k, v, key_mask, dropout, rngs, query_rows=None, *, interpret=False):
    """:func:`attend` through jax's Pallas splash-attention kernel (TPU; ``interpret``: the
    Pallas interpreter, any platform). Padding is a second segment: queries are segment 1 and
    attend to the keys ``key_mask`` marks as segment 1 (a row without any such key attends to
    all of its keys instead; its output is unused, and the kernel then divides by no zero).

    Falls back to :func:`attend` with probability dropout on (the kernel has none), when a
    sequence length is not a multiple of :data:`SPLASH_BLOCK`, and (without ``interpret``) when
    the program is lowered for another platform than TPU. Under a mesh the kernel runs per
    device on its rows of the batch (``shard_map`` over every mesh axis, the batch sharding of
    :func:`gemsjax.train.sharding.batch_sharding`).
    """
    (_, len_q, heads, depth), len_k = q.shape, k.shape[1]
    if _dropout_on(dropout) or len_q % SPLASH_BLOCK or len_k % SPLASH_BLOCK:
        return attend(q, k, v, key_mask, dropout, rngs, query_rows)
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block = SPLASH_BLOCK * math.gcd(len_q // SPLASH_BLOCK, len_k // SPLASH_BLOCK, 4)
    tiles = ("q", "kv", "kv_compute", "q_dkv", "kv_dkv", "kv_dkv_compute", "q_dq", "kv_dq")
    kernel = splash.make_splash_mha(
        masks.MultiHeadMask([masks.FullMask((len_q, len_k))] * heads),
        block_sizes=splash.BlockSizes(**{f"block_{tile}": block for tile in tiles}),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    keys = key_mask | ~key_mask.any(axis=1, keepdims=True)

    def run(q, k, v, keys):
        segments = splash.SegmentIds(q=jnp.ones(q.shape[:2], jnp.int32), kv=keys.astype(jnp.int32))
        heads_first = lambda t: jnp.swapaxes(t, 1, 2)  # [B, L, N, D] -> [B, N, L, D]
        scale = jnp.asarray(1.0 / math.sqrt(depth), q.dtype)
        out = jax.vmap(kernel)(heads_first(q * scale), heads_first(k), heads_first(v), segments)
        return heads_first(out).astype(v.dtype)

    per_rows = functools.partial(per_device_rows, run)
    if interpret:
        return per_rows(q, k, v, keys)
    # The Mosaic kernel lowers for TPU only: a model built for TPU but run elsewhere (a CPU
    # host checking it) takes the einsums, chosen when the program is lowered.
    return jax.lax.platform_dependent(
        q,
        k,
        v,
        keys,
        tpu=per_rows,
        default=lambda q, k, v, keys: attend(q, k, v, key_mask, dropout, rngs, query_rows),
    )


# ------------------------------------------------------------------------------------ CPU


class Dense2D(nnx.Linear):
    """``nnx.Linear`` that multiplies its inputs as a 2-D ``[tokens, din]`` matrix (same
    parameters and results): with ``[B, L, din]`` inputs XLA's CPU backend first transposes the
    whole output gradient to get the kernel gradient. Inputs, kernel and output of one dtype
    (float32 training on CPU) take :func:`matmul_2d`'s kernel gradient."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        """``inputs: float[..., din]`` -> ``float[..., dout]``."""
        flat = inputs.reshape(-1, inputs.shape[-1])
        kernel = self.kernel[...]
        dtypes = (kernel.dtype, self.dtype or flat.dtype, self.preferred_element_type or flat.dtype)
        if (
            out_sharding is None
            and self.precision is None
            and {jnp.dtype(d) for d in dtypes} == {flat.dtype}
        ):
            out = matmul_2d(flat, kernel)
            if self.bias is not None:
                out = out + self.bias[...].astype(out.dtype)
        else:
            out = super().__call__(flat, out_sharding)
        return out.reshape(*inputs.shape[:-1], -1)


KERNEL_MAX_WIDTH = 256
"""Dense layers whose kernel has a dimension of at most this many features take the C++ product
(:func:`matmul_2d`): measured faster than XLA's there (a 256-wide model such as LOGO), slower
at 768 features (DNABERT-6, BarcodeMAE; BENCHMARKS.md)."""


@jax.custom_vjp
def matmul_2d(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x: float[T, din] @ w: float[din, dout] -> float[T, dout]`` (one dtype).

    float32 on one device, where the kernels of :mod:`gemsjax.models.native_kernels` build and
    ``min(din, dout) <= KERNEL_MAX_WIDTH``, the product and both gradients (``d_out w^T``,
    ``x^T d_out``) are :func:`native_kernels.matmul` calls: a register-tiled product that reads
    transposed operands in place (the LOGO step 7 % faster on the 2-core AMD host; the
    DNABERT-6 step 7 % slower, hence the width limit; BENCHMARKS.md). Otherwise XLA's
    products, whose kernel gradient for ``din > dout`` (a feed-forward layer's output
    projection) is computed as ``(g^T x)^T``: XLA's CPU matmul computes ``x^T g`` into a tall
    ``[din, dout]`` output up to 1.4x slower than the wide ``[dout, din]`` one plus a transpose;
    an optimisation barrier keeps XLA from folding the transpose back into the matmul, and
    :func:`_transposed` writes it row-major."""
    if _product_kernel_applies(x, w):
        return native_kernels.matmul(x, w)
    return x @ w


def _matmul_2d_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return matmul_2d(x, w), (x, w)


def _matmul_2d_bwd(residuals, d_out):
    x, w = residuals
    if _product_kernel_applies(x, w):
        d_x = native_kernels.matmul(d_out, w, transpose_b=True)
        return d_x, native_kernels.matmul(x, d_out, transpose_a=True)
    if w.shape[0] > w.shape[1]:
        d_w = _transposed(jax.lax.optimization_barrier(d_out.T @ x))
    else:
        d_w = x.T @ d_out
    return d_out @ w.T, d_w


matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def _kernels_apply(x: jax.Array) -> bool:
    """Whether a float32 ``x`` can go to the C++ kernels: outside a multi-device mesh (one
    device's arrays) and where they build."""
    mesh = jax.sharding.get_abstract_mesh()
    one_device = mesh.empty or mesh.size == 1
    return x.dtype == jnp.float32 and one_device and native_kernels.load()


def _product_kernel_applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether ``x @ w`` and its gradients take the C++ product (:data:`KERNEL_MAX_WIDTH`)."""
    return min(w.shape) <= KERNEL_MAX_WIDTH and _kernels_apply(x)


def _transposed(x: jax.Array) -> jax.Array:
    """``x.T`` of a 2-D array, written row-major by the C++ kernel for float32 outside a
    multi-device mesh when the kernels build (else XLA's layout)."""
    if _kernels_apply(x):
        return native_kernels.transpose(x)
    return x.T


class LayerNormLastAxis(nnx.LayerNorm):
    """``nnx.LayerNorm`` (same parameters and results) whose float32 normalisation over the last
    axis, with scale and bias and the two-pass variance, goes through the C++ kernel
    (:func:`layer_norm_fused_cpu`) where it builds, else through :func:`layer_norm`'s
    hand-written gradient; any other configuration takes ``nnx.LayerNorm``'s own path."""

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """``x: float[..., H]`` -> ``float[..., H]``."""
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        plain = (
            mask is None
            and scale is not None
            and bias is not None
            and not self.use_fast_variance
            and self.axis_name is None
            and self.reduction_axes in (-1, (-1,))
            and self.feature_axes in (-1, (-1,))
            and {x.dtype, scale.dtype, bias.dtype, jnp.dtype(self.dtype or x.dtype)}
            == {jnp.dtype(jnp.float32)}
        )
        if not plain:
            return super().__call__(x, mask=mask)
        norm = layer_norm_fused_cpu if native_kernels.load() else layer_norm
        return norm(x, scale, bias, self.epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis of ``x: float32[..., H]``
    (``scale, bias: float32[H]``; two-pass variance, as PyTorch). Its backward pass is the
    closed form ``rstd * (d - mean(d) - x_hat * mean(d * x_hat))`` with ``d = g * scale`` from
    the saved row statistics: autodiff of the same forward pass runs 1.3x slower on XLA's CPU
    backend (BENCHMARKS.md)."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    rstd = jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)
    return centered * rstd * scale + bias, (x, mean, rstd, scale)


def _layer_norm_bwd(eps, residuals, d_out):
    del eps
    x, mean, rstd, scale = residuals
    x_hat = (x - mean) * rstd
    d_hat = d_out * scale
    d_x = rstd * (
        d_hat
        - jnp.mean(d_hat, axis=-1, keepdims=True)
        - x_hat * jnp.mean(d_hat * x_hat, axis=-1, keepdims=True)
    )
    rows = tuple(range(x.ndim - 1))
    return d_x, jnp.sum(d_out * x_hat, axis=rows), jnp.sum(d_out, axis=rows)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_fused_cpu(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """:func:`layer_norm` in the C++ kernel of :mod:`gemsjax.models.native_kernels` (call its
    ``load`` first), each device on its own rows of the batch: both passes read and write each
    array once, where XLA's fusions of :func:`layer_norm` materialise ``[..., H]`` broadcasts of
    the row statistics and of the scale (a LOGO step ~1 % faster, BENCHMARKS.md). The scale's and
    bias's gradients are summed per device in the kernel, then over the devices. Arguments and
    result as in :func:`layer_norm` (``x``'s first axis the batch)."""
    return _layer_norm_fused_fwd(x, scale, bias, eps)[0]


def _layer_norm_fused_fwd(x, scale, bias, eps):
    forward = lambda x, scale, bias: native_kernels.layer_norm_forward(x, scale, bias, eps)
    out, stats = per_device_rows(forward, x, shared=(scale, bias))
    return out, (x, stats, scale)


def _layer_norm_fused_bwd(eps, residuals, d_out):
    del eps

    def backward(x, stats, d_out, scale):
        d_x, d_params = native_kernels.layer_norm_backward(x, stats, scale, d_out)
        return d_x, d_params[None]

    x, stats, scale = residuals
    d_x, d_params = per_device_rows(backward, x, stats, d_out, shared=(scale,))
    d_scale, d_bias = jnp.sum(d_params, axis=0)
    return d_x, d_scale, d_bias


layer_norm_fused_cpu.defvjp(_layer_norm_fused_fwd, _layer_norm_fused_bwd)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU in PyTorch's form ``x * (1 + erf(x / sqrt(2))) / 2``.

    ``jax.nn.gelu(approximate=False)`` goes through ``erfc``, slow on CPU. The derivative
    ``Phi(x) + x phi(x)`` is a custom VJP computed in the backward pass from the saved input:
    autodiff would compute and store it in the forward pass, one more ``[tokens, ffn]`` pass and
    array per layer.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def _gelu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return gelu(x), x


def _gelu_bwd(x: jax.Array, d_out: jax.Array) -> tuple[jax.Array]:
    # Phi(x) as 1 - Phi(-x): written like the forward's erf(x / sqrt 2), XLA shares that erf
    # between the passes and stores it, one more [tokens, ffn] pass and array in the forward.
    cdf = 0.5 - 0.5 * jax.lax.erf(x * (-1.0 / math.sqrt(2.0)))
    pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return (d_out * (cdf + x * pdf).astype(d_out.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def attend_cpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    dropout: Any,
    rngs: nnx.Rngs | None,
    query_rows: Any = None,
) -> jax.Array:
    """:func:`attend` through :func:`attend_fused_cpu`: with probability dropout on, given the
    keep mask ``dropout`` would draw for the probabilities (where the kernel cannot be built,
    :func:`attend` itself); without it, through :func:`attend_leading` when the queries are rows
    that pack (``query_rows.pack``: only the slots :meth:`~gemsjax.models.bert.Rows.slots_read`
    counts are ever read)."""
    if _dropout_on(dropout):
        if dropout.rate == 1.0 or not native_kernels.load():
            return attend(q, k, v, key_mask, dropout, rngs, query_rows)
        rows = None if query_rows is None else query_rows._replace(axis=2, pack=None)
        (batch, len_q, heads, _), len_k = q.shape, k.shape[1]
        kept = dropout.kept((batch, heads, len_q, len_k), rngs=rngs, rows=rows)
        return attend_fused_cpu(q, k, v, key_mask, kept, 1.0 / (1.0 - dropout.rate))
    if query_rows is not None and query_rows.pack is not None:
        return attend_leading(q, k, v, key_mask, query_rows.slots_read())
    return attend_fused_cpu(q, k, v, key_mask)


def attend_fused_cpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    kept: jax.Array | None = None,
    scale: float = 1.0,
) -> jax.Array:
    """:func:`attend` through the C++ kernel of :mod:`gemsjax.models.native_kernels` (float32
    inside; each device runs it on its own rows of the batch) when it builds on this host, else
    through :func:`attend_tiled` (then ``kept`` must be None). Arguments and result as in
    :func:`attend_tiled`; ``kept: bool[B, N, Lq, Lk]`` and ``scale``: dropout's keep mask on
    the probabilities and ``1 / (1 - rate)``."""
    if not native_kernels.load():
        if kept is not None:  # the tiled path has no dropout: never drop it silently
            raise ValueError("attend_fused_cpu: dropout needs the C++ kernel; use attend instead")
        return attend_tiled(q, k, v, key_mask)
    q = q.astype(jnp.float32) * (1.0 / math.sqrt(q.shape[-1]))
    args = (q, k.astype(jnp.float32), v.astype(jnp.float32), key_mask)
    if kept is None:
        out = per_device_rows(native_kernels.attend, *args)
    else:
        run = lambda *a: native_kernels.attend(*a, scale)
        out = per_device_rows(run, *args, kept)
    return out.astype(v.dtype)


QUERY_BUCKET = 16
""":func:`attend_leading` attends the smallest multiple of this many leading query slots that
holds every slot it must (one compiled branch per multiple)."""


@jax.custom_vjp
def attend_leading(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, leading: jax.Array
) -> jax.Array:
    """:func:`attend_fused_cpu` for the first ``leading`` (``int32[]``, traced) query slots of every
    row; the outputs of the others are 0. A ``lax.switch`` over the multiples of
    :data:`QUERY_BUCKET` up to ``Lq`` picks the smallest that holds ``leading``: the masked-token
    step's last layer attends as many query slots as its fullest row needs (85-118 of 192 in
    the LOGO benchmark's GeneMask batches), not the per-row slots sized for the worst case.
    The backward pass is a second switch that recomputes from the inputs (the C++ kernel's
    backward reads only those), so no branch hands residuals to the others: autodiff of the
    forward switch alone made every branch write zeros for every other branch's residuals and
    copy ``k`` and ``v`` out (~8 ms of a 0.37 s LOGO step). Arguments otherwise as in
    :func:`attend_tiled`."""
    len_q = q.shape[1]

    def first(size: int) -> Callable[..., jax.Array]:
        def run(q, k, v, key_mask):
            out = attend_fused_cpu(q[:, :size], k, v, key_mask)
            return jnp.pad(out, ((0, 0), (0, len_q - size), (0, 0), (0, 0)))

        return run

    return _switch_leading(first, leading, len_q, q, k, v, key_mask)


def _switch_leading(branch_for: Callable, leading: jax.Array, len_q: int, *args) -> Any:
    """``lax.switch`` over ``branch_for(size)`` for the multiples ``size`` of
    :data:`QUERY_BUCKET` below ``len_q`` and ``len_q`` itself: the smallest that holds
    ``leading``."""
    sizes = [*range(QUERY_BUCKET, len_q, QUERY_BUCKET), len_q]
    return _switch_sizes(branch_for, sizes, leading, *args)


def _switch_sizes(branch_for: Callable, sizes: list[int], leading: jax.Array, *args) -> Any:
    """``lax.switch`` over ``branch_for(size)`` for the ascending ``sizes``: the smallest that
    holds ``leading`` (the largest where none does)."""
    branch = jnp.searchsorted(jnp.asarray(sizes), leading.astype(jnp.int32))
    branches = [branch_for(size) for size in sizes]
    return jax.lax.switch(jnp.minimum(branch, len(sizes) - 1), branches, *args)


def _attend_leading_fwd(q, k, v, key_mask, leading):
    return attend_leading(q, k, v, key_mask, leading), (q, k, v, key_mask, leading)


def _attend_leading_bwd(residuals, d_out):
    q, k, v, key_mask, leading = residuals

    def first(size: int) -> Callable[..., tuple[jax.Array, ...]]:
        def run(q, k, v, key_mask, d_out):
            attend_first = lambda q, k, v: attend_fused_cpu(q[:, :size], k, v, key_mask)
            _, vjp = jax.vjp(attend_first, q, k, v)
            return vjp(d_out[:, :size])

        return run

    d_q, d_k, d_v = _switch_leading(first, leading, q.shape[1], q, k, v, key_mask, d_out)
    return d_q, d_k, d_v, None, None


attend_leading.defvjp(_attend_leading_fwd, _attend_leading_bwd)


ROW_BUCKETS = 16
""":func:`sums_on_leading_rows` runs on the smallest of ``ceil(i * P / ROW_BUCKETS)`` rows,
``i = ROW_BUCKETS / 2 .. ROW_BUCKETS``, rounded up to a multiple of 8, that holds the rows that
carry weight (one compiled branch per size)."""


def row_buckets(total: int) -> list[int]:
    """The row counts :func:`sums_on_leading_rows` compiles a branch for, of ``total`` rows."""
    round_up = lambda n: -(-n // 8) * 8
    steps = range(ROW_BUCKETS // 2, ROW_BUCKETS + 1)
    return sorted({min(total, round_up(math.ceil(i * total / ROW_BUCKETS))) for i in steps})


def sums_on_leading_rows(
    fn: Callable[..., dict], leading: jax.Array, params: Any, rows: Any, data: Any
) -> dict:
    """``fn(params, rows, data)`` (a dict of float32 sums) on the first ``size`` rows of axis 1
    of every array in ``rows`` (differentiable, float) and ``data`` (not differentiated), for
    the smallest ``size`` of :func:`row_buckets` that holds ``leading`` (``int32[]``): the
    masked-token step's packed slots after the last layer's attention, of which a batch uses
    as many as its fullest shard has masked tokens (536-713 of 820 in the LOGO benchmark's
    GeneMask batches). ``fn`` must work row by row and give the rows from ``leading`` on no
    weight in its sums; then the result and the gradient of ``"loss_sum"`` with respect to
    ``params`` and ``rows`` equal ``fn``'s on every row.

    A ``lax.switch`` over the sizes. Under differentiation each branch computes ``fn``'s value
    and gradient together (``jax.value_and_grad``) and the backward pass only scales them by
    the incoming cotangent: a switch differentiated by JAX would have every branch write zeros
    for every other branch's residuals, and a switch per matmul (tried) pads every product back
    to ``P`` rows, which costs what the smaller products save (BENCHMARKS.md, Train step)."""
    total = jax.tree.leaves(rows)[0].shape[1]
    sizes = row_buckets(total)
    cut = lambda size, tree: jax.tree.map(lambda a: a[:, :size], tree)

    def value(size: int) -> Callable[..., dict]:
        return lambda params, rows, data: fn(params, cut(size, rows), cut(size, data))

    def value_and_grads(size: int) -> Callable[..., tuple]:
        def run(params, rows, data):
            def loss(params, rows):
                sums = fn(params, rows, cut(size, data))
                return sums["loss_sum"], sums

            grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
            (_, sums), (d_params, d_rows) = grad(params, cut(size, rows))
            pad = lambda d: jnp.pad(d, [(0, 0), (0, total - size)] + [(0, 0)] * (d.ndim - 2))
            return sums, d_params, jax.tree.map(pad, d_rows)

        return run

    @jax.custom_vjp
    def sums(leading, params, rows, data):
        return _switch_sizes(value, sizes, leading, params, rows, data)

    def sums_fwd(leading, params, rows, data):
        out, d_params, d_rows = _switch_sizes(value_and_grads, sizes, leading, params, rows, data)
        return out, (d_params, d_rows)

    def sums_bwd(residuals, d_out):
        scale = lambda d: d * d_out["loss_sum"].astype(d.dtype)
        d_params, d_rows = jax.tree.map(scale, residuals)
        return None, d_params, d_rows, None

    sums.defvjp(sums_fwd, sums_bwd)
    return sums(leading, params, rows, data)


def l2_cache_bytes(cpu_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """Size of the level-2 data (or unified) cache of the first CPU core, from Linux sysfs;
    ``None`` where sysfs does not say (another OS, a container hiding it)."""
    for index in sorted(pathlib.Path(cpu_dir).glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if level == "2" and kind in ("Data", "Unified") and size[:-1].isdigit():
            return int(size[:-1]) << {"K": 10, "M": 20}.get(size[-1], 0)
    return None


def tile_budget(l2_bytes: int | None) -> tuple[int, int | None]:
    """``(TILE_ELEMENTS, TILE_PAIRS)`` for a host whose cores have ``l2_bytes`` of L2 cache.

    Measured on two 2-core VMs (BENCHMARKS.md): with 512 KiB-class L2 (AMD EPYC) one (row, head)
    pair per loop step at 512 tokens was fastest (65,536 scores; 2-32 pairs: up to 17 % slower
    at 512 queries, 12-32 % at 192); with 2 MiB L2 (Intel Xeon, AVX-512) 8 pairs at 512 tokens
    were 14-23 % faster (the loop's per-step cost and its small matmuls' threading dominate
    there), but capped at 8 pairs (128 pairs of 110 tokens made the BarcodeMAE forward 18 %
    slower)."""
    if l2_bytes is not None and l2_bytes >= 2 << 20:
        return 1 << 21, 8
    return 1 << 16, None


TILE_ELEMENTS, TILE_PAIRS = tile_budget(l2_cache_bytes())
""":func:`attend_tiled` scores at most ``TILE_ELEMENTS`` (query, key) pairs of at most
``TILE_PAIRS`` (row, head) pairs (no cap when ``None``) per loop step (one pair's ``[Lq, Lk]``
tile when that is larger), by :func:`tile_budget` for this host."""


def attend_tiled(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array) -> jax.Array:
    """:func:`attend` without dropout, a few (row, head) pairs at a time, with a recomputing
    backward pass.

    XLA's CPU backend writes every ``[B, N, Lq, Lk]`` intermediate (scores, exponentials, their
    gradients) to memory. A ``jax.lax.map`` over tiles of ``c`` (row, head) pairs keeps each to
    ``[c, Lq, Lk]``, ``c * Lq * Lk`` up to :data:`TILE_ELEMENTS` and ``c`` up to
    :data:`TILE_PAIRS` (sized for this host's cache by :func:`tile_budget`; a CPU optimisation
    that would only serialise work on a GPU or TPU); the forward pass saves only the
    softmax's row maxima and sums (``float32[.., Lq, 1]`` each) and the backward pass recomputes
    the probabilities; the scale is folded into ``q`` and the normalisation divides the
    ``[c, Lq, D]`` output rather than the probabilities. Under a mesh each device loops over its
    own rows of the batch (:func:`per_device_rows`).

    Args and result as in :func:`attend` (``q, k, v: float[B, L, N, D]``, ``key_mask: bool[B, L]``
    -> ``float[B, Lq, N, D]`` in ``v``'s dtype).
    """

    def run(q, k, v, key_mask):
        (rows, len_q, heads, depth), len_k = q.shape, k.shape[1]
        per_tile = max(1, min(TILE_ELEMENTS // (len_q * len_k), TILE_PAIRS or rows * heads))
        per_tile = max(c for c in range(1, per_tile + 1) if (rows * heads) % c == 0)
        tiles = lambda t: jnp.moveaxis(t, 2, 0).reshape(-1, per_tile, t.shape[1], depth)
        keep = jnp.broadcast_to(key_mask[None, :, None, :], (heads, rows, 1, len_k))
        q = q * jnp.asarray(1.0 / math.sqrt(depth), q.dtype)
        out = _attend_tiles(tiles(q), tiles(k), tiles(v), keep.reshape(-1, per_tile, 1, len_k))
        return jnp.moveaxis(out.reshape(heads, rows, len_q, depth), 0, 2)

    return per_device_rows(run, q, k, v, key_mask)


def per_device_rows(fn: Callable[..., Any], *args: jax.Array, shared: tuple = ()) -> Any:
    """``fn(*args, *shared)`` (batch-major ``args`` and results; ``shared`` whole on every
    device) run by each device on its own rows of the batch under the active mesh: ``shard_map``
    with the batch over every mesh axis (the batch sharding of
    :func:`gemsjax.train.sharding.batch_sharding`). Without a mesh, on one device, or for a
    batch the devices do not divide, ``fn(*args, *shared)`` itself."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or args[0].shape[0] % mesh.size:
        return fn(*args, *shared)
    rows, whole = jax.sharding.PartitionSpec(tuple(mesh.axis_names)), jax.sharding.PartitionSpec()
    specs = (rows,) * len(args) + (whole,) * len(shared)
    run = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=rows, check_vma=False)
    return run(*args, *shared)


def _tile_scores(q: jax.Array, k: jax.Array, keep: jax.Array) -> jax.Array:
    """One tile's masked scores: ``q: float[c, Lq, D]``, ``k: float[c, Lk, D]``,
    ``keep: bool[c, 1, Lk]`` -> ``float32[c, Lq, Lk]`` (the float32 minimum off ``keep``)."""
    scores = jnp.einsum("bqd,bkd->bqk", q, k, preferred_element_type=jnp.float32)
    return jnp.where(keep, scores, jnp.finfo(jnp.float32).min)


def _tile_forward(
    q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One tile's ``softmax(scores) v: float[c, Lq, D]`` in v's dtype and the scores' row maxima
    and ``sum(exp(scores - max))``, ``float32[c, Lq, 1]`` each (a log-sum-exp would lose the
    sum of an all-masked row to rounding); arguments as in :func:`_tile_scores`."""
    scores = _tile_scores(q, k, keep)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    exp = jnp.exp(scores - peak)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    out = jnp.einsum("bqk,bkd->bqd", exp.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / total).astype(v.dtype), (peak, total)


@jax.custom_vjp
def _attend_tiles(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array) -> jax.Array:
    """Tiled attention: ``q, k, v: float[T, c, L, D]``, ``keep: bool[T, c, 1, Lk]``
    -> ``float[T, c, Lq, D]``."""
    return _attend_tiles_fwd(q, k, v, keep)[0]


def _attend_tiles_fwd(q, k, v, keep):
    """Output and residuals: the inputs, the output and the per-tile row statistics."""
    out, stats = jax.lax.map(lambda args: _tile_forward(*args), (q, k, v, keep))
    return out, (q, k, v, keep, out, stats)


def _attend_tiles_bwd(residuals, d_out):
    """Cotangents of q, k, v (none for ``keep``), per tile from recomputed probabilities.

    The tiles are built transposed (``[c, Lk, Lq]``) so that two of the three gradient matmuls
    contract over the tile's last axis, the layout XLA's CPU matmul takes without a copy.
    """

    def tile(args):
        hq, hk, hv, keep, h_out, (h_peak, h_total), h_d = args
        keep_t = jnp.swapaxes(keep, 1, 2)
        scores_t = jnp.einsum("bkd,bqd->bkq", hk, hq, preferred_element_type=jnp.float32)
        scores_t = jnp.where(keep_t, scores_t, jnp.finfo(jnp.float32).min)
        probs_t = jnp.exp(scores_t - jnp.swapaxes(h_peak, 1, 2)) * jnp.swapaxes(1.0 / h_total, 1, 2)
        d_v = jnp.einsum(
            "bkq,bqd->bkd", probs_t.astype(h_d.dtype), h_d, preferred_element_type=jnp.float32
        )
        d_probs_t = jnp.einsum("bkd,bqd->bkq", hv, h_d, preferred_element_type=jnp.float32)
        delta = jnp.sum(h_d.astype(jnp.float32) * h_out.astype(jnp.float32), axis=-1)
        d_scores_t = jnp.where(keep_t, probs_t * (d_probs_t - delta[:, None, :]), 0.0).astype(
            hq.dtype
        )
        d_q = jnp.einsum("bkq,bkd->bqd", d_scores_t, hk, preferred_element_type=jnp.float32)
        d_k = jnp.einsum("bkq,bqd->bkd", d_scores_t, hq, preferred_element_type=jnp.float32)
        return d_q.astype(hq.dtype), d_k.astype(hk.dtype), d_v.astype(hv.dtype)

    d_q, d_k, d_v = jax.lax.map(tile, (*residuals, d_out))
    return d_q, d_k, d_v, None


_attend_tiles.defvjp(_attend_tiles_fwd, _attend_tiles_bwd)


def _unembed_2d(hidden: jax.Array, table: jax.Array) -> jax.Array:
    """:func:`_unembed` as one 2-D ``[tokens, H] x [H, V]`` matmul (see :class:`Dense2D`)."""
    tokens = hidden.reshape(-1, hidden.shape[-1])
    logits = jnp.einsum(
        "th,vh->tv", tokens, table.astype(hidden.dtype), preferred_element_type=jnp.float32
    )
    return logits.reshape(*hidden.shape[:-1], -1)


CPU = Layers(
    dense=Dense2D,
    norm=LayerNormLastAxis,
    gelu=gelu,
    attention=attend_cpu,
    keep_mask=random_bits.bernoulli16,
    unembed=_unembed_2d,
    leading_sums=sums_on_leading_rows,
)
