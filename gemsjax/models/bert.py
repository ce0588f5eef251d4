"""BERT as DNABERT has it, in Flax NNX: embeddings, post-LN encoder, tied MLM head, classifier.

Conventions shared by every module here:

- ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``), ``param_dtype`` the parameter dtype
  (keep ``jnp.float32``). LayerNorm statistics are always float32; logits are returned float32.
- Init as in BERT: kernels and embeddings N(0, 0.02), biases 0, LayerNorm scale 1 and bias 0.
- Large kernels and embedding tables carry mesh-axis annotations (``nnx.with_partitioning``) that
  shard one dimension over the :data:`FSDP_AXIS` mesh axis; biases and LayerNorm stay replicated.
  The annotation is always recorded (read it with ``nnx.get_partition_spec``); the array is
  sharded at creation only when a mesh is active (``jax.set_mesh``), so the same code builds a
  plain single-device model when no mesh is set. A mesh must have ``AxisType.Auto`` axes (XLA
  then inserts the FSDP all-gathers); explicit-axis meshes are refused with a clear error.
- Dropout layers hold no RNG state: they start deterministic (eval mode). For training, switch
  them on (``model.train()`` or ``nnx.view(model, deterministic=False)``) and pass
  ``rngs=nnx.Rngs(dropout=key)`` to ``__call__``; that keeps a jitted step a pure function of
  its key. Layers with rate 0 never need a key.
- Platform-specific implementations (dense layer class, GELU, attention, dropout bits, the tied
  decoder's matmul) come from :func:`gemsjax.models.backend.layers` for ``config.platform``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gemsjax.models import backend

ARCHS = ("mlm", "mae", "mae_baseline")
"""``mlm``: BERT encoder + tied MLM head. ``mae``: BarcodeMAE (encoder on visible tokens only).
``mae_baseline``: the same encoder-decoder with ``[MASK]`` tokens fed to the encoder."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Sizes of a BERT encoder (and, for the MAE archs, its decoder).

    Attributes:
      vocab_size: number of token ids.
      hidden: model width; ``heads`` must divide it.
      layers: number of transformer blocks.
      heads: attention heads.
      ffn: width of the feed-forward inner layer.
      max_positions: size of the learned absolute position table.
      type_vocab: number of token types (segment ids).
      dropout: hidden dropout rate (embeddings, residual branches, heads).
      attn_dropout: dropout rate on the attention probabilities.
      ln_eps: LayerNorm epsilon.
      arch: one of :data:`ARCHS`.
      decoder_layers: MAE decoder blocks (MAE archs only; width and FFN as the encoder).
      decoder_heads: MAE decoder attention heads (MAE archs only).
      num_classes: MAE output classes (the 4^k k-mers; target = token id - number of specials).
      platform: whose layer implementations to build (:func:`gemsjax.models.backend.layers`);
        None: ``jax.default_backend()``.
      attention: ``"auto"``, ``"xla"`` or ``"fused"`` (:mod:`gemsjax.models.backend`: a fused
        kernel on GPU / TPU where the attention probabilities get no dropout).
    """

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    max_positions: int = 512
    type_vocab: int = 2
    dropout: float = 0.1
    attn_dropout: float = 0.1
    ln_eps: float = 1e-12
    arch: str = "mlm"
    decoder_layers: int = 0
    decoder_heads: int = 0
    num_classes: int = 0
    platform: str | None = None
    attention: str = "auto"

    def __post_init__(self):
        for key in (
            "vocab_size",
            "hidden",
            "layers",
            "heads",
            "ffn",
            "max_positions",
            "type_vocab",
        ):
            _require(key, getattr(self, key) >= 1, "must be a positive integer")
        _require(
            "hidden", self.hidden % self.heads == 0, f"must be divisible by heads={self.heads}"
        )
        for key in ("dropout", "attn_dropout"):
            _require(key, 0.0 <= getattr(self, key) < 1.0, "must be in [0, 1)")
        _require("ln_eps", self.ln_eps > 0, "must be positive")
        _require("arch", self.arch in ARCHS, f"must be one of {ARCHS}")
        _require(
            "attention",
            self.attention in backend.ATTENTIONS,
            f"must be one of {backend.ATTENTIONS}",
        )
        if self.arch != "mlm":
            for key in ("decoder_layers", "decoder_heads", "num_classes"):
                _require(key, getattr(self, key) >= 1, f"must be positive for arch={self.arch!r}")
            _require(
                "hidden",
                self.hidden % self.decoder_heads == 0,
                f"must be divisible by decoder_heads={self.decoder_heads}",
            )

    def decoder(self) -> BertConfig:
        """The MAE decoder stack's own config: same width and FFN, its own depth and heads."""
        return dataclasses.replace(
            self,
            arch="mlm",
            layers=self.decoder_layers,
            heads=self.decoder_heads,
            decoder_layers=0,
            decoder_heads=0,
            num_classes=0,
        )


def _require(key: str, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"model config key {key!r} {what}")


FSDP_AXIS = "fsdp"
"""Mesh axis over which annotated parameters are sharded (the mesh is ``("data", "fsdp")``)."""

INIT_STD = 0.02
POOLINGS = ("cls", "mean")

Dtype = Any
Names = tuple[str | None, ...]


def sharded_init(init: nnx.Initializer, names: Names) -> nnx.Initializer:
    """``init`` annotated with mesh axis ``names`` (one per dimension, ``None`` = replicated).

    Flax 0.12.8 shards annotated variables eagerly at creation and raises when no mesh is
    active; eager sharding is therefore requested only when a mesh is set at construction time.
    """
    eager = not jax.sharding.get_abstract_mesh().empty
    return nnx.with_partitioning(init, names, eager_sharding=eager)


def dense(
    din: int,
    dout: int,
    names: Names | None,
    *,
    platform: str | None,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
    out_dtype: Dtype | None = None,
) -> nnx.Linear:
    """Linear ``din -> dout`` with BERT init (the ``platform``'s dense class); ``names`` shards
    the kernel (None = replicated); ``out_dtype`` (e.g. float32 for logits) sets the matmul's
    output dtype."""
    init = nnx.initializers.normal(INIT_STD)
    return backend.layers(platform).dense(
        din,
        dout,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=sharded_init(init, names) if names else init,
        bias_init=nnx.initializers.zeros_init(),
        preferred_element_type=out_dtype,
        rngs=rngs,
    )


class Pack(NamedTuple):
    """Per-row slots packed per group of rows: ``index: int32[G, P]`` picks ``P`` of each group's
    ``B / G * S`` slots (row-major) out of a per-row tensor ``[B, S, ...]``. The groups are the
    batch's shards, so packing never moves a token across devices. ``used`` (``int32[]``, for
    :meth:`BertForMaskedLM.packed_sums`): no group's packed slot from this count on is ever
    read."""

    index: jax.Array
    used: jax.Array | None = None

    def take(self, rows: jax.Array) -> jax.Array:
        """``rows: [B, S, ...]`` -> ``[G, P, ...]``."""
        groups = self.index.shape[0]
        flat = rows.reshape(groups, -1, *rows.shape[2:])
        index = self.index.reshape(self.index.shape + (1,) * (flat.ndim - 2))
        return jnp.take_along_axis(flat, index, axis=1)


class Rows(NamedTuple):
    """Rows ``positions`` (``int32[B, S]``, per batch row) along ``axis`` of a tensor whose length
    along ``axis`` is ``length``: what a computation restricted to some query positions holds.
    ``pack``: the block's computation after attention runs on these rows packed (:class:`Pack`)."""

    axis: int
    positions: jax.Array
    length: int
    pack: Pack | None = None

    def take(self, full: jax.Array) -> jax.Array:
        """The rows of ``full: [B, ..., length, ...]`` (``length`` at ``axis``)."""
        shape = [1] * full.ndim
        shape[0], shape[self.axis] = self.positions.shape
        return jnp.take_along_axis(full, self.positions.reshape(shape), axis=self.axis)

    def packed(self, rows: jax.Array) -> jax.Array:
        """``rows: [B, S, ...]`` (what :meth:`take` gave) packed, or unchanged without ``pack``."""
        return rows if self.pack is None else self.pack.take(rows)

    def slots_read(self) -> jax.Array:
        """``int32[]``, with ``pack``: how many leading slots of the rows are ever read. No row's
        slot from this count on is packed, so a per-row computation's outputs there are never
        read (a row's positions take its first slots, unused ones follow; an unused entry of
        ``pack`` reads slot 0)."""
        return jnp.max(self.pack.index % self.positions.shape[1]) + 1


class Dropout(nnx.Dropout):
    """``nnx.Dropout`` that can drop rows of a larger tensor exactly as the whole (``rows``),
    drawing its keep masks with the ``platform``'s ``keep_mask``."""

    def __init__(self, rate: float, *, deterministic: bool = False, platform: str | None = None):
        super().__init__(rate, deterministic=deterministic)
        self.keep_mask = backend.layers(platform).keep_mask

    def __call__(
        self,
        inputs: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
        rows: Rows | None = None,
    ) -> jax.Array:
        """``inputs`` with each element zeroed with probability ``rate`` and the rest scaled by
        ``1 / (1 - rate)``; unchanged when deterministic or ``rate == 0``. ``rngs`` as in
        ``nnx.Dropout`` (an ``nnx.Rngs`` with a ``dropout`` stream, a stream or a key).

        ``rows``: ``inputs`` holds only some rows of a full tensor, packed if ``rows.pack`` (see
        :class:`Rows`); the keep mask is drawn for the full tensor and its rows are used, so the
        rows are dropped exactly as they would be in the full computation."""
        keep = self.draw(inputs.shape, deterministic=deterministic, rngs=rngs, rows=rows)
        return self.apply(inputs, keep, deterministic=deterministic)

    def _off(self, deterministic: bool | None) -> bool:
        deterministic = self.deterministic if deterministic is None else deterministic
        return self.rate == 0.0 or deterministic

    def draw(
        self,
        shape: tuple[int, ...],
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
        rows: Rows | None = None,
    ) -> jax.Array | None:
        """The keep mask ``bool[shape]`` calling this layer would draw, or None where it draws
        none (deterministic, rate 0 or 1); arguments as in :meth:`__call__`."""
        if self._off(deterministic) or self.rate == 1.0:
            return None
        return self.kept(shape, rngs=rngs, rows=rows)

    def apply(
        self, inputs: jax.Array, keep: jax.Array | None, *, deterministic: bool | None = None
    ) -> jax.Array:
        """``inputs`` dropped by ``keep`` (what :meth:`draw` gave) as :meth:`__call__` drops."""
        if self._off(deterministic):
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        return jnp.where(keep, inputs / (1.0 - self.rate), jnp.zeros((), inputs.dtype))

    def kept(
        self, shape: tuple[int, ...], *, rngs: nnx.Rngs | None = None, rows: Rows | None = None
    ) -> jax.Array:
        """The keep mask ``bool[shape]`` that calling this layer on an input of ``shape`` would
        apply (drawing the same key from ``rngs``; ``rows`` as there), for kernels that drop
        inside (:func:`gemsjax.models.backend.attend_cpu`)."""
        rngs = self.rngs if rngs is None else rngs
        if rngs is None:
            raise ValueError(
                "dropout is on but no rngs were given; pass "
                "rngs=nnx.Rngs(dropout=key) to the model call"
            )
        key = (
            rngs[self.rng_collection]()
            if isinstance(rngs, nnx.Rngs)
            else (rngs() if isinstance(rngs, nnx.RngStream) else rngs)
        )
        if rows is None:
            return self.keep_mask(key, 1.0 - self.rate, shape)
        full = list(shape)
        full[0], full[rows.axis] = rows.positions.shape[0], rows.length
        return rows.packed(rows.take(self.keep_mask(key, 1.0 - self.rate, tuple(full))))


def dropout_layer(rate: float, platform: str | None) -> Dropout:
    """A :class:`Dropout` that starts deterministic (see the module docstring)."""
    return Dropout(rate, deterministic=True, platform=platform)


def embed(
    num: int,
    features: int,
    names: Names | None,
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> nnx.Embed:
    """Embedding table ``float[num, features]`` with N(0, 0.02) init."""
    init = nnx.initializers.normal(INIT_STD)
    return nnx.Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=sharded_init(init, names) if names else init,
        rngs=rngs,
    )


def layer_norm(
    features: int,
    eps: float,
    *,
    platform: str | None,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> nnx.LayerNorm:
    """LayerNorm with float32 statistics and the two-pass (exact) variance, as in PyTorch (the
    ``platform``'s LayerNorm class)."""
    return backend.layers(platform).norm(
        features,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        rngs=rngs,
    )


def check_mesh() -> None:
    """Raise unless the active mesh (if any) has only ``AxisType.Auto`` axes."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and not mesh.are_all_axes_auto:
        raise ValueError(
            f"the models need a mesh with AxisType.Auto axes, got {mesh.axis_types}; "
            "build it with jax.make_mesh(shape, names, "
            "axis_types=(jax.sharding.AxisType.Auto,) * len(names))"
        )


def masked_mean(hidden: jax.Array, attention: jax.Array) -> jax.Array:
    """Mean of ``hidden: float[B, L, H]`` over positions where ``attention: int[B, L]`` is
    nonzero -> ``float32[B, H]`` (BarcodeMAE's embedding pooling). All-padding rows give 0."""
    weights = (attention != 0).astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * weights, axis=1)
    return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with separate query/key/value/output projections (BERT layout)."""

    def __init__(self, config: BertConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        h, platform = config.hidden, config.platform
        kw = dict(platform=platform, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads = config.heads
        self.query = dense(h, h, (FSDP_AXIS, None), **kw)
        self.key = dense(h, h, (FSDP_AXIS, None), **kw)
        self.value = dense(h, h, (FSDP_AXIS, None), **kw)
        self.out = dense(h, h, (FSDP_AXIS, None), **kw)
        self.prob_dropout = dropout_layer(config.attn_dropout, platform)
        self.attend = backend.layers(platform, config.attention).attention

    def __call__(
        self,
        x: jax.Array,
        key_mask: jax.Array,
        rngs: nnx.Rngs | None = None,
        query_rows: Rows | None = None,
    ):
        """``x: float[B, L, H]``, ``key_mask: bool[B, L]`` -> ``float[B, L, H]``, or
        ``float[B, S, H]`` for the query rows ``query_rows`` only (keys and values: all of x),
        ``float[G, P, H]`` if they pack (the output projection then runs on the packed rows)."""
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)
        xq = x if query_rows is None else query_rows.take(x)
        ctx = self.attend(
            split(self.query(xq)),
            split(self.key(x)),
            split(self.value(x)),
            key_mask,
            self.prob_dropout,
            rngs,
            query_rows,
        )
        ctx = ctx.reshape(xq.shape[:-1] + (-1,))
        return self.out(ctx if query_rows is None else query_rows.packed(ctx))


class TransformerBlock(nnx.Module):
    """Post-LN block: ``LN(x + drop(attn(x)))`` then ``LN(h + drop(W2 gelu(W1 h)))``."""

    def __init__(self, config: BertConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        h, platform = config.hidden, config.platform
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = SelfAttention(config, **kw)
        self.attention_dropout = dropout_layer(config.dropout, platform)
        self.attention_norm = layer_norm(h, config.ln_eps, platform=platform, **kw)
        self.ffn_in = dense(h, config.ffn, (None, FSDP_AXIS), platform=platform, **kw)
        self.ffn_out = dense(config.ffn, h, (FSDP_AXIS, None), platform=platform, **kw)
        self.gelu = backend.layers(platform).gelu
        self.ffn_dropout = dropout_layer(config.dropout, platform)
        self.ffn_norm = layer_norm(h, config.ln_eps, platform=platform, **kw)

    def __call__(
        self,
        x: jax.Array,
        key_mask: jax.Array,
        rngs: nnx.Rngs | None = None,
        query_rows: Rows | None = None,
    ):
        """``x: float[B, L, H]``, ``key_mask: bool[B, L]`` -> ``float[B, L, H]``.

        With ``query_rows`` (axis 1): the block's output at those rows only, ``float[B, S, H]``
        (queries, residual stream and feed-forward at ``S`` positions; keys and values from all
        ``L``), equal to the rows of the full output, dropout included; ``float[G, P, H]`` if
        they pack (queries per row; output projection, residual stream and feed-forward on the
        packed rows)."""
        return self.after_attention(*self.attend(x, key_mask, rngs, query_rows))

    def attend(
        self,
        x: jax.Array,
        key_mask: jax.Array,
        rngs: nnx.Rngs | None = None,
        query_rows: Rows | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
        """The block up to its attention's output projection: ``(xq, attn, keep_attn,
        keep_ffn)``, the residual stream and attention output at the query rows (``[B, L, H]``,
        ``[B, S, H]`` or packed ``[G, P, H]``) and the keep masks of the block's two dropouts
        (None where they draw none), drawn in the order :meth:`__call__` draws them."""
        xq = x if query_rows is None else query_rows.packed(query_rows.take(x))
        attn = self.attention(x, key_mask, rngs, query_rows)
        draw = lambda dropout: dropout.draw(attn.shape, rngs=rngs, rows=query_rows)
        return xq, attn, draw(self.attention_dropout), draw(self.ffn_dropout)

    def after_attention(
        self,
        xq: jax.Array,
        attn: jax.Array,
        keep_attn: jax.Array | None,
        keep_ffn: jax.Array | None,
    ) -> jax.Array:
        """The rest of the block (row by row) on :meth:`attend`'s outputs -> ``float[..., H]``."""
        h = self.attention_norm(xq + self.attention_dropout.apply(attn, keep_attn))
        ffn = self.ffn_out(self.gelu(self.ffn_in(h)))
        return self.ffn_norm(h + self.ffn_dropout.apply(ffn, keep_ffn))


class TransformerStack(nnx.Module):
    """``config.layers`` post-LN blocks applied in order."""

    def __init__(self, config: BertConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.blocks = nnx.List(
            [
                TransformerBlock(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(config.layers)
            ]
        )

    def __call__(
        self,
        x: jax.Array,
        key_mask: jax.Array,
        rngs: nnx.Rngs | None = None,
        positions: jax.Array | None = None,
        pack: Pack | None = None,
        tail: Callable[..., Any] | None = None,
    ):
        """``x: float[B, L, H]``, ``key_mask: bool[B, L]`` -> ``float[B, L, H]``, or
        ``float[B, S, H]`` at ``positions: int32[B, S]``: the last block then computes only
        those rows (what an output head at ``positions`` needs); ``float[G, P, H]`` when
        ``pack`` packs them (:class:`Pack`). ``tail`` (with ``positions``): the last block
        stops after its attention and ``tail(last_block, *last_block.attend(...))`` is
        returned (:meth:`TransformerBlock.attend`)."""
        check_mesh()
        *blocks, last = self.blocks
        for block in blocks:
            x = block(x, key_mask, rngs)
        if positions is None:
            return last(x, key_mask, rngs)
        rows = Rows(1, positions, x.shape[1], pack)
        if tail is None:
            return last(x, key_mask, rngs, rows)
        return tail(last, *last.attend(x, key_mask, rngs, rows))


class Embeddings(nnx.Module):
    """``dropout(LN(x + position + token_type))``: BERT's embedding sum after the word lookup.

    The word lookup is left to the caller so that the MAE decoder can feed vectors instead."""

    def __init__(self, config: BertConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.position = embed(config.max_positions, config.hidden, (None, FSDP_AXIS), **kw)
        self.token_type = embed(config.type_vocab, config.hidden, None, **kw)
        self.norm = layer_norm(config.hidden, config.ln_eps, platform=config.platform, **kw)
        self.dropout = dropout_layer(config.dropout, config.platform)

    def __call__(
        self,
        x: jax.Array,
        position_ids: jax.Array,
        token_type_ids: jax.Array,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """``x: float[B, L, H]``, ``position_ids, token_type_ids: int32[B, L]`` -> ``[B, L, H]``."""
        check_mesh()
        x = x + self.position(position_ids) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x), rngs=rngs)


class BertModel(nnx.Module):
    """The BERT encoder (no pooler): word embeddings, :class:`Embeddings`, transformer stack."""

    def __init__(
        self,
        config: BertConfig,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.word_embeddings = embed(config.vocab_size, config.hidden, (None, FSDP_AXIS), **kw)
        self.embeddings = Embeddings(config, **kw)
        self.stack = TransformerStack(config, **kw)

    def __call__(
        self,
        ids: jax.Array,
        attention: jax.Array,
        *,
        position_ids: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
        positions: jax.Array | None = None,
        pack: Pack | None = None,
        tail: Callable[..., Any] | None = None,
    ) -> jax.Array:
        """Last hidden layer ``float[B, L, H]`` (compute dtype), or ``float[B, S, H]`` at
        ``positions`` (the last layer then runs only there; see :class:`TransformerStack`),
        ``float[G, P, H]`` with ``pack``.

        Args:
          ids: ``int32[B, L]`` token ids.
          attention: ``int[B, L]`` or ``bool[B, L]``; nonzero where a token may be attended to.
          position_ids: ``int32[B, L]``; defaults to ``0..L-1`` in every row.
          token_type_ids: ``int32[B, L]``; defaults to 0.
          rngs: dropout keys (``nnx.Rngs(dropout=key)``) when dropout is switched on.
          positions: ``int32[B, S]`` rows wanted from the last layer (None: all).
          pack: those rows packed per group of ``B / G`` rows (:class:`Pack`).
          tail: what the last layer's rows go to after its attention (see
            :class:`TransformerStack`); its result is returned.
        """
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(ids)
        x = self.embeddings(self.word_embeddings(ids), position_ids, token_type_ids, rngs)
        return self.stack(x, attention != 0, rngs, positions, pack, tail)


class MlmHead(nnx.Module):
    """dense -> GELU -> LN -> decoder tied to the word embeddings (``E^T``) + output bias."""

    def __init__(self, config: BertConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ops = backend.layers(config.platform)
        self.dense = dense(
            config.hidden, config.hidden, (FSDP_AXIS, None), platform=config.platform, **kw
        )
        self.gelu, self.unembed = ops.gelu, ops.unembed
        self.norm = layer_norm(config.hidden, config.ln_eps, platform=config.platform, **kw)
        self.bias = nnx.Param(jnp.zeros((config.vocab_size,), param_dtype))

    def __call__(self, hidden: jax.Array, word_embeddings: jax.Array) -> jax.Array:
        """``hidden: float[..., H]``, ``word_embeddings: float[V, H]`` -> ``float32[..., V]``."""
        t = self.norm(self.gelu(self.dense(hidden)))
        return self.unembed(t, word_embeddings) + self.bias[...].astype(jnp.float32)


class BertForMaskedLM(nnx.Module):
    """:class:`BertModel` + :class:`MlmHead` whose decoder is the encoder's word-embedding table."""

    def __init__(
        self,
        config: BertConfig,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = BertModel(config, **kw)
        self.head = MlmHead(config, **kw)
        self.leading_sums = backend.layers(config.platform).leading_sums

    def __call__(
        self,
        ids: jax.Array,
        attention: jax.Array,
        *,
        positions: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """MLM logits ``float32[B, L, V]``, or ``float32[B, S, V]`` at ``positions: int32[B, S]``
        (the head and the encoder's last layer then run only there; equal to the full logits
        at those positions). Other arguments as in :meth:`BertModel.__call__`."""
        hidden = self.encoder(
            ids,
            attention,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            rngs=rngs,
            positions=positions,
        )
        return self.head(hidden, self.encoder.word_embeddings.embedding[...])

    def packed_sums(
        self,
        ids: jax.Array,
        attention: jax.Array,
        positions: jax.Array,
        pack: Pack,
        loss: Callable[..., dict],
        data: tuple[jax.Array, ...],
        *,
        rngs: nnx.Rngs | None = None,
    ) -> dict:
        """``loss(logits, *data)`` at ``positions: int32[B, S]`` packed by ``pack``
        (:class:`Pack`): a dict of float32 sums over the packed slots, of which ``"loss_sum"``
        is differentiated (``logits: float32[G, P', V]``, ``data``: arrays ``[G, P, ...]``, both
        cut to the same ``P'`` leading slots). The last layer's attention runs as in
        :meth:`__call__`; the rest of it, the head and ``loss`` run through the platform's
        ``leading_sums`` (:mod:`gemsjax.models.backend`): on CPU on the fewest leading slots
        that hold ``pack.used``, with their gradient computed alongside. Equal to ``loss`` of
        the packed logits wherever ``loss`` gives the slots from ``pack.used`` on no weight."""
        table = self.encoder.word_embeddings.embedding[...]

        def tail(last, xq, attn, keep_attn, keep_ffn):
            graphdef, state = nnx.split((last, self.head))

            def run(params, rows, data):
                (last, head), table = nnx.merge(graphdef, params[0]), params[1]
                xq, attn = rows
                (keep_attn, keep_ffn), data = data[:2], data[2:]
                logits = head(last.after_attention(xq, attn, keep_attn, keep_ffn), table)
                return loss(logits, *data)

            return self.leading_sums(
                run, pack.used, (state, table), (xq, attn), (keep_attn, keep_ffn, *data)
            )

        return self.encoder(ids, attention, rngs=rngs, positions=positions, pack=pack, tail=tail)


class ClassifierHead(nnx.Module):
    """Pooling -> dropout -> linear. ``pooling="cls"``: BERT's tanh pooler on position 0
    (DNABERT fine-tuning); ``"mean"``: attention-masked mean of the last hidden layer."""

    def __init__(
        self,
        config: BertConfig,
        num_labels: int,
        *,
        pooling: str = "cls",
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; valid: {POOLINGS}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, platform = config.hidden, config.platform
        self.pooler = (
            dense(h, h, (FSDP_AXIS, None), platform=platform, **kw) if pooling == "cls" else None
        )
        self.dropout = dropout_layer(config.dropout, platform)
        self.out = dense(
            h, num_labels, (FSDP_AXIS, None), platform=platform, out_dtype=jnp.float32, **kw
        )

    def __call__(
        self, hidden: jax.Array, attention: jax.Array, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """``hidden: float[B, L, H]``, ``attention: int[B, L]`` -> ``float32[B, num_labels]``."""
        if self.pooler is not None:
            pooled = jnp.tanh(self.pooler(hidden[:, 0]))
        else:
            pooled = masked_mean(hidden, attention).astype(hidden.dtype)
        return self.out(self.dropout(pooled, rngs=rngs)).astype(jnp.float32)


class BertClassifier(nnx.Module):
    """:class:`BertModel` + :class:`ClassifierHead`, for fine-tuning a pretrained encoder
    (copy it in with ``nnx.update(clf.encoder, nnx.state(pretrained.encoder))``)."""

    def __init__(
        self,
        config: BertConfig,
        num_labels: int,
        *,
        pooling: str = "cls",
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = BertModel(config, **kw)
        self.head = ClassifierHead(config, num_labels, pooling=pooling, **kw)

    def __call__(
        self, ids: jax.Array, attention: jax.Array, *, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """``ids: int32[B, L]``, ``attention: int[B, L]`` -> logits ``float32[B, num_labels]``."""
        return self.head(self.encoder(ids, attention, rngs=rngs), attention, rngs)
