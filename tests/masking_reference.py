"""Per-sequence masking in Python / NumPy, the way a PyTorch data collator does it, plus real data.

This is the oracle of ``test_masking.py`` and the baseline of ``benchmarks/bench_masking.py``: one
sequence at a time, Python loops over the mask centres and their span offsets, sets of positions,
as in DNABERT / GeneMask / CM-GEMS ``mask_tokens`` (``reference/cmgems.md`` sections 2-3), with
the intended semantics (rank of the token at each position) or the ``compat`` modes of
:mod:`gemsjax.masking` (B1-B3). Two documented choices of gemsjax are mirrored: spans are clipped
to the first..last maskable position (the released code's ``[1, end]``) and special positions
inside that range are never masked; B3's "first half" of the centres is in position order.

Per-token lookups come in two styles: with a rank table they are vectorized per row
(``ranks[ids_row]``, ``ids_row < 5``, ``np.lexsort``); or they are done one token at a time
as the released collator does (special-token list over ``row.tolist()``, the rank of a position
through its k-mer string and a ``{kmer: rank}`` dict, ``sorted`` over positions for Global-PMI)
when given that dict (:func:`rank_by_kmer`).
"""

from __future__ import annotations

import gzip
import math
import pathlib

import numpy as np

from gemsjax.data import samples
from gemsjax.tokenizers import KmerTokenizer
from gemsjax.vocab import get_vocab

SPAN6 = (-2, -1, 1, 2, 3)
WIDE = tuple(range(-5, 6))
CHR22 = samples.sample_path(
    samples.GENOME
)  # the shipped copy of ../shared/data/human_chr22_20-21Mb
RANKS = samples.sample_path(samples.GENEMASK_RANKS)  # the published GeneMask ranking, shipped
VOCAB = get_vocab("dnabert", 6)


def read_fasta(path: pathlib.Path) -> str:
    """The concatenated, upper-cased sequence of a (gzip) FASTA file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return "".join(line.strip() for line in f if not line.startswith(">")).upper()


def chr22_chunks(count: int, bp: int = 510) -> list[str]:
    """``count`` consecutive ``bp``-base chunks of the chr22 segment with every N deleted (the
    GeneMask pretraining-corpus recipe, Code-A); 510 bp give 505 6-mers, L = 507 with CLS/SEP."""
    seq = read_fasta(CHR22).replace("N", "")
    if count * bp > len(seq):
        raise ValueError(f"the chr22 segment has {len(seq)} non-N bases, fewer than {count}x{bp}")
    return [seq[i * bp : (i + 1) * bp] for i in range(count)]


def dnabert_batch(seqs: list[str], max_len: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32[B, max_len], special bool[B, max_len])`` in the DNABERT 6-mer layout."""
    ids, _ = KmerTokenizer(k=6, vocab="dnabert").encode(seqs, max_len)
    return ids, ids < VOCAB.num_specials


def rank_by_kmer(ranks: np.ndarray) -> dict[str, int]:
    """The ``{kmer: rank}`` dict that the released code unpickles (``seq_to_pmi_rank.pkl``)."""
    return {kmer: int(ranks[VOCAB.num_specials + i]) for i, kmer in enumerate(VOCAB.kmer_strings())}


class TokenRanks:
    """Ranks of a row's tokens, one lookup per access through the k-mer string, as the released
    collator does (``tokenizer.decode`` then a ``{kmer: rank}`` dict)."""

    tokens = VOCAB.tokens()
    worst = 4**VOCAB.k

    def __init__(self, ids_row: np.ndarray, kmer_ranks: dict[str, int]):
        self.ids = ids_row.tolist()
        self.kmer_ranks = kmer_ranks

    def __getitem__(self, i: int) -> int:
        return self.kmer_ranks.get(self.tokens[self.ids[i]], self.worst)


def row_inputs(ids_row: np.ndarray, ranks: np.ndarray | dict[str, int], compat=False):
    """``(special_row bool[L], rank)`` of one row; ``rank[i]`` is the rank of position ``i``: of
    its token, or of ``vocab[i]`` under B1 (``compat``; B2 rank 0 for ``"genemask"``/True).

    ``ranks`` is a rank table (numpy lookups) or a :func:`rank_by_kmer` dict (Python lookups, one
    token at a time, intended algorithm only).
    """
    if isinstance(ranks, dict):
        if compat:
            raise ValueError("the python-lookup style implements the intended algorithm only")
        specials = set(range(VOCAB.num_specials))
        return np.array([t in specials for t in ids_row.tolist()]), TokenRanks(ids_row, ranks)
    special_row = ids_row < VOCAB.num_specials
    if not compat:
        return special_row, ranks[ids_row]
    pos = np.arange(ids_row.size)
    by_position = ranks[np.minimum(pos, ranks.size - 1)].copy()
    if compat in (True, "genemask"):
        by_position[pos < VOCAB.num_specials] = 0
    return special_row, by_position


def _region(special_row: np.ndarray) -> tuple[int, int]:
    """First and last maskable position of a row (``(0, -1)`` if none)."""
    idx = np.flatnonzero(~special_row)
    return (int(idx[0]), int(idx[-1])) if idx.size else (0, -1)


def _to_mask(positions: set[int], special_row: np.ndarray) -> np.ndarray:
    mask = np.zeros(special_row.size, bool)
    mask[sorted(positions)] = True
    return mask & ~special_row


def random_span_row(centres: np.ndarray, special_row: np.ndarray, span: int = 6) -> np.ndarray:
    """DNABERT spans ``c-(span-1)//2 .. c+span//2`` around each centre of one row."""
    start, end = _region(special_row)
    masked = set()
    for c in np.flatnonzero(centres).tolist():
        for offset in range(-((span - 1) // 2), span // 2 + 1):
            if start <= c + offset <= end:
                masked.add(c + offset)
    return _to_mask(masked, special_row)


def genemask_row(centres: np.ndarray, special_row: np.ndarray, rank, compat=False) -> np.ndarray:
    """GeneMask on one row for given centres (the Code-B loop); ``rank`` from :func:`row_inputs`."""
    start, end = _region(special_row)
    masked = set()
    picks = []
    for c in np.flatnonzero(centres).tolist():
        masked.add(c)
        best_rank, best_index = rank[c], c
        for offset in SPAN6:
            i = c + offset
            if start <= i <= end:
                masked.add(i)
                if rank[i] < best_rank:
                    best_rank, best_index = rank[i], i
        picks.append((best_rank, best_index))
    segment_cnt = math.ceil(len(picks) / 2)
    if segment_cnt < 5:
        high = picks
    elif compat:
        high = picks[:segment_cnt]
    else:
        high = sorted(picks, key=lambda pick: pick[0])[:segment_cnt]
    for _, index in high:
        for offset in WIDE:
            if start <= index + offset <= end:
                masked.add(index + offset)
    return _to_mask(masked, special_row)


def global_pmi_row(count: int, special_row: np.ndarray, rank) -> np.ndarray:
    """Global-PMI on one row: 11-token windows on the ``count`` best (rank, position)."""
    start, end = _region(special_row)
    if isinstance(rank, np.ndarray):
        positions = np.arange(start, end + 1)
        best = positions[np.lexsort((positions, rank[positions]))][:count].tolist()
    else:
        best = sorted(range(start, end + 1), key=lambda i: (rank[i], i))[:count]
    masked = set()
    for centre in best:
        for offset in WIDE:
            if start <= centre + offset <= end:
                masked.add(centre + offset)
    return _to_mask(masked, special_row)


def _centres(rng: np.random.Generator, special_row: np.ndarray, prob: float) -> np.ndarray:
    return (rng.random(special_row.size) < prob) & ~special_row


def random_span_batch(rng, ids, ranks, prob=0.025) -> np.ndarray:
    """Collator-style DNABERT masking of a batch, one row at a time (``ranks``: table or dict)."""
    out = []
    for row in ids:
        special_row, _ = row_inputs(row, ranks)
        out.append(random_span_row(_centres(rng, special_row, prob), special_row))
    return np.stack(out)


def genemask_batch(rng, ids, ranks, prob=0.0176) -> np.ndarray:
    """Collator-style GeneMask masking of a batch, one row at a time (``ranks``: table or dict)."""
    out = []
    for row in ids:
        special_row, rank = row_inputs(row, ranks)
        out.append(genemask_row(_centres(rng, special_row, prob), special_row, rank))
    return np.stack(out)


def global_pmi_batch(rng, ids, ranks, prob=0.0136) -> np.ndarray:
    """Collator-style Global-PMI masking of a batch, row by row (``ranks``: table or dict)."""
    out = []
    for row in ids:
        special_row, rank = row_inputs(row, ranks)
        count = int(_centres(rng, special_row, prob).sum())
        out.append(global_pmi_row(count, special_row, rank))
    return np.stack(out)
