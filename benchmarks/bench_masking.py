"""Benchmark: jitted batched masking (gemsjax.masking) vs per-sequence collator-style masking.

A batch of 250 real sequences x 512 tokens (chr22 segment, N deleted, 510-bp chunks: CLS + 505
6-mers + SEP + padding), the GeneMask / CM-GEMS batch size. For each strategy it times

- ``jax``: the jitted gemsjax function on the default JAX device, after a warm-up, each call with a
  new key and ``block_until_ready``;
- ``numpy rows``: the per-sequence implementation of ``masking_reference.py`` with per-row
  vectorized lookups (``ranks[ids_row]``) and Python loops over the mask centres;
- ``collator``: the same loops with per-token Python lookups (special-token list, rank through the
  k-mer string and a dict, ``sorted`` positions), as the released DNABERT / GeneMask collator does;

and prints medians and the speed-up of jax over each. Run: ``python benchmarks/bench_masking.py``
(``--repeats``, ``--baseline-repeats``, ``--batch``, ``--data`` to change the defaults).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import masking_reference as ref
import numpy as np

from gemsjax import masking
from gemsjax.pmi import load_genemask_ranks

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def median_seconds(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--baseline-repeats", type=int, default=5)
    args = parser.parse_args()

    ranks = load_genemask_ranks(args.data / ref.RANKS)
    ids, special = ref.dnabert_batch(ref.chr22_chunks(args.data, args.batch))
    valid = ~special
    ids_d, special_d, ranks_d = jnp.asarray(ids), jnp.asarray(special), jnp.asarray(ranks)
    kmer_ranks = ref.rank_by_kmer(ranks)
    seed = jax.random.key(0)
    rng = np.random.default_rng(0)
    strategies = {
        "random_span": (lambda k, i, s, r: masking.random_span(k, i, s, 0.025),
                        lambda table: ref.random_span_batch(rng, ids, table, 0.025)),
        "genemask": (lambda k, i, s, r: masking.genemask(k, i, s, r, 0.0176),
                     lambda table: ref.genemask_batch(rng, ids, table, 0.0176)),
        "global_pmi": (lambda k, i, s, r: masking.global_pmi(k, i, s, r, 0.0136),
                       lambda table: ref.global_pmi_batch(rng, ids, table, 0.0136)),
    }
    print(f"batch {ids.shape[0]} x {ids.shape[1]} tokens, {valid.sum(1).mean():.0f} maskable per "
          f"row; jax device: {jax.devices()[0].device_kind}; medians of {args.repeats} (jax) / "
          f"{args.baseline_repeats} (baselines) runs")
    print(f"{'strategy':<12} {'masked':>7} {'jax ms':>8} {'numpy rows ms':>14} {'ratio':>7} "
          f"{'collator ms':>12} {'ratio':>7}")
    for name, (jax_fn, baseline) in strategies.items():
        jitted = jax.jit(jax_fn)
        masks = jitted(seed, ids_d, special_d, ranks_d).block_until_ready()
        t_jax = median_seconds(lambda i, f=jitted: f(jax.random.fold_in(seed, i), ids_d,
                                                     special_d, ranks_d).block_until_ready(),
                               args.repeats)
        t_rows = median_seconds(lambda i, b=baseline: b(ranks), args.baseline_repeats)
        t_collator = median_seconds(lambda i, b=baseline: b(kmer_ranks), args.baseline_repeats)
        fraction = float(np.asarray(masks)[valid].mean())
        print(f"{name:<12} {fraction:>7.1%} {t_jax * 1e3:>8.2f} {t_rows * 1e3:>14.1f} "
              f"{t_rows / t_jax:>6.0f}x {t_collator * 1e3:>12.1f} {t_collator / t_jax:>6.0f}x")


if __name__ == "__main__":
    main()
