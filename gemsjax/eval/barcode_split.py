"""A deterministic, species-level split of a labelled barcode table for the BarcodeMAE protocol.

BIOSCAN-5M ships its split; a BOLD download (e.g. ``../shared/data/bold_insect_coi_barcodes``)
has none. :func:`assign_splits` makes one with BIOSCAN-5M's split names, so that
:func:`gemsjax.data.tables.read_barcode_tsv` reads the result like BIOSCAN-5M:

1. rows: the table's rows after BarcodeMAE's preprocessing (gaps and trailing N removed, then
   duplicate sequences dropped, the first row in file order kept); rows without a species or
   genus name are ``pretrain`` (unlabelled data);
2. ``test_unseen``: in every genus with at least ``min_genus_species`` species (3 by default),
   ``max(1, floor(n * unseen_fraction))`` of its ``n`` species are held out whole (all their
   rows), drawn with ``numpy.random.default_rng(seed)`` from the sorted species names, genera in
   sorted order; so every unseen species has at least two seen species of its genus;
3. every other species, in sorted order: its rows permuted by the same generator, the first
   ``max(1, round(n * train_fraction))`` are ``train`` (the 1-NN keys and the classifiers'
   training set), the next ``round(n * test_fraction)`` (at most what is left) ``test``, the
   rest ``pretrain``. Unseen species never reach ``pretrain``.

:func:`write_split` writes the table with a ``split`` column appended (all original columns
unchanged, deduplicated rows only) as gzip with mtime 0, plus ``split.json`` (parameters, counts,
SHA-256 of the input and of the assignment), so every arm reads the same file:

    python -m gemsjax.eval.barcode_split \
        ../shared/data/bold_insect_coi_barcodes/insect_coi_barcodes.tsv.gz runs/bold_split

The shipped sample ``bold_coi_sample.tsv.gz`` has its own ``split`` column (pretrain / train /
val / test over 100 species, no unseen species); :func:`held_out_species` applied to it, with
``min_genus_species=2`` (it has only two genera with three species), gives its unseen species:
see :func:`gemsjax.eval.barcodes.load_barcode_sets`.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import os
import pathlib

import numpy as np

from gemsjax.data import tables

SPLITS = ("pretrain", "train", "test", "test_unseen")
DEFAULTS = dict(
    seed=0, min_genus_species=3, unseen_fraction=1 / 3, train_fraction=0.3, test_fraction=0.2
)


def held_out_species(
    species: np.ndarray,
    genus: np.ndarray,
    *,
    seed: int = 0,
    min_genus_species: int = 3,
    unseen_fraction: float = 1 / 3,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Species held out whole: ``int[S]`` sorted species indices.

    Args:
      species, genus: ``int[N]`` label indices per row (``-1``: unlabelled, ignored); species
        indices are in sorted-name order (as :func:`read_barcode_tsv` makes them).
      min_genus_species: only genera with at least this many species lose any.
      unseen_fraction: each such genus loses ``max(1, floor(n * unseen_fraction))`` species.
      rng: the generator to draw from (default ``default_rng(seed)``).
    """
    rng = np.random.default_rng(seed) if rng is None else rng
    labelled = (species >= 0) & (genus >= 0)
    pairs = np.unique(np.stack([genus[labelled], species[labelled]], axis=1), axis=0)
    held = []
    for g in np.unique(pairs[:, 0]):
        members = pairs[pairs[:, 0] == g, 1]  # sorted species of genus g
        if len(members) >= min_genus_species:
            count = max(1, int(len(members) * unseen_fraction))
            held.extend(rng.choice(members, count, replace=False).tolist())
    return np.sort(np.asarray(held, np.int64))


def assign_splits(
    species: np.ndarray,
    genus: np.ndarray,
    *,
    seed: int = 0,
    min_genus_species: int = 3,
    unseen_fraction: float = 1 / 3,
    train_fraction: float = 0.3,
    test_fraction: float = 0.2,
) -> np.ndarray:
    """``str[N]`` split names (:data:`SPLITS`) per row; see the module docstring.

    ``species, genus: int[N]`` label indices (``-1`` unlabelled)."""
    species, genus = np.asarray(species), np.asarray(genus)
    rng = np.random.default_rng(seed)
    unseen = held_out_species(
        species,
        genus,
        min_genus_species=min_genus_species,
        unseen_fraction=unseen_fraction,
        rng=rng,
    )
    out = np.full(len(species), "pretrain", dtype=object)
    labelled = (species >= 0) & (genus >= 0)
    out[labelled & np.isin(species, unseen)] = "test_unseen"
    seen = labelled & ~np.isin(species, unseen)
    order = np.argsort(species, kind="stable")
    order = order[seen[order]]
    bounds = np.flatnonzero(np.diff(species[order])) + 1
    for rows in np.split(order, bounds):
        rows = rng.permutation(rows)
        n_train = max(1, round(len(rows) * train_fraction))
        n_test = min(round(len(rows) * test_fraction), len(rows) - n_train)
        out[rows[:n_train]] = "train"
        out[rows[n_train : n_train + n_test]] = "test"
    return out.astype(str)


def write_split(tsv: str | os.PathLike, out_dir: str | os.PathLike, **params) -> dict:
    """Split ``tsv`` (BOLD or BIOSCAN-5M columns, see :func:`read_barcode_tsv`) and write
    ``<name>.split.tsv.gz`` and ``split.json`` into ``out_dir``; returns the ``split.json`` dict.

    ``params`` override :data:`DEFAULTS`. The input must not have a ``split`` column already."""
    params = DEFAULTS | params
    tsv, out_dir = pathlib.Path(tsv), pathlib.Path(out_dir)
    with tables.DelimitedReader(tsv, "\t") as reader:
        header = reader.header
    if "split" in header:
        raise tables.TableFormatError(
            f"{tsv}, line 1: the table already has a 'split' column; "
            "evaluate it as it is, or remove the column to re-split"
        )
    labels = tables.read_barcode_tsv(
        tsv, ("species_name", "genus_name"), extra_columns=header, deduplicate=True
    )
    columns = labels["species_name"].extra
    splits = assign_splits(labels["species_name"].labels, labels["genus_name"].labels, **params)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = tsv.name.removesuffix(".gz").rsplit(".", 1)[0]
    out = out_dir / f"{name}.split.tsv.gz"
    assignment = hashlib.sha256()
    first = columns[header[0]]
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        writer = csv.writer(_Text(gz), delimiter="\t", lineterminator="\n")
        writer.writerow([*header, "split"])
        for row, split in enumerate(splits):
            writer.writerow([*(columns[c][row] for c in header), split])
            assignment.update(f"{first[row]}\t{split}\n".encode())
    names, counts = np.unique(splits, return_counts=True)
    species = labels["species_name"].labels
    summary = dict(
        input=tsv.name,
        input_sha256=_sha256(tsv),
        output=out.name,
        assignment_sha256=assignment.hexdigest(),
        params=params,
        rows=dict(zip(names.tolist(), counts.tolist(), strict=True)),
        species={s: int(np.unique(species[(splits == s) & (species >= 0)]).size) for s in SPLITS},
    )
    (out_dir / "split.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


class _Text:
    """A text ``write`` onto a binary gzip stream (csv.writer needs ``write(str)``)."""

    def __init__(self, binary):
        self._binary = binary

    def write(self, text: str) -> int:
        return self._binary.write(text.encode("utf-8"))


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tsv", help="BOLD or BIOSCAN-5M barcode TSV (plain or gzip)")
    parser.add_argument("out_dir", help="folder for <name>.split.tsv.gz and split.json")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key}", type=type(value), default=value)
    args = parser.parse_args(argv)
    params = {key: getattr(args, key) for key in DEFAULTS}
    print(json.dumps(write_split(args.tsv, args.out_dir, **params), indent=1))


if __name__ == "__main__":
    main()
