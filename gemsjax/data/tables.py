"""Labelled sequence tables: GUE CSV, GeneMask / DNABERT k-mer TSV, BOLD and BIOSCAN-5M barcodes.

Every reader returns :class:`LabelledTable` (the barcode reader one per label column) and reads
through :class:`DelimitedReader`, which opens plain or gzip files (by magic bytes), finds columns
by name and reports bad rows by file and line. Sequences are checked against the IUPAC nucleotide
alphabet in one vectorized pass per table.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import hashlib
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from gemsjax.data.rawio import first_invalid, open_text
from gemsjax.errors import UserError
from gemsjax.tokenizers import kmer_text_to_sequence

BIOSCAN5M_SPLITS = (
    "pretrain",
    "train",
    "val",
    "test",
    "key_unseen",
    "val_unseen",
    "test_unseen",
    "other_heldout",
)
"""The values of the BIOSCAN-5M ``split`` column."""

BARCODEMAE_PARTITIONS = {
    "pretrain": ("pretrain", "other_heldout"),
    "train": ("train",),
    "val": ("val",),
    "test": ("test",),
    "unseen": ("test_unseen",),
}
"""BarcodeMAE's data files (``data_split.py``) as unions of BIOSCAN-5M ``split`` values; pass
``splits=BARCODEMAE_PARTITIONS["pretrain"]`` to :func:`read_barcode_tsv`."""

_RENAMED = {"dna_bin": "bin_uri", "dna_barcode": "nucleotides"}
_RENAMED.update({bold: bioscan for bioscan, bold in _RENAMED.items()})


class TableFormatError(UserError):
    """A table that cannot be read; the message names the file, the line and the fix."""


@dataclasses.dataclass(frozen=True, repr=False)
class LabelledTable:
    """Sequences with one categorical label each.

    Attributes:
      sequences: ``N`` nucleotide strings.
      labels: ``int32[N]`` indices into ``label_names``; ``-1`` where the row has no label.
      label_names: index → category name.
      source: the file the table was read from.
      extra: further per-row columns by name (each of length ``N``), e.g. ``"split"``.
    """

    sequences: list[str]
    labels: np.ndarray
    label_names: tuple[str, ...]
    source: str
    extra: dict[str, np.ndarray | list] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sequences)

    def __repr__(self) -> str:
        return (
            f"LabelledTable({len(self)} rows, {len(self.label_names)} labels, "
            f"extra={sorted(self.extra)}, source={self.source!r})"
        )


class DelimitedReader:
    """Rows of a CSV / TSV file, plain or gzip, with 1-based line numbers; use with ``with``.

    The first line is the header. :meth:`column` finds a column by any of its accepted names,
    :meth:`rows` yields ``(line, fields)`` and checks each row's field count; blank lines are
    skipped. Every problem is raised as :class:`TableFormatError` naming the file and line.
    """

    def __init__(self, path: str | os.PathLike, delimiter: str):
        self.path = os.fspath(path)
        self._file = open_text(path)
        self._reader = csv.reader(self._file, delimiter=delimiter)
        self.row_start = 1  # the line the last row read began on
        try:
            header = self._next_row()
            if not header:
                raise self.error(
                    1, "the file is empty (no header line)", "check the path, or re-create the file"
                )
        except TableFormatError:
            self._file.close()
            raise
        self.header = [name.strip().lstrip("\ufeff") for name in header]

    def __enter__(self) -> DelimitedReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self._file.close()

    def error(self, line: int, what: str, fix: str) -> TableFormatError:
        return TableFormatError(f"{self.path}, line {line}: {what}; {fix}")

    def column(self, *names: str, required: bool = True) -> int | None:
        """Index of the first of ``names`` present in the header (None if absent and optional)."""
        for name in names:
            if name in self.header:
                return self.header.index(name)
        if not required:
            return None
        accepted = " or ".join(repr(n) for n in names)
        raise self.error(
            1,
            f"missing required column {accepted}; found columns {self.header}",
            "check the header line and the delimiter (tab for .tsv, comma for .csv)",
        )

    def rows(self) -> Iterator[tuple[int, list[str]]]:
        """``(line, fields)`` for each data row, ``len(fields) == len(self.header)``; ``line`` is
        where the row begins."""
        while (fields := self._next_row()) is not None:
            if not fields:
                continue
            if len(fields) != len(self.header):
                raise self.error(
                    self.row_start,
                    f"{len(fields)} fields, but the header has {len(self.header)}" + self._run_on(),
                    "look for a stray delimiter or an unbalanced quote on this line",
                )
            yield self.row_start, fields

    def _run_on(self) -> str:
        """Words for a row that runs past its first line (a quote opened and never closed)."""
        end = self._reader.line_num
        return (
            (
                f" (the row runs on to line {end}: an unbalanced '\"' on line {self.row_start} "
                "joins the lines after it)"
            )
            if end > self.row_start
            else ""
        )

    def _next_row(self) -> list[str] | None:
        self.row_start = self._reader.line_num + 1
        try:
            return next(self._reader, None)
        except csv.Error as err:
            if "field larger than field limit" in str(err) and not self._run_on():
                raise self.error(
                    self.row_start,
                    f"a field is longer than {csv.field_size_limit():,} characters",
                    "no barcode or task sequence is that long: remove the row or shorten the field",
                ) from err
            raise self.error(
                self.row_start,
                f"unreadable row ({err}){self._run_on()}",
                "fix the quoting on this line",
            ) from err
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            raise self.error(
                self._reader.line_num + 1,
                f"the gzip stream is truncated or corrupt ({err})",
                "download the file again or re-compress it with gzip",
            ) from err


def read_gue_csv(path: str | os.PathLike) -> LabelledTable:
    """A GUE (DNABERT-2) task file: CSV with header ``sequence,label`` and integer labels."""
    return _read_integer_labelled(path, ",", lambda text: text.strip())


def read_genemask_tsv(path: str | os.PathLike) -> LabelledTable:
    """A GeneMask few-shot / DNABERT fine-tuning TSV: header ``sequence<TAB>label``.

    Sequences are written as space-separated overlapping k-mers and are returned as the raw
    sequence. Fields may be wrapped in ``"`` (the GeneMask train files are, the test files are
    not); the quotes are removed, unlike in DNABERT's own reader.
    """
    return _read_integer_labelled(path, "\t", kmer_text_to_sequence)


def read_barcode_tsv(
    path: str | os.PathLike,
    label_columns: Sequence[str] = ("species_name",),
    *,
    splits: Iterable[str] | None = None,
    extra_columns: Sequence[str] = (),
    strip_gaps: bool = True,
    strip_trailing_n: bool = True,
    deduplicate: bool = False,
    drop_empty_labels: bool = False,
    delimiter: str = "\t",
) -> dict[str, LabelledTable]:
    """DNA barcodes from a BOLD TSV or the BIOSCAN-5M metadata TSV.

    Column names are accepted in either scheme: BIOSCAN-5M ``dna_barcode``, ``dna_bin``,
    ``species``, ``genus``, ... or BOLD ``nucleotides``, ``bin_uri``, ``species_name``,
    ``genus_name``, ...

    Processing, in BarcodeMAE's order (``data_split.py``):

    1. label indices: for each label column, the sorted distinct non-empty names over **all rows
       of the file**, so that tables read with different ``splits`` share the same indices;
       rows with an empty label get ``-1``;
    2. sequences: gaps ``-`` removed (``strip_gaps``), trailing ``N`` removed
       (``strip_trailing_n``);
    3. ``deduplicate``: keep only the first row (in file order, over all splits) of each sequence;
    4. ``drop_empty_labels``: drop rows whose label is empty in any of ``label_columns``;
    5. ``splits``: keep rows whose ``split`` value is one of these (BIOSCAN-5M names such as
       ``"train"``; see :data:`BARCODEMAE_PARTITIONS`). A name that is neither in the file nor a
       BIOSCAN-5M split, or a selection with no rows, is an error.

    Args:
      path: the TSV (plain or gzip).
      label_columns: one table is returned per label column.
      splits: split values to keep; None keeps all rows.
      extra_columns: more columns to carry along as ``extra[name]`` (lists of strings).

    Returns:
      ``{label column (as passed): LabelledTable}``. The tables hold the same rows and share one
      ``sequences`` list and one ``extra`` dict, which has ``"split"`` when the file has a split
      column.

    Raises:
      TableFormatError: a missing column, a bad row, an empty sequence or invalid characters (the
        message names the file and line), or a bad ``splits`` selection.
    """
    keep_splits = None if splits is None else frozenset(splits)
    with DelimitedReader(path, delimiter) as reader:
        seq_col = reader.column("nucleotides", "dna_barcode")
        label_cols = [reader.column(*_aliases(name)) for name in label_columns]
        extra_cols = [reader.column(*_aliases(name)) for name in extra_columns]
        split_col = reader.column("split", required=keep_splits is not None)
        names: list[set[str]] = [set() for _ in label_columns]
        split_values: set[str] = set()
        dropped = collections.Counter()  # (split, reason) -> rows; explains an empty selection
        seen: set[bytes] = set()
        lines, sequences, labels, extras, row_splits = [], [], [], [], []
        for line, fields in reader.rows():
            row_labels = [fields[c].strip() for c in label_cols]
            for found, value in zip(names, row_labels, strict=True):
                found.add(value)
            split = "" if split_col is None else fields[split_col].strip()
            split_values.add(split)
            seq = fields[seq_col].strip()
            if strip_gaps:
                seq = seq.replace("-", "")
            if strip_trailing_n:
                seq = seq.rstrip("Nn")
            if deduplicate:
                key = hashlib.blake2b(seq.encode(), digest_size=16).digest()
                if key in seen:
                    dropped[split, "duplicates of earlier sequences (deduplicate=True)"] += 1
                    continue
                seen.add(key)
            if drop_empty_labels and not all(row_labels):
                dropped[split, "empty labels (drop_empty_labels=True)"] += 1
                continue
            if keep_splits is not None and split not in keep_splits:
                continue
            lines.append(line)
            sequences.append(seq)
            labels.append(row_labels)
            extras.append([fields[c] for c in extra_cols])
            row_splits.append(split)
    if keep_splits is not None:
        unknown = keep_splits - split_values - set(BIOSCAN5M_SPLITS)
        reasons = collections.Counter()
        for (split, reason), count in dropped.items():
            if split in keep_splits:
                reasons[reason] += count
        if not unknown and not sequences and reasons:
            raise TableFormatError(
                f"{os.fspath(path)}: every row of split(s) {sorted(keep_splits)} was dropped ("
                + ", ".join(f"{n} as {why}" for why, n in reasons.items())
                + "); select other "
                "splits, or a file whose rows in them are distinct and labelled"
            )
        if unknown or not sequences:
            raise TableFormatError(
                f"{os.fspath(path)}: no rows in split(s) "
                f"{sorted(unknown or keep_splits)}; the 'split' column holds "
                f"{sorted(split_values)}; pass splits from that list"
            )
    _check_sequences(os.fspath(path), sequences, lines)
    extra: dict[str, np.ndarray | list] = {
        name: [row[j] for row in extras] for j, name in enumerate(extra_columns)
    }
    if split_col is not None:
        extra["split"] = row_splits
    tables = {}
    for j, column in enumerate(label_columns):
        label_names = tuple(sorted(names[j] - {""}))
        index = {name: i for i, name in enumerate(label_names)} | {"": -1}
        tables[column] = LabelledTable(
            sequences=sequences,
            labels=np.fromiter((index[row[j]] for row in labels), np.int32, len(labels)),
            label_names=label_names,
            source=os.fspath(path),
            extra=extra,
        )
    return tables


def _aliases(column: str) -> tuple[str, ...]:
    """The names a column may have in BOLD or BIOSCAN-5M (``species`` ↔ ``species_name``)."""
    if column in _RENAMED:
        return column, _RENAMED[column]
    if column.endswith("_name"):
        return column, column.removesuffix("_name")
    return column, f"{column}_name"


def _read_integer_labelled(
    path: str | os.PathLike, delimiter: str, to_sequence: Callable[[str], str]
) -> LabelledTable:
    """Rows ``sequence, label`` with integer labels; ``to_sequence`` maps the sequence field.
    ``extra["line"]`` holds each row's 1-based line number in the file."""
    lines, sequences, labels = [], [], []
    with DelimitedReader(path, delimiter) as reader:
        seq_col, label_col = reader.column("sequence"), reader.column("label")
        for line, fields in reader.rows():
            label = fields[label_col].strip()
            if not (label.isascii() and label.isdigit()):
                raise reader.error(
                    line,
                    f"label {label!r} is not a non-negative integer",
                    "labels must be class indices 0, 1, 2, ...",
                )
            try:
                sequences.append(to_sequence(fields[seq_col]))
            except ValueError as err:
                raise reader.error(
                    line,
                    f"bad k-mer sequence field ({err})",
                    "write the sequence as overlapping k-mers separated by single spaces",
                ) from err
            labels.append(int(label))
            lines.append(line)
    _check_sequences(os.fspath(path), sequences, lines)
    labels_array = np.asarray(labels, dtype=np.int32)
    n_classes = int(labels_array.max()) + 1 if len(labels) else 0
    return LabelledTable(
        sequences=sequences,
        labels=labels_array,
        label_names=tuple(str(i) for i in range(n_classes)),
        source=os.fspath(path),
        extra={"line": np.asarray(lines, np.int64)},
    )


def _check_sequences(path: str, sequences: list[str], lines: list[int]) -> None:
    """Raise naming the line of the first empty sequence or the first invalid character."""
    lengths = np.fromiter(map(len, sequences), np.int64, len(sequences))
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise TableFormatError(
            f"{path}, line {lines[empty[0]]}: empty sequence (after removing "
            "gaps and trailing N where asked); remove the row or fix it"
        )
    bad = first_invalid("".join(sequences).encode("latin-1", "replace"))
    if bad >= 0:
        ends = np.cumsum(lengths)
        row = int(np.searchsorted(ends, bad, side="right"))
        column = bad - (int(ends[row - 1]) if row else 0)
        char = sequences[row][column]
        raise TableFormatError(
            f"{path}, line {lines[row]}: invalid character {char!r} at position "
            f"{column + 1} of the sequence; sequences may hold only IUPAC "
            "nucleotide codes (ACGTURYSWKMBDHVN, either case), '-', '*' and "
            "'.'"
        )
