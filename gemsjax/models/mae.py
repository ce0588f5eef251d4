"""BarcodeMAE: a BERT encoder that sees only the visible tokens, and a BERT decoder over all.

``variant="dropped"`` (the paper's default, ``maelm_v2``): masked tokens are removed before the
encoder. The visible tokens of each row are compacted to the left into ``num_visible`` slots
(a static size the caller chooses >= the largest visible count in the batch), keep their original
position ids, and run through the encoder; empty slots hold ``[UNK]`` at position 0 and are never
attended to, nor are original padding positions. The encoder output goes through a linear
projection (always applied, as in the reference code), is put back at the original positions, and
masked positions get one learned mask vector (initialized to zero). The decoder adds its own
position and token-type embeddings, applies LN and dropout, runs its blocks with the original
padding mask, then dropout and a linear layer over the ``num_classes`` k-mer classes
(target = token id - 2 in the BarcodeBERT vocab).

``variant="baseline"``: masked tokens are replaced by ``[MASK]`` and the full sequence goes
through the encoder, projection and decoder.

After pretraining only the encoder is kept; :meth:`BarcodeMAE.encode` runs it alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemsjax.models.bert import (
    FSDP_AXIS,
    BertConfig,
    BertModel,
    Dtype,
    Embeddings,
    Rows,
    TransformerStack,
    dense,
    dropout_layer,
)
from gemsjax.vocab import get_vocab

_VOCAB = get_vocab("barcodebert", 6)
UNK_ID = _VOCAB.unk_id
MASK_ID = _VOCAB.mask_id
VARIANTS = ("dropped", "baseline")


def compact_visible(
    ids: jax.Array, attention: jax.Array, mask: jax.Array, num_visible: int, unk_id: int = UNK_ID
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Left-compact the visible (unmasked) tokens of each row.

    Args:
      ids: ``int32[B, L]`` token ids.
      attention: ``int[B, L]``, nonzero on real tokens (0 on padding).
      mask: ``bool[B, L]``, True where a token is masked (dropped).
      num_visible: static slot count V >= the largest number of visible tokens in a row;
        visible tokens beyond V would be silently dropped.
      unk_id: id written into empty slots.
    Returns:
      ``(ids, position_ids, key_mask)``: ``int32[B, V]`` ids of the visible tokens in their
      original order (``unk_id`` in empty slots), ``int32[B, V]`` their original positions
      (0 in empty slots), ``bool[B, V]`` True where the slot is a visible non-padding token.
    """
    order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)[:, :num_visible]
    count = jnp.sum(~mask, axis=1, keepdims=True)
    filled = jnp.arange(num_visible)[None, :] < count
    slot_ids = jnp.where(filled, jnp.take_along_axis(ids, order, axis=1), unk_id)
    slot_pos = jnp.where(filled, order, 0).astype(jnp.int32)
    key_mask = filled & (jnp.take_along_axis(attention, order, axis=1) != 0)
    return slot_ids.astype(jnp.int32), slot_pos, key_mask


def expand_visible(compact: jax.Array, mask: jax.Array, fill: jax.Array) -> jax.Array:
    """Inverse of :func:`compact_visible` for vectors.

    Args:
      compact: ``float[B, V, H]``, one vector per slot.
      mask: ``bool[B, L]``, True where masked.
      fill: ``float[H]``, the vector placed at masked positions.
    Returns:
      ``float[B, L, H]``: visible position p gets the slot holding it; masked positions get fill.
    """
    rank = jnp.cumsum(~mask, axis=1) - 1
    slot = jnp.clip(rank, 0, compact.shape[1] - 1)
    full = jnp.take_along_axis(compact, slot[..., None], axis=1)
    return jnp.where(mask[..., None], fill.astype(compact.dtype), full)


class MaeDecoder(nnx.Module):
    """Decoder over all positions: embeddings (no word table) -> blocks -> dropout -> linear."""

    def __init__(
        self,
        config: BertConfig,
        num_classes: int,
        *,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = Embeddings(config, **kw)
        self.stack = TransformerStack(config, **kw)
        self.dropout = dropout_layer(config.dropout, config.platform)
        self.classifier = dense(
            config.hidden,
            num_classes,
            (None, FSDP_AXIS),
            platform=config.platform,
            out_dtype=jnp.float32,
            **kw,
        )

    def __call__(
        self,
        x: jax.Array,
        attention: jax.Array,
        rngs: nnx.Rngs | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """``x: float[B, L, H]``, ``attention: int[B, L]`` -> logits ``float32[B, L, C]``, or
        ``float32[B, P, C]`` at ``positions: int32[B, P]`` (the last block, dropout and the
        classifier then run at those rows only; equal to the full logits there)."""
        position_ids = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        h = self.embeddings(x, position_ids, jnp.zeros_like(position_ids), rngs)
        h = self.stack(h, attention != 0, rngs, positions)
        rows = None if positions is None else Rows(1, positions, x.shape[1])
        return self.classifier(self.dropout(h, rngs=rngs, rows=rows)).astype(jnp.float32)


class BarcodeMAE(nnx.Module):
    """Encoder (:class:`~gemsjax.models.bert.BertModel`) + projection + :class:`MaeDecoder`.

    ``config`` is a BertConfig with ``decoder_layers``, ``decoder_heads`` and ``num_classes``.
    """

    def __init__(
        self,
        config: BertConfig,
        *,
        variant: str = "dropped",
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"unknown BarcodeMAE variant {variant!r}; valid: {VARIANTS}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.variant = variant
        self.encoder = BertModel(config, **kw)
        self.projection = dense(
            config.hidden, config.hidden, (FSDP_AXIS, None), platform=config.platform, **kw
        )
        if variant == "dropped":
            self.mask_vector = nnx.Param(jnp.zeros((config.hidden,), param_dtype))
        self.decoder = MaeDecoder(config.decoder(), config.num_classes, **kw)

    def encode(
        self,
        ids: jax.Array,
        attention: jax.Array,
        *,
        position_ids: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """The pretrained encoder alone: ``ids, attention: int32[B, L]`` -> ``float[B, L, H]``."""
        return self.encoder(ids, attention, position_ids=position_ids, rngs=rngs)

    def __call__(
        self,
        ids: jax.Array,
        attention: jax.Array,
        mask: jax.Array,
        *,
        num_visible: int | None = None,
        positions: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Logits ``float32[B, L, num_classes]``, or ``float32[B, P, num_classes]`` at
        ``positions``.

        Args:
          ids: ``int32[B, L]`` uncorrupted token ids.
          attention: ``int[B, L]``, 0 on padding.
          mask: ``bool[B, L]``, True where a token is masked.
          num_visible: static encoder length for ``variant="dropped"`` (>= the largest visible
            count per row; default L). Ignored by the baseline.
          positions: ``int32[B, P]`` rows wanted from the decoder (None: all): its last block
            and classifier then run only there (what a loss on the masked tokens needs).
          rngs: dropout keys when dropout is switched on.
        """
        if self.variant == "baseline":
            corrupted = jnp.where(mask, MASK_ID, ids)
            x = self.projection(self.encoder(corrupted, attention, rngs=rngs))
        else:
            slot_ids, slot_pos, key_mask = compact_visible(
                ids, attention, mask, num_visible or ids.shape[1]
            )
            hidden = self.encoder(slot_ids, key_mask, position_ids=slot_pos, rngs=rngs)
            x = expand_visible(self.projection(hidden), mask, self.mask_vector[...])
        return self.decoder(x, attention, rngs, positions)
