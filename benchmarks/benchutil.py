"""Shared benchmark helpers: machine description, warm-up-skipping median timings, real batches
from the samples shipped with the package."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from gemsjax.data import fasta, pipelines, samples, tables


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> str:
    """One line: CPU model, core count, load average, JAX backend and devices."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {load}; "
        f"jax {jax.__version__} backend {jax.default_backend()} "
        f"({jax.device_count()} x {devices})"
    )


def median_seconds(fn: Callable[[int], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn(i)`` for ``i = warmup .. warmup + repeats - 1``, after the
    untimed warm-up calls ``fn(0) .. fn(warmup - 1)``.

    ``fn`` must finish its work before returning (``jax.block_until_ready`` on its outputs).
    """
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(warmup, warmup + repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_turns(
    runners: dict[str, Callable[[int], object]], rounds: int, steps: int
) -> dict[str, list[list[float]]]:
    """Wall times of each runner's timed calls, per round, the runners taking turns:
    ``{name: [[seconds] * steps] * rounds]}``.

    In each of ``rounds`` rounds every runner takes a turn of ``1 + steps`` consecutive calls
    ``fn(i)`` (``i`` counts that runner's calls from 0); the first call of a turn is untimed
    (compilation on the first turn; caches and allocator after another contender's turn).
    Turns spread drift in the machine's load over all contenders, so their ratio is steadier
    than that of one block each. Each ``fn`` must finish its work before returning.
    """
    times: dict[str, list[list[float]]] = {name: [] for name in runners}
    calls = dict.fromkeys(runners, 0)
    for _ in range(rounds):
        for name, fn in runners.items():
            turn = []
            for turn_step in range(1 + steps):
                start = time.perf_counter()
                fn(calls[name])
                calls[name] += 1
                if turn_step:
                    turn.append(time.perf_counter() - start)
            times[name].append(turn)
    return times


def interleaved_medians(
    runners: dict[str, Callable[[int], object]], rounds: int, steps: int
) -> dict[str, float]:
    """Median wall time per call of each runner over :func:`interleaved_turns`."""
    return call_medians(interleaved_turns(runners, rounds, steps))


def call_medians(turns: dict[str, list[list[float]]]) -> dict[str, float]:
    """Median wall time per call of each runner of :func:`interleaved_turns`' ``turns``."""
    return {name: statistics.median(t for turn in per for t in turn) for name, per in turns.items()}


def round_ratios(turns: dict[str, list[list[float]]], num: str, den: str) -> list[float]:
    """Per round of :func:`interleaved_turns`, the median time of ``num``'s turn over that of
    ``den``'s (> 1: ``den`` faster): neighbouring turns share the machine's state, so these
    ratios hold even when its speed drifts between rounds."""
    median = statistics.median
    return [median(a) / median(b) for a, b in zip(turns[num], turns[den], strict=True)]


def genome_batch(batch: int, max_len: int = 512) -> dict[str, np.ndarray]:
    """``{"ids", "attention"}: int32[batch, max_len]``: consecutive 510-bp chunks of the shipped
    chr22 sample with every N deleted (the GeneMask corpus recipe), DNABERT 6-mer tokens."""
    ((_, seq),) = fasta.read_fasta(samples.sample_path(samples.GENOME))
    seq = seq.replace("N", "")
    chunks = [seq[i * 510 : (i + 1) * 510] for i in range(batch)]
    ids, attention = pipelines.dnabert_tokenizer().encode(chunks, max_len)
    return {"ids": ids, "attention": attention}


def barcode_batch(batch: int, max_len: int = 110) -> dict[str, np.ndarray]:
    """``{"ids", "attention"}: int32[batch, max_len]``: the first ``batch`` BOLD COI barcodes of
    the shipped sample, non-overlapping 6-mers (BarcodeBERT layout, no reading-frame shift)."""
    table = tables.read_barcode_tsv(samples.sample_path(samples.BARCODES))["species_name"]
    ids, attention = pipelines.barcode_tokenizer().encode(table.sequences[:batch], max_len)
    return {"ids": ids, "attention": attention}
