"""Named model sizes as plain dicts of :class:`~gemsjax.models.bert.BertConfig` fields.

Imports nothing heavy, so a config file can name and list sizes without jax or flax;
:func:`gemsjax.models.registry.get_model_config` turns a size into a ``BertConfig``.
"""

from __future__ import annotations

from typing import Any

_DNABERT_VOCAB = 4101
_BARCODE_VOCAB = 4098
_BARCODE_VOCAB_K8 = 4**8 + 2
_BARCODE_MAE = dict(
    vocab_size=_BARCODE_VOCAB,
    hidden=768,
    layers=6,
    heads=6,
    ffn=3072,
    decoder_layers=6,
    decoder_heads=6,
    num_classes=4096,
)

SIZES: dict[str, dict[str, Any]] = {
    "dnabert6": dict(vocab_size=_DNABERT_VOCAB, hidden=768, layers=12, heads=12, ffn=3072),
    "logo": dict(
        vocab_size=_DNABERT_VOCAB,
        hidden=256,
        layers=2,
        heads=8,
        ffn=3072,
        dropout=0.0,
        attn_dropout=0.0,
    ),
    "barcode_bert": dict(vocab_size=_BARCODE_VOCAB, hidden=768, layers=6, heads=6, ffn=3072),
    "barcode_mae": dict(arch="mae", **_BARCODE_MAE),
    "barcode_mae_baseline": dict(arch="mae_baseline", **_BARCODE_MAE),
    "barcode_bert_small": dict(vocab_size=_BARCODE_VOCAB, hidden=256, layers=4, heads=4, ffn=1024),
    "barcode_mae_small": dict(
        arch="mae",
        vocab_size=_BARCODE_VOCAB,
        hidden=256,
        layers=4,
        heads=4,
        ffn=1024,
        decoder_layers=2,
        decoder_heads=4,
        num_classes=4096,
    ),
    "barcode_bert_5m": dict(vocab_size=_BARCODE_VOCAB_K8, hidden=768, layers=4, heads=4, ffn=3072),
    "barcode_bert_5m_small": dict(
        vocab_size=_BARCODE_VOCAB_K8, hidden=256, layers=4, heads=4, ffn=1024
    ),
    "test": dict(vocab_size=_DNABERT_VOCAB, hidden=64, layers=2, heads=2, ffn=128),
    "test_k8": dict(vocab_size=_BARCODE_VOCAB_K8, hidden=64, layers=2, heads=2, ffn=128),
    "test_mae": dict(
        arch="mae",
        vocab_size=_BARCODE_VOCAB,
        hidden=64,
        layers=2,
        heads=2,
        ffn=128,
        decoder_layers=2,
        decoder_heads=2,
        num_classes=4096,
    ),
}
"""Named sizes (fields not given take ``BertConfig``'s defaults): DNABERT-6 (≈89M), the
GeneMask/CM-GEMS "LOGO" size (≈5.0M), a BarcodeBERT-style MLM, BarcodeMAE (≈96.5M in the
reference, encoder ≈46M) and its baseline, laptop-size ``*_small`` barcode models (the default
configs' CPU demo), BarcodeBERT-5M (8-mers: 65,538 ids, 4 layers x 768, 4 heads; 129.5M
trainable parameters in the reference's ``KNN_Taxa.ipynb``, most of them the k = 8 embedding and
output tables), and tiny test sizes."""
