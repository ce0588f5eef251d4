"""Masking curricula: which strategy masks each batch, as pure functions of (step, state).

A :class:`Curriculum` only schedules; the masking probabilities belong to the step's
specification (:class:`gemsjax.train.spec.StepSpec`). It is a NamedTuple of pure functions in the
optax style::

    curriculum = cm_gems(threshold=1.0)                          # or from_config(config.masking)
    state = curriculum.init()                                   # CurriculumState (arrays only)
    weights = curriculum.schedule(step, state)                  # float32[S] over STRATEGIES
    strategy = curriculum.sample(key, step, state, batch_size)  # int32[] or int32[B]
    mask = masking.make_mask(key, strategy, ids, special, rank_table, mask_params,
                             curriculum.active)
    state = curriculum.update(state, val_perplexity, step)      # after each validation

``step`` may be traced (a jitted step never recompiles as it advances) and the state is a pytree
of fixed-dtype scalars that Orbax checkpoints with the train state. Curricula:

- :func:`cm_gems` -- CM-GEMS (Roy et al., ECAI 2024): GeneMask until the running minimum of
  ``|Δ validation perplexity|`` between consecutive validations (or, ``relative``, of
  ``|Δ| / previous``) falls below ``threshold``, then Global-PMI for good.
- :func:`cm_step` -- CM-STEP: per batch, Global-PMI with probability
  ``floor(step / floor(max_steps / 100)) / 100``, otherwise DNABERT random spans.
- :func:`constant` -- one strategy throughout (the baselines).

:func:`from_config` is the one dispatcher from a config's ``masking`` section.

``per_example`` chooses how :meth:`Curriculum.sample` draws: ``False``, one strategy per batch
(a scalar, as the reference code does per micro-batch); ``True``, one per sequence (``int32[B]``);
an int ``g``, one per group of ``g`` consecutive sequences (``g = 10`` reproduces the reference's
per-micro-batch draws inside a 250-sequence step of 25 accumulated micro-batches).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gemsjax.masking import STRATEGIES, strategy_index

THRESHOLD_MODES = ("absolute", "relative")


class CurriculumState(NamedTuple):
    """Validation history a curriculum needs (scalars with fixed dtypes; Orbax-saveable).

    Attributes:
      last_metric: ``float32[]`` last validation metric (perplexity); NaN before the first.
      min_delta: ``float32[]`` running minimum of ``|metric_i - metric_{i-1}|`` (divided by
        ``metric_{i-1}`` for a relative plateau rule); +inf until two validations (NaN metrics
        are skipped).
      num_evals: ``int32[]`` validations recorded.
      switched: ``bool[]`` CM-GEMS has moved to its hard phase (never reset).
      switch_step: ``int32[]`` the first step trained in the hard phase; -1 until then.
    """

    last_metric: jax.Array
    min_delta: jax.Array
    num_evals: jax.Array
    switched: jax.Array
    switch_step: jax.Array


class Curriculum(NamedTuple):
    """A masking curriculum (pure functions; see the module docstring).

    Attributes:
      name: the curriculum's name.
      init: ``() -> CurriculumState``.
      schedule: ``(step int[], state) -> float32[S]`` strategy weights over
        :data:`gemsjax.masking.STRATEGIES`, summing to 1.
      update: ``(state, val_metric float[], step int[]) -> state`` after a validation at
        ``step`` (optimizer updates done; the next batch trains at ``step``).
      sample: ``(key, step, state, batch_size: int) -> int32[]`` (one strategy for the batch) or
        ``int32[B]`` (per sequence), drawn from ``schedule``.
      active: static indices of the strategies with a possibly non-zero weight.
    """

    name: str
    init: Callable[[], CurriculumState]
    schedule: Callable[[jax.Array, CurriculumState], jax.Array]
    update: Callable[[CurriculumState, jax.Array, jax.Array], CurriculumState]
    sample: Callable[..., jax.Array]
    active: tuple[int, ...]


def init_state() -> CurriculumState:
    """The state before any validation."""
    return CurriculumState(
        last_metric=jnp.float32(jnp.nan),
        min_delta=jnp.float32(jnp.inf),
        num_evals=jnp.int32(0),
        switched=jnp.bool_(False),
        switch_step=jnp.int32(-1),
    )


def record(
    state: CurriculumState, val_metric, step=None, *, relative: bool = False
) -> CurriculumState:
    """Record a validation metric: last value, running min of ``|Δ|`` (``|Δ| / previous`` when
    ``relative``; NaN skipped), count. ``step`` is unused here (curricula that switch record
    it)."""
    del step
    val_metric = jnp.asarray(val_metric, jnp.float32)
    delta = jnp.abs(val_metric - state.last_metric)
    if relative:
        delta = delta / state.last_metric
    return state._replace(
        last_metric=val_metric,
        min_delta=jnp.fmin(state.min_delta, delta),
        num_evals=state.num_evals + 1,
    )


def _one_hot(name: str) -> jax.Array:
    return jax.nn.one_hot(strategy_index(name), len(STRATEGIES), dtype=jnp.float32)


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


def _curriculum(name, schedule, update, per_example, active) -> Curriculum:
    return Curriculum(
        name=name,
        init=init_state,
        schedule=schedule,
        update=update,
        sample=_sampler(schedule, per_example),
        active=tuple(sorted(strategy_index(s) for s in active)),
    )


def constant(strategy: str, *, per_example: bool | int = False) -> Curriculum:
    """One strategy for every batch (baselines: random_span, genemask, global_pmi, mae_drop).

    Args:
      strategy: a name in :data:`gemsjax.masking.STRATEGIES`.
      per_example: see the module docstring (irrelevant to the masks here).
    """
    weights = _one_hot(strategy)
    return _curriculum(strategy, lambda step, state: weights, record, per_example, (strategy,))


def cm_gems(
    threshold: float = 1.0, *, threshold_mode: str = "absolute", per_example: bool | int = False
) -> Curriculum:
    """CM-GEMS: GeneMask, then Global-PMI once validation perplexity plateaus (one-way).

    ``update`` records each validation perplexity; once the running minimum of ``|Δ perplexity|``
    between consecutive validations is below ``threshold``, ``schedule`` is Global-PMI for good
    (the reference re-reads ``eval_results.txt`` before each batch; here the state lives in the
    train state, so a stale file from an earlier run cannot trigger the switch). The state records
    the step of the switch (``switch_step``: the first step trained on Global-PMI).

    Args:
      threshold: ``--threshold_perplexity_drop`` (1.0 in the reference, ``absolute``).
      threshold_mode: ``"absolute"`` (the paper's rule, perplexity units) or ``"relative"``
        (``|Δ| / previous perplexity``: a rule that triggers at any perplexity scale, e.g. a
        short CPU run at perplexity ~2,000 moving by ~100 per validation).
      per_example: see the module docstring.
    """
    if not threshold > 0:
        raise ValueError(f"cm_gems threshold must be > 0, got {threshold}")
    if threshold_mode not in THRESHOLD_MODES:
        raise ValueError(
            f"cm_gems threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}"
        )
    easy, hard = _one_hot("genemask"), _one_hot("global_pmi")

    def schedule(step, state):
        return jnp.where(state.switched, hard, easy)

    def update(state, val_metric, step):
        state = record(state, val_metric, relative=threshold_mode == "relative")
        switches = ~state.switched & (state.min_delta < threshold)
        return state._replace(
            switched=state.switched | switches,
            switch_step=jnp.where(switches, jnp.asarray(step, jnp.int32), state.switch_step),
        )

    return _curriculum("cm_gems", schedule, update, per_example, ("genemask", "global_pmi"))


def cm_step(max_steps: int, *, per_example: bool | int = False) -> Curriculum:
    """CM-STEP: Global-PMI with probability rising from 0 to 1 in 100 stairs, else DNABERT spans.

    ``p_global(step) = min(floor(step / floor(max_steps / 100)) / 100, 1)``, ``step`` counting
    completed optimizer updates from 0 (the reference's ``global_step``; it does not clip, and
    fails past 1).

    Args:
      max_steps: total training steps (>= 100).
      per_example: see the module docstring (the reference draws once per micro-batch).
    """
    stair = max_steps // 100
    if stair < 1:
        raise ValueError(
            f"cm_step needs max_steps >= 100 (100 stairs of floor(max_steps/100) "
            f"steps), got {max_steps}"
        )
    spans, hard = _one_hot("random_span"), _one_hot("global_pmi")

    def schedule(step, state):
        p_global = jnp.minimum(jnp.asarray(step) // stair, 100).astype(jnp.float32) / 100
        return (1 - p_global) * spans + p_global * hard

    return _curriculum("cm_step", schedule, record, per_example, ("random_span", "global_pmi"))


CURRICULA = ("cm_gems", "cm_step", "constant")


def from_config(masking: Mapping, max_steps: int) -> Curriculum:
    """The curriculum a config's ``masking`` section names (``masking.curriculum``), built from
    the keys that curriculum reads: ``per_example``; ``threshold`` and ``threshold_mode``
    (cm_gems); ``strategy`` (constant). ``max_steps`` is the run's length (cm_step's stairs)."""
    name = masking["curriculum"]
    per_example = masking["per_example"]
    if name == "cm_gems":
        return cm_gems(
            masking["threshold"], threshold_mode=masking["threshold_mode"], per_example=per_example
        )
    if name == "cm_step":
        return cm_step(max_steps, per_example=per_example)
    if name == "constant":
        return constant(masking["strategy"], per_example=per_example)
    raise ValueError(f"config.masking.curriculum={name!r}; valid: {CURRICULA}")
