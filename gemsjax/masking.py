"""Masking strategies as pure, batched JAX functions (DNABERT spans, GeneMask, Global-PMI, MAE).

Every function takes a token batch ``ids: int32[B, L]`` and ``special: bool[B, L]`` (True at
``[PAD] [CLS] [SEP] [UNK] [MASK]``, see :func:`special_mask`) and returns a ``bool[B, L]`` mask
that is never True on a special position. Shapes are static, nothing leaves the device and there
is no Python loop over tokens (the only loops run over a handful of static span offsets), so all
of it can be traced inside a jitted train step. Randomness comes from an explicit PRNG ``key``.

Strategies (probabilities are per maskable position):

- :func:`random_span` -- DNABERT: centres ~ Bernoulli(p = 0.025); each masks ``c-2 .. c+3``.
- :func:`genemask` -- GeneMask (Roy et al., ECAI 2023): centres ~ Bernoulli(p = 0.0176); each
  centre's 6-span picks its best PMI-ranked token (the *modified centre*); the best-ranked half of
  the centres (all of them when that half is < 5) widen to the 11 tokens around their modified
  centre, the rest keep their 6-span.
- :func:`global_pmi` -- CM-GEMS hard phase: ``k`` ~ Binomial(n_valid, p) per sequence; mask the 11
  tokens around each of the ``k`` best-ranked positions (ties by position).
- :func:`mae_drop` / :func:`mae_drop_fixed` -- BarcodeMAE: independent Bernoulli(ratio) per token,
  or exactly ``floor(ratio * n_valid + 0.5)`` tokens (with a static bound on the visible count,
  :func:`visible_len`, for encoders that gather visible tokens to a fixed length).

Spans are clipped to the region between the first and last maskable position (the reference's
``[1, end]``) and special positions inside it (``[UNK]`` k-mers) are never masked; the reference
masks an interior ``[UNK]`` that a span covers, this module does not.

PMI ranks come from a *rank table* ``rank_table: int32[V]`` indexed by token id (1 = best, specials
and unscored k-mers ``4**k``), e.g. :func:`gemsjax.pmi.load_genemask_ranks`.

``reference_code_compat`` reproduces the released GeneMask / CM-GEMS code (``reference/cmgems.md``
section 2) instead of the intended algorithm:

- ``""`` (default): the intended algorithm, rank of the *token* at each position.
- ``"genemask"`` (GeneMask Code-B): B1, the rank is looked up by *position*
  (``rank(position i) = rank_table[i]``, i.e. the rank of ``vocab[i]``, the same for every
  sequence);
  B2, the DNABERT special ids' ranks are 0 (best; a ``defaultdict(int)``), so positions 1-4 are
  the best; B3, GeneMask's high set is the first ``ceil(m/2)`` centres rather than the best.
- ``"cmgems"`` (``CM-GEMS_pretraining_code.py``, ``CM-STEP_...``, ``Global-...``): B1 and B3, with
  the special ranks remapped 0 -> ``4**k`` (worst), i.e. the rank table as given. This is the mode
  that gives Global-PMI its fixed positions 5, 9, 278, 6, 346, ...

Under B3 the released code takes the first half in CPython set-iteration order; here it is the
first half in position order. Either way the high set does not depend on PMI.

- ``"genemask_2023"`` (the paper-era upload of Code-B, github roysoumya/GeneMask ``fa0604f``,
  2023-07-20, which produced the GeneMask paper's numbers): every centre masks its 6-span, and the
  11-token widening is written around the stale loop variable ``center`` (fixed in ``5120456``,
  2023-09-16) -- the centre the set iteration visited last -- so one 11-window around one
  unmodified centre is added, whatever the PMI ranks (B1-B3 then change nothing). Masks ~11.2%
  of chr22 at p = 0.0176 instead of ~15.4%. The last centre in CPython 3.6's set order is taken
  as the one with the largest ``c mod T`` (ties: the larger ``c``), ``T`` the set's table size
  after ``m`` insertions (8, 32, 128, 512 for m <= 4, 20, 84, more); probing collisions below the
  top slot are not modelled, they never change the masked count.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gemsjax import random_bits
from gemsjax.vocab import get_vocab

STRATEGIES = ("random_span", "genemask", "global_pmi", "mae_drop")
"""Strategy names; a strategy index (:func:`make_mask`, the curricula) indexes this tuple."""

COMPAT_MODES = ("genemask", "cmgems", "genemask_2023")
GENEMASK_SPAN = (-2, 3)
"""Offsets of the 6-token span around a centre (DNABERT ``MASK_LIST`` for k = 6, plus 0)."""
WIDE_RADIUS = 5
"""Half-width of the 11-token windows of GeneMask's high set and of Global-PMI."""


class MaskParams(NamedTuple):
    """Static masking hyper-parameters for :func:`make_mask` (hashable: a valid static jit arg).

    Attributes:
      random_span_prob: DNABERT centre probability (0.025 = 0.15 / 6).
      span: DNABERT span length (k of the k-mers: 6 masks ``c-2 .. c+3``).
      genemask_prob: GeneMask centre probability (0.0176 = 0.15 / 8.5).
      global_pmi_prob: Global-PMI centre probability (CM-STEP 0.0136 = 0.15 / 11; CM-GEMS and
        the Global-PMI baseline 0.0176, GeneMask Script-A's ``mlm_probability``).
      mae_ratio: BarcodeMAE drop probability.
      reference_code_compat: see the module docstring.
    """

    random_span_prob: float = 0.025
    span: int = 6
    genemask_prob: float = 0.0176
    global_pmi_prob: float = 0.0136
    mae_ratio: float = 0.5
    reference_code_compat: str = ""


def strategy_index(name: str) -> int:
    """Index of a strategy name in :data:`STRATEGIES`; raises ValueError listing the valid names."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown masking strategy {name!r}; valid: {STRATEGIES}")
    return STRATEGIES.index(name)


def special_mask(ids: jax.Array, special_ids: Sequence[int]) -> jax.Array:
    """Positions holding a special token.

    Args:
      ids: ``int32[B, L]`` token ids.
      special_ids: the ids never to mask, e.g. ``range(vocab.num_specials)`` (DNABERT: PAD, UNK,
        CLS, SEP, MASK = 0..4; BarcodeBERT: MASK, UNK = 0, 1; BarcodeBERT pads with UNK).

    Returns:
      ``bool[B, L]``, True where ``ids`` is one of ``special_ids``.
    """
    return jnp.isin(ids, jnp.asarray(list(special_ids), dtype=jnp.int32))


def _check(ids: jax.Array, special: jax.Array) -> jax.Array:
    """Validate shapes and return the maskable positions ``bool[B, L]``."""
    if ids.ndim != 2:
        raise ValueError(f"ids must be int[B, L], got shape {ids.shape}")
    if special.shape != ids.shape:
        raise ValueError(f"special must have the ids' shape {ids.shape}, got {special.shape}")
    return ~special.astype(bool)


def _compat_mode(reference_code_compat: str) -> str:
    """``""`` (intended; also False / None) or one of :data:`COMPAT_MODES`."""
    if not reference_code_compat:
        return ""
    if reference_code_compat not in COMPAT_MODES:
        raise ValueError(
            f"reference_code_compat must be '' or one of {COMPAT_MODES}, "
            f"got {reference_code_compat!r}"
        )
    return reference_code_compat


def _neighbours(x: jax.Array, lo: int, hi: int, fill) -> list[jax.Array]:
    """``[y_lo, ..., y_hi]`` with ``y_o[:, i] = x[:, i + o]`` (``fill`` outside ``[0, L)``).

    All are slices of one padded copy, which XLA fuses into a single pass (shifting each
    separately makes it recompute the producer per shift).
    """
    length = x.shape[1]
    base = max(-lo, 0)
    padded = jnp.pad(x, ((0, 0), (base, max(hi, 0))), constant_values=fill)
    return [padded[:, base + o : base + o + length] for o in range(lo, hi + 1)]


def _spread(marks: jax.Array, lo: int, hi: int) -> jax.Array:
    """Each True at ``c`` in ``marks: bool[B, L]`` covers ``c+lo .. c+hi`` (within ``[0, L)``)."""
    return functools.reduce(operator.or_, _neighbours(marks, -hi, -lo, False))


def _inside(valid: jax.Array) -> jax.Array:
    """``bool[B, L]``: between the first and the last maskable position (inclusive)."""
    pos = jnp.arange(valid.shape[1], dtype=_narrow_dtype(valid.shape[1]))
    first = jnp.min(jnp.where(valid, pos, valid.shape[1]), axis=1, keepdims=True)
    last = jnp.max(jnp.where(valid, pos, -1), axis=1, keepdims=True)
    return (pos >= first) & (pos <= last)


def _position_ranks(ids: jax.Array, rank_table: jax.Array, mode: str) -> jax.Array:
    """``int32[B, L]`` PMI rank of each position: of its token, or of ``vocab[position]`` (B1)."""
    rank_table = jnp.asarray(rank_table, dtype=jnp.int32)
    if rank_table.ndim != 1:
        raise ValueError(f"rank_table must be int32[vocab_size], got shape {rank_table.shape}")
    if not mode:
        return jnp.take(rank_table, ids, mode="clip")
    pos = jnp.arange(ids.shape[1])
    by_position = jnp.take(rank_table, pos, mode="clip")
    if mode == "genemask":
        by_position = jnp.where(pos < get_vocab("dnabert").num_specials, 0, by_position)
    return jnp.broadcast_to(by_position, ids.shape)


def _narrow_dtype(bound: int):
    """int16 when every value in ``[0, bound]`` fits it (half the memory traffic on CPU), else
    int32."""
    return jnp.int16 if bound < 2**15 else jnp.int32


_UNROLL_BISECTION = contextvars.ContextVar("unroll_bisection", default=False)


@contextlib.contextmanager
def unrolled_bisection() -> Iterator[None]:
    """Trace the bisection passes of the rank-based strategies unrolled (same results).

    For cost estimates only: XLA's cost analysis counts a loop body once, so a program traced
    inside this context is costed with every pass. On CPU the loop runs ~6x faster than the
    unrolled passes, so the training step keeps the loop.
    """
    token = _UNROLL_BISECTION.set(True)
    try:
        yield
    finally:
        _UNROLL_BISECTION.reset(token)


def _smallest(keys: jax.Array, count: jax.Array, bits: int) -> jax.Array:
    """``bool[B, L]``: the ``count[b]`` smallest entries of each row of ``keys``.

    ``keys: int16[B, L]`` or ``int32[B, L]`` must be unique within a row among the eligible
    entries and lie in ``[0, 2**bits)``; excluded entries carry a larger key than every eligible
    one and the caller ANDs the result with its eligibility. The ``count``-th smallest key is found
    by bisection, one bit per pass from the top (``bits`` passes over the batch; no sort, which is
    slow on CPU). The passes count over the transposed keys, which vectorizes across the batch on
    CPU, in the narrowest integer type that holds ``L``.
    """
    columns = keys.T
    tally = _narrow_dtype(keys.shape[1])
    count = count.astype(tally)
    one = jnp.ones((), keys.dtype)

    def narrow(i, below):
        trial = below | jnp.left_shift(one, (bits - 1 - i).astype(keys.dtype))
        smaller = (columns < trial).sum(axis=0, dtype=tally)
        return jnp.where(smaller < count, trial, below)

    edge = jax.lax.fori_loop(
        0, bits, narrow, jnp.zeros(keys.shape[:1], keys.dtype), unroll=_UNROLL_BISECTION.get()
    )
    return (keys <= edge[:, None]) & (count > 0)[:, None]


def _best_ranked(
    rank: jax.Array, eligible: jax.Array, count: jax.Array, table_size: int
) -> jax.Array:
    """``bool[B, L]``: per row, the ``count[b]`` eligible positions with the best (smallest)
    ``(rank, position)``, ranks clipped to ``[0, table_size]``.

    Two bisections (:func:`_smallest`) on narrow keys instead of one on ``rank * L + position``:
    the ``count``-th best rank, then, among the positions holding exactly that rank, the leftmost
    ones still needed; the second runs only when some row has more such positions than it needs.
    """
    length = rank.shape[1]
    rank = jnp.where(eligible, jnp.clip(rank, 0, table_size), table_size + 1)
    rank = rank.astype(_narrow_dtype(table_size + 1))
    count = jnp.asarray(count, jnp.int32)
    within = _smallest(rank, count, (table_size + 1).bit_length()) & eligible
    edge = jnp.max(jnp.where(within, rank, -1), axis=1, keepdims=True)
    below = within & (rank < edge)
    tied = within & (rank == edge)
    need = count - below.sum(axis=1, dtype=jnp.int32)
    position = jnp.arange(length, dtype=_narrow_dtype(length))
    leftmost = jax.lax.cond(
        jnp.any(tied.sum(axis=1, dtype=jnp.int32) > need),
        lambda: _smallest(jnp.where(tied, position, length), need, length.bit_length()) & tied,
        lambda: tied,
    )
    return below | leftmost


def draw_centres(key: jax.Array, special: jax.Array, prob) -> jax.Array:
    """Mask centres: ``bool[B, L]``, Bernoulli(``prob``) on each non-special position (``prob``
    rounded to a multiple of ``2**-16``, :func:`gemsjax.random_bits.bernoulli16`)."""
    return random_bits.bernoulli16(key, prob, special.shape) & ~special.astype(bool)


def span_mask(centres: jax.Array, special: jax.Array, span: int = 6) -> jax.Array:
    """DNABERT spans around given centres.

    Args:
      centres: ``bool[B, L]`` mask centres.
      special: ``bool[B, L]``.
      span: span length; DNABERT's ``MASK_LIST`` gives ``c - (span-1)//2 .. c + span//2``
        (6: ``c-2 .. c+3``; 3: ``c-1 .. c+1``).

    Returns:
      ``bool[B, L]`` mask, False on special positions.
    """
    if span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
    return _spread(centres, -((span - 1) // 2), span // 2) & ~special.astype(bool)


def random_span(
    key: jax.Array, ids: jax.Array, special: jax.Array, prob=0.025, span: int = 6
) -> jax.Array:
    """DNABERT random span masking (centres ~ Bernoulli(``prob``), ``span`` tokens each).

    Args:
      key: PRNG key.
      ids: ``int32[B, L]`` token ids.
      special: ``bool[B, L]`` positions never masked.
      prob: centre probability, a float or traced scalar (0.025 masks ~14% of 6-mers).
      span: span length (static).

    Returns:
      ``bool[B, L]`` mask.
    """
    _check(ids, special)
    return span_mask(draw_centres(key, special, prob), special, span)


def genemask_from_centres(
    centres: jax.Array,
    ids: jax.Array,
    special: jax.Array,
    rank_table: jax.Array,
    reference_code_compat: str = "",
) -> jax.Array:
    """GeneMask spans around given centres (the deterministic part of :func:`genemask`).

    For each centre ``c`` the candidates are the in-range positions of ``c-2 .. c+3``, visited as
    ``c, c-2, c-1, c+1, c+2, c+3``; the first with a strictly smaller rank than all before it is
    the modified centre (so ties keep the centre, then the leftmost). With ``m`` centres in a row
    and ``h = ceil(m / 2)``, the high set is every centre when ``h < 5``, else the ``h`` centres
    whose modified centre has the best rank (ties by centre position). High-set centres mask the
    11 tokens around their modified centre (which covers their 6-span), the others ``c-2 .. c+3``.

    Args:
      centres: ``bool[B, L]`` mask centres (must not be special).
      ids: ``int32[B, L]`` token ids.
      special: ``bool[B, L]``.
      rank_table: ``int32[V]`` indexed by token id.
      reference_code_compat: see the module docstring (static).

    Returns:
      ``bool[B, L]`` mask.
    """
    valid = _check(ids, special)
    mode = _compat_mode(reference_code_compat)
    centres = centres & valid
    if mode == "genemask_2023":
        return _stale_centre_spans(centres, valid)
    worst = jnp.shape(rank_table)[0] + 1  # beyond every clipped rank: never a modified centre
    rank = jnp.clip(_position_ranks(ids, rank_table, mode), 0, worst - 1)
    rank = jnp.where(_inside(valid), rank, worst).astype(_narrow_dtype(worst))
    near = _neighbours(rank, GENEMASK_SPAN[0], GENEMASK_SPAN[1], worst)
    best_rank = rank
    best_offset = jnp.zeros(ids.shape, jnp.int8)
    for offset in (o for o in range(GENEMASK_SPAN[0], GENEMASK_SPAN[1] + 1) if o != 0):
        candidate = near[offset - GENEMASK_SPAN[0]]
        better = candidate < best_rank
        best_rank = jnp.where(better, candidate, best_rank)
        best_offset = jnp.where(better, jnp.int8(offset), best_offset)

    num_centres = centres.sum(axis=1, dtype=jnp.int32)
    num_high = (num_centres + 1) // 2
    if mode:  # the first num_high centres by position (a bisection is faster than a cumsum)
        length = ids.shape[1]
        position = jnp.arange(length, dtype=_narrow_dtype(length))
        in_front = _smallest(jnp.where(centres, position, length), num_high, length.bit_length())
    else:
        in_front = _best_ranked(best_rank, centres, num_high, jnp.shape(rank_table)[0])
    high = centres & (in_front | (num_high < 5)[:, None])

    # one code per position, one pass over its neighbours (no scatter, no intermediate masks):
    # 0 no centre, o - lo + 1 a high centre whose modified centre is c + o, `plain` another centre
    lo, hi = GENEMASK_SPAN
    plain = hi - lo + 2
    code = jnp.where(high, best_offset - lo + 1, jnp.where(centres, plain, 0)).astype(jnp.int8)
    reach = (lo - WIDE_RADIUS, hi + WIDE_RADIUS)
    back = _neighbours(code, -reach[1], -reach[0], 0)  # back[reach[1] - s][:, j] = code[:, j - s]
    return (
        functools.reduce(
            operator.or_, (_covers(back[reach[1] - s], s) for s in range(reach[0], reach[1] + 1))
        )
        & valid
    )


def _stale_centre_spans(centres: jax.Array, valid: jax.Array) -> jax.Array:
    """``reference_code_compat="genemask_2023"`` (module docstring): the 6-span of every centre
    plus the 11 tokens around the centre CPython's set iteration visits last."""
    length = centres.shape[1]
    pos = jnp.arange(length, dtype=jnp.int32)
    m = centres.sum(axis=1, dtype=jnp.int32)
    table = jnp.where(m <= 4, 8, jnp.where(m <= 20, 32, jnp.where(m <= 84, 128, 512)))
    order = jnp.where(centres, (pos % table[:, None]) * length + pos, -1)
    last = jnp.argmax(order, axis=1)[:, None]
    wide = (jnp.abs(pos - last) <= WIDE_RADIUS) & (m > 0)[:, None]
    return (span_mask(centres, ~valid) | wide) & valid


def _covers(code: jax.Array, s: int) -> jax.Array:
    """``bool[B, L]``: a centre with ``code`` (see :func:`genemask_from_centres`) masks the
    position ``s`` tokens after it: any centre when ``s`` is in :data:`GENEMASK_SPAN` (a high
    centre's 11 tokens cover its 6-span), else a high centre whose offset ``o`` is within
    :data:`WIDE_RADIUS` of ``s``."""
    lo, hi = GENEMASK_SPAN
    if lo <= s <= hi:
        return code > 0
    first = max(s - WIDE_RADIUS, lo) - lo + 1  # codes o - lo + 1 of the offsets o reaching s
    last = min(s + WIDE_RADIUS, hi) - lo + 1
    return (code >= first) & (code <= last)


def genemask(
    key: jax.Array,
    ids: jax.Array,
    special: jax.Array,
    rank_table: jax.Array,
    prob=0.0176,
    reference_code_compat: str = "",
) -> jax.Array:
    """GeneMask masking: random centres, PMI-guided 6- and 11-token spans.

    Args:
      key: PRNG key.
      ids: ``int32[B, L]`` token ids.
      special: ``bool[B, L]`` positions never masked.
      rank_table: ``int32[V]`` indexed by token id (1 = best).
      prob: centre probability (0.0176 masks ~15.4% at L ~ 506, ~17% on short sequences).
      reference_code_compat: see the module docstring (static).

    Returns:
      ``bool[B, L]`` mask; see :func:`genemask_from_centres` for the span rules.
    """
    return genemask_from_centres(
        draw_centres(key, special, prob), ids, special, rank_table, reference_code_compat
    )


def global_pmi_from_counts(
    counts: jax.Array,
    ids: jax.Array,
    special: jax.Array,
    rank_table: jax.Array,
    reference_code_compat: str = "",
) -> jax.Array:
    """Global-PMI windows for given per-sequence counts (the deterministic part of
    :func:`global_pmi`).

    Args:
      counts: ``int32[B]`` number of windows per sequence.
      ids: ``int32[B, L]`` token ids.
      special: ``bool[B, L]``.
      rank_table: ``int32[V]`` indexed by token id.
      reference_code_compat: see the module docstring (static).

    Returns:
      ``bool[B, L]``: the 11 tokens around each of the ``counts[b]`` in-range positions with the
      best (rank, position).
    """
    valid = _check(ids, special)
    mode = _compat_mode(reference_code_compat)
    inside = _inside(valid)
    top = _best_ranked(
        _position_ranks(ids, rank_table, mode), inside, counts, jnp.shape(rank_table)[0]
    )
    return _spread(top, -WIDE_RADIUS, WIDE_RADIUS) & valid


def global_pmi(
    key: jax.Array,
    ids: jax.Array,
    special: jax.Array,
    rank_table: jax.Array,
    prob,
    reference_code_compat: str = "",
) -> jax.Array:
    """Global-PMI masking: ``k ~ Binomial(n_valid, prob)`` windows on the best-ranked positions.

    Args:
      key: PRNG key.
      ids: ``int32[B, L]`` token ids.
      special: ``bool[B, L]`` positions never masked.
      rank_table: ``int32[V]`` indexed by token id.
      prob: per-position probability whose success count is ``k`` (0.0136 masks ~14%).
      reference_code_compat: see the module docstring (static).

    Returns:
      ``bool[B, L]`` mask; see :func:`global_pmi_from_counts`.
    """
    counts = draw_centres(key, special, prob).sum(axis=1, dtype=jnp.int32)
    return global_pmi_from_counts(counts, ids, special, rank_table, reference_code_compat)


def mae_drop(key: jax.Array, ids: jax.Array, special: jax.Array, ratio=0.5) -> jax.Array:
    """BarcodeMAE masking: each non-special token dropped with probability ``ratio``.

    Args:
      key: PRNG key.
      ids: ``int32[B, L]`` token ids.
      special: ``bool[B, L]`` (BarcodeBERT layout: ids 0 and 1, i.e. [MASK] and [UNK]/padding).
      ratio: drop probability, float or traced scalar.

    Returns:
      ``bool[B, L]`` mask; the count per sequence varies (no static visible length).
    """
    _check(ids, special)
    return draw_centres(key, special, ratio)


def _masked_counts(length: int, ratio: float) -> np.ndarray:
    """``int32[length + 1]``: tokens :func:`mae_drop_fixed` masks for ``n = 0 .. length`` valid."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    n = np.arange(length + 1)
    return np.floor(ratio * n + 0.5).astype(np.int32)


def masked_len(length: int, ratio: float) -> int:
    """Static bound on the masked tokens per sequence under :func:`mae_drop_fixed`:
    ``floor(ratio * L + 0.5)``, the count it masks in a row of ``L`` maskable tokens (the count
    never decreases with ``n``). An MAE decoder head can therefore run on each row's masked
    positions gathered into ``masked_len(L, ratio)`` slots."""
    return int(_masked_counts(length, ratio)[-1])


def visible_len(length: int, ratio: float) -> int:
    """Static bound on the visible tokens per sequence under :func:`mae_drop_fixed`.

    With ``n`` maskable tokens, :func:`mae_drop_fixed` masks ``floor(ratio * n + 0.5)`` and leaves
    ``n - floor(ratio * n + 0.5)`` visible, which never exceeds the returned value for any
    ``n <= length`` (it is that maximum). An MAE encoder can therefore gather the visible
    maskable tokens of each row into ``visible_len(L, ratio)`` slots
    (:func:`gemsjax.models.mae.compact_visible`).

    Args:
      length: ``L``, the padded sequence length.
      ratio: the drop ratio given to :func:`mae_drop_fixed`.
    """
    counts = _masked_counts(length, ratio)
    return int(np.max(np.arange(length + 1) - counts))


def mae_drop_fixed(
    key: jax.Array, ids: jax.Array, special: jax.Array, ratio: float = 0.5
) -> jax.Array:
    """MAE masking with a fixed count: exactly ``floor(ratio * n_valid + 0.5)`` tokens per row.

    Args:
      key: PRNG key.
      ids: ``int32[B, L]`` token ids.
      special: ``bool[B, L]`` positions never masked.
      ratio: drop ratio, a static Python float.

    Returns:
      ``bool[B, L]`` mask, uniformly random among the maskable positions (each gets a random
      ``30 - log2(L)``-bit draw, ties broken by position); the visible maskable count per row is
      at most ``visible_len(L, ratio)``.
    """
    valid = _check(ids, special)
    length = ids.shape[1]
    counts = jnp.asarray(_masked_counts(length, ratio))[valid.sum(axis=1)]
    position_bits = max(length - 1, 1).bit_length()
    draws = random_bits.words(key, ids.shape) >> (2 + position_bits)
    keys = jnp.left_shift(draws.astype(jnp.int32), position_bits) | jnp.arange(length)
    return _smallest(jnp.where(valid, keys, 2**30), counts, 31) & valid


def _share_below(fraction: float) -> int:
    """``round(fraction * 2**32)``: a uint32 draw is below it with probability ``fraction``."""
    return int(round(fraction * 2**32))


def _below(draw: jax.Array, threshold: int) -> jax.Array:
    """``draw < threshold`` for ``draw: uint32[...]`` and a static ``threshold`` in [0, 2**32]."""
    if threshold >= 2**32:
        return jnp.ones(draw.shape, bool)
    return draw < jnp.uint32(threshold)


def corrupt(
    key: jax.Array,
    ids: jax.Array,
    mask: jax.Array,
    vocab_size: int,
    mask_id: int,
    *,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
    random_low: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """BERT corruption of masked positions: [MASK] / random id / unchanged (80/10/10).

    One 32-bit random draw ``u`` per position decides everything: ``u`` below ``mask_frac``
    (as a share of ``2**32``) gives ``[MASK]``; ``u`` in the next ``random_frac`` band gives a
    random id, read from ``u``'s offset in that band (uniform over the ids to within 0.1%:
    the offset is scaled in float32); the rest stay unchanged.

    Args:
      key: PRNG key.
      ids: ``int32[B, L]`` original token ids.
      mask: ``bool[B, L]`` positions to corrupt and predict.
      vocab_size: random ids are uniform in ``[random_low, vocab_size)``.
      mask_id: id of ``[MASK]``.
      mask_frac: share of masked positions replaced by ``mask_id`` (static).
      random_frac: share replaced by a random id; the rest is left unchanged (static).
      random_low: lowest random id. 0 draws from the whole vocabulary, specials included, as
        DNABERT / GeneMask do; ``vocab.num_specials`` draws k-mers only.

    Returns:
      ``(inputs int32[B, L], targets int32[B, L], weights float32[B, L])``: corrupted inputs, the
      original ids, and 1.0 on masked positions, 0.0 elsewhere.
    """
    if not (0.0 <= mask_frac and 0.0 <= random_frac and mask_frac + random_frac <= 1.0):
        raise ValueError(
            f"need mask_frac, random_frac >= 0 and mask_frac + random_frac <= 1, got "
            f"{mask_frac} and {random_frac}"
        )
    if not 0 <= random_low < vocab_size:
        raise ValueError(f"random_low must be in [0, vocab_size={vocab_size}), got {random_low}")
    ids = jnp.asarray(ids, jnp.int32)
    mask_below = _share_below(mask_frac)
    band = _share_below(mask_frac + random_frac) - mask_below
    inputs = ids
    if band > 0:
        draw = random_bits.words(key, ids.shape)
        offset = draw - jnp.uint32(mask_below % 2**32)  # wraps: in the band iff offset < band
        span = vocab_size - random_low
        scaled = jnp.floor(offset.astype(jnp.float32) * jnp.float32(span / band))
        random_ids = random_low + jnp.minimum(scaled.astype(jnp.int32), span - 1)
        inputs = jnp.where(_below(offset, band), random_ids, inputs)
        replace = _below(draw, mask_below)
    elif mask_below < 2**32:
        replace = _below(random_bits.words(key, ids.shape), mask_below)
    else:
        replace = jnp.ones(ids.shape, bool)
    inputs = jnp.where(replace, jnp.int32(mask_id), inputs)
    inputs = jnp.where(mask, inputs, ids)
    return inputs, ids, mask.astype(jnp.float32)


def strategy_functions(params: MaskParams) -> tuple[Callable[..., jax.Array], ...]:
    """One ``fn(key, ids, special, rank_table) -> bool[B, L]`` per entry of :data:`STRATEGIES`."""
    compat = params.reference_code_compat
    return (
        lambda key, ids, special, rank_table: random_span(
            key, ids, special, params.random_span_prob, params.span
        ),
        lambda key, ids, special, rank_table: genemask(
            key, ids, special, rank_table, params.genemask_prob, compat
        ),
        lambda key, ids, special, rank_table: global_pmi(
            key, ids, special, rank_table, params.global_pmi_prob, compat
        ),
        lambda key, ids, special, rank_table: mae_drop(key, ids, special, params.mae_ratio),
    )


def make_mask(
    key: jax.Array,
    strategy: jax.Array,
    ids: jax.Array,
    special: jax.Array,
    rank_table: jax.Array,
    params: MaskParams,
    active: Sequence[int] | None = None,
) -> jax.Array:
    """The mask of a strategy chosen at run time (no recompilation when it changes).

    Args:
      key: PRNG key (every strategy draws from the same key).
      strategy: index into :data:`STRATEGIES`; a scalar (``int32[]``) picks one strategy for the
        whole batch through ``lax.switch`` (only that branch runs); ``int32[B]`` picks one per
        sequence (each strategy in ``active`` is computed for the batch and selected per row).
      ids: ``int32[B, L]`` token ids.
      special: ``bool[B, L]``.
      rank_table: ``int32[V]`` (ignored by random_span and mae_drop).
      params: static hyper-parameters.
      active: static strategy indices that per-sequence selection may pick (default all);
        sequences whose index is not in ``active`` get an empty mask.

    Returns:
      ``bool[B, L]`` mask. Row ``b`` equals the mask of strategy ``strategy[b]`` called directly
      with the same key.
    """
    functions = strategy_functions(params)
    strategy = jnp.asarray(strategy, jnp.int32)
    if strategy.ndim == 0:
        return jax.lax.switch(strategy, functions, key, ids, special, rank_table)
    if strategy.shape != ids.shape[:1]:
        raise ValueError(
            f"per-sequence strategy must be int32[B] with B = {ids.shape[0]}, got "
            f"shape {strategy.shape}"
        )
    active = range(len(STRATEGIES)) if active is None else active
    out = jnp.zeros(ids.shape, bool)
    for index in active:
        chosen = (strategy == index)[:, None]
        out = jnp.where(chosen, functions[index](key, ids, special, rank_table), out)
    return out
