"""GeneMask PMI: n-gram counts over genomes, dp-PMI scores, k-mer ranks and rank tables.

The pipeline (GeneMask Code-C; ``shared/reference/cmgems.md`` section 1):

1. :func:`count_kmers` counts every DNA n-gram, n = 1..max_n, over sequences or FASTA files,
   streamed in chunks. Count arrays are ``int64[4**n]`` indexed by the base-4 code of the n-gram
   over the alphabet ``A,C,G,T`` (``AA..A = 0``, ``TT..T = 4**n - 1``).
2. :func:`pmi_scores` turns counts into the four GeneMask columns: naive PMI, ``true.pmi``
   (best binary split), ``dp.true.pmi`` (best segmentation into 1- and 2-mers) and its
   frequency-discounted normalisation. Probabilities are ``p = count / (2 N)``, N = number of
   valid bases (a GeneMask quirk, kept by default).
3. :func:`rank_table` ranks the k-mers by normalized dp-PMI (1 = highest) into a *rank table*
   ``int32[vocab.size]`` indexed by token id; special tokens and k-mers without a score (seen fewer
   than ``min_count`` times) get the worst rank ``4**k``. The masking kernels look ranks up by id.

The published GeneMask table (``Data-A_norm-pmi-score-ranking.csv``) is read by
:func:`load_genemask_ranks` and :func:`load_genemask_columns`; the tests invert its normalisation
to get the exact 6-mer counts behind it (``tests/genemask_formats.py``), which makes it a parity
test for all of the above.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from gemsjax.data.fasta import iter_fasta, resolve_paths
from gemsjax.data.rawio import open_text
from gemsjax.errors import UserError
from gemsjax.vocab import INVALID_BASE, Vocab, base_codes, get_vocab, rolling_kmer_codes

MAX_N = 10
"""Longest n-gram :func:`count_kmers` counts (4**10 bins of int64 = 8 MiB)."""

GENEMASK_MIN_COUNT = 101
"""GeneMask's ``min_occurrences``: k-mers seen fewer times get no score."""

GENEMASK_COLUMNS = {
    "naive_pmi": "naive.pmi",
    "true_pmi": "true.pmi",
    "dp_true_pmi": "dp.true.pmi",
    "norm_dp_true_pmi": "norm_dp_true_pmi",
}
"""Score names of :func:`pmi_scores` → column names of the published GeneMask CSV."""

DENOMINATORS = ("genemask", "per_length")
TRUE_SPLITS = ("genemask", "all")
RANK_TABLE_FORMAT = "gemsjax-rank-table/1"

_BLOCK = 1 << 16  # windows per vectorized counting block: keeps the temporaries in cache
_SEPARATOR = np.full(1, INVALID_BASE, dtype=np.uint8)  # ends a record: no n-gram spans it


# ----------------------------------------------------------------------------------- counting


@dataclasses.dataclass(frozen=True, eq=False)
class NgramCounts:
    """Counts of all DNA n-grams, n = 1..max_n.

    Attributes:
      counts: ``{n: int64[4**n]}`` for n = 1..max_n; index = base-4 code over ``A,C,G,T``.
      n_bases: number of valid (A/C/G/T) bases counted; equals ``counts[1].sum()`` when the
        counts come from :func:`count_kmers`.
    """

    counts: dict[int, np.ndarray]
    n_bases: int

    def __post_init__(self):
        if sorted(self.counts) != list(range(1, len(self.counts) + 1)) or not self.counts:
            raise ValueError(f"counts must have keys 1..max_n, got {sorted(self.counts)}")
        for n, c in self.counts.items():
            if c.shape != (4**n,):
                raise ValueError(f"counts[{n}] must have shape ({4**n},), got {c.shape}")

    @property
    def max_n(self) -> int:
        return len(self.counts)

    def lookup(self, ngrams: Sequence[str]) -> np.ndarray:
        """Counts of equal-length n-grams given as strings (any case): ``int64[len(ngrams)]``."""
        lengths = {len(g) for g in ngrams}
        if len(lengths) != 1 or not 1 <= min(lengths) <= self.max_n:
            raise ValueError(
                f"n-grams must all have one length in 1..{self.max_n}, "
                f"got lengths {sorted(lengths)}"
            )
        (n,) = lengths
        codes = rolling_kmer_codes(base_codes("".join(ngrams), "ACGT"), n)[::n]
        if (codes < 0).any():
            bad = [g for g, c in zip(ngrams, codes, strict=True) if c < 0]
            raise ValueError(f"n-grams must use only A, C, G, T; got {bad[:5]}")
        return self.counts[n][codes]

    def __getitem__(self, ngram: str) -> int:
        return int(self.lookup([ngram])[0])


def count_kmers(seqs_or_fasta_paths, max_n: int = 6, *, chunk_bases: int = 1 << 22) -> NgramCounts:
    """Count every DNA n-gram, n = 1..max_n, streamed in chunks with memory independent of size.

    N-grams containing a base other than A/C/G/T (any case) are skipped; n-grams never span two
    records (sequences, FASTA records, files). Each chunk counts only its max_n-grams (one
    ``bincount``); shorter n-grams are their marginals plus those starting in the last
    ``max_n - 1`` bases of each run of valid bases, where no max_n-gram starts.

    Args:
      seqs_or_fasta_paths: one item or an iterable of items; an ``os.PathLike`` is a FASTA file
        (optionally gzip), a ``str`` / ``bytes`` / ``uint8`` array is one sequence.
      max_n: longest n-gram, 1..10.
      chunk_bases: bases read and counted at a time (sets the memory used).

    Returns:
      :class:`NgramCounts` with ``counts[n]: int64[4**n]`` for n = 1..max_n.
    """
    _check_int("max_n", max_n, 1, MAX_N)
    _check_int("chunk_bases", chunk_bases, 1, None)
    counter = _NgramCounter(max_n)
    buffer, size = [], 0  # pieces (short records, record ends) gathered up to chunk_bases
    for piece in _code_pieces(seqs_or_fasta_paths, chunk_bases):
        while piece.size:
            take = min(piece.size, chunk_bases - size)
            buffer.append(piece[:take])
            size += take
            piece = piece[take:]
            if size == chunk_bases:
                counter.update(np.concatenate(buffer))
                buffer, size = [], 0
    counter.update(np.concatenate([*buffer, _SEPARATOR]))
    return counter.result()


def _check_int(name: str, value, lo: int, hi: int | None) -> None:
    if not isinstance(value, int | np.integer) or value < lo or (hi is not None and value > hi):
        valid = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer in {valid}, got {value!r}")


def _code_pieces(items, chunk_bases: int) -> Iterator[np.ndarray]:
    """``uint8`` ACGT base codes of all records, in pieces, each record preceded by a separator."""
    if isinstance(items, str | bytes | np.ndarray | os.PathLike):
        items = [items]
    for item in items:
        if isinstance(item, os.PathLike):
            yield from _fasta_pieces(pathlib.Path(item), chunk_bases)
            continue
        if not isinstance(item, str | bytes | np.ndarray):
            raise TypeError(
                f"expected a sequence (str, bytes, uint8 array) or a FASTA path "
                f"(pathlib.Path), got {type(item).__name__}"
            )
        if isinstance(item, str) and len(item) < 4096 and os.path.isfile(item):
            raise TypeError(
                f"{item!r} is a file name, but strings are read as sequences; "
                "pass pathlib.Path(...) to count a FASTA file"
            )
        codes = base_codes(item, "ACGT")
        yield _SEPARATOR
        for start in range(0, codes.size, chunk_bases):
            yield codes[start : start + chunk_bases]


def _fasta_pieces(path: pathlib.Path, chunk_bases: int) -> Iterator[np.ndarray]:
    record = None
    for chunk in iter_fasta(path, chunk_bases, upper=True):
        if chunk.record != record:
            record = chunk.record
            yield _SEPARATOR
        yield base_codes(chunk.seq, "ACGT")


class _NgramCounter:
    """Streaming state of :func:`count_kmers`: max_n-gram counts, run-tail counts, carry."""

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.top = np.zeros(4**max_n, dtype=np.int64)
        self.tails = {n: np.zeros(4**n, dtype=np.int64) for n in range(1, max_n)}
        self.carry = np.full(max_n - 1, INVALID_BASE, dtype=np.uint8)
        self.n_bases = 0

    def update(self, new: np.ndarray) -> None:
        """Count ``new`` (``uint8`` codes) following the ``max_n - 1`` carried bases."""
        arr = np.concatenate([self.carry, new])
        valid = arr < INVALID_BASE
        self.n_bases += int(np.count_nonzero(valid[self.carry.size :]))
        self.top += _count_windows(arr, self.max_n)
        if self.max_n > 1:
            self._count_run_tails(arr, valid)
        self.carry = arr[arr.size - (self.max_n - 1) :].copy()

    def _count_run_tails(self, arr: np.ndarray, valid: np.ndarray) -> None:
        """Count the shorter n-grams in the last max_n - 1 bases of each run that ends in ``arr``.

        A run ends at i if base i is valid and i + 1 is not; only ends with i + 1 new (past the
        carry) are counted here, so that each end is counted once.

        Args:
          arr: ``uint8[L]`` codes, the carried bases first.
          valid: ``bool[L]``, ``arr < INVALID_BASE``.
        """
        m = self.max_n - 1
        ends = np.flatnonzero(valid[m - 1 : -1] & ~valid[m:]) + (m - 1)
        if ends.size == 0:
            return
        tails = arr[ends[:, None] + np.arange(1 - m, 1)]  # uint8[runs, m]: bases end-m+1..end
        before_gap = np.logical_or.accumulate(tails[:, ::-1] >= INVALID_BASE, axis=1)[:, ::-1]
        tails = np.where(before_gap, INVALID_BASE, tails)  # drop bases of earlier runs
        for n in range(1, self.max_n):
            self.tails[n] += _count_block(tails, n)

    def result(self) -> NgramCounts:
        counts = {
            n: self.top.reshape(4**n, -1).sum(axis=1) + self.tails[n] for n in range(1, self.max_n)
        }
        counts[self.max_n] = self.top
        return NgramCounts(counts=counts, n_bases=self.n_bases)


def _count_windows(codes: np.ndarray, n: int) -> np.ndarray:
    """``int64[4**n]`` counts of the valid n-grams of ``codes: uint8[L]``, in cache-sized blocks."""
    total = np.zeros(4**n, dtype=np.int64)
    block = max(_BLOCK, 4**n)
    for start in range(0, codes.size - n + 1, block):
        total += _count_block(codes[start : start + block + n - 1], n)
    return total


def _count_block(codes: np.ndarray, n: int) -> np.ndarray:
    """``int64[4**n]`` counts of the valid n-grams along the last axis of ``codes: uint8[..., L]``.

    Each window's base-4 code gets bit ``2n`` set when it holds an invalid base, so one
    ``bincount`` over ``2 * 4**n`` bins counts valid windows in the lower half. Codes are
    ``uint16`` up to n = 7: several times faster than ``vocab.kmer_codes`` (``int64``, -1 for
    invalid) followed by a masked ``bincount`` (``benchmarks/bench_pmi.py``).
    """
    m = codes.shape[-1] - n + 1
    if m <= 0:
        return np.zeros(4**n, dtype=np.int64)
    dtype = np.uint16 if 2 * n < 16 else np.uint32
    base = codes & 3
    invalid = codes >> 2
    code = base[..., :m].astype(dtype)
    bad = invalid[..., :m].copy()
    for j in range(1, n):
        code <<= 2
        code |= base[..., j : j + m]
        bad |= invalid[..., j : j + m]
    code |= bad.astype(dtype) << (2 * n)
    return np.bincount(code.ravel(), minlength=2 * 4**n)[: 4**n]


# ------------------------------------------------------------------------------------- scores


def pmi_scores(
    counts: NgramCounts,
    k: int = 6,
    *,
    min_count: int = GENEMASK_MIN_COUNT,
    denominator: str = "genemask",
    true_splits: str = "genemask",
) -> dict[str, np.ndarray]:
    """GeneMask PMI scores of every k-mer, vectorized over all 4**k k-mers.

    With ``ln p(x) = ln count(x) - ln D`` and ``w = w_1..w_k``:

    - ``naive_pmi = ln p(w) - sum_i ln p(w_i)``;
    - ``true_pmi = min_i ln p(w) - ln p(w[:i]) - ln p(w[i:])`` over ``i = 1..k-2``
      (``true_splits="genemask"``, the original code's off-by-one) or ``i = 1..k-1`` (``"all"``);
    - ``dp_true_pmi = ln p(w) - max_seg sum ln p(piece)`` over segmentations of w into 1- and
      2-mers (dynamic programming);
    - ``norm_dp_true_pmi = dp_true_pmi * ln f / (ln f + ln min_count)``, f = count(w).

    Args:
      counts: n-gram counts with ``max_n >= k``.
      k: k-mer length, 3..counts.max_n.
      min_count: k-mers seen fewer times get NaN scores (GeneMask: 101); at least 2.
      denominator: ``"genemask"``: D = 2 * n_bases for every n (as published);
        ``"per_length"``: D = the total count of n-grams of that length.
      true_splits: ``"genemask"`` or ``"all"``, see above.

    Returns:
      ``{name: float64[4**k]}`` for the names in :data:`GENEMASK_COLUMNS`, in ACGT code order;
      NaN where ``count < min_count``.
    """
    _check_int("k", k, 3, counts.max_n)
    _check_int("min_count", min_count, 2, None)
    _check_choice("denominator", denominator, DENOMINATORS)
    _check_choice("true_splits", true_splits, TRUE_SPLITS)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = {}
        for n in range(1, k + 1):
            total = 2 * counts.n_bases if denominator == "genemask" else counts.counts[n].sum()
            log_p[n] = np.log(counts.counts[n]) - np.log(total)
        codes = np.arange(4**k)

        def piece(i: int, j: int) -> np.ndarray:  # ln p(w[i:j]) for every k-mer w
            return log_p[j - i][(codes >> (2 * (k - j))) & (4 ** (j - i) - 1)]

        log_pw = log_p[k]
        naive = log_pw - sum(piece(i, i + 1) for i in range(k))
        last = k - 1 if true_splits == "genemask" else k
        true = log_pw - np.max([piece(0, i) + piece(i, k) for i in range(1, last)], axis=0)
        best = [np.zeros(4**k), piece(0, 1)]  # best[j]: max sum ln p over segmentations of w[:j]
        for j in range(2, k + 1):
            best.append(np.maximum(best[j - 1] + piece(j - 1, j), best[j - 2] + piece(j - 2, j)))
        dp = log_pw - best[k]
        log_f = np.log(counts.counts[k])
        norm = dp * log_f / (log_f + np.log(min_count))
    scored = counts.counts[k] >= min_count
    scores = {"naive_pmi": naive, "true_pmi": true, "dp_true_pmi": dp, "norm_dp_true_pmi": norm}
    return {name: np.where(scored, s, np.nan) for name, s in scores.items()}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def ranks_from_scores(scores: np.ndarray) -> np.ndarray:
    """Rank k-mers by score, highest first.

    Args:
      scores: ``float64[4**k]`` in ACGT code order; NaN = no score.

    Returns:
      ``int32[4**k]``: 1..n_scored for scored k-mers; ties go to the k-mer that comes first in
      A<C<G<T lexicographic order. Unscored k-mers get the worst rank ``4**k``.
    """
    order = np.argsort(-scores, kind="stable")  # NaN sorts last
    n_scored = int(np.count_nonzero(~np.isnan(scores)))
    ranks = np.full(scores.size, scores.size, dtype=np.int32)
    ranks[order[:n_scored]] = np.arange(1, n_scored + 1, dtype=np.int32)
    return ranks


def rank_table(
    counts: NgramCounts,
    k: int = 6,
    min_count: int = GENEMASK_MIN_COUNT,
    vocab: Vocab | None = None,
    *,
    denominator: str = "genemask",
    true_splits: str = "genemask",
) -> np.ndarray:
    """Rank table from n-gram counts: rank of each token's k-mer by normalized dp-PMI.

    Args:
      counts, k, min_count, denominator, true_splits: as for :func:`pmi_scores`.
      vocab: the id layout to index by (default: DNABERT k-mers); ``vocab.k`` must equal k.

    Returns:
      ``int32[vocab.size]``: 1 = highest ``norm_dp_true_pmi`` (ties: see
      :func:`ranks_from_scores`); specials and k-mers seen fewer than min_count times get ``4**k``.
    """
    vocab = vocab or get_vocab("dnabert", k)
    if vocab.k != k:
        raise ValueError(f"vocab {vocab.name!r} has k = {vocab.k}, but k = {k}")
    scores = pmi_scores(
        counts, k, min_count=min_count, denominator=denominator, true_splits=true_splits
    )
    return acgt_to_vocab_order(ranks_from_scores(scores["norm_dp_true_pmi"]), vocab, fill=4**k)


def acgt_to_vocab_order(values: np.ndarray, vocab: Vocab, fill) -> np.ndarray:
    """Re-index a per-k-mer array from ACGT code order to token ids.

    Args:
      values: ``[4**vocab.k]`` in ACGT code order.
      vocab: the id layout.
      fill: value for the special tokens.

    Returns:
      ``[vocab.size]`` array of ``values.dtype``: ``out[vocab.num_specials + i]`` is the value of
      the vocab's i-th k-mer.
    """
    k = vocab.k
    digit_to_acgt = base_codes(vocab.alphabet, "ACGT").astype(np.int64)
    idx = np.arange(4**k)
    acgt_code = np.zeros(4**k, dtype=np.int64)
    for j in range(k):
        acgt_code = acgt_code * 4 + digit_to_acgt[(idx >> (2 * (k - 1 - j))) & 3]
    out = np.full(vocab.size, fill, dtype=values.dtype)
    out[vocab.num_specials :] = values[acgt_code]
    return out


# ------------------------------------------------------------------- published GeneMask table


def _genemask_rows(path: pathlib.Path, columns: Iterable[str], alphabet: str, k: int):
    """Yield ``(line_no, kmer_code, row)`` of a GeneMask CSV, the k-mer coded over ``alphabet``."""
    with open_text(path) as f:
        reader = csv.DictReader(f)
        missing = {"ngram", *columns} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}"
            )
        for line_no, row in enumerate(reader, start=2):
            kmer = row["ngram"]
            kmer_code = rolling_kmer_codes(base_codes(kmer, alphabet), k)
            if len(kmer) != k or kmer_code.shape != (1,) or kmer_code[0] < 0:
                raise ValueError(f"{path}:{line_no}: {kmer!r} is not a DNA {k}-mer")
            yield line_no, int(kmer_code[0]), row


def load_genemask_ranks(
    csv_path: str | pathlib.Path, vocab: Vocab | None = None, column: str = "norm_pmi_rank_rel"
) -> np.ndarray:
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
    table = np.full(vocab.size, 4**vocab.k, dtype=np.int32)
    for line_no, kmer_code, row in _genemask_rows(path, [column], vocab.alphabet, vocab.k):
        try:
            rank = int(row[column])
        except ValueError:
            raise ValueError(
                f"{path}:{line_no}: rank {row[column]!r} in column {column!r} is not an integer"
            ) from None
        table[vocab.num_specials + kmer_code] = rank
    return table


def load_genemask_columns(
    csv_path: str | pathlib.Path, columns: Sequence[str], k: int = 6
) -> dict[str, np.ndarray]:
    """Numeric columns of a GeneMask score CSV, per k-mer in ACGT code order.

    Returns:
      ``{column: float64[4**k]}``; NaN for k-mers missing from the file.
    """
    path = pathlib.Path(csv_path)
    out = {c: np.full(4**k, np.nan) for c in columns}
    for line_no, kmer_code, row in _genemask_rows(path, columns, "ACGT", k):
        for c in columns:
            try:
                out[c][kmer_code] = float(row[c])
            except ValueError:
                raise ValueError(
                    f"{path}:{line_no}: {row[c]!r} in column {c!r} is not a number"
                ) from None
    return out


# ------------------------------------------------------------------------ rank table files


def save_rank_table(
    path: str | pathlib.Path, rank_table: np.ndarray, vocab: Vocab, meta: dict | None = None
) -> None:
    """Write a rank table as TSV ``token<TAB>id<TAB>rank`` (gzip if the name ends in .gz).

    The header comments name the format, the vocab and ``meta`` (JSON), so the file describes
    itself; :func:`load_rank_table` reads it back.

    Args:
      path: output file.
      rank_table: ``int[vocab.size]``.
      vocab: the id layout the table is indexed by.
      meta: JSON-serializable provenance (sources, counts, settings).
    """
    if rank_table.shape != (vocab.size,):
        raise ValueError(
            f"rank_table must have shape ({vocab.size},) for vocab {vocab.name!r} "
            f"k={vocab.k}, got {rank_table.shape}"
        )
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# format: {RANK_TABLE_FORMAT}",
        f"# vocab: {vocab.name}",
        f"# k: {vocab.k}",
        f"# meta: {json.dumps(meta or {}, sort_keys=True)}",
        "token\tid\trank",
    ]
    lines += [
        f"{t}\t{i}\t{int(r)}"
        for i, (t, r) in enumerate(zip(vocab.tokens(), rank_table, strict=True))
    ]
    with gzip.open(path, "wt") if path.suffix == ".gz" else open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def load_rank_table(path: str | pathlib.Path) -> tuple[np.ndarray, Vocab, dict]:
    """Read a file written by :func:`save_rank_table`.

    Returns:
      ``(rank_table int32[vocab.size], vocab, meta)``.

    Raises:
      UserError: the file is not such a table; the message names the file, the line and the fix.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"rank table not found: {path}; check config.masking.rank_table")
    with open_text(path) as f:
        lines = f.read().splitlines()
    fix = "write rank tables with --mode=pmi (pmi.save_rank_table)"
    header, where = {}, {}
    for line_no, line in enumerate(lines[:4], start=1):
        key, sep, value = line.removeprefix("# ").partition(": ")
        if not line.startswith("# ") or not sep:
            raise UserError(
                f"{path}:{line_no}: expected a '# key: value' header line, got {line[:80]!r}; {fix}"
            )
        header[key], where[key] = value, line_no
    if header.get("format") != RANK_TABLE_FORMAT:
        raise UserError(
            f"{path}:1: format {header.get('format')!r} is not {RANK_TABLE_FORMAT!r}; {fix}"
        )
    try:
        vocab = get_vocab(header["vocab"], int(header["k"]))
    except (KeyError, ValueError) as err:
        raise UserError(
            f"{path}:{where.get('k', 3)}: vocab {header.get('vocab')!r} with k "
            f"{header.get('k')!r} is not a known layout ({err}); {fix}"
        ) from None
    try:
        meta = json.loads(header.get("meta", ""))
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}:{where.get('meta', 4)}: the meta header is not JSON ({err}); {fix}"
        ) from None
    rows = lines[5:]
    if lines[4:5] != ["token\tid\trank"] or len(rows) != vocab.size:
        raise UserError(
            f"{path}: expected the column header 'token<TAB>id<TAB>rank' on line 5 "
            f"and {vocab.size} rows, got {len(rows)} rows; {fix}"
        )
    table = np.empty(vocab.size, dtype=np.int32)
    worst = 4**vocab.k
    for i, (token, row) in enumerate(zip(vocab.tokens(), rows, strict=True)):
        fields = row.split("\t")
        if (
            len(fields) != 3
            or fields[:2] != [token, str(i)]
            or not fields[2].isdigit()
            or not 1 <= int(fields[2]) <= worst
        ):
            raise UserError(
                f"{path}:{i + 6}: expected '{token}<TAB>{i}<TAB><rank 1..{worst}>', "
                f"got {row[:80]!r}; {fix}"
            )
        table[i] = int(fields[2])
    return table, vocab, meta


def rank_table_from_fasta(
    paths,
    out_path: str | pathlib.Path | None = None,
    k: int = 6,
    max_n: int = 6,
    min_count: int = GENEMASK_MIN_COUNT,
    *,
    denominator: str = "genemask",
    vocab: Vocab | None = None,
    chunk_bases: int = 1 << 22,
) -> np.ndarray:
    """Count n-grams over FASTA files and rank the k-mers: the one route from FASTA to a rank
    table (``--mode=pmi`` saves it; a training run with ``masking.rank_table=fasta`` uses it).

    Args:
      paths: one FASTA path or a list of them (str or Path; gzip allowed).
      out_path: where :func:`save_rank_table` writes the table (None: not saved).
      k, min_count, denominator, vocab: as for :func:`rank_table`.
      max_n: longest n-gram counted, k..10.
      chunk_bases: as for :func:`count_kmers`.

    Returns:
      the ``int32[vocab.size]`` rank table.
    """
    paths = resolve_paths(paths)
    _check_int("max_n", max_n, k, MAX_N)
    vocab = vocab or get_vocab("dnabert", k)
    counts = count_kmers(paths, max_n, chunk_bases=chunk_bases)
    table = rank_table(counts, k, min_count, vocab, denominator=denominator)
    meta = {
        "sources": [str(p) for p in paths],
        "n_bases": counts.n_bases,
        "k": k,
        "max_n": max_n,
        "min_count": min_count,
        "denominator": denominator,
        "n_scored": int(np.count_nonzero(counts.counts[k] >= min_count)),
    }
    if out_path is not None:
        save_rank_table(out_path, table, vocab, meta)
    return table
