"""Uniform random bits at half (or a quarter) of ``jax.random``'s cost, for the hot paths.

``jax.random.bits`` with JAX's default partitionable Threefry spends one Threefry-2x32 block per
32-bit word and discards half of it. :func:`words` keeps both words of every block, and
:func:`bits16` splits each word in two, so a Bernoulli draw (:func:`bernoulli16`) costs a quarter
of a block instead of a whole one. The counters are the flat indices of the output array, so the
hash stays elementwise and shards with its operands. Different bits than ``jax.random`` for the
same key, but as reproducible: the same key and shape always give the same bits.

The Threefry rounds are written out here (:func:`threefry2x32`) rather than bound to JAX's
primitive, whose CPU lowering runs them in a rolled loop that writes the state to memory every
four rounds; unrolled, XLA fuses the whole hash into the pass that consumes the bits (about half
the cost on CPU, the same bits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def threefry2x32(
    k1: jax.Array, k2: jax.Array, x0: jax.Array, x1: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 with 20 rounds (Salmon et al., SC 2011), as ``jax.random``'s primitive.

    Args:
      k1, k2: ``uint32[]`` key words.
      x0, x1: ``uint32[...]`` counter words (same shape).

    Returns:
      ``(uint32[...], uint32[...])``, the two words of each block.
    """
    schedule = (k1, k2, k1 ^ k2 ^ jnp.uint32(_PARITY))
    x0, x1 = x0 + schedule[0], x1 + schedule[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))) ^ x0
        x0 = x0 + schedule[(i + 1) % 3]
        x1 = x1 + schedule[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0, x1


def words(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``uint32[shape]`` uniform random words; the two words of each Threefry block fill the two
    halves of the last axis. Keys of other PRNG implementations use ``jax.random.bits``."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if typed and jax.random.key_impl(key) != "threefry2x32":
        return jax.random.bits(key, shape, jnp.uint32)
    *lead, length = shape
    half_shape = (*lead, (length + 1) // 2)
    if np.prod(half_shape) >= 2**32:
        raise ValueError(f"random draw of shape {shape} exceeds 2**33 words; draw in pieces")
    counter = jnp.zeros(half_shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(half_shape))):
        counter += jax.lax.broadcasted_iota(jnp.uint32, half_shape, axis) * jnp.uint32(stride)
        stride *= half_shape[axis]
    k1, k2 = jax.random.key_data(key) if typed else key
    first, second = threefry2x32(k1, k2, jnp.zeros_like(counter), counter)
    return jnp.concatenate([first, second], axis=-1)[..., :length]


def bits16(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``uint16[shape]`` uniform random bits, two per :func:`words` word."""
    *lead, length = shape
    halves = jax.lax.bitcast_convert_type(words(key, (*lead, (length + 1) // 2)), jnp.uint16)
    return halves.reshape(*lead, -1)[..., :length]


def bernoulli16(key: jax.Array, prob, shape: tuple[int, ...]) -> jax.Array:
    """``bool[shape]``, True with probability ``prob`` (a float or traced scalar) rounded to a
    multiple of ``2**-16`` (at most ``7.6e-6`` away: 0.0176 becomes 0.017593)."""
    threshold = jnp.round(jnp.asarray(prob, jnp.float32) * 2**16).astype(jnp.int32)
    return bits16(key, shape) < threshold
