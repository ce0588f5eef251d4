"""Masking curricula: which strategy masks each batch, as pure functions of (step, state).

A :class:`Curriculum` is a NamedTuple of pure functions in the optax style::

    curriculum = get_curriculum("cm_gems", threshold=1.0)
    state = curriculum.init()                                   # CurriculumState (arrays only)
    weights = curriculum.schedule(step, state)                  # float32[S] over STRATEGIES
    strategy = curriculum.sample(key, step, state, batch_size)  # int32[] or int32[B]
    mask = masking.make_mask(key, strategy, ids, special, ranks, curriculum.mask_params,
                             curriculum.active)
    state = curriculum.update(state, val_perplexity)            # after each validation

``step`` may be traced (a jitted step never recompiles as it advances) and the state is a pytree
of fixed-dtype scalars that Orbax checkpoints with the train state. Curricula:

- :func:`cm_gems` -- CM-GEMS (Roy et al., ECAI 2024): GeneMask until the running minimum of
  ``|Δ validation perplexity|`` between consecutive validations falls below ``threshold``, then
  Global-PMI for good.
- :func:`cm_step` -- CM-STEP: per batch, Global-PMI with probability
  ``floor(step / floor(max_steps / 100)) / 100``, otherwise DNABERT random spans.
- :func:`constant` -- one strategy throughout (the baselines); :func:`mixture` -- fixed weights.

``per_example`` chooses how :meth:`Curriculum.sample` draws: ``False``, one strategy per batch
(a scalar, as the reference code does per micro-batch); ``True``, one per sequence (``int32[B]``);
an int ``g``, one per group of ``g`` consecutive sequences (``g = 10`` reproduces the reference's
per-micro-batch draws inside a 250-sequence step of 25 accumulated micro-batches).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gemsjax.masking import STRATEGIES, MaskParams, strategy_index


class CurriculumState(NamedTuple):
    """Validation history a curriculum needs (scalars with fixed dtypes; Orbax-saveable).

    Attributes:
      last_metric: ``float32[]`` last validation metric (perplexity); NaN before the first.
      min_delta: ``float32[]`` running minimum of ``|metric_i - metric_{i-1}|``; +inf until two
        validations (NaN metrics are skipped).
      num_evals: ``int32[]`` validations recorded.
      switched: ``bool[]`` CM-GEMS has moved to its hard phase (never reset).
    """

    last_metric: jax.Array
    min_delta: jax.Array
    num_evals: jax.Array
    switched: jax.Array


class Curriculum(NamedTuple):
    """A masking curriculum (pure functions; see the module docstring).

    Attributes:
      name: registry name.
      init: ``() -> CurriculumState``.
      schedule: ``(step int[], state) -> float32[S]`` strategy weights over
        :data:`gemsjax.masking.STRATEGIES`, summing to 1.
      update: ``(state, val_metric float[]) -> state`` after a validation.
      sample: ``(key, step, state, batch_size: int) -> int32[]`` (one strategy for the batch) or
        ``int32[B]`` (per sequence), drawn from ``schedule``.
      mask_params: the masking probabilities per strategy (static).
      active: static indices of the strategies with a possibly non-zero weight.
    """

    name: str
    init: Callable[[], CurriculumState]
    schedule: Callable[[jax.Array, CurriculumState], jax.Array]
    update: Callable[[CurriculumState, jax.Array], CurriculumState]
    sample: Callable[..., jax.Array]
    mask_params: MaskParams
    active: tuple[int, ...]


def init_state() -> CurriculumState:
    """The state before any validation."""
    return CurriculumState(last_metric=jnp.float32(jnp.nan), min_delta=jnp.float32(jnp.inf),
                           num_evals=jnp.int32(0), switched=jnp.bool_(False))


def record(state: CurriculumState, val_metric) -> CurriculumState:
    """Record a validation metric: last value, running min of ``|Δ|`` (NaN skipped), count."""
    val_metric = jnp.asarray(val_metric, jnp.float32)
    delta = jnp.abs(val_metric - state.last_metric)
    return state._replace(last_metric=val_metric, min_delta=jnp.fmin(state.min_delta, delta),
                          num_evals=state.num_evals + 1)


def _one_hot(name: str) -> jax.Array:
    return jax.nn.one_hot(strategy_index(name), len(STRATEGIES), dtype=jnp.float32)


def _mask_params(mask_kwargs: Mapping) -> MaskParams:
    unknown = set(mask_kwargs) - set(MaskParams._fields)
    if unknown:
        raise ValueError(f"unknown masking option(s) {sorted(unknown)}; valid: "
                         f"{MaskParams._fields}")
    return MaskParams(**mask_kwargs)


def _sampler(schedule, per_example: bool | int):
    """``sample(key, step, state, batch_size)`` drawing strategies from ``schedule``."""
    if isinstance(per_example, bool):
        group = 1 if per_example else None
    elif isinstance(per_example, int) and per_example >= 1:
        group = per_example
    else:
        raise ValueError(f"per_example must be a bool or a group size >= 1, got {per_example!r}")

    def sample(key, step, state, batch_size: int) -> jax.Array:
        logits = jnp.log(schedule(step, state))
        if group is None:
            return jax.random.categorical(key, logits).astype(jnp.int32)
        groups = -(-batch_size // group)
        draws = jax.random.categorical(key, logits, shape=(groups,)).astype(jnp.int32)
        return jnp.repeat(draws, group, total_repeat_length=groups * group)[:batch_size]

    return sample


def _curriculum(name, schedule, update, per_example, mask_kwargs, active) -> Curriculum:
    return Curriculum(name=name, init=init_state, schedule=schedule, update=update,
                      sample=_sampler(schedule, per_example),
                      mask_params=_mask_params(mask_kwargs),
                      active=tuple(sorted(strategy_index(s) for s in active)))


def constant(strategy: str, *, per_example: bool | int = False, **mask_kwargs) -> Curriculum:
    """One strategy for every batch (baselines: random_span, genemask, global_pmi, mae_drop).

    Args:
      strategy: a name in :data:`gemsjax.masking.STRATEGIES`.
      per_example: see the module docstring (irrelevant to the masks here).
      **mask_kwargs: :class:`gemsjax.masking.MaskParams` fields, e.g. ``global_pmi_prob``.
    """
    weights = _one_hot(strategy)
    return _curriculum(strategy, lambda step, state: weights, record, per_example, mask_kwargs,
                       (strategy,))


def mixture(weights: Mapping[str, float], *, per_example: bool | int = True,
            **mask_kwargs) -> Curriculum:
    """Fixed strategy weights; by default each sequence draws its own strategy.

    Args:
      weights: ``{strategy: weight}``, non-negative, normalized here.
      per_example: see the module docstring.
      **mask_kwargs: :class:`gemsjax.masking.MaskParams` fields.
    """
    vector = np.zeros(len(STRATEGIES), np.float32)
    for name, weight in weights.items():
        if not weight >= 0:
            raise ValueError(f"mixture weight of {name!r} must be >= 0, got {weight}")
        vector[strategy_index(name)] = weight
    if vector.sum() <= 0:
        raise ValueError(f"mixture weights must have a positive sum, got {dict(weights)}")
    vector = jnp.asarray(vector / vector.sum())
    active = [name for name, weight in weights.items() if weight > 0]
    return _curriculum("mixture", lambda step, state: vector, record, per_example, mask_kwargs,
                       active)


def cm_gems(threshold: float = 1.0, *, per_example: bool | int = False,
            **mask_kwargs) -> Curriculum:
    """CM-GEMS: GeneMask, then Global-PMI once validation perplexity plateaus (one-way).

    ``update`` records each validation perplexity; once the running minimum of ``|Δ perplexity|``
    between consecutive validations is below ``threshold``, ``schedule`` is Global-PMI for good
    (the reference re-reads ``eval_results.txt`` before each batch; here the state lives in the
    train state, so a stale file from an earlier run cannot trigger the switch).

    Args:
      threshold: ``--threshold_perplexity_drop`` (1.0 in the reference).
      per_example: see the module docstring.
      **mask_kwargs: :class:`gemsjax.masking.MaskParams` fields; the reference hard-codes
        GeneMask's ``genemask_prob=0.0176`` and uses ``--mlm_probability`` for Global-PMI
        (``global_pmi_prob``, default 0.0136 as in CM-STEP; 0.0176 in GeneMask's script).
    """
    if not threshold > 0:
        raise ValueError(f"cm_gems threshold must be > 0, got {threshold}")
    easy, hard = _one_hot("genemask"), _one_hot("global_pmi")

    def schedule(step, state):
        return jnp.where(state.switched, hard, easy)

    def update(state, val_metric):
        state = record(state, val_metric)
        return state._replace(switched=state.switched | (state.min_delta < threshold))

    return _curriculum("cm_gems", schedule, update, per_example, mask_kwargs,
                       ("genemask", "global_pmi"))


def cm_step(max_steps: int, *, per_example: bool | int = False, **mask_kwargs) -> Curriculum:
    """CM-STEP: Global-PMI with probability rising from 0 to 1 in 100 stairs, else DNABERT spans.

    ``p_global(step) = min(floor(step / floor(max_steps / 100)) / 100, 1)``, ``step`` counting
    completed optimizer updates from 0 (the reference's ``global_step``; it does not clip, and
    fails past 1).

    Args:
      max_steps: total training steps (>= 100).
      per_example: see the module docstring (the reference draws once per micro-batch).
      **mask_kwargs: :class:`gemsjax.masking.MaskParams` fields; the reference hard-codes
        ``random_span_prob=0.025`` and ``global_pmi_prob=0.0136``, the defaults.
    """
    stair = max_steps // 100
    if stair < 1:
        raise ValueError(f"cm_step needs max_steps >= 100 (100 stairs of floor(max_steps/100) "
                         f"steps), got {max_steps}")
    spans, hard = _one_hot("random_span"), _one_hot("global_pmi")

    def schedule(step, state):
        p_global = jnp.minimum(jnp.asarray(step) // stair, 100).astype(jnp.float32) / 100
        return (1 - p_global) * spans + p_global * hard

    return _curriculum("cm_step", schedule, record, per_example, mask_kwargs,
                       ("random_span", "global_pmi"))


CURRICULA: dict[str, Callable[..., Curriculum]] = {
    "cm_gems": cm_gems,
    "cm_step": cm_step,
    "constant": constant,
    "mixture": mixture,
    **{name: functools.partial(constant, name) for name in STRATEGIES},
}


def get_curriculum(name: str, **kwargs) -> Curriculum:
    """A curriculum by name: ``cm_gems``, ``cm_step``, ``constant``, ``mixture``, or a strategy
    name for its constant baseline; ``kwargs`` go to the constructor."""
    if name not in CURRICULA:
        raise ValueError(f"unknown curriculum {name!r}; valid: {sorted(CURRICULA)}")
    return CURRICULA[name](**kwargs)
