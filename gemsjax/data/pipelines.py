"""grain input pipelines: random-access sources → per-process, shuffled, tokenized batches.

Every pipeline is a grain ``MapDataset`` whose elements are whole batches, so it is deterministic
given its seed and its iterator state is a small JSON (``get_state()`` / ``set_state()``, saved with
Orbax through ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``)::

    MapDataset.range(number of batches)
      .map(FetchBatch: BatchPlan(b) → rows → source[rows] → one tokenizer call)
      .to_iter_dataset(ReadOptions)

:class:`BatchPlan` does per-epoch shuffling, repetition, batching and the per-process slice of
each global batch as vectorized index arithmetic; the global batches (and the reading-frame
offsets of barcode training) do not depend on the number of processes. grain's own per-element chain
(``source → [i::n] → shuffle → repeat → batch``) costs 25-40 µs per example in grain's per-element
bookkeeping (index shuffle, stats), more than tokenizing the example; at the batch level the
pipeline runs at the speed of the vectorized tokenizer (see ``benchmarks/bench_pipeline.py``).

Batches are dicts of fixed-shape numpy ``int32`` arrays:

- pretraining: ``ids [B, L]``, ``attention [B, L]``;
- labelled: also ``labels [B]`` and ``valid [B]`` (0 on rows that only pad the last batch of an
  evaluation pass; their label is -1).

``B`` is the per-process batch (global batch / process count). Turn a host batch into global
``jax.Array``s with ``gemsjax.train.sharding.shard_batch(batch, mesh)`` (batch axis split over the
mesh axes ``("data", "fsdp")``).

Training pipelines shuffle (reshuffled every epoch) and repeat (forever by default), and drop the
last partial batch. Evaluation pipelines (``training=False``) read each example once in order;
labelled ones pad the data to whole global batches (``valid == 0`` rows), pretraining ones keep a
whole number of global batches, so every process yields the same number of batches.

:func:`make_pretraining_iterator` is the single entry the train loop calls.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from gemsjax.data import genome, genome_cache, samples, tables
from gemsjax.data.fasta import resolve_paths
from gemsjax.tokenizers import KmerTokenizer, data_tokenizer

GENOME_MAX_LEN = 512
"""DNABERT's 512 positions: [CLS] + up to 506 6-mers of a 511 bp chunk + [SEP] fit."""
BARCODE_MAX_LEN = 110
"""BarcodeMAE: 660 nt truncated / N-padded → 110 non-overlapping 6-mers."""
LABELLED_FORMATS = ("gue", "genemask", "barcode")


def dnabert_tokenizer() -> KmerTokenizer:
    """Overlapping 6-mers, DNABERT ids, ``[CLS] ... [SEP]`` (genome data)."""
    return data_tokenizer("genome")


def barcode_tokenizer(randomize_offset: bool = False, k: int = 6) -> KmerTokenizer:
    """Non-overlapping k-mers (6: BarcodeMAE, 8: BarcodeBERT-5M), BarcodeBERT ids;
    ``randomize_offset`` (a frame offset 0..k-1) for training only."""
    return data_tokenizer("barcode", k, randomize_offset=randomize_offset)


@dataclasses.dataclass(frozen=True)
class EncodeSequences:
    """Batch transform: ``list[str | bytes]`` of length B → ``{"ids", "attention"}`` int32[B, L]."""

    tokenizer: KmerTokenizer
    max_len: int

    def __call__(self, seqs: list, offsets: np.ndarray | None = None) -> dict[str, np.ndarray]:
        ids, attention = self.tokenizer.encode(_as_str(seqs), self.max_len, offsets=offsets)
        return {"ids": ids, "attention": attention}


@dataclasses.dataclass(frozen=True)
class EncodeLabelled:
    """Batch transform: B dicts ``{"sequence", "label"[, "valid"]}`` → a labelled batch.

    Returns ``ids, attention: int32[B, L]``, ``labels, valid: int32[B]`` (``valid`` defaults to 1).
    """

    tokenizer: KmerTokenizer
    max_len: int

    def __call__(
        self, rows: list[Mapping], offsets: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        ids, attention = self.tokenizer.encode(
            _as_str([r["sequence"] for r in rows]), self.max_len, offsets=offsets
        )
        labels = np.fromiter((r["label"] for r in rows), np.int32, len(rows))
        valid = np.fromiter((r.get("valid", 1) for r in rows), np.int32, len(rows))
        return {"ids": ids, "attention": attention, "labels": labels, "valid": valid}


def _as_str(seqs: Sequence) -> list[str]:
    """Sequences as ``str`` (TFDS text features and genome chunks arrive as ASCII bytes)."""
    return [s.decode("ascii") if isinstance(s, bytes) else s for s in seqs]


class TableSource:
    """A :class:`~gemsjax.data.tables.LabelledTable` as a grain source of
    ``{"sequence": str, "label": int}`` rows (the same element format as a TFDS data source)."""

    def __init__(self, table: tables.LabelledTable):
        unlabelled = np.flatnonzero(table.labels < 0)
        if unlabelled.size:
            raise ValueError(
                f"{table.source}: {unlabelled.size} rows have no label (first: row "
                f"{unlabelled[0]}); read the table with drop_empty_labels=True"
            )
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        return {"sequence": self.table.sequences[index], "label": int(self.table.labels[index])}

    def __repr__(self) -> str:
        return f"TableSource({self.table.source!r}, rows={len(self)})"


PAD_ROW = {"sequence": "", "label": -1, "valid": 0}
"""The row that fills the last batch of a padded evaluation pass."""
_ENDLESS = 2**62
"""Number of batches of an endless (``num_epochs=None``) training pipeline."""


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which source rows form batch ``b`` of this process; index arithmetic only, vectorized.

    Global batch ``b`` is ``batch_size * process_count`` rows; this process takes its
    ``process_index``-th slice of ``batch_size`` rows. The global batches do not depend on the
    number of processes, so a run on 2 hosts sees the batches of the same run on 1.

    - ``training``: epoch ``e`` is a permutation of all rows drawn from ``default_rng([seed, e])``
      (a new order every epoch); each epoch yields ``num_examples // global batch`` batches (the
      remainder is dropped); ``num_epochs`` epochs, or endless when None.
    - evaluation: one ordered pass over a whole number of global batches: the rows are padded up
      to it with ``-1`` (``pad``) or cut down to it.
    """

    num_examples: int
    batch_size: int
    training: bool
    seed: int = 0
    num_epochs: int | None = None
    process_index: int = 0
    process_count: int = 1
    pad: bool = False

    def __post_init__(self):
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(
                f"process_index={self.process_index} must be in [0, process_count="
                f"{self.process_count})"
            )
        if self.batch_size < 1 or (self.num_epochs is not None and self.num_epochs < 1):
            raise ValueError(
                f"batch_size ({self.batch_size}) and num_epochs ({self.num_epochs}) must be >= 1"
            )
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.num_examples} examples make no whole global batch of "
                f"{self.global_batch} ({self.batch_size} for each of {self.process_count} "
                "processes); lower the batch size"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.process_count

    @property
    def batches_per_epoch(self) -> int:
        if self.training or not self.pad:
            return self.num_examples // self.global_batch
        return -(-self.num_examples // self.global_batch)

    def __len__(self) -> int:
        if not self.training:
            return self.batches_per_epoch
        return self.batches_per_epoch * self.num_epochs if self.num_epochs else _ENDLESS

    def global_rows(self, batch: int) -> np.ndarray:
        """``int64[global batch]`` source rows of global batch ``batch``; ``-1`` marks padding."""
        if not 0 <= batch < len(self):
            raise IndexError(f"batch {batch} out of range for {self}")
        epoch, within = divmod(batch, self.batches_per_epoch)
        span = np.arange(within * self.global_batch, (within + 1) * self.global_batch)
        if self.training:
            return _permutation(self.num_examples, self.seed, epoch)[span]
        return np.where(span < self.num_examples, span, -1)

    def __call__(self, batch: int) -> np.ndarray:
        """``int64[batch_size]``: this process's slice of :meth:`global_rows`."""
        first = self.process_index * self.batch_size
        return self.global_rows(batch)[first : first + self.batch_size]


@functools.lru_cache(maxsize=2)
def _permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """The order of an epoch (cached: consecutive batches of an epoch share it)."""
    order = np.random.default_rng([seed, epoch]).permutation(size)
    order.setflags(write=False)
    return order


@dataclasses.dataclass(frozen=True)
class FetchBatch:
    """grain transform: batch number → the plan's source rows → one tokenizer call.

    Rows are read with the source's ``__getitems__`` when it has one (TFDS array_record sources
    read a whole batch at once), else one ``source[i]`` each.
    """

    source: Any
    plan: BatchPlan
    encode: EncodeSequences | EncodeLabelled

    def __call__(self, batch: int) -> dict:
        rows = self.plan(int(batch))
        real = rows[rows >= 0].tolist()
        getitems = getattr(self.source, "__getitems__", None)
        elements = list(getitems(real)) if getitems else [self.source[i] for i in real]
        return self.encode(elements + [PAD_ROW] * (rows.size - len(real)), self.offsets(batch))

    def offsets(self, batch: int) -> np.ndarray | None:
        """``int64[batch_size]`` reading-frame offsets of this process's rows, drawn for the
        whole global batch from ``default_rng([seed, batch])`` (so they do not depend on the
        number of processes either), or None when the tokenizer takes none."""
        tokenizer = self.encode.tokenizer
        if not tokenizer.randomize_offset:
            return None
        plan = self.plan
        drawn = np.random.default_rng([plan.seed, int(batch)]).integers(
            0, tokenizer.k, plan.global_batch
        )
        first = plan.process_index * plan.batch_size
        return drawn[first : first + plan.batch_size]


def make_batches(
    source,
    encode: EncodeSequences | EncodeLabelled,
    *,
    batch_size: int,
    training: bool,
    seed: int = 0,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    pad: bool = False,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """The generic pipeline behind every builder below.

    Args:
      source: a random-access source (``__len__``, ``__getitem__``): a list of sequences, a
        :class:`~gemsjax.data.genome.GenomeChunkSource`, a :class:`TableSource` or a TFDS
        ``data_source`` of ``{"sequence", "label"}`` dicts.
      encode: the batch transform; it gets reading-frame offsets (:meth:`FetchBatch.offsets`)
        iff its tokenizer has ``randomize_offset``.
      batch_size: per-process batch size B.
      training: shuffle every epoch and repeat (``num_epochs``, None = forever); else one ordered
        pass. See :class:`BatchPlan`.
      seed: shuffle and augmentation seed.
      process_index, process_count: this process reads its slice of each global batch of
        ``batch_size * process_count`` rows.
      pad: evaluation of labelled data: pad to whole global batches with ``valid == 0`` rows
        (otherwise evaluation keeps ``len // (B * process_count)`` global batches).
      read_options: grain read threads / prefetch (default 2 threads, 4 batches).

    Returns:
      A ``grain.IterDataset`` of batch dicts; ``iter()`` it for a checkpointable iterator.
    """
    if pad and not isinstance(encode, EncodeLabelled):
        raise ValueError(
            "pad=True needs labelled rows (EncodeLabelled): padding rows are marked by valid == 0"
        )
    plan = BatchPlan(
        len(source),
        batch_size,
        training,
        seed,
        num_epochs,
        process_index,
        process_count,
        pad and not training,
    )
    fetch = FetchBatch(source, plan, encode)
    ds = grain.MapDataset.range(len(plan)).map(fetch)
    return ds.to_iter_dataset(
        read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    )


def genome_pipeline(
    prepared_dir: str | os.PathLike,
    *,
    batch_size: int,
    split: str = "train",
    max_len: int = GENOME_MAX_LEN,
    seed: int = 0,
    corpus_seed: int = 0,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """CM-GEMS pretraining batches from a prepared genome (:func:`genome.prepare_genome`).

    ``split="train"`` shuffles and repeats; ``"validation"`` is one ordered pass. ``corpus_seed``
    fixes the chunking and the train / validation split (keep it constant across runs); ``seed``
    the order. Yields ``{"ids", "attention"}: int32[batch_size, max_len]`` (DNABERT 6-mers).
    """
    source = genome.GenomeChunkSource(prepared_dir, split=split, seed=corpus_seed)
    return make_batches(
        source,
        EncodeSequences(dnabert_tokenizer(), max_len),
        batch_size=batch_size,
        training=split == "train",
        seed=seed,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        read_options=read_options,
    )


def barcode_pipeline(
    sequences: Sequence[str],
    *,
    batch_size: int,
    training: bool,
    max_len: int = BARCODE_MAX_LEN,
    seed: int = 0,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    k: int = 6,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """BarcodeMAE pretraining batches: non-overlapping k-mers, 110 tokens (660 nt) for k = 6.

    Training draws a reading-frame offset 0..k-1 per sequence (BarcodeMAE's ``randomize_offset``);
    evaluation does not. Yields ``{"ids", "attention"}: int32[batch_size, max_len]``.
    """
    return make_batches(
        list(sequences),
        EncodeSequences(barcode_tokenizer(training, k), max_len),
        batch_size=batch_size,
        training=training,
        seed=seed,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        read_options=read_options,
    )


def labelled_pipeline(
    data: tables.LabelledTable | Any,
    *,
    vocab: str,
    batch_size: int,
    max_len: int,
    training: bool,
    k: int = 6,
    seed: int = 0,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Classification batches from a labelled table or a TFDS data source.

    Args:
      data: a :class:`~gemsjax.data.tables.LabelledTable` or any random-access source of
        ``{"sequence": str | bytes, "label": int}`` (e.g. ``tfds.data_source(...)``).
      vocab: ``"dnabert"`` (GUE, GeneMask: overlapping 6-mers with CLS/SEP) or ``"barcodebert"``
        (barcodes: non-overlapping ``k``-mers, random offset when training).
      k: the barcode k-mer length (6; 8 for BarcodeBERT-5M); DNABERT's is always 6.
      training: shuffle, repeat ``num_epochs`` (None = forever), random offsets; else one ordered
        pass padded to whole global batches.

    Yields:
      ``ids, attention: int32[B, max_len]``, ``labels, valid: int32[B]``.
    """
    if vocab not in ("dnabert", "barcodebert"):
        raise ValueError(f"vocab must be 'dnabert' or 'barcodebert', got {vocab!r}")
    source = TableSource(data) if isinstance(data, tables.LabelledTable) else data
    tokenizer = dnabert_tokenizer() if vocab == "dnabert" else barcode_tokenizer(training, k)
    return make_batches(
        source,
        EncodeLabelled(tokenizer, max_len),
        batch_size=batch_size,
        training=training,
        seed=seed,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        pad=not training,
        read_options=read_options,
    )


def read_labelled(
    path: str | os.PathLike,
    fmt: str,
    *,
    label_column: str = "species_name",
    splits: Sequence[str] | None = None,
) -> tables.LabelledTable:
    """Read a labelled file: ``fmt`` is ``"gue"`` (CSV), ``"genemask"`` (6-mer TSV) or
    ``"barcode"`` (BOLD / BIOSCAN-5M TSV; ``label_column`` and ``splits`` apply; as in BarcodeMAE,
    duplicate sequences are dropped over the whole file and label indices are shared by all its
    splits; rows without a label are dropped)."""
    if fmt == "gue":
        return tables.read_gue_csv(path)
    if fmt == "genemask":
        return tables.read_genemask_tsv(path)
    if fmt == "barcode":
        return tables.read_barcode_tsv(
            path, (label_column,), splits=splits, deduplicate=True, drop_empty_labels=True
        )[label_column]
    raise ValueError(f"unknown labelled format {fmt!r}; valid: {LABELLED_FORMATS}")


def fasta_paths(value: Any) -> list[pathlib.Path]:
    """``config.data.fasta`` as paths: one path, a list of paths, or empty for the shipped
    chr22 sample."""
    return resolve_paths(value or samples.sample_path(samples.GENOME))


def corpus_report(config: Mapping) -> dict[str, int] | None:
    """Base counts of a genome run's prepared corpus (:func:`genome.report`: kept bases, ``U``
    read as ``T``, ``N`` and other characters deleted; warnings logged), None for barcodes."""
    data = config["data"]
    if data["kind"] != "genome":
        return None
    fasta = fasta_paths(data["fasta"])
    prepared = data["prepared_dir"] or genome_cache.cache_dir(fasta)
    return genome.report(genome.load_manifest(prepared))


def make_pretraining_iterator(
    config: Mapping,
    split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """The pretraining data iterator for the train loop (checkpoint it with the train state).

    Reads the ``config.data`` keys of a validated config (:func:`gemsjax.config.validate`
    documents their ranges, the config files their meaning): ``kind``, ``batch_size`` (global; must
    divide by ``process_count``), ``max_len``, ``seed``, ``num_threads``, ``prefetch``; for
    genomes ``fasta`` (empty: the shipped chr22 sample), ``prepared_dir`` (empty:
    :func:`genome_cache.cache_dir`; prepared on first use, checked and rebuilt if damaged on every
    use) and ``corpus_seed``; for barcodes ``tsv`` (empty: the shipped BOLD sample), ``k``
    (k-mer length) and ``train_splits`` / ``validation_splits`` (values of the file's ``split``
    column; duplicate sequences are dropped over the whole file, as in BarcodeMAE).

    Args:
      split: ``"train"`` (shuffled, endless) or ``"validation"`` (one ordered pass).
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.

    Returns:
      A grain iterator of ``{"ids", "attention"}: int32[batch_size // process_count, max_len]``.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    data = config["data"]
    if data["batch_size"] % process_count:
        raise ValueError(
            f"config.data.batch_size={data['batch_size']} is not divisible by the "
            f"{process_count} processes"
        )
    if split not in genome.SPLITS:
        raise ValueError(f"split must be one of {genome.SPLITS}, got {split!r}")
    common = dict(
        batch_size=data["batch_size"] // process_count,
        seed=data["seed"],
        max_len=data["max_len"],
        process_index=process_index,
        process_count=process_count,
        read_options=grain.ReadOptions(
            num_threads=data["num_threads"], prefetch_buffer_size=data["prefetch"]
        ),
    )
    if data["kind"] == "genome":
        fasta = fasta_paths(data["fasta"])
        prepared = genome_cache.prepared_genome(fasta, data["prepared_dir"])
        ds = genome_pipeline(prepared, split=split, corpus_seed=data["corpus_seed"], **common)
    elif data["kind"] == "barcode":
        table = tables.read_barcode_tsv(
            data["tsv"] or samples.sample_path(samples.BARCODES),
            ("species_name",),
            splits=tuple(data[f"{split}_splits"]),
            deduplicate=True,
        )["species_name"]
        ds = barcode_pipeline(table.sequences, training=split == "train", k=data["k"], **common)
    else:
        raise ValueError(f"config.data.kind={data['kind']!r}: expected 'genome' or 'barcode'")
    return iter(ds)
