"""Test oracles for the GeneMask release's formats: the k-mer text writer (the inverse of
:func:`gemsjax.tokenizers.kmer_text_to_sequence`) and the exact 6-mer counts behind the published
PMI table, recovered by inverting its normalisation."""

import pathlib

import numpy as np

from gemsjax import pmi

GENEMASK_N_BASES = 669_129_375
"""Non-N bases of GRCh38 chr1-3: the N of GeneMask's ``p = count / (2 N)``."""


def sequence_to_kmer_text(seq: str, k: int = 6, stride: int = 1) -> str:
    """A sequence as space-separated k-mers starting every ``stride`` bases: overlapping with
    ``stride=1`` (DNABERT's ``seq2kmer``), non-overlapping with ``stride=k`` (BarcodeBERT; a
    trailing partial k-mer is left out).

    ``"ACGTACG", k=6`` -> ``"ACGTAC CGTACG"``. Raises ValueError if ``len(seq) < k``.
    """
    if len(seq) < k:
        raise ValueError(f"sequence of length {len(seq)} is shorter than k={k}")
    return " ".join(seq[i : i + k] for i in range(0, len(seq) - k + 1, stride))


def recover_genemask_counts(
    csv_path: str | pathlib.Path,
    n_bases: int = GENEMASK_N_BASES,
    min_count: int = pmi.GENEMASK_MIN_COUNT,
) -> pmi.NgramCounts:
    """The exact 6-mer counts behind the published GeneMask table, by inverting its normalisation.

    ``norm = dp * ln f / (ln f + ln min_count)`` gives ``f = exp(r ln min_count / (1 - r))`` with
    ``r = norm / dp``; counts of shorter n-grams are sums over the trailing bases, so they miss
    the n-grams in the last bases of each run of the original corpus: the 6-mer counts sum to
    669,128,271, 1,104 less than :data:`GENEMASK_N_BASES`. Either N reproduces the published
    PMI columns to within 0.004 (``tests/test_pmi.py``).

    Args:
      csv_path: ``Data-A_norm-pmi-score-ranking.csv[.gz]``.
      n_bases: the N of ``p = count / (2 N)``; GeneMask's is the non-N bases of GRCh38 chr1-3.
      min_count: the table's minimum count (101).

    Returns:
      :class:`gemsjax.pmi.NgramCounts` with ``max_n = 6``.
    """
    cols = pmi.load_genemask_columns(csv_path, ["dp.true.pmi", "norm_dp_true_pmi"])
    ratio = cols["norm_dp_true_pmi"] / cols["dp.true.pmi"]
    f = np.exp(ratio * np.log(min_count) / (1 - ratio))
    counts6 = np.rint(f).astype(np.int64)
    if np.isnan(f).any() or np.abs(f - counts6).max() > 1e-3:
        raise ValueError(
            f"{csv_path}: scores do not invert to integer counts with min_count = "
            f"{min_count}; is this a complete GeneMask 6-mer table?"
        )
    counts = {n: counts6.reshape(4**n, -1).sum(axis=1) for n in range(1, 7)}
    return pmi.NgramCounts(counts=counts, n_bases=n_bases)
