"""Labelled splits for fine-tuning: reading with checks, stratified draws, token lengths.

Everything a protocol needs between the table readers (:mod:`gemsjax.data.tables`) and the
fine-tuning loop, with every user mistake raised as :class:`~gemsjax.errors.UserError` naming
the file, the line or class, and the fix: a missing or empty split, labels outside the task's
classes, a class with fewer rows than the shots asked for.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from gemsjax.data import pipelines, tables
from gemsjax.errors import UserError

VOCAB_OF_FORMAT = {"gue": "dnabert", "genemask": "dnabert", "barcode": "barcodebert"}
_K = 6


def read_split(path: str | os.PathLike, fmt: str) -> tables.LabelledTable:
    """A labelled file (``fmt``: ``gue`` CSV, ``genemask`` 6-mer TSV); an empty one is refused."""
    if not os.path.isfile(path):
        raise UserError(f"{os.fspath(path)}: no such file; check the path in the config")
    table = pipelines.read_labelled(path, fmt)
    if len(table) == 0:
        raise UserError(
            f"{os.fspath(path)}: the split is empty (a header and no rows); add rows "
            "or point the config at another file"
        )
    return table


def row_line(table: tables.LabelledTable, row: int) -> str:
    """``"line N"`` of a table row when the reader kept line numbers, else ``"data row N"``."""
    lines = table.extra.get("line")
    return f"line {int(lines[row])}" if lines is not None else f"data row {row + 1}"


def check_labels(table: tables.LabelledTable, num_labels: int, what: str) -> None:
    """Refuse labels outside ``[0, num_labels)``, naming the first such row."""
    bad = np.flatnonzero((table.labels < 0) | (table.labels >= num_labels))
    if bad.size:
        row = int(bad[0])
        raise UserError(
            f"{table.source}, {row_line(table, row)}: label {table.labels[row]} is "
            f"outside the {num_labels} classes 0..{num_labels - 1} of the {what} "
            f"({bad.size} such rows); fix the labels or set num_labels"
        )


def num_labels_of(*splits: tables.LabelledTable | None) -> int:
    """Classes of a task: one more than the largest label over its splits."""
    return max(int(s.labels.max()) + 1 for s in splits if s is not None)


def subset(table: tables.LabelledTable, rows: np.ndarray) -> tables.LabelledTable:
    """The rows ``rows`` of ``table`` (in that order), per-row extras included."""
    rows = np.asarray(rows, np.int64)
    extra = {
        name: (np.asarray(v)[rows] if isinstance(v, np.ndarray) else [v[i] for i in rows])
        for name, v in table.extra.items()
    }
    return dataclasses.replace(
        table, sequences=[table.sequences[i] for i in rows], labels=table.labels[rows], extra=extra
    )


def stratified_draw(
    table: tables.LabelledTable, shots: int, seed: int, num_labels: int
) -> np.ndarray:
    """``int64[num_labels * shots]`` rows: ``shots`` of each class without replacement, drawn
    with ``default_rng(seed)`` (a new seed gives a new draw), in class order then draw order.

    Raises UserError when a class has fewer than ``shots`` rows, naming the class."""
    rng = np.random.default_rng(seed)
    picked = []
    for label in range(num_labels):
        members = np.flatnonzero(table.labels == label)
        if members.size < shots:
            raise UserError(
                f"{table.source}: class {label} has {members.size} rows, fewer than "
                f"the {shots} shots asked for; lower the shots or use a larger train "
                "file"
            )
        picked.append(rng.choice(members, shots, replace=False))
    return np.concatenate(picked)


def stratified_subsample(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """``int64[size]`` sorted rows keeping each class's share (largest remainders get the extra
    rows), drawn with ``default_rng(seed)``; all rows when ``size`` >= their number."""
    labels = np.asarray(labels)
    if size >= labels.size:
        return np.arange(labels.size)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / labels.size
    take = np.floor(exact).astype(np.int64)
    take[np.argsort(take - exact)[: size - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    rows = [
        rng.choice(np.flatnonzero(labels == c), n, replace=False)
        for c, n in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(rows))


def tokens_needed(sequences: list[str], vocab: str, k: int = 6) -> np.ndarray:
    """``int64[N]`` tokens each sequence needs untruncated: ``[CLS]`` + overlapping 6-mers +
    ``[SEP]`` (dnabert), or whole non-overlapping k-mers (barcodebert)."""
    lengths = np.fromiter(map(len, sequences), np.int64, len(sequences))
    if vocab == "dnabert":
        return np.maximum(lengths - _K + 1, 0) + 2
    return lengths // k


def choose_max_len(requested: int, needed: np.ndarray, max_positions: int) -> int:
    """Tokens per row: ``requested``, or when 0 the longest ``needed`` rounded up to a multiple
    of 8; never more than the model's ``max_positions`` (longer rows are truncated)."""
    if requested < 0:
        raise UserError(f"max_len={requested}; use 0 (from the data) or a positive length")
    length = requested or int(-(-needed.max() // 8) * 8)
    return min(length, max_positions)


def truncated(needed: np.ndarray, max_len: int) -> int:
    """How many rows lose tokens at ``max_len``."""
    return int((needed > max_len).sum())
