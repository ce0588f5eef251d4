"""The released PyTorch masking collators, ported operation for operation: the baseline of
``bench_masking.py`` ("the way a PyTorch data collator does it").

Each function below performs, in order, the operations of one released ``mask_tokens`` on a
``[B, L]`` batch of DNABERT ids, through a real Hugging Face ``BertTokenizer`` over the DNABERT
6-mer vocabulary and a ``{kmer: rank}`` ``defaultdict(int)`` (the unpickled
``seq_to_pmi_rank.pkl``). Sources (``reference/cmgems.md`` sections 2-3):

- :func:`dnabert_random_span`: DNABERT ``examples/run_pretrain.py``, ``mask_tokens``;
- :func:`cmgems_genemask` and :func:`cmgems_global_pmi`: the two branches of ``mask_tokens`` in
  curriculum-GeneMask ``src/pretraining-adaptive/CM-GEMS_pretraining_code.py``, with its
  ``kmer_id_to_pmi_rank`` (``tokenizer.decode`` of the id, split/join, dict lookup, 0 -> 4096).

They keep the released code's semantics, bugs included: the PMI rank is looked up by *position*
(B1) and GeneMask's high set is the first half of the centres (B3), i.e. gemsjax's
``reference_code_compat="cmgems"``; a rank the released code computes and never uses is computed
too, and so is the ``deepcopy`` of the mask tensor that the released loops iterate over. Left out
(it would only add time): CM-GEMS's read of ``eval_results.txt`` before each batch, which belongs
to the curriculum, not to the masking.
"""

from __future__ import annotations

import collections
import copy
import math

import numpy as np
import torch
from transformers import BertTokenizer

from gemsjax.vocab import get_vocab

VOCAB = get_vocab("dnabert", 6)
MASK_LIST = (-2, -1, 1, 2, 3)
"""DNABERT ``MASK_LIST["6"]``: the offsets a centre's 6-token span adds."""
WINDOW_11 = (-5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5)
"""CM-GEMS ``mask_list_11``: the 11-token window."""
WORST_RANK = 4**VOCAB.k


def dnabert_tokenizer() -> BertTokenizer:
    """A Hugging Face ``BertTokenizer`` over DNABERT's 4101-token 6-mer vocabulary."""
    return BertTokenizer(
        vocab={token: i for i, token in enumerate(VOCAB.tokens())}, do_lower_case=False
    )


def rank_dict(ranks: np.ndarray) -> collections.defaultdict:
    """``{kmer: rank}`` as a ``defaultdict(int)`` (missing keys read as 0), from a rank table
    ``int32[V]`` indexed by token id."""
    table = collections.defaultdict(int)
    for i, kmer in enumerate(VOCAB.kmer_strings()):
        table[kmer] = int(ranks[VOCAB.num_specials + i])
    return table


def kmer_rank(token_id: int, tokenizer: BertTokenizer, ranks: collections.defaultdict) -> int:
    """CM-GEMS ``kmer_id_to_pmi_rank``: decode one id, join its pieces, look the k-mer up; a
    missing k-mer (0 from the defaultdict) is the worst rank."""
    kmer = "".join(tokenizer.decode(token_id, skip_special_tokens=True).split())
    rank = ranks[kmer]
    return WORST_RANK if rank == 0 else rank


def _centres(labels: torch.Tensor, tokenizer: BertTokenizer, prob: float):
    """The shared head of every ``mask_tokens``: a probability matrix zeroed on special tokens
    (the tokenizer's per-row special-tokens mask) and padding, then ``torch.bernoulli``."""
    probability = torch.full(labels.shape, prob)
    special = [
        tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
        for row in labels.tolist()
    ]
    probability.masked_fill_(torch.tensor(special, dtype=torch.bool), value=0.0)
    probability.masked_fill_(labels.eq(tokenizer.pad_token_id), value=0.0)
    return probability, torch.bernoulli(probability).bool()


def _row_centres(probability_row: torch.Tensor, masked_row: torch.Tensor) -> tuple[int, set]:
    """The released per-row preamble: last maskable index and the set of centres."""
    end = torch.where(probability_row != 0)[0].tolist()[-1]
    return end, set(torch.where(masked_row == 1)[0].tolist())


def _corrupt(
    inputs: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor, tokenizer: BertTokenizer
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared tail: labels -100 off the mask; 80% [MASK], half the rest a random id."""
    labels[~masked] = -100
    replaced = torch.bernoulli(torch.full(labels.shape, 0.8)).bool() & masked
    inputs[replaced] = tokenizer.convert_tokens_to_ids(tokenizer.mask_token)
    randomized = torch.bernoulli(torch.full(labels.shape, 0.5)).bool() & masked & ~replaced
    random_words = torch.randint(len(tokenizer), labels.shape, dtype=torch.long)
    inputs[randomized] = random_words[randomized]
    return inputs, labels


def dnabert_random_span(inputs: torch.Tensor, tokenizer: BertTokenizer, prob: float = 0.025):
    """DNABERT ``mask_tokens``: Bernoulli centres, each extended by :data:`MASK_LIST` within
    ``[1, end]``. Returns ``(inputs, labels)`` (``labels`` -100 off the mask)."""
    labels = inputs.clone()
    probability, masked = _centres(labels, tokenizer, prob)
    for i, masked_row in enumerate(copy.deepcopy(masked)):
        end, centres = _row_centres(probability[i], masked_row)
        positions = copy.deepcopy(centres)
        for centre in centres:
            for offset in MASK_LIST:
                if 1 <= centre + offset <= end:
                    positions.add(centre + offset)
        masked[i][list(positions)] = True
    return _corrupt(inputs, labels, masked, tokenizer)


def cmgems_genemask(
    inputs: torch.Tensor,
    tokenizer: BertTokenizer,
    ranks: collections.defaultdict,
    prob: float = 0.0176,
):
    """CM-GEMS ``mask_tokens``, GeneMask branch: per centre, the best-ranked position of its
    6-span; the first ``ceil(m/2)`` centres (all when that is < 5) widen to 11 tokens."""
    labels = inputs.clone()
    probability, masked = _centres(labels, tokenizer, prob)
    for i, masked_row in enumerate(copy.deepcopy(masked)):
        end, centres = _row_centres(probability[i], masked_row)
        positions = copy.deepcopy(centres)
        best = []
        for centre in centres:
            best_rank, best_index = kmer_rank(centre, tokenizer, ranks), centre
            for offset in MASK_LIST:
                index = centre + offset
                if 1 <= index <= end:
                    positions.add(index)
                    rank = kmer_rank(index, tokenizer, ranks)
                    if rank < best_rank:
                        best_rank, best_index = rank, index
            best.append((best_rank, best_index))
        if best:
            segments = math.ceil(len(best) / 2)
            high = best if segments < 5 else best[:segments]
            best.sort(key=lambda pick: pick[0])
            for _, index in high:
                for offset in WINDOW_11:
                    if 1 <= index + offset <= end:
                        positions.add(index + offset)
                        kmer_rank(index + offset, tokenizer, ranks)  # computed, never used
        masked[i][list(positions)] = True
    return _corrupt(inputs, labels, masked, tokenizer)


def cmgems_global_pmi(
    inputs: torch.Tensor,
    tokenizer: BertTokenizer,
    ranks: collections.defaultdict,
    prob: float = 0.0136,
):
    """CM-GEMS ``mask_tokens``, Global-PMI branch: ``k`` = number of Bernoulli centres; the
    ``k`` best (rank, index) positions of ``1..end`` each mask their 11-token window."""
    labels = inputs.clone()
    probability, masked = _centres(labels, tokenizer, prob)
    for i, masked_row in enumerate(copy.deepcopy(masked)):
        end, centres = _row_centres(probability[i], masked_row)
        by_index = collections.defaultdict(int)
        for index in range(1, end + 1):
            by_index[index] = kmer_rank(index, tokenizer, ranks)
        ordered = sorted(by_index.items(), key=lambda item: (item[1], item[0]))
        positions = set()
        for index, _ in ordered[: len(centres)]:
            for offset in WINDOW_11:
                if 1 <= index + offset <= end:
                    positions.add(index + offset)
                    kmer_rank(index + offset, tokenizer, ranks)  # computed, never used
        masked[i][list(centres)] = False
        masked[i][list(positions)] = True
    return _corrupt(inputs, labels, masked, tokenizer)
