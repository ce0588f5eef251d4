"""Benchmark: gemsjax's CPU attention (forward + backward) vs PyTorch's fused SDPA, LOGO shapes.

Attention was the largest part of the LOGO train step's gap to the fully gathered PyTorch step
(BENCHMARKS.md, issue 13 §6), so this times it alone, float32, on the CPU:

- ``gemsjax kernel``: :func:`gemsjax.models.backend.attend_fused_cpu` (what the CPU train step
  runs without attention dropout: the fused C++ kernel of :mod:`gemsjax.models.native_kernels`
  through XLA FFI), ``jax.jit(jax.grad(...))`` of ``sum(out * g)``;
- ``gemsjax XLA tiled``: :func:`gemsjax.models.backend.attend_tiled` (its fallback where no C++
  compiler is found: tiles of (row, head) pairs under ``lax.map``, recomputing custom VJP);
- ``jax stock``: ``jax.nn.dot_product_attention(..., implementation="xla")``, the same gradient;
- ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` with an additive key mask and
  ``torch.autograd.grad`` of the same sum (its fused CPU flash kernel, forward and backward).

Shapes: LOGO (8 heads of 32) at batch 8, keys 512 (5 padding keys masked); queries 512 (every
layer but the last) and 192 (the last layer's per-row masked-token slots). The contenders take
turns (``benchutil.interleaved_medians``); the ratio is torch's time over each one's (> 1: faster
than torch). Results are checked equal (gradients within 1e-4) before timing.

Run: ``python benchmarks/bench_attention.py [--rounds 5] [--steps 3]``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from benchutil import interleaved_medians, machine_info

from gemsjax.models import backend, native_kernels

BATCH, KEYS, HEADS, DEPTH, PADDING = 8, 512, 8, 32, 5


def inputs(queries: int) -> dict[str, np.ndarray]:
    """``q: float32[B, Lq, N, D]``, ``k, v: [B, Lk, N, D]``, ``g`` (the output's cotangent, like
    ``q``) and ``keep: bool[B, Lk]`` (the last :data:`PADDING` keys off), seed 0."""
    rng = np.random.default_rng(0)
    shape = lambda n: (BATCH, n, HEADS, DEPTH)
    q, g = (rng.standard_normal(shape(queries), np.float32) for _ in range(2))
    k, v = (rng.standard_normal(shape(KEYS), np.float32) for _ in range(2))
    keep = np.ones((BATCH, KEYS), bool)
    keep[:, KEYS - PADDING :] = False
    return dict(q=q, k=k, v=v, g=g, keep=keep)


def jax_gradient(attention, x: dict) -> Callable[[int], object]:
    """``run(i)``: the jitted value and gradient of ``sum(attention(q, k, v, keep) * g)`` w.r.t.
    q, k, v, returning the gradients. The value is computed too, as in training (with ``jax.grad``
    alone XLA drops a forward pass whose output the backward pass does not read: the C++
    kernel's)."""
    q, k, v, g, keep = (jnp.asarray(x[n]) for n in ("q", "k", "v", "g", "keep"))
    loss = lambda q, k, v: jnp.sum(attention(q, k, v, keep) * g)
    both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return lambda _: jax.block_until_ready(both(q, k, v))[1]


def stock(q, k, v, keep):
    return jax.nn.dot_product_attention(q, k, v, mask=keep[:, None, None, :], implementation="xla")


def torch_gradient(x: dict) -> Callable[[int], object]:
    """``run(i)``: SDPA forward and ``autograd.grad`` of the same sum (heads-first layout)."""
    heads_first = lambda a: torch.as_tensor(a).transpose(1, 2).contiguous()
    q, k, v = (heads_first(x[n]).requires_grad_() for n in ("q", "k", "v"))
    g = heads_first(x["g"])
    bias = torch.zeros(BATCH, 1, 1, KEYS)
    bias[..., ~torch.as_tensor(x["keep"][0])] = torch.finfo(torch.float32).min

    def run(_):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return torch.autograd.grad((out * g).sum(), (q, k, v))

    return run


def check_equal(x: dict) -> float:
    """Largest gradient difference between gemsjax's attentions and torch's (asserted < 1e-4)."""
    theirs = [t.transpose(1, 2).numpy() for t in torch_gradient(x)(0)]
    diff = 0.0
    for attention in (backend.attend_fused_cpu, backend.attend_tiled):
        ours = jax_gradient(attention, x)(0)
        for a, b in zip(ours, theirs, strict=True):
            diff = max(diff, float(np.max(np.abs(np.asarray(a) - b))))
    assert diff < 1e-4, diff
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if not native_kernels.load():
        raise SystemExit(
            "the C++ attention kernel is not available here: it needs an x86 CPU with AVX-512 "
            "or AVX2 + FMA and a C++ compiler (see any warning above)"
        )
    torch.set_num_threads(os.cpu_count())
    print(machine_info())
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); forward + backward, "
        f"float32, B {BATCH}, keys {KEYS}, {HEADS} heads of {DEPTH}; medians of "
        f"{args.rounds} x {args.steps} calls, taking turns"
    )
    for queries in (512, 192):
        x = inputs(queries)
        diff = check_equal(x)
        runners = {
            "gemsjax kernel (attend_fused_cpu)": jax_gradient(backend.attend_fused_cpu, x),
            "gemsjax XLA tiled (attend_tiled)": jax_gradient(backend.attend_tiled, x),
            "jax stock (dot_product_attention, xla)": jax_gradient(stock, x),
            "torch SDPA": torch_gradient(x),
        }
        seconds = interleaved_medians(runners, args.rounds, args.steps)
        base = seconds["torch SDPA"]
        print(f"queries {queries} (gradients equal within {diff:.1e}):")
        for name, s in seconds.items():
            print(f"  {name}: {1000 * s:.1f} ms, torch / it = {base / s:.2f}x")


if __name__ == "__main__":
    main()
