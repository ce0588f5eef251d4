"""From a run's config to what its step needs: the step specification, vocabulary, model config and
rank table, each decided here once.

``step_spec(config)`` is the one builder of :class:`StepSpec`, which owns every masking and
corruption setting; the curriculum it carries only schedules strategies. The loop, the tests and
the benchmarks build their steps from it (``dataclasses.replace`` adjusts a built spec).
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
import numpy as np

from gemsjax import curriculum as curriculum_lib
from gemsjax import masking, pmi
from gemsjax.data import pipelines, samples
from gemsjax.models import registry
from gemsjax.models.bert import BertConfig
from gemsjax.tokenizers import data_tokenizer
from gemsjax.vocab import Vocab

KINDS = ("mlm", "mae")
LOSS_ON = ("masked", "all")
MAE_DRAWS = ("fixed", "bernoulli")


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What a train / eval step computes (static and hashable: the jitted step closes over it).

    Attributes:
      kind: ``"mlm"`` (BERT masked-LM: mask, corrupt, predict token ids) or ``"mae"``
        (BarcodeMAE: drop ``masking.mae_ratio`` of the tokens, predict the k-mer class
        ``id - specials`` of the dropped ones; no corruption).
      vocab: the token layout (specials are never masked).
      curriculum: which strategy masks each batch (MLM; the MAE step always drops tokens).
      masking: the strategies' probabilities (:class:`gemsjax.masking.MaskParams`).
      seed: base of every step key, ``fold_in(key(seed), step)``.
      grad_accum: micro-batches per optimizer update.
      mask_frac, random_frac, random_low: MLM corruption (see :func:`masking.corrupt`).
      loss_on: MLM: ``"masked"`` or ``"all"`` (every non-special token, BarcodeBERT).
      mlm_head_share: MLM with ``loss_on="masked"`` only: the share of a row's positions given to
        the MLM head. The head (dense, LayerNorm, the ``V``-way tied decoder, softmax) and the
        encoder's last layer (its queries, residual stream and feed-forward; keys and values
        still cover every position) run on the masked tokens only, gathered per row into
        ``ceil(mlm_head_share * L)`` slots; when a row has more masked tokens everything runs on
        every position instead, so the loss, accuracy and gradients are the same either way,
        dropout included. 0.375 suits the ~15% masking of the MLM recipes: over 9,500 rows of
        chr22 at L = 512 the most masked tokens in a row were 162 (GeneMask), 149 (random
        spans) and 145 (Global-PMI), against 192 slots. ``None``: every position.
      mlm_pack_share: with ``mlm_head_share``: after the last layer's attention (queries still
        per row), its output projection, residual stream, feed-forward and the MLM head run on
        the masked tokens of each batch shard's rows packed together, in
        :meth:`pack_slots` slots per shard, where the rows' counts average out; a shard with
        more masked tokens runs everything on every position, as above. ``None``: per row.
        0.2 suits shards of >= 8 rows at L = 512: on 1,920 chr22 rows x 4 mask keys (mean
        13-14 % masked, sd ~28 tokens per row) batches of 8 overflowed 820 slots in 0 % (random
        spans, GeneMask) and 0.10 % (Global-PMI) of cases; 4 rows: 0.05 / 0.57 / 0.99 %;
        1 row: 4.4 / 7.2 / 9.5 % (there packing saves little; set a larger share or None).
        On CPU, without attention dropout, the last layer attends only the leading per-row slots
        the batch's fullest row uses, rounded up to a multiple of 16
        (:func:`gemsjax.models.backend.attend_leading`); after its attention the last layer, the
        head and the loss run on the leading packed slots the fullest shard uses, one of 9 sizes
        from half the slots to all of them (:func:`gemsjax.models.backend.sums_on_leading_rows`:
        536-713 of 820 masked tokens in the LOGO benchmark's batches, ~3 % of its step).
      mae_draw: MAE: ``"fixed"`` (exactly ``floor(ratio * n + 0.5)`` of a row's ``n`` maskable
        tokens, :func:`masking.mae_drop_fixed`) or ``"bernoulli"`` (each one independently with
        probability ``ratio``, :func:`masking.mae_drop`, the reference's draw).
      mae_visible_slack: MAE: encoder slots beyond the fixed draw's bound, see
        :meth:`num_visible`; the Bernoulli draw's decoder head gets as many beyond its bound,
        see :meth:`head_slots`.
    """

    kind: str
    vocab: Vocab
    curriculum: curriculum_lib.Curriculum
    masking: masking.MaskParams = masking.MaskParams()
    seed: int = 0
    grad_accum: int = 1
    mask_frac: float = 0.8
    random_frac: float = 0.1
    random_low: int = 0
    loss_on: str = "masked"
    mlm_head_share: float | None = None
    mlm_pack_share: float | None = None
    mae_draw: str = "fixed"
    mae_visible_slack: int = 16

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"step kind must be one of {KINDS}, got {self.kind!r}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        if self.mae_draw not in MAE_DRAWS:
            raise ValueError(f"mae_draw must be one of {MAE_DRAWS}, got {self.mae_draw!r}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.mlm_head_share is not None and not (
            self.kind == "mlm" and self.loss_on == "masked" and 0 < self.mlm_head_share <= 1
        ):
            raise ValueError(
                f"mlm_head_share={self.mlm_head_share} needs kind='mlm', "
                "loss_on='masked' and a value in (0, 1]; use None otherwise"
            )
        if self.mlm_pack_share is not None and not (
            self.mlm_head_share is not None and 0 < self.mlm_pack_share <= 1
        ):
            raise ValueError(
                f"mlm_pack_share={self.mlm_pack_share} needs mlm_head_share and a value in "
                "(0, 1]; use None otherwise"
            )

    def head_slots(self, length: int) -> int | None:
        """Output-head slots per row of ``length`` tokens; None when the head runs on every
        position.

        MLM: ``ceil(mlm_head_share * L)``. MAE: the loss is on the masked tokens only, so the
        decoder's last block (queries, residual stream, feed-forward; keys and values still
        cover every position), its output dropout and its ``num_classes``-way classifier run on
        each row's masked positions, gathered into these slots; a batch with a row over them
        runs on every position instead (:func:`gemsjax.train.step.head_fits`), with the same
        loss and gradients. The fixed draw masks at most ``masking.masked_len(L, ratio)``
        (exact: 55 of 110 at ratio 0.5); the Bernoulli draw gets ``mae_visible_slack`` slots
        more (71 of 110: a row of 108 maskable tokens overflows with probability ~4e-4)."""
        if self.kind == "mae":
            bound = masking.masked_len(length, self.masking.mae_ratio)
            slack = 0 if self.mae_draw == "fixed" else self.mae_visible_slack
            return min(length, bound + slack)
        return None if self.mlm_head_share is None else math.ceil(self.mlm_head_share * length)

    def pack_slots(self, rows: int, length: int) -> int | None:
        """MLM packed slots for a shard of ``rows`` rows of ``length`` tokens:
        ``min(ceil(mlm_pack_share * rows * L), rows * head_slots(L))``; None when not packing."""
        if self.mlm_pack_share is None:
            return None
        return min(math.ceil(self.mlm_pack_share * rows * length), rows * self.head_slots(length))

    def num_visible(self, length: int) -> int:
        """MAE encoder slots for rows of ``length`` tokens: ``min(L, visible_len(L, ratio) +
        mae_visible_slack)``. The encoder is given every unmasked token that is not padding --
        ``[UNK]`` k-mers included, as the reference feeds them (only masked positions and padding
        are dropped there) -- so neither draw has an exact static bound: a row's visible count
        is ``n - masked + u`` with ``u`` its in-sequence ``[UNK]`` k-mers. A batch whose rows all
        fit runs the encoder on these slots; otherwise the whole batch runs on ``L`` slots
        (:func:`gemsjax.train.step.visible_fits`), which gives the same loss and gradients
        without dropout (with it, the same in distribution: the encoder's dropout masks are
        drawn for the layout it runs on). At L = 110, ratio 0.5 and slack 16 (71 slots): the
        fixed draw fits while ``u <= 32``; a Bernoulli(0.5) row of 110 maskable tokens
        overflows with probability ~3e-4. The
        pipeline strips alignment gaps, so ``[UNK]`` comes from N / IUPAC codes only: 7.4 % of
        2,000 BOLD barcodes hold one and 0.10 % (fixed) / 0.13 % (Bernoulli) of rows overflow
        71 slots. With gaps kept, 41 % hold an ``[UNK]`` (99th percentile 58) and 4 % overflow
        under the fixed draw."""
        return min(
            length, masking.visible_len(length, self.masking.mae_ratio) + self.mae_visible_slack
        )


def run_vocab(config: ml_collections.ConfigDict) -> Vocab:
    """The run's vocabulary: BarcodeBERT's non-overlapping ``data.k``-mers for barcode data,
    DNABERT's overlapping 6-mers for genomes (:func:`gemsjax.tokenizers.data_tokenizer`'s)."""
    return data_tokenizer(config.data.kind, config.data.get("k", 6)).vocab


def model_config(config: ml_collections.ConfigDict) -> BertConfig:
    """The size ``config.model.name`` with ``config.model.dropout`` (when >= 0) on both dropout
    rates and ``config.model.attention``; its vocabulary must hold the run's."""
    overrides = dict(attention=config.model.attention)
    if config.model.dropout >= 0:
        overrides |= dict(dropout=config.model.dropout, attn_dropout=config.model.dropout)
    model_cfg = registry.get_model_config(config.model.name, **overrides)
    vocab = run_vocab(config)
    if model_cfg.vocab_size < vocab.size:
        raise ValueError(
            f"config.model.name={config.model.name!r} has vocab_size "
            f"{model_cfg.vocab_size} < {vocab.size} ids of the {vocab.name} vocab; "
            "choose a size made for this data kind"
        )
    return model_cfg


def step_spec(config: ml_collections.ConfigDict) -> StepSpec:
    """The step's specification from ``config``, reading only the keys its recipe offers.

    MAE models (``arch`` ``mae*``): ``masking.mae_ratio``, ``masking.mae_draw`` and
    ``train.mae_visible_slack``. MLM models: the corruption
    (``masking.mask_frac``, ``random_frac``, ``random_low``), ``masking.loss_on``,
    ``train.mlm_head_share`` and ``train.mlm_pack_share`` (0: off; packing needs the head
    share), and for genomes the curriculum
    (:func:`gemsjax.curriculum.from_config`) and the strategies' probabilities; barcode configs
    have no curriculum, their MLM masks every batch by ``mae_drop`` (Bernoulli ``mae_ratio``).
    """
    m, train = config.masking, config.train
    common = dict(vocab=run_vocab(config), seed=config.seed, grad_accum=train.grad_accum)
    if model_config(config).arch != "mlm":
        return StepSpec(
            kind="mae",
            curriculum=curriculum_lib.constant("mae_drop"),
            masking=masking.MaskParams(mae_ratio=m.mae_ratio),
            mae_draw=m.mae_draw,
            mae_visible_slack=train.mae_visible_slack,
            **common,
        )
    if "curriculum" in m:
        curriculum = curriculum_lib.from_config(m, train.steps)
        params = masking.MaskParams(
            random_span_prob=m.random_span_prob,
            genemask_prob=m.genemask_prob,
            global_pmi_prob=m.global_pmi_prob,
            mae_ratio=m.mae_ratio,
            reference_code_compat=m.reference_code_compat,
        )
    else:
        curriculum = curriculum_lib.constant("mae_drop")
        params = masking.MaskParams(mae_ratio=m.mae_ratio)
    return StepSpec(
        kind="mlm",
        curriculum=curriculum,
        masking=params,
        mask_frac=m.mask_frac,
        random_frac=m.random_frac,
        random_low=m.random_low,
        loss_on=m.loss_on,
        mlm_head_share=train.get("mlm_head_share") or None,
        mlm_pack_share=(train.get("mlm_head_share") and train.get("mlm_pack_share")) or None,
        **common,
    )


def rank_table(config: ml_collections.ConfigDict, vocab: Vocab) -> np.ndarray:
    """``int32[vocab.size]`` PMI ranks by ``config.masking.rank_table``: the published GeneMask
    table (``genemask``), counted from the training genome (``fasta``, as ``--mode=pmi`` counts
    it), or a rank-table file written by ``--mode=pmi``. Barcode runs use no PMI ranks: every
    entry is the worst rank ``4**k``."""
    if vocab.name != "dnabert":
        return np.full(vocab.size, 4**vocab.k, np.int32)
    source = config.masking.rank_table
    if source == "genemask":
        return pmi.load_genemask_ranks(samples.sample_path(samples.GENEMASK_RANKS), vocab)
    if source == "fasta":
        return pmi.rank_table_from_fasta(
            pipelines.fasta_paths(config.data.fasta), k=vocab.k, vocab=vocab
        )
    table, table_vocab, _ = pmi.load_rank_table(source)
    if table_vocab != vocab:
        raise ValueError(
            f"config.masking.rank_table={source!r} is for the {table_vocab.name} "
            f"k={table_vocab.k} vocab; this run uses {vocab.name} k={vocab.k}"
        )
    return table
