"""Nearest-neighbour label transfer: cosine 1-NN on vectors, and exact-sequence lookup.

The open-world genus probe of BarcodeMAE (``knn_probing.py``: scikit-learn
``KNeighborsClassifier(n_neighbors=1, metric="cosine")``, keys = seen-species training barcodes,
queries = unseen species) is :func:`nearest_labels`; it returns the same neighbours as
scikit-learn (``tests/test_barcode_eval.py``) as one BLAS matrix product per block of queries,
without needing scikit-learn (the default training run prints its table on a plain install).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gemsjax.vocab import base_codes, kmer_codes

QUERY_BLOCK = 1024
ANCHOR = 31  # k of the exact-lookup index (2-bit codes in an int64)
SEPARATOR = "|"  # between keys in the searched text; not a nucleotide code, so no match spans it


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``float[N, D]`` rows scaled to unit L2 norm (all-zero rows stay zero) as float32."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


def nearest(keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``int64[Q]``: for each row of ``queries: float[Q, D]`` the index of the row of
    ``keys: float[K, D]`` with the smallest cosine distance (the first one on ties)."""
    if len(keys) == 0:
        raise ValueError("no keys to search: the key set is empty")
    keys, queries = unit_rows(keys), unit_rows(queries)
    out = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), QUERY_BLOCK):
        block = queries[start : start + QUERY_BLOCK]
        out[start : start + len(block)] = np.argmax(block @ keys.T, axis=1)
    return out


def nearest_labels(keys: np.ndarray, key_labels: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``int[Q]``: the label of each query's cosine nearest key (``key_labels: int[K]``)."""
    return np.asarray(key_labels)[nearest(keys, queries)]


def exact_lookup(
    key_sequences: Sequence[str], key_labels: np.ndarray, query_sequences: Sequence[str]
) -> np.ndarray:
    """``int[Q]``: the label of the first key (in key order) whose sequence contains the query's
    sequence exactly (equal, or the query is a substring: barcodes of one haplotype are often
    trimmed differently); ``-1`` where no key does. No alignment, no mismatches.

    The keys are joined into one text; every A/C/G/T-only 31-mer of it is indexed by its 2-bit
    code (a sorted int64 array), so each query is checked only where its first clean 31-mer
    occurs. A query without one (short, or N every 31 bases) is searched with ``str.find``."""
    starts = np.cumsum([0] + [len(s) + 1 for s in key_sequences])
    text = SEPARATOR.join(key_sequences)
    labels = np.asarray(key_labels)
    out = np.full(len(query_sequences), -1, labels.dtype if labels.size else np.int64)
    codes = kmer_codes(base_codes(text), ANCHOR)
    order = np.argsort(codes, kind="stable")  # equal codes stay in text (= key) order
    sorted_codes = codes[order]
    for i, query in enumerate(query_sequences):
        if not query or SEPARATOR in query:
            continue
        own = kmer_codes(base_codes(query), ANCHOR)
        clean = np.flatnonzero(own >= 0)
        if clean.size == 0:
            at = text.find(query)
            if at >= 0:
                out[i] = labels[np.searchsorted(starts, at, side="right") - 1]
            continue
        offset = int(clean[0])
        lo, hi = (
            np.searchsorted(sorted_codes, own[offset], side="left"),
            np.searchsorted(sorted_codes, own[offset], side="right"),
        )
        for at in np.sort(order[lo:hi]) - offset:
            if at >= 0 and text.startswith(query, at):
                out[i] = labels[np.searchsorted(starts, at, side="right") - 1]
                break
    return out
