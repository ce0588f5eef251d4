"""Model FLOPs of a training step, from the model's sizes (what MFU divides by).

FLOPs count matmuls only (multiply-add = 2 FLOPs), training = 3 x forward (backward = 2 x
forward), on the padded static shapes the step computes; bidirectional attention is *not* halved.
A transformer block over ``T`` query tokens attending to ``K`` keys, width ``d``, FFN ``f``::

    forward = T * (8 d^2 + 4 d f)      # Q, K, V, output projections; FFN in and out
            + 4 T K d                  # scores Q K^T and context A V

BERT MLM per sequence (``S`` tokens; head on ``P`` positions, default ``P = S``)::

    train = 3 * [ layers * (S (8 d^2 + 4 d f) + 4 S^2 d) + P (2 d^2 + 2 d V) ]

(head = dense ``d x d`` + the tied unembedding ``d x V``; embedding lookups cost nothing). This
equals MaxText's count and the ``6 N + 12 L d S`` per-token rule with N = matmul weights. When
the step runs the head on ``P < S`` masked slots (``StepSpec.head_slots``) the last layer
runs its queries there too, and the count is what the step computes: that layer costs
``P (4 d^2 + 4 d f) + S 4 d^2 + 4 P S d`` (Q, output projection and FFN on P; K, V on S).
When the masked tokens are also packed per batch shard after that layer's attention
(``StepSpec.mlm_pack_share``, ``Q`` packed slots per sequence on average), the output
projection, FFN and head run on ``Q`` instead: ``P (2 d^2 + 4 S d) + S 4 d^2 + Q (2 d^2 + 4 d f)``
for the layer and ``Q (2 d^2 + 2 d V)`` for the head. The BarcodeMAE decoder's last block and
classifier run on its masked slots as the unpacked MLM does.
"""

from __future__ import annotations

from gemsjax.models.bert import BertConfig


def transformer_forward_flops(layers: int, hidden: int, ffn: int, tokens: int, keys: int) -> float:
    """Forward matmul FLOPs of ``layers`` blocks over one sequence of ``tokens`` queries attending
    to ``keys`` keys: ``layers * (tokens * (8 d^2 + 4 d f) + 4 * tokens * keys * d)``."""
    d = hidden
    return float(layers * (tokens * (8 * d * d + 4 * d * ffn) + 4 * tokens * keys * d))


def stack_forward_flops(
    layers: int, hidden: int, ffn: int, seq_len: int, rows: int, packed: float | None = None
) -> float:
    """Forward FLOPs of ``layers`` blocks over one sequence of ``seq_len`` tokens whose last
    block runs its queries on ``rows`` positions only (K and V on all) and its output
    projection, residual stream and FFN on ``packed`` (default ``rows``): that block costs
    ``rows (2 d^2 + 4 S d) + S 4 d^2 + packed (2 d^2 + 4 d f)``."""
    d, s = hidden, seq_len
    packed = rows if packed is None else packed
    last = rows * (2 * d * d + 4 * s * d) + s * 4 * d * d + packed * (2 * d * d + 4 * d * ffn)
    return transformer_forward_flops(layers - 1, d, ffn, s, s) + last


def bert_train_flops(
    layers: int,
    hidden: int,
    ffn: int,
    vocab: int,
    seq_len: int,
    head_len: int | None = None,
    packed_len: float | None = None,
) -> float:
    """Training FLOPs per sequence of a BERT MLM (module docstring); the last layer's queries
    run on ``head_len`` positions (default all ``seq_len``), its output projection and FFN and
    the MLM head on ``packed_len`` (default ``head_len``; packed slots per sequence)."""
    d, head = hidden, seq_len if head_len is None else head_len
    packed = head if packed_len is None else packed_len
    encoder = stack_forward_flops(layers, d, ffn, seq_len, head, packed)
    return 3.0 * (encoder + packed * (2 * d * d + 2 * d * vocab))


def mae_train_flops(
    layers: int,
    hidden: int,
    ffn: int,
    decoder_layers: int,
    num_classes: int,
    seq_len: int,
    visible_len: int,
    head_len: int | None = None,
) -> float:
    """Training FLOPs per sequence of BarcodeMAE (the decoder has the encoder's width and FFN)::

        3 * [ encoder over visible_len tokens (attention over visible_len)
              + projection visible_len * 2 d^2
              + decoder over seq_len tokens (attention over seq_len), its last block's
                queries on head_len rows (stack_forward_flops)
              + head head_len * 2 d num_classes ]

    ``visible_len`` is the static encoder length (``seq_len`` for the baseline variant);
    ``head_len`` the decoder head's slots (default ``seq_len``: every position).
    """
    head = seq_len if head_len is None else head_len
    forward = (
        transformer_forward_flops(layers, hidden, ffn, visible_len, visible_len)
        + visible_len * 2 * hidden * hidden
        + stack_forward_flops(decoder_layers, hidden, ffn, seq_len, head)
        + head * 2 * hidden * num_classes
    )
    return 3.0 * forward


def train_flops(
    config: BertConfig,
    seq_len: int,
    *,
    head_len: int | None = None,
    visible_len: int | None = None,
    packed_len: float | None = None,
) -> float:
    """Training FLOPs per sequence of the model ``config`` describes: :func:`bert_train_flops`
    (last layer's queries on ``head_len`` positions, MLM head on ``packed_len``) or, for the
    MAE archs, :func:`mae_train_flops` (encoder on ``visible_len`` slots, default ``seq_len``
    as in the baseline; decoder head on ``head_len``)."""
    c = config
    if c.arch == "mlm":
        return bert_train_flops(
            c.layers, c.hidden, c.ffn, c.vocab_size, seq_len, head_len, packed_len
        )
    return mae_train_flops(
        c.layers,
        c.hidden,
        c.ffn,
        c.decoder_layers,
        c.num_classes,
        seq_len,
        seq_len if visible_len is None else visible_len,
        head_len,
    )
