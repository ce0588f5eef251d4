"""The unrolled Threefry hash equals JAX's own primitive, and the bit helpers' distributions."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

from gemsjax import random_bits


def test_threefry_matches_jax_primitive():
    x0 = jnp.arange(1000, dtype=jnp.uint32) * jnp.uint32(2654435761)
    x1 = jnp.arange(1000, dtype=jnp.uint32)
    for k1, k2 in [(0, 0), (1, 2), (0xDEADBEEF, 0x12345678), (2**32 - 1, 7)]:
        k1, k2 = jnp.uint32(k1), jnp.uint32(k2)
        want = threefry2x32_p.bind(k1, k2, x0, x1)
        got = jax.jit(random_bits.threefry2x32)(k1, k2, x0, x1)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_words_deterministic_uniform_and_key_dependent():
    key = jax.random.key(3)
    a = np.asarray(random_bits.words(key, (64, 513)))
    np.testing.assert_array_equal(a, random_bits.words(key, (64, 513)))
    assert not np.array_equal(a, random_bits.words(jax.random.key(4), (64, 513)))
    bits = np.unpackbits(a.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.002  # 1.05M bits: sd 0.0005
    hits = np.asarray(random_bits.bernoulli16(key, 0.025, (250, 512)))
    assert abs(hits.mean() - 0.025) < 0.002  # 128k draws: sd 0.00044
