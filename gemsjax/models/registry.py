"""Model sizes by name, and the one place that turns a size into a model.

``get_model_config("dnabert6", dropout=0.0)`` gives a frozen :class:`BertConfig`;
``build_model(config, nnx.Rngs(0))`` builds the pretraining model it describes
(:class:`~gemsjax.models.bert.BertForMaskedLM` for ``arch="mlm"``,
:class:`~gemsjax.models.mae.BarcodeMAE` for ``arch="mae"`` / ``"mae_baseline"``).
Build a big size under ``nnx.eval_shape`` to inspect it without allocating.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gemsjax.models.bert import BertForMaskedLM
from gemsjax.models.mae import BarcodeMAE

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

    def __post_init__(self):
        for key in ("vocab_size", "hidden", "layers", "heads", "ffn", "max_positions",
                    "type_vocab"):
            _require(key, getattr(self, key) >= 1, "must be a positive integer")
        _require("hidden", self.hidden % self.heads == 0,
                 f"must be divisible by heads={self.heads}")
        for key in ("dropout", "attn_dropout"):
            _require(key, 0.0 <= getattr(self, key) < 1.0, "must be in [0, 1)")
        _require("ln_eps", self.ln_eps > 0, "must be positive")
        _require("arch", self.arch in ARCHS, f"must be one of {ARCHS}")
        if self.arch != "mlm":
            for key in ("decoder_layers", "decoder_heads", "num_classes"):
                _require(key, getattr(self, key) >= 1, f"must be positive for arch={self.arch!r}")
            _require("hidden", self.hidden % self.decoder_heads == 0,
                     f"must be divisible by decoder_heads={self.decoder_heads}")

    def decoder(self) -> BertConfig:
        """The MAE decoder stack's own config: same width and FFN, its own depth and heads."""
        return dataclasses.replace(self, arch="mlm", layers=self.decoder_layers,
                                   heads=self.decoder_heads, decoder_layers=0, decoder_heads=0,
                                   num_classes=0)


def _require(key: str, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"model config key {key!r} {what}")


_DNABERT_VOCAB = 4101
_BARCODE_VOCAB = 4098
_BARCODE_MAE = dict(vocab_size=_BARCODE_VOCAB, hidden=768, layers=6, heads=6, ffn=3072,
                    decoder_layers=6, decoder_heads=6, num_classes=4096)

SIZES: dict[str, BertConfig] = {
    "dnabert6": BertConfig(vocab_size=_DNABERT_VOCAB, hidden=768, layers=12, heads=12, ffn=3072),
    "logo": BertConfig(vocab_size=_DNABERT_VOCAB, hidden=256, layers=2, heads=8, ffn=3072,
                       dropout=0.0, attn_dropout=0.0),
    "barcode_bert": BertConfig(vocab_size=_BARCODE_VOCAB, hidden=768, layers=6, heads=6,
                               ffn=3072),
    "barcode_mae": BertConfig(arch="mae", **_BARCODE_MAE),
    "barcode_mae_baseline": BertConfig(arch="mae_baseline", **_BARCODE_MAE),
    "barcode_bert_small": BertConfig(vocab_size=_BARCODE_VOCAB, hidden=256, layers=4, heads=4,
                                     ffn=1024),
    "barcode_mae_small": BertConfig(arch="mae", vocab_size=_BARCODE_VOCAB, hidden=256, layers=4,
                                    heads=4, ffn=1024, decoder_layers=2, decoder_heads=4,
                                    num_classes=4096),
    "test": BertConfig(vocab_size=_DNABERT_VOCAB, hidden=64, layers=2, heads=2, ffn=128),
    "test_mae": BertConfig(arch="mae", vocab_size=_BARCODE_VOCAB, hidden=64, layers=2, heads=2,
                           ffn=128, decoder_layers=2, decoder_heads=2, num_classes=4096),
}
"""Named sizes: DNABERT-6 (≈89M), the GeneMask/CM-GEMS "LOGO" size (≈5.0M), a BarcodeBERT-style
MLM, BarcodeMAE (≈96.5M in the reference, encoder ≈46M) and its baseline, laptop-size ``*_small``
barcode models (the default configs' CPU demo), and tiny test sizes."""


def get_model_config(name: str, **overrides: Any) -> BertConfig:
    """The size ``name`` from :data:`SIZES`, with ``overrides`` replacing fields.

    Raises:
      ValueError: unknown ``name`` (the message lists the valid names), unknown override key
        (the message names it and lists the valid keys), or an invalid value.
    """
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; valid: {sorted(SIZES)}")
    fields = {f.name for f in dataclasses.fields(BertConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown} for size {name!r}; "
                         f"valid keys: {sorted(fields)}")
    return dataclasses.replace(SIZES[name], **overrides)


def build_model(config: BertConfig, rngs: nnx.Rngs, *, dtype: Any = jnp.float32,
                param_dtype: Any = jnp.float32) -> BertForMaskedLM | BarcodeMAE:
    """The pretraining model for ``config``; ``dtype`` is the compute dtype (e.g. bfloat16),
    ``param_dtype`` the parameter dtype (keep float32). ``rngs`` seeds the parameter init."""
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if config.arch == "mlm":
        return BertForMaskedLM(config, **kwargs)
    variant = "dropped" if config.arch == "mae" else "baseline"
    return BarcodeMAE(config, variant=variant, **kwargs)


def param_count(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param``); works on ``nnx.eval_shape`` models."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
