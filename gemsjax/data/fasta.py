"""Streamed FASTA reading (plain or gzip), in fixed-size chunks of sequence bytes.

:func:`iter_fasta` reads the file in large binary blocks and works on whole blocks with C-level
bytes operations (``find``, ``translate``, ``count``): newlines and other whitespace are deleted,
lower case is upper-cased, and characters are validated per block. Memory stays bounded by about
``chunk_bases + block_bytes`` however long a record is, so a 3 Gbp genome streams through the same
code as a 48 kbp phage.

A record's chunks are contiguous (``start`` counts bases from the start of the record), all but
its last have exactly ``chunk_bases`` bases, and no chunk spans two records.
"""

from __future__ import annotations

import gzip
import itertools
import os
import pathlib
import zlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

from gemsjax.data.rawio import SEQUENCE_CHARS, first_invalid, open_binary
from gemsjax.errors import UserError

_WHITESPACE = b" \t\r\n\v\f"
_SEQUENCE_OR_NEWLINE = SEQUENCE_CHARS + b"\n"
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark some editors write at the start of a file
_GT = ord(">")
_NL = ord("\n")


class FastaFormatError(UserError):
    """A FASTA file that cannot be read; the message names the file, the line and the fix."""


class FastaChunk(NamedTuple):
    """Up to ``chunk_bases`` consecutive bases of one record.

    Attributes:
      record: 0-based index of the record in the file.
      name: header text after ``>`` up to the first whitespace.
      description: the whole header line after ``>``, stripped.
      start: offset of ``seq[0]`` within the record.
      seq: ``uint8[n]`` ASCII bytes (read-only), without newlines or other whitespace.
    """

    record: int
    name: str
    description: str
    start: int
    seq: np.ndarray


def resolve_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[pathlib.Path]:
    """One FASTA path or several -> ``list[Path]``; raises if there is none or one is missing."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    resolved = [pathlib.Path(p) for p in paths]
    if not resolved:
        raise UserError("no FASTA paths given; name at least one FASTA file (gzip allowed)")
    for path in resolved:
        if not path.is_file():
            raise UserError(f"FASTA file not found: {path}; check the path")
    return resolved


def iter_fasta(
    path: str | os.PathLike,
    chunk_bases: int = 1 << 22,
    *,
    upper: bool = True,
    allow_empty_records: bool = False,
    block_bytes: int = 1 << 20,
) -> Iterator[FastaChunk]:
    """Stream the records of a FASTA or gzip FASTA file (gzip detected by magic bytes).

    Args:
      path: the file.
      chunk_bases: the most bases per chunk (> 0).
      upper: upper-case the sequence (soft-masked lower case becomes upper case).
      allow_empty_records: yield one chunk with an empty ``seq`` for a header without sequence
        instead of raising.
      block_bytes: size of the decompressed blocks read from the file (a tuning knob only).

    Yields:
      :class:`FastaChunk` in file order.

    Raises:
      FastaFormatError: empty file, sequence before the first header, a character outside IUPAC
        nucleotide codes / ``-`` / ``*`` / ``.``, a record without sequence, or a truncated or
        corrupt gzip stream. The message names the file and line.
    """
    if chunk_bases < 1 or block_bytes < 1:
        raise ValueError(
            f"chunk_bases and block_bytes must be >= 1, got {chunk_bases}, {block_bytes}"
        )
    parser = _Parser(os.fspath(path), chunk_bases, upper, allow_empty_records)
    with open_binary(path) as fh:
        at_start = True  # a UTF-8 byte-order mark at the start is not sequence data: skip it
        while True:
            try:
                block = fh.read(len(_BOM) if at_start else block_bytes)
            except (EOFError, zlib.error, gzip.BadGzipFile) as err:
                raise parser.error(
                    parser.line_base + 1,
                    f"the gzip stream is truncated or corrupt ({err})",
                    "download the file again or re-compress it with gzip",
                ) from err
            if not block:
                break
            if at_start:
                block, at_start = block.removeprefix(_BOM), False
            if block:
                yield from parser.feed(block)
    yield from parser.finish()


def read_fasta(
    path: str | os.PathLike, *, upper: bool = True, allow_empty_records: bool = False
) -> list[tuple[str, str]]:
    """All records of a small FASTA file as ``(name, sequence)`` pairs; see :func:`iter_fasta`."""
    chunks = iter_fasta(path, upper=upper, allow_empty_records=allow_empty_records)
    return [
        (name, b"".join(c.seq.tobytes() for c in group).decode("ascii"))
        for (_, name), group in itertools.groupby(chunks, key=lambda c: (c.record, c.name))
    ]


class _Parser:
    """Incremental FASTA state machine over binary blocks; one instance per file."""

    def __init__(self, path: str, chunk_bases: int, upper: bool, allow_empty_records: bool):
        self.path = path
        self.chunk_bases = chunk_bases
        self.upper = upper
        self.allow_empty_records = allow_empty_records
        self.line_base = 0  # newlines in the blocks already consumed
        self.in_header = False
        self.at_line_start = True
        self.header_parts: list[bytes] = []
        self.header_line = 0
        self.record = -1
        self.name = self.description = ""
        self.emitted = 0  # bases of the current record already yielded
        self.pending: list[bytes] = []
        self.pending_len = 0
        self.block = b""
        self.counted_to = 0  # newlines of self.block before this offset are in self.counted
        self.counted = 0

    def error(self, line: int, what: str, fix: str) -> FastaFormatError:
        return FastaFormatError(f"{self.path}, line {line}: {what}; {fix}")

    def line_at(self, pos: int) -> int:
        """1-based line number of offset ``pos`` of the current block (``pos`` never decreases)."""
        self.counted += self.block.count(b"\n", self.counted_to, pos)
        self.counted_to = pos
        return self.line_base + self.counted + 1

    def feed(self, block: bytes) -> Iterator[FastaChunk]:
        self.block, self.counted_to, self.counted = block, 0, 0
        pos, n = 0, len(block)
        while pos < n:
            if self.in_header:
                nl = block.find(b"\n", pos)
                self.header_parts.append(block[pos : n if nl < 0 else nl])
                if nl < 0:
                    break
                self.start_record()
                pos = nl + 1
                self.at_line_start = True
            elif self.at_line_start and block[pos] == _GT:
                yield from self.end_record()
                self.header_line = self.line_at(pos)
                self.in_header = True
                pos += 1
            else:
                gt = block.find(b">", pos)
                # a '>' that does not start a line stays in the sequence and is reported there
                end = n if gt < 0 else gt if gt > pos and block[gt - 1] == _NL else gt + 1
                yield from self.sequence(block[pos:end], pos)
                self.at_line_start = block[end - 1] == _NL
                pos = end
        self.line_base += block.count(b"\n")

    def finish(self) -> Iterator[FastaChunk]:
        if self.in_header:
            self.start_record()
        if self.record < 0:
            raise self.error(
                1,
                "the file is empty (no FASTA header and no sequence)",
                "check the path, or re-create the file",
            )
        yield from self.end_record()

    def start_record(self) -> None:
        self.description = b"".join(self.header_parts).decode("utf-8", "replace").strip()
        self.name = self.description.split(maxsplit=1)[0] if self.description else ""
        self.header_parts = []
        self.in_header = False
        self.record += 1
        self.emitted = 0

    def end_record(self) -> Iterator[FastaChunk]:
        if self.record < 0:
            return
        yield from self.chunks(final=True)
        if self.emitted == 0:
            if not self.allow_empty_records:
                raise self.error(
                    self.header_line,
                    f"record {self.name!r} has a header but no sequence",
                    "remove the header, or pass allow_empty_records=True",
                )
            yield FastaChunk(
                self.record, self.name, self.description, 0, np.zeros(0, dtype=np.uint8)
            )

    def sequence(self, raw: bytes, offset: int) -> Iterator[FastaChunk]:
        """Take sequence lines ``raw`` found at ``offset`` of the current block."""
        if self.record < 0 and raw.strip():
            first = len(raw) - len(raw.lstrip())
            raise self.error(
                self.line_at(offset + first),
                "sequence data before the first '>' header line",
                "add a header line such as '>name' before the sequence",
            )
        if raw.translate(None, _SEQUENCE_OR_NEWLINE):  # \r, spaces, or invalid characters
            bad = first_invalid(raw, _WHITESPACE)
            if bad >= 0:
                raise self.error(
                    self.line_at(offset + bad),
                    f"invalid character {chr(raw[bad])!r} in the sequence of record {self.name!r}",
                    "sequence lines may hold only IUPAC nucleotide "
                    "codes (ACGTURYSWKMBDHVN, either case), '-', '*' and '.'; a "
                    "header line must start with '>'",
                )
            seq = raw.translate(None, _WHITESPACE)
        else:
            seq = raw.replace(b"\n", b"")
        if self.upper:
            seq = seq.upper()
        if not seq:
            return
        self.pending.append(seq)
        self.pending_len += len(seq)
        if self.pending_len >= self.chunk_bases:
            yield from self.chunks(final=False)

    def chunks(self, final: bool) -> Iterator[FastaChunk]:
        """Yield the pending bases as full chunks (and, if ``final``, the remainder)."""
        data = b"".join(self.pending)
        size = self.chunk_bases
        cut = len(data) if final else len(data) - len(data) % size
        for start in range(0, cut, size):
            count = min(size, cut - start)
            yield FastaChunk(
                self.record,
                self.name,
                self.description,
                self.emitted,
                np.frombuffer(data, dtype=np.uint8, count=count, offset=start),
            )
            self.emitted += count
        self.pending = [data[cut:]] if cut < len(data) else []
        self.pending_len = len(data) - cut
