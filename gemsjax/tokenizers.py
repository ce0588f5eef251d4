"""k-mer tokenizers: DNABERT overlapping k-mers and BarcodeBERT non-overlapping k-mers.

:class:`KmerTokenizer` turns a batch of DNA strings into fixed-shape ``int32[B, L]`` token ids and
attention masks, vectorized over the whole batch with numpy: the strings are joined once into a
single byte buffer, cleaned there (gaps, trailing ``N``, reading-frame offsets) with cumulative
counts, gathered into one padded base-code matrix ``uint8[B, bases]`` and turned into k-mer ids
with :meth:`gemsjax.vocab.Vocab.kmer_ids`. The id layouts are those of :mod:`gemsjax.vocab`.

Also here: the reader of the DNABERT / GeneMask k-mer text format (space-separated overlapping
k-mers), :func:`kmer_text_to_sequence`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from gemsjax.vocab import INVALID_BASE, Vocab, as_bytes, get_vocab

_GATHER_CHUNK = 1 << 22
"""Bases gathered per step when building the padded matrix (bounds the index array's memory)."""


def kmer_text_to_sequence(text: str) -> str:
    """The sequence spelled by a DNABERT / GeneMask k-mer text field.

    Args:
      text: space-separated overlapping k-mers, optionally wrapped in ``"`` (as in the GeneMask
        few-shot train TSVs), e.g. ``"ACGTAC CGTACG"``.

    Returns:
      The first k-mer followed by the last base of each later k-mer (``"ACGTACG"``).

    Raises:
      ValueError: empty text, k-mers of different lengths, or consecutive k-mers that do not
        overlap by k-1 bases (the message names the first offending k-mer).
    """
    kmers = text.strip().strip('"').split()
    if not kmers:
        raise ValueError(f"no k-mers in k-mer text {text[:60]!r}")
    k = len(kmers[0])
    seq = kmers[0] + "".join(kmer[-1] for kmer in kmers[1:])
    expected = [seq[i : i + k] for i in range(len(kmers))]
    if expected != kmers:
        i = next(i for i, (a, b) in enumerate(zip(expected, kmers, strict=True)) if a != b)
        if len(kmers[i]) != k:
            raise ValueError(
                f"k-mer {i} {kmers[i]!r} has length {len(kmers[i])}, but k-mer 0 "
                f"{kmers[0]!r} has length {k}; all k-mers must have the same length"
            )
        raise ValueError(
            f"k-mer {i} {kmers[i]!r} does not overlap k-mer {i - 1} {kmers[i - 1]!r} "
            f"by {k - 1} bases; expected overlapping k-mers (stride 1) as written by "
            f"DNABERT's seq2kmer"
        )
    return seq


class KmerTokenizer:
    """Batch k-mer tokenizer for the ``dnabert`` and ``barcodebert`` id layouts.

    ``vocab="dnabert"`` (stride 1, overlapping; DNABERT, GeneMask, CM-GEMS): each row is
    ``[CLS] kmer_0 ... kmer_{n-1} [SEP] [PAD]...`` with attention 1 on CLS, the k-mers and SEP;
    a sequence is truncated so that CLS + k-mers + SEP fill at most ``max_len`` tokens.

    ``vocab="barcodebert"`` (stride k, non-overlapping; BarcodeBERT, BarcodeMAE): the sequence is
    truncated to ``max_len * k`` bases or right-padded with ``N``, so padding tokens are
    ``[UNK]``; attention is 1 on token indices ``< n_bases // k`` only, so a trailing partial
    k-mer is attention-masked too.

    Any k-mer containing a base outside ACGT (``N``, IUPAC codes, gaps ``-``) is ``[UNK]``; lower
    case is read as upper case.

    Args:
      k: k-mer length, 1..12.
      stride: 1 for ``dnabert``, ``k`` for ``barcodebert``; ``None`` picks the layout's stride.
      vocab: ``"dnabert"`` or ``"barcodebert"``.
      strip_gaps: remove alignment gaps ``-`` before tokenizing (otherwise they make ``[UNK]``).
      strip_trailing_n: remove trailing ``N``/``n`` before tokenizing (BarcodeMAE preprocessing).
      randomize_offset: drop a random number ``0..k-1`` of leading bases per sequence (BarcodeMAE
        reading-frame augmentation; ``barcodebert`` only); :meth:`encode` then needs ``rng``.
    """

    def __init__(
        self,
        k: int = 6,
        stride: int | None = None,
        vocab: str = "dnabert",
        *,
        strip_gaps: bool = False,
        strip_trailing_n: bool = False,
        randomize_offset: bool = False,
    ):
        self._vocab = get_vocab(vocab, k)
        natural = 1 if vocab == "dnabert" else k
        stride = natural if stride is None else stride
        if stride != natural:
            raise ValueError(
                f"vocab={vocab!r} with k={k} needs stride={natural} "
                f"({'overlapping' if natural == 1 else 'non-overlapping'} k-mers), "
                f"got stride={stride}"
            )
        if randomize_offset and vocab != "barcodebert":
            raise ValueError(
                "randomize_offset is a reading-frame augmentation for non-overlapping "
                "k-mers; use it with vocab='barcodebert'"
            )
        self.stride = stride
        self.strip_gaps = strip_gaps
        self.strip_trailing_n = strip_trailing_n
        self.randomize_offset = randomize_offset

    def __repr__(self) -> str:
        return (
            f"KmerTokenizer(k={self.k}, stride={self.stride}, vocab={self._vocab.name!r}, "
            f"strip_gaps={self.strip_gaps}, strip_trailing_n={self.strip_trailing_n}, "
            f"randomize_offset={self.randomize_offset})"
        )

    @property
    def vocab(self) -> Vocab:
        return self._vocab

    @property
    def k(self) -> int:
        return self._vocab.k

    @property
    def vocab_size(self) -> int:
        return self._vocab.size

    @property
    def overlapping(self) -> bool:
        """True for the dnabert layout (stride 1, CLS/SEP framing), False for barcodebert."""
        return self._vocab.name == "dnabert"

    @property
    def unk_id(self) -> int:
        return self._vocab.unk_id

    @property
    def mask_id(self) -> int:
        return self._vocab.mask_id

    @property
    def pad_id(self) -> int:
        """The id of padding positions: ``[PAD]`` for dnabert, ``[UNK]`` for barcodebert."""
        return self._vocab.special_id("[PAD]") if self.overlapping else self.unk_id

    @property
    def cls_id(self) -> int | None:
        """``[CLS]`` for dnabert; None for barcodebert, which has no CLS token."""
        return self._vocab.special_id("[CLS]") if self.overlapping else None

    @property
    def sep_id(self) -> int | None:
        """``[SEP]`` for dnabert; None for barcodebert, which has no SEP token."""
        return self._vocab.special_id("[SEP]") if self.overlapping else None

    def write_vocab_txt(self, path: str | os.PathLike) -> None:
        """Write a DNABERT-style ``vocab.txt``: one token per line, line i holding id i."""
        with open(path, "w", encoding="ascii") as f:
            f.write("\n".join(self._vocab.tokens()) + "\n")

    def encode(
        self,
        seqs: Sequence[str],
        max_len: int,
        rng: np.random.Generator | int | None = None,
        *,
        offsets: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize a batch of sequences.

        Args:
          seqs: B DNA strings (any length; lower case, N, IUPAC codes and gaps allowed).
          max_len: L, tokens per row (dnabert: >= 3, including CLS and SEP).
          rng: numpy Generator or seed for the reading-frame offsets; with
            ``randomize_offset=True`` it or ``offsets`` is required; ignored otherwise.
          offsets: ``int[B]`` in ``0..k-1``: the offsets themselves (the data pipeline draws
            them per global batch).

        Returns:
          ``(ids, attention)``, both ``int32[B, L]``.
        """
        min_len = 3 if self.overlapping else 1
        if (
            isinstance(max_len, bool)
            or not isinstance(max_len, int | np.integer)
            or max_len < min_len
        ):
            framing = ", including [CLS] and [SEP]" if self.overlapping else ""
            raise ValueError(
                f"max_len must be an int >= {min_len} for vocab={self._vocab.name!r} "
                f"(tokens per row{framing}), got {max_len!r}"
            )
        max_len = int(max_len)
        buf, starts, lengths = _join(seqs)
        if self.strip_gaps:
            buf, starts, lengths = _drop_bytes(buf, starts, lengths, b"-")
        if self.strip_trailing_n:
            lengths = _rstrip_lengths(buf, starts, lengths, b"Nn")
        if self.randomize_offset:
            if offsets is None and rng is None:
                raise ValueError(
                    "this tokenizer has randomize_offset=True: pass rng "
                    "(a numpy Generator or an int seed) or offsets to encode()"
                )
            if offsets is None:
                offsets = np.random.default_rng(rng).integers(0, self.k, size=len(starts))
            offsets = np.asarray(offsets)
            if offsets.shape != starts.shape or not np.all((offsets >= 0) & (offsets < self.k)):
                raise ValueError(f"offsets must be {len(starts)} values in 0..{self.k - 1}")
            offsets = np.minimum(offsets, lengths)  # dropping more bases than there are is moot
            starts = starts + offsets
            lengths = np.maximum(lengths - offsets, 0)
        if self.overlapping:
            return self._encode_overlapping(buf, starts, lengths, max_len)
        return self._encode_blocks(buf, starts, lengths, max_len)

    def _encode_overlapping(self, buf, starts, lengths, max_len):
        n_kmers = max_len - 2
        codes, lengths = _padded_codes(
            self._vocab.base_codes(buf), starts, lengths, n_kmers + self.k - 1
        )
        n_tokens = np.maximum(lengths - self.k + 1, 0)
        position = np.arange(max_len)
        ids = np.full((codes.shape[0], max_len), self.pad_id, dtype=np.int32)
        ids[:, 1:-1] = self._vocab.kmer_ids(codes, stride=1)
        ids[position[None, :] >= (n_tokens + 1)[:, None]] = self.pad_id
        ids[:, 0] = self.cls_id
        ids[np.arange(codes.shape[0]), n_tokens + 1] = self.sep_id
        attention = (position[None, :] < (n_tokens + 2)[:, None]).astype(np.int32)
        return ids, attention

    def _encode_blocks(self, buf, starts, lengths, max_len):
        codes, lengths = _padded_codes(
            self._vocab.base_codes(buf), starts, lengths, max_len * self.k
        )
        ids = self._vocab.kmer_ids(codes, stride=self.k)
        attention = np.arange(max_len)[None, :] < (lengths // self.k)[:, None]
        return ids, attention.astype(np.int32)

    def decode(self, ids: np.ndarray) -> list[str]:
        """Sequences spelled by token ids; inverts :meth:`encode` on clean (ACGT-only) sequences.

        Args:
          ids: ``int[B, L]`` (or ``int[L]`` for one sequence) token ids.

        Returns:
          B strings. Overlapping: the first k-mer, then the last base of each later k-mer;
          non-overlapping: the k-mers concatenated. Special ids (``[UNK]`` and padding included)
          are skipped, so a sequence with N or gaps does not round-trip.
        """
        ids = np.atleast_2d(np.asarray(ids))
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"decode expects integer ids of shape [B, L], got {ids.dtype} {ids.shape}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"ids must be in 0..{self.vocab_size - 1} for {self!r}; got range "
                f"{ids.min()}..{ids.max()}"
            )
        ns, k = self._vocab.num_specials, self.k
        is_kmer = ids >= ns
        emit = np.broadcast_to(is_kmer[:, :, None], ids.shape + (k,))
        if self.overlapping:
            first = is_kmer & (np.cumsum(is_kmer, axis=1) == 1)
            emit = emit & (first[:, :, None] | (np.arange(k) == k - 1))
        letters = np.frombuffer(self._vocab.alphabet.encode("ascii"), dtype=np.uint8)
        shifts = 2 * np.arange(k - 1, -1, -1)
        chars = letters[(np.maximum(ids - ns, 0)[:, :, None] >> shifts) & 3]  # uint8[B, L, k]
        text = chars[emit].tobytes().decode("ascii")
        ends = np.cumsum(emit.sum(axis=(1, 2)))
        return [text[a:b] for a, b in zip(np.concatenate([[0], ends[:-1]]), ends, strict=True)]


DATA_KINDS = ("genome", "barcode")


def data_tokenizer(
    kind: str, k: int = 6, *, randomize_offset: bool = False, strip_gaps: bool = False
) -> KmerTokenizer:
    """The tokenizer of a pretraining data kind: the one place where a run's data picks its ids.

    ``"genome"``: DNABERT's overlapping 6-mers with ``[CLS]`` / ``[SEP]`` (GeneMask, CM-GEMS;
    ``k`` must be 6). ``"barcode"``: BarcodeBERT's non-overlapping ``k``-mers (6: BarcodeMAE,
    8: BarcodeBERT-5M), a random reading-frame offset ``0..k-1`` per row with
    ``randomize_offset`` (training only), alignment gaps removed first with ``strip_gaps``.
    Raises ValueError on another kind, or a genome k != 6.
    """
    if kind == "genome":
        if k != 6:
            raise ValueError(f"genome data reads DNABERT 6-mers; got k={k}")
        return KmerTokenizer(6, stride=1, vocab="dnabert")
    if kind == "barcode":
        return KmerTokenizer(
            k,
            stride=k,
            vocab="barcodebert",
            randomize_offset=randomize_offset,
            strip_gaps=strip_gaps,
        )
    raise ValueError(f"data kind {kind!r}; expected one of {DATA_KINDS}")


def _join(seqs: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All sequences in one byte buffer: ``(uint8[total], starts int64[B], lengths int64[B])``."""
    if isinstance(seqs, str | bytes):
        raise TypeError(
            "encode expects a list of sequences, got a single "
            f"{type(seqs).__name__}; wrap it in a list: encode([seq], max_len)"
        )
    try:
        text = "".join(seqs)
    except TypeError:
        i, bad = next((i, s) for i, s in enumerate(seqs) if not isinstance(s, str))
        raise TypeError(
            f"sequence {i} is a {type(bad).__name__}, not a str; encode expects DNA strings"
        ) from None
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    starts = np.cumsum(lengths) - lengths
    return as_bytes(text), starts, lengths


def _drop_bytes(buf, starts, lengths, chars: bytes):
    """Remove every byte in ``chars`` from the buffer, updating each sequence's start and length."""
    keep = ~np.isin(buf, np.frombuffer(chars, dtype=np.uint8))
    kept_before = np.concatenate([[0], np.cumsum(keep)])
    new_starts = kept_before[starts]
    return buf[keep], new_starts, kept_before[starts + lengths] - new_starts


def _rstrip_lengths(buf, starts, lengths, chars: bytes) -> np.ndarray:
    """Lengths of the sequences with trailing bytes from ``chars`` removed: ``int64[B]``."""
    other = ~np.isin(buf, np.frombuffer(chars, dtype=np.uint8))
    other_before = np.concatenate([[0], np.cumsum(other)])
    # first index i with other_before[i] == other_before[end] is one past the last kept byte
    ends = np.searchsorted(other_before, other_before[starts + lengths], side="left")
    return np.maximum(ends - starts, 0)


def _padded_codes(codes, starts, lengths, n_bases: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather sequences into ``uint8[B, n_bases]`` base codes, truncated or padded with invalid.

    Returns the matrix and the truncated lengths ``int64[B]``.
    """
    lengths = np.minimum(lengths, n_bases)
    codes = np.concatenate([codes, np.full(n_bases, INVALID_BASE, dtype=np.uint8)])
    batch = starts.shape[0]
    out = np.empty((batch, n_bases), dtype=np.uint8)
    column = np.arange(n_bases)
    rows = max(1, _GATHER_CHUNK // max(n_bases, 1))
    for lo in range(0, batch, rows):
        chunk = slice(lo, lo + rows)
        block = codes[starts[chunk, None] + column]
        block[column >= lengths[chunk, None]] = INVALID_BASE
        out[chunk] = block
    return out, lengths
