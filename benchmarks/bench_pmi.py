"""Benchmark: streamed n-gram counting (n = 1..6) over 70 Mb of human chrX, on one core.

Times ``gemsjax.pmi.count_kmers`` on the GRCh37 chrX sample (gzip FASTA, decompression included)
and on the same file streamed 3 times, and reports Mbp/s and peak RSS; peak memory must not grow
with the input. Baselines measured in the same run: a pure-Python ``collections.Counter`` over
substrings (1 Mb slice, scaled) and a generic numpy count (``vocab.kmer_codes`` + ``bincount`` for
each n separately). Each measurement runs in its own subprocess pinned to one core, so that peak
RSS (``getrusage`` maxrss) is its own.

Run: ``python benchmarks/bench_pmi.py [--max-n 6] [--slice-mb 1]``
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from gemsjax import pmi  # noqa: E402
from gemsjax.data.fasta import iter_fasta  # noqa: E402
from gemsjax.vocab import base_codes, kmer_codes  # noqa: E402

CHRX = REPO.parent / "shared" / "data" / "human_grch37_chrX_0-70Mb" / "hs37chrXtrunc.fa.gz"
SLICE_START = 30_000_000  # the Counter baseline's slice (a multiple of 1 Mb, no N)


def timed(fn, repeats: int) -> tuple[object, dict]:
    """Call ``fn`` ``repeats`` times; its last result and the best wall and CPU seconds."""
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return out, {"seconds": min(walls), "cpu_seconds": min(cpus)}


def worker_read(args) -> dict:
    """Decompress and parse only (the floor any counter pays)."""
    bases, times = timed(lambda: sum(chunk.seq.size for chunk in iter_fasta(CHRX)), args.repeats)
    return {"bases": bases, **times}


def worker_count(args) -> dict:
    """``count_kmers`` over the chrX file, streamed ``args.copies`` times."""
    counts, times = timed(lambda: pmi.count_kmers([CHRX] * args.copies, args.max_n), args.repeats)
    return {"n_bases": counts.n_bases, **times}


def numpy_counts(max_n: int) -> dict[int, np.ndarray]:
    """Generic vectorized baseline: one ``kmer_codes`` + ``bincount`` pass per n, per chunk."""
    totals = {n: np.zeros(4**n, dtype=np.int64) for n in range(1, max_n + 1)}
    for chunk in iter_fasta(CHRX):
        codes = base_codes(chunk.seq)
        for n, total in totals.items():
            kc = kmer_codes(codes, n)
            total += np.bincount(kc[kc >= 0], minlength=4**n)
    return totals


def worker_numpy(args) -> dict:
    totals, times = timed(lambda: numpy_counts(args.max_n), 1)
    return {"n_bases": int(totals[1].sum()), **times}


def counter_counts(seq: str, max_n: int) -> collections.Counter:
    """Pure-Python baseline: ``collections.Counter`` over all substrings of length 1..max_n."""
    counter = collections.Counter()
    for n in range(1, max_n + 1):
        counter.update(seq[i : i + n] for i in range(len(seq) - n + 1))
    return counter


def worker_counter(args) -> dict:
    size = int(args.slice_mb * 1_000_000)
    seq = b"".join(
        c.seq.tobytes()
        for c in iter_fasta(CHRX, chunk_bases=1_000_000)
        if SLICE_START <= c.start < SLICE_START + size
    ).decode()[:size]
    if seq.strip("ACGT"):
        raise ValueError(f"the baseline slice at {SLICE_START:,} must hold only A/C/G/T")
    _, times = timed(lambda: counter_counts(seq, args.max_n), args.repeats)
    return {"bases": len(seq), **times}


def worker_idle(args) -> dict:
    """Interpreter + numpy + gemsjax.pmi imported, nothing counted: the RSS floor."""
    return {"seconds": 0.0, "cpu_seconds": 0.0}


WORKERS = {
    "read": worker_read,
    "count": worker_count,
    "numpy": worker_numpy,
    "counter": worker_counter,
    "idle": worker_idle,
}


def run_worker(name: str, args, **extra) -> dict:
    """Run one measurement in a fresh subprocess; returns its JSON result plus peak RSS (MiB)."""
    flags = {"max_n": args.max_n, "slice_mb": args.slice_mb, "repeats": 1, **extra}
    cmd = [
        sys.executable,
        __file__,
        f"--worker={name}",
        *(f"--{k.replace('_', '-')}={v}" for k, v in flags.items()),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-n", type=int, default=6)
    parser.add_argument("--slice-mb", type=float, default=1.0, help="Counter baseline slice")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (best kept)")
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        result = WORKERS[args.worker](args)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    idle = run_worker("idle", args)
    read = run_worker("read", args, repeats=args.repeats)
    one = run_worker("count", args, repeats=args.repeats)
    three = run_worker("count", args, copies=3, repeats=args.repeats)
    generic = run_worker("numpy", args)
    counter = run_worker("counter", args, repeats=args.repeats)

    bp = read["bases"]
    rows = [
        ("imports only", idle, 0),
        ("read only (gunzip + FASTA parse)", read, bp),
        ("count_kmers, chrX x1", one, bp),
        ("count_kmers, chrX x3 (streamed 3 times)", three, 3 * bp),
        ("baseline: numpy kmer_codes+bincount per n", generic, bp),
        (f"baseline: Counter over substrings, {args.slice_mb:g} Mb", counter, counter["bases"]),
    ]
    print(
        f"chrX GRCh37 0-70 Mb: {bp:,} bases ({one['n_bases']:,} ACGT), gzip FASTA; "
        f"n = 1..{args.max_n}; one core, numpy 1 thread; best of {args.repeats}"
    )
    print(
        f"{'measurement':<44}{'wall s':>8}{'Mbp/s':>8}{'CPU s':>8}{'Mbp/CPU-s':>11}"
        f"{'peak RSS MiB':>14}"
    )
    for label, res, bases in rows:
        wall_rate = f"{bases / res['seconds'] / 1e6:8.1f}" if bases else " " * 8
        cpu_rate = f"{bases / res['cpu_seconds'] / 1e6:11.1f}" if bases else " " * 11
        print(
            f"{label:<44}{res['seconds']:8.2f}{wall_rate}{res['cpu_seconds']:8.2f}{cpu_rate}"
            f"{res['peak_rss_mib']:14.0f}"
        )
    assert three["n_bases"] == 3 * one["n_bases"] == 3 * generic["n_bases"]
    rate = bp / one["seconds"] / 1e6
    counter_rate = counter["bases"] / counter["seconds"] / 1e6
    print(
        f"speed-up vs Counter baseline: {rate / counter_rate:.0f}x; "
        f"vs generic numpy: {generic['seconds'] / one['seconds']:.2f}x (wall)"
    )
    print(
        f"target >= 50 Mbp/s on one core: {'met' if rate >= 50 else 'NOT met'} "
        f"({rate:.1f} Mbp/s wall)"
    )
    growth = three["peak_rss_mib"] - one["peak_rss_mib"]
    print(
        f"peak RSS x3 - x1: {growth:+.1f} MiB "
        f"({'flat' if abs(growth) < 0.05 * one['peak_rss_mib'] else 'GROWS'}); "
        f"counting above imports: {one['peak_rss_mib'] - idle['peak_rss_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
