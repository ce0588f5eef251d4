"""k-mer vocabularies: the two published id layouts and vectorized base / k-mer coding.

Two layouts are supported, each matching published checkpoints exactly:

- ``dnabert`` (DNABERT, GeneMask, CM-GEMS): ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``, then the
  4^k k-mers in lexicographic order over the alphabet ``A,T,C,G`` (``AAAAAA=5, AAAAAT=6, ...``).
- ``barcodebert`` (BarcodeBERT, BarcodeMAE): ``[MASK]=0 [UNK]=1``, then the 4^k k-mers in
  lexicographic order over ``A,C,G,T`` (``AAAAAA=2 ... TTTTTT=4097`` for k = 6).

Everything here is numpy and vectorized: a sequence is first turned into base codes
(``uint8[N]``, 0..3 for the alphabet's letters, :data:`INVALID_BASE` for anything else), then into
k-mer codes (``int64[..., n]``, ``-1`` where the k-mer contains an invalid base).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np

INVALID_BASE = 4
"""Base code of any character outside the 4-letter alphabet (N, IUPAC codes, gaps, ...)."""


@dataclasses.dataclass(frozen=True)
class Vocab:
    """An id layout: special tokens first, then the 4^k k-mers in the alphabet's order.

    Attributes:
      name: ``"dnabert"`` or ``"barcodebert"``.
      k: k-mer length.
      alphabet: the 4 bases in the order that defines k-mer ids (``"ATCG"`` or ``"ACGT"``).
      specials: special token strings; ``specials[i]`` has id ``i``.
    """

    name: str
    k: int
    alphabet: str
    specials: tuple[str, ...]

    @property
    def num_specials(self) -> int:
        return len(self.specials)

    @property
    def size(self) -> int:
        """Total number of ids: specials + 4^k."""
        return self.num_specials + 4**self.k

    def special_id(self, token: str) -> int:
        """Id of a special token such as ``"[MASK]"``; raises KeyError naming the valid ones."""
        try:
            return self.specials.index(token)
        except ValueError:
            raise KeyError(
                f"{token!r} is not a special token of the {self.name} vocab; valid: {self.specials}"
            ) from None

    @property
    def unk_id(self) -> int:
        return self.special_id("[UNK]")

    @property
    def mask_id(self) -> int:
        return self.special_id("[MASK]")

    def kmer_strings(self) -> list[str]:
        """All 4^k k-mers in id order (``result[i]`` has id ``num_specials + i``)."""
        return ["".join(p) for p in itertools.product(self.alphabet, repeat=self.k)]

    def tokens(self) -> list[str]:
        """The full id → token list (the content of a ``vocab.txt``)."""
        return list(self.specials) + self.kmer_strings()

    def base_codes(self, seq: str | bytes | np.ndarray) -> np.ndarray:
        """Base codes of a sequence under this vocab's alphabet; see :func:`base_codes`."""
        return base_codes(seq, self.alphabet)

    def kmer_ids(self, codes: np.ndarray, stride: int = 1) -> np.ndarray:
        """Token ids of the k-mers of base codes, along the last axis.

        Args:
          codes: ``uint8[..., N]`` base codes from :meth:`base_codes`.
          stride: 1 for overlapping k-mers, ``k`` for non-overlapping ones.

        Returns:
          ``int32[..., n_kmers]`` ids, ``n_kmers = (N - k) // stride + 1`` (0 if N < k); k-mers that
          contain an invalid base get ``[UNK]``.
        """
        kc = kmer_codes(codes, self.k, stride, dtype=np.int32)
        kc += self.num_specials
        kc[kc < self.num_specials] = self.unk_id
        return kc


DNABERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BARCODEBERT_SPECIALS = ("[MASK]", "[UNK]")
LAYOUTS = {
    "dnabert": ("ATCG", DNABERT_SPECIALS),
    "barcodebert": ("ACGT", BARCODEBERT_SPECIALS),
}


@functools.cache
def get_vocab(name: str = "dnabert", k: int = 6) -> Vocab:
    """The vocab ``name`` (``"dnabert"`` or ``"barcodebert"``) for k-mers of length k (1..12)."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown vocab {name!r}; valid: {sorted(LAYOUTS)}")
    if not 1 <= k <= 12:
        raise ValueError(f"k must be in 1..12, got {k}")
    alphabet, specials = LAYOUTS[name]
    return Vocab(name=name, k=k, alphabet=alphabet, specials=specials)


@functools.cache
def _code_table(alphabet: str) -> np.ndarray:
    table = np.full(256, INVALID_BASE, dtype=np.uint8)
    for code, base in enumerate(alphabet):
        table[ord(base)] = code
        table[ord(base.lower())] = code
    if "T" in alphabet:  # RNA: U is read as T everywhere (genome preparation, PMI, tokenizers)
        table[ord("U")] = table[ord("u")] = alphabet.index("T")
    table.setflags(write=False)
    return table


def as_bytes(seq: str | bytes | np.ndarray) -> np.ndarray:
    """A sequence as a ``uint8[N]`` array of ASCII bytes (no copy for bytes / uint8 arrays)."""
    if isinstance(seq, np.ndarray):
        if seq.dtype != np.uint8:
            raise TypeError(f"expected a uint8 byte array, got dtype {seq.dtype}")
        return seq
    if isinstance(seq, str):
        seq = seq.encode("ascii", errors="replace")
    return np.frombuffer(seq, dtype=np.uint8)


def base_codes(seq: str | bytes | np.ndarray, alphabet: str = "ACGT") -> np.ndarray:
    """Map a sequence to base codes.

    Args:
      seq: a ``str``, ``bytes`` or ``uint8[N]`` ASCII array; lower case is accepted.
      alphabet: the 4 bases whose codes are 0..3, in order.

    Returns:
      ``uint8[N]``: the index of each base in ``alphabet`` (``U`` / ``u`` count as ``T``),
      :data:`INVALID_BASE` for anything else (``N``, IUPAC ambiguity codes, gaps ``-``, ...).
    """
    return _code_table(alphabet)[as_bytes(seq)]


def rolling_kmer_codes(codes: np.ndarray, k: int) -> np.ndarray:
    """Base-4 codes of every overlapping k-mer (stride 1): :func:`kmer_codes` with ``stride=1``.

    Args:
      codes: ``uint8[N]`` base codes (0..3 valid, anything larger invalid).
      k: k-mer length, ``k <= 31``.

    Returns:
      ``int64[max(N - k + 1, 0)]``: ``sum_j codes[i + j] * 4^(k-1-j)``, or ``-1`` where the k-mer
      at ``i`` contains an invalid base.
    """
    return kmer_codes(codes, k)


def kmer_codes(codes: np.ndarray, k: int, stride: int = 1, dtype=np.int64) -> np.ndarray:
    """Base-4 codes of the k-mers starting every ``stride`` bases, along the last axis.

    Args:
      codes: ``uint8[..., N]`` base codes (0..3 valid, anything larger invalid).
      k: k-mer length (``k <= 15`` for ``int32``, ``k <= 31`` for ``int64``).
      stride: bases between consecutive k-mer starts (1: overlapping, k: non-overlapping).
      dtype: integer dtype of the result.

    Returns:
      ``dtype[..., n]``, ``n = max((N - k) // stride + 1, 0)``: element ``i`` is
      ``sum_j codes[..., i * stride + j] * 4^(k-1-j)``, or ``-1`` if that k-mer contains an
      invalid base.
    """
    codes = np.asarray(codes)
    n = max((codes.shape[-1] - k) // stride + 1, 0)
    out = np.zeros(codes.shape[:-1] + (n,), dtype=dtype)
    seen = np.zeros(out.shape, dtype=codes.dtype)  # bitwise OR of the k-mer's base codes
    for j in range(k):  # k shifted adds, each vectorized over all k-mers
        column = codes[..., j : j + (n - 1) * stride + 1 : stride]
        out <<= 2
        out += column
        seen |= column
    out[seen >= 4] = -1  # valid codes are 0..3, so the OR is >= 4 iff some base is invalid
    return out
