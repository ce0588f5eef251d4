"""Benchmark: grain input pipelines (gemsjax.data.pipelines) vs a naive per-example pipeline.

Both run on one core (the process is pinned to one CPU; grain reads in the main thread,
``ReadOptions(num_threads=0)``), on the data shipped in ``gemsjax/data/samples``:

- ``genome``: CM-GEMS pretraining batches of 250 x 512 from the chr22 sample (prepared into a
  temporary directory): shuffled GeneMask chunks (6-511 bp), DNABERT overlapping 6-mers.
- ``barcode``: BarcodeMAE pretraining batches of 128 x 110 from the BOLD sample (4,000 barcodes,
  duplicates dropped): random reading-frame offset, non-overlapping 6-mers, 660 nt.

The baseline does the same work one example at a time in Python, as a torch ``Dataset`` +
collator would: shuffle the chunk list, slice the genome string, look every k-mer up in a dict,
pad lists, stack with ``np.array``. Its output is checked against ``KmerTokenizer`` first.

Run: ``python benchmarks/bench_pipeline.py [--seconds 5]``; prints sequences/s and the ratio.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import sys
import tempfile
import time

import grain
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from gemsjax.data import genome, pipelines, samples, tables  # noqa: E402
from gemsjax.vocab import get_vocab  # noqa: E402

ONE_THREAD = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def rate(batches, batch_size: int, seconds: float) -> float:
    """Sequences per second drawn from the iterator ``batches`` during about ``seconds``."""
    next(batches)  # warm-up
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        next(batches)
        n += 1
    return n * batch_size / elapsed


def kmer_dict(name: str) -> dict[str, int]:
    vocab = get_vocab(name, 6)
    return {kmer: i + vocab.num_specials for i, kmer in enumerate(vocab.kmer_strings())}


def naive_genome_batches(
    source: genome.GenomeChunkSource, batch_size: int, max_len: int, seed: int
):
    """Per-example reference: shuffled chunk list, string slices, one dict lookup per k-mer."""
    text = source.bases().tobytes().decode("ascii")
    chunks = list(zip(source.starts.tolist(), source.lengths.tolist(), strict=True))
    ids_of = kmer_dict("dnabert")
    shuffler = random.Random(seed)
    while True:
        order = list(range(len(chunks)))
        shuffler.shuffle(order)
        for lo in range(0, len(order) - batch_size + 1, batch_size):
            rows, masks = [], []
            for i in order[lo : lo + batch_size]:
                start, length = chunks[i]
                seq = text[start : start + length]
                tokens = [2] + [ids_of.get(seq[j : j + 6], 1) for j in range(len(seq) - 5)]
                tokens = tokens[: max_len - 1] + [3]
                masks.append([1] * len(tokens) + [0] * (max_len - len(tokens)))
                rows.append(tokens + [0] * (max_len - len(tokens)))
            yield {"ids": np.array(rows, np.int32), "attention": np.array(masks, np.int32)}


def naive_barcode_batches(seqs: list[str], batch_size: int, max_len: int, seed: int):
    """Per-example reference for barcodes: random offset, N-padding, one dict lookup per k-mer."""
    ids_of = kmer_dict("barcodebert")
    shuffler = random.Random(seed)
    n_bases = max_len * 6
    while True:
        order = list(range(len(seqs)))
        shuffler.shuffle(order)
        for lo in range(0, len(order) - batch_size + 1, batch_size):
            rows, masks = [], []
            for i in order[lo : lo + batch_size]:
                seq = seqs[i][shuffler.randrange(6) :][:n_bases]
                n_full = len(seq) // 6
                seq = seq + "N" * (n_bases - len(seq))
                rows.append([ids_of.get(seq[j : j + 6], 1) for j in range(0, n_bases, 6)])
                masks.append([1] * n_full + [0] * (max_len - n_full))
            yield {"ids": np.array(rows, np.int32), "attention": np.array(masks, np.int32)}


def check_baseline_tokens(genome_source, barcode_seqs) -> None:
    """The baselines produce the tokenizer's ids (offset 0 for barcodes), so the work is equal."""
    chunks = [genome_source[i] for i in range(8)]
    ids, attention = pipelines.dnabert_tokenizer().encode(chunks, 512)
    ids_of = kmer_dict("dnabert")
    for row, mask, seq in zip(ids, attention, chunks, strict=True):
        tokens = [2] + [ids_of.get(seq[j : j + 6], 1) for j in range(len(seq) - 5)] + [3]
        assert row[: len(tokens)].tolist() == tokens and mask.sum() == len(tokens)
    ids, _ = pipelines.barcode_tokenizer().encode(barcode_seqs[:8], 110)
    ids_of = kmer_dict("barcodebert")
    for row, seq in zip(ids, barcode_seqs[:8], strict=True):
        seq = seq[:660] + "N" * (660 - len(seq[:660]))
        assert row.tolist() == [ids_of.get(seq[j : j + 6], 1) for j in range(0, 660, 6)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="timing window per run")
    args = parser.parse_args()
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})

    with tempfile.TemporaryDirectory() as tmp:
        prepared = genome.prepare_genome(
            samples.sample_path(samples.GENOME), pathlib.Path(tmp) / "chr22"
        )
        source = genome.GenomeChunkSource(prepared, "train")
        barcodes = tables.read_barcode_tsv(
            samples.sample_path(samples.BARCODES), ("species_name",), deduplicate=True
        )["species_name"]
        check_baseline_tokens(source, barcodes.sequences)
        runs = {
            "genome 250x512": (
                iter(pipelines.genome_pipeline(prepared, batch_size=250, read_options=ONE_THREAD)),
                naive_genome_batches(source, 250, 512, seed=0),
                250,
            ),
            "barcode 128x110": (
                iter(
                    pipelines.barcode_pipeline(
                        barcodes.sequences, batch_size=128, training=True, read_options=ONE_THREAD
                    )
                ),
                naive_barcode_batches(barcodes.sequences, 128, 110, seed=0),
                128,
            ),
        }
        print(
            f"one core (cpu {cpu}); {len(source)} genome chunks, {len(barcodes)} barcodes; "
            f"{args.seconds:.0f} s per measurement"
        )
        for name, (grain_it, naive_it, batch) in runs.items():
            fast = rate(grain_it, batch, args.seconds)
            slow = rate(naive_it, batch, args.seconds)
            print(
                f"{name}: grain + vectorized tokenizer {fast:,.0f} seq/s | naive per-example "
                f"{slow:,.0f} seq/s | ratio {fast / slow:.1f}x"
            )


if __name__ == "__main__":
    main()
