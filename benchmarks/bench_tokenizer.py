"""Benchmark: vectorized KmerTokenizer against a per-k-mer Python dict lookup, on real barcodes.

Tokenizes 100,000 BOLD insect COI barcodes (``nucleotides`` column, gaps stripped, cycled to
100k) with the barcodebert layout at 660 bp (110 non-overlapping 6-mers) on one core, and with the
dnabert overlapping layout at 512 tokens for comparison. Each baseline is a plain Python per-k-mer
dictionary lookup producing the same ids and attention, timed on a subset and scaled linearly.

Run: ``python benchmarks/bench_tokenizer.py [--n 100000] [--baseline-n 10000]``
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import functools  # noqa: E402
import gzip  # noqa: E402
import itertools  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from gemsjax.tokenizers import KmerTokenizer  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
BARCODES = SHARED_DATA / "bold_insect_coi_barcodes" / "insect_coi_barcodes.tsv.gz"


def read_barcodes(path: pathlib.Path, n: int) -> list[str]:
    """``n`` barcodes from the ``nucleotides`` column, gaps stripped, cycled to reach ``n``."""
    csv.field_size_limit(1 << 24)
    with gzip.open(path, "rt", newline="") as f:
        seqs = [row["nucleotides"].replace("-", "") for row in csv.DictReader(f, delimiter="\t")]
    return list(itertools.islice(itertools.cycle(seqs), n))


def dict_lookup_barcodebert(
    seqs: list[str], k: int, max_len: int, table: dict[str, int], unk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Baseline: BarcodeBERT tokenization, one Python dict lookup per non-overlapping k-mer."""
    ids, attention = [], []
    n_bases = max_len * k
    for seq in seqs:
        x = seq.upper()[:n_bases]
        valid = len(x) // k
        x = x.ljust(n_bases, "N")
        ids.append([table.get(x[i : i + k], unk) for i in range(0, n_bases, k)])
        attention.append([1] * valid + [0] * (max_len - valid))
    return np.asarray(ids, dtype=np.int32), np.asarray(attention, dtype=np.int32)


def dict_lookup_dnabert(
    seqs: list[str], k: int, max_len: int, table: dict[str, int], tok: KmerTokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """Baseline: DNABERT ``[CLS] k-mers [SEP] [PAD]...``, one dict lookup per overlapping k-mer."""
    ids, attention = [], []
    for seq in seqs:
        x = seq.upper()[: max_len - 2 + k - 1]
        row = (
            [tok.cls_id]
            + [table.get(x[i : i + k], tok.unk_id) for i in range(len(x) - k + 1)]
            + [tok.sep_id]
        )
        pad = max_len - len(row)
        ids.append(row + [tok.pad_id] * pad)
        attention.append([1] * len(row) + [0] * pad)
    return np.asarray(ids, dtype=np.int32), np.asarray(attention, dtype=np.int32)


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls, and the last result."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="barcodes to tokenize")
    parser.add_argument(
        "--baseline-n",
        type=int,
        default=10_000,
        help="barcodes for the (slow) dict baseline, scaled linearly to --n",
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    seqs = read_barcodes(BARCODES, args.n)
    subset = seqs[: args.baseline_n]
    print(
        f"{args.n:,} BOLD barcodes (gaps stripped), mean {np.mean([len(s) for s in seqs]):.0f} "
        f"bp; numpy on 1 thread; best of {args.repeats}; dict baselines timed on the first "
        f"{len(subset):,} and scaled linearly to {args.n:,}"
    )
    k = 6
    for name, max_len in (("barcodebert", 110), ("dnabert", 512)):
        tok = KmerTokenizer(k, vocab=name)
        table = {t: i for i, t in enumerate(tok.vocab.tokens()) if i >= tok.vocab.num_specials}
        if name == "barcodebert":
            baseline = functools.partial(
                dict_lookup_barcodebert, subset, k, max_len, table, tok.unk_id
            )
        else:
            baseline = functools.partial(dict_lookup_dnabert, subset, k, max_len, table, tok)
        t_vec, (ids, att) = best_time(functools.partial(tok.encode, seqs, max_len), args.repeats)
        t_sub, (ref_ids, ref_att) = best_time(baseline, args.repeats)
        if not (
            np.array_equal(ids[: len(subset)], ref_ids)
            and np.array_equal(att[: len(subset)], ref_att)
        ):
            raise SystemExit(f"{name}: vectorized tokenizer disagrees with the dict baseline")
        t_base = t_sub * args.n / len(subset)
        print(f"{name} k={k}, {max_len} tokens:")
        print(
            f"  dict lookup baseline : {t_base:7.3f} s  {args.n / t_base:10,.0f} seq/s  "
            f"(measured {t_sub:.3f} s on {len(subset):,})"
        )
        print(
            f"  KmerTokenizer (numpy): {t_vec:7.3f} s  {args.n / t_vec:10,.0f} seq/s  "
            f"speed-up {t_base / t_vec:.1f}x  (ids and attention identical on the subset)"
        )


if __name__ == "__main__":
    main()
