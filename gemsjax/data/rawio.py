"""Shared by the data readers: opening plain or gzip files, and checking sequence characters.

Gzip is detected by its magic bytes, never by the file name. Sequence characters are checked with a
256-entry table: IUPAC nucleotide codes ``ACGTURYSWKMBDHVN`` in either case, the gap ``-``, and
``*`` and ``.`` are valid; anything else (digits, ``>``, spaces inside a sequence, ...) is not.
"""

from __future__ import annotations

import gzip
import io
import os
from typing import BinaryIO, TextIO

import numpy as np

GZIP_MAGIC = b"\x1f\x8b"

SEQUENCE_CHARS = b"ACGTURYSWKMBDHVNacgturyswkmbdhvn-*."
"""Every byte that may appear in a nucleotide sequence."""

_VALID_BYTE = np.zeros(256, dtype=bool)
_VALID_BYTE[np.frombuffer(SEQUENCE_CHARS, dtype=np.uint8)] = True


def is_gzip(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` starts with the gzip magic bytes."""
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def open_binary(path: str | os.PathLike) -> BinaryIO:
    """Open a plain or gzip file for binary reading (decompressed transparently)."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def open_text(path: str | os.PathLike) -> TextIO:
    """Open a plain or gzip file as UTF-8 text, with newlines left as they are (for ``csv``)."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", errors="replace", newline="")


def first_invalid(data: bytes, also_valid: bytes = b"") -> int:
    """Offset of the first byte of ``data`` not in :data:`SEQUENCE_CHARS` or ``also_valid``, or -1.

    The common all-valid case costs one C-level ``bytes.translate``; the offset is looked up (with
    the 256-entry table over ``uint8[len(data)]``) only when some byte is invalid.
    """
    if not data.translate(None, SEQUENCE_CHARS + also_valid):
        return -1
    valid = _VALID_BYTE.copy()
    valid[np.frombuffer(also_valid, dtype=np.uint8)] = True
    return int(np.flatnonzero(~valid[np.frombuffer(data, dtype=np.uint8)])[0])
