"""Benchmark: jitted batched masking (gemsjax.masking) vs per-sequence collator masking.

A batch of 250 real sequences x 512 tokens (chr22 segment, N deleted, 510-bp chunks: CLS + 505
6-mers + SEP + padding), the GeneMask / CM-GEMS batch size. For each strategy it times

- ``jax mask``: the jitted gemsjax mask function (intended algorithm) on the default JAX device,
  after a warm-up, each call with a new key and ``block_until_ready``; against
- ``numpy rows``: the per-sequence NumPy implementation of ``tests/masking_reference.py``
  (vectorized per-row lookups ``ranks[ids_row]``, Python loops over the centres; masks only);
- ``jax mask+corrupt``: the jitted mask (``reference_code_compat="cmgems"``: the released code's
  position-indexed ranks, B1/B3) plus the 80/10/10 corruption, returning inputs and labels;
  against
- ``released``: ``released_collators.py``, the released PyTorch ``mask_tokens`` (DNABERT
  ``run_pretrain.py`` for random spans, ``CM-GEMS_pretraining_code.py`` for GeneMask and
  Global-PMI) ported operation for operation, which also returns inputs and labels;

and prints medians, masked fractions and the speed-up of jax over each baseline. JAX uses all
cores (its default); the released collator's tensor ops get ``--torch-threads`` (default 1: its
work is single-threaded Python, and on a busy 2-core machine two torch threads made it up to 5x
slower). Run: ``python benchmarks/bench_masking.py`` (``--repeats``, ``--baseline-repeats``,
``--batch``, ``--data``, ``--torch-threads`` to change the defaults).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import released_collators as released
import torch
from benchutil import machine_info, median_seconds

from gemsjax import masking
from gemsjax.pmi import load_genemask_ranks

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import masking_reference as ref  # noqa: E402  (the test oracle, tests/masking_reference.py)

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
STRATEGIES = {  # name: (probability, released collator)
    "random_span": (0.025, lambda ids, tok, table, p: released.dnabert_random_span(ids, tok, p)),
    "genemask": (0.0176, released.cmgems_genemask),
    "global_pmi": (0.0136, released.cmgems_global_pmi),
}


def jax_mask(name: str, prob: float, compat: bool | str):
    """``fn(key, ids, special, ranks) -> bool[B, L]`` for strategy ``name``."""
    if name == "random_span":
        return lambda key, ids, special, ranks: masking.random_span(key, ids, special, prob)
    fn = masking.genemask if name == "genemask" else masking.global_pmi
    return lambda key, ids, special, ranks: fn(
        key, ids, special, ranks, prob, reference_code_compat=compat
    )


def jax_mask_and_corrupt(mask_fn):
    """``fn(key, ids, special, ranks) -> (inputs, labels)`` as a collator returns them."""
    vocab = ref.VOCAB

    def fn(key, ids, special, ranks):
        mask_key, corrupt_key = jax.random.split(key)
        mask = mask_fn(mask_key, ids, special, ranks)
        inputs, _, _ = masking.corrupt(corrupt_key, ids, mask, vocab.size, vocab.mask_id)
        return inputs, jnp.where(mask, ids, -100)

    return fn


def benchmark_strategy(name: str, data: dict, repeats: int, baseline_repeats: int) -> str:
    """One table row: timings, ratios and masked fractions of strategy ``name``."""
    prob, collator = STRATEGIES[name]
    ids, special, ranks, keys = data["ids"], data["special"], data["ranks"], data["keys"]
    device = [jnp.asarray(x) for x in (ids, special, ranks)]
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    tokenizer, rank_dict = data["tokenizer"], data["rank_dict"]
    rng = np.random.default_rng(0)
    rows = getattr(ref, f"{name}_batch")
    mask_fn = jax.jit(jax_mask(name, prob, False))
    full_fn = jax.jit(jax_mask_and_corrupt(jax_mask(name, prob, "cmgems")))

    def run_jax(i, fn):
        return jax.block_until_ready(fn(keys[i], *device))

    def run_released(i):
        return collator(ids_t.clone(), tokenizer, rank_dict, prob)

    t_mask = median_seconds(lambda i: run_jax(i, mask_fn), repeats)
    t_full = median_seconds(lambda i: run_jax(i, full_fn), repeats)
    t_rows = median_seconds(lambda i: rows(rng, ids, ranks, prob), baseline_repeats)
    t_released = median_seconds(run_released, baseline_repeats)
    valid = ~special
    fractions = [
        np.asarray(run_jax(0, mask_fn))[valid].mean(),
        rows(rng, ids, ranks, prob)[valid].mean(),
        (np.asarray(run_jax(0, full_fn)[1]) != -100)[valid].mean(),
        (run_released(0)[1].numpy() != -100)[valid].mean(),
    ]
    return (
        f"{name:<12} | {t_mask * 1e3:>6.2f}ms {t_rows * 1e3:>8.1f}ms "
        f"{t_rows / t_mask:>5.0f}x | {t_full * 1e3:>14.2f}ms {t_released * 1e3:>7.1f}ms "
        f"{t_released / t_full:>5.0f}x | " + ", ".join(f"{f:.1%}" for f in fractions)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--baseline-repeats", type=int, default=5)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="threads of the released collator's tensor ops (its Python loops "
        "are single-threaded; 1 is its fastest setting on a busy machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    ranks = load_genemask_ranks(ref.RANKS)
    ids, special = ref.dnabert_batch(ref.chr22_chunks(args.batch))
    data = dict(
        ids=ids,
        special=special,
        ranks=ranks,
        tokenizer=released.dnabert_tokenizer(),
        rank_dict=released.rank_dict(ranks),
        keys=list(jax.random.split(jax.random.key(0), args.repeats + 1)),
    )
    torch.manual_seed(0)

    print(machine_info())
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); batch {ids.shape[0]} "
        f"x {ids.shape[1]} tokens, {(~special).sum(1).mean():.0f} maskable per row; medians of "
        f"{args.repeats} (jax) / {args.baseline_repeats} (baselines) runs after a warm-up"
    )
    print(
        f"{'strategy':<12} | {'jax mask':>8} {'numpy rows':>10} {'ratio':>6} | "
        f"{'jax mask+corrupt':>16} {'released':>9} {'ratio':>6} | masked: jax, rows, "
        "jax compat, released"
    )
    for name in STRATEGIES:
        print(benchmark_strategy(name, data, args.repeats, args.baseline_repeats))


if __name__ == "__main__":
    main()
