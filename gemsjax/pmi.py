"""PMI rank tables: k-mer ranks by normalized PMI, indexed by token id.

A *rank table* is ``int32[vocab_size]``: ``rank_table[token_id]`` is the rank of that token's k-mer
by normalized dp-PMI (1 = highest); special tokens and k-mers without a score get the worst rank
(``4**k``). The masking kernels look ranks up by token id.
"""

from __future__ import annotations

import csv
import gzip
import pathlib

import numpy as np

from gemsjax.vocab import Vocab, base_codes, get_vocab, rolling_kmer_codes


def _open_text(path: pathlib.Path):
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")


def load_genemask_ranks(csv_path: str | pathlib.Path, vocab: Vocab | None = None,
                        column: str = "norm_pmi_rank_rel") -> np.ndarray:
    """Load the published GeneMask ranking (``Data-A_norm-pmi-score-ranking.csv[.gz]``).

    Args:
      csv_path: the CSV (optionally gzip) with columns ``ngram`` and ``column``.
      vocab: the id layout to index by (default: DNABERT 6-mers).
      column: the rank column; GeneMask / CM-GEMS use ``norm_pmi_rank_rel``.

    Returns:
      ``int32[vocab.size]`` rank table; specials and k-mers missing from the file get ``4**k``.
    """
    vocab = vocab or get_vocab("dnabert", 6)
    path = pathlib.Path(csv_path)
    worst = 4**vocab.k
    table = np.full(vocab.size, worst, dtype=np.int32)
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        missing = {"ngram", column} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; "
                             f"found {reader.fieldnames}")
        for line_no, row in enumerate(reader, start=2):
            kmer = row["ngram"]
            codes = base_codes(kmer, vocab.alphabet)
            kmer_code = rolling_kmer_codes(codes, vocab.k)
            if len(kmer) != vocab.k or kmer_code.shape != (1,) or kmer_code[0] < 0:
                raise ValueError(f"{path}:{line_no}: {kmer!r} is not a DNA {vocab.k}-mer")
            try:
                rank = int(row[column])
            except ValueError:
                raise ValueError(f"{path}:{line_no}: rank {row[column]!r} in column {column!r} "
                                 "is not an integer") from None
            table[vocab.num_specials + kmer_code[0]] = rank
    return table
