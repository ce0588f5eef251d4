"""The alignment-free baseline of the barcode tables: k-mer frequency vectors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gemsjax.vocab import base_codes, kmer_codes

_BLOCK = 2048  # sequences per pass (bounds the int64 count matrix)


def kmer_frequencies(sequences: Sequence[str], k: int = 6) -> np.ndarray:
    """``float32[N, 4^k]``: each sequence's overlapping k-mer counts over the k-mers made of
    A, C, G, T only (in that base order), divided by their total (all zero if it has none).

    Gaps ``-`` are removed first; k-mers holding N or another IUPAC code are not counted. One
    vectorized pass over all sequences joined by ``N`` (so no k-mer spans two of them)."""
    out = np.zeros((len(sequences), 4**k), np.float32)
    for start in range(0, len(sequences), _BLOCK):
        out[start : start + _BLOCK] = _frequencies(sequences[start : start + _BLOCK], k)
    return out


def _frequencies(sequences: Sequence[str], k: int) -> np.ndarray:
    cleaned = [s.replace("-", "") for s in sequences]
    lengths = np.fromiter((len(s) + 1 for s in cleaned), np.int64, len(cleaned))
    codes = kmer_codes(base_codes("N".join(cleaned) + "N"), k)
    rows = np.repeat(np.arange(len(cleaned)), lengths)[: len(codes)]
    valid = codes >= 0
    counts = np.bincount(rows[valid] * 4**k + codes[valid], minlength=len(cleaned) * 4**k).reshape(
        len(cleaned), 4**k
    )
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
