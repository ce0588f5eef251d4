"""The jitted train and eval steps: masks are made on device, inside the step.

One optimizer update per call, as :class:`gemsjax.train.spec.StepSpec` describes it::

    key      = fold_in(key(seed), step)
    strategy = curriculum.sample(key_strategy, step, curriculum_state)      (per micro-batch)
    mask     = masking.make_mask(key_mask, strategy, ids, special, rank_table, spec.masking)
    inputs   = masking.corrupt(key_corrupt, ids, mask)                      (MLM)
    loss     = cross-entropy of model(inputs) at the masked positions
    grads    = mean over ``grad_accum`` micro-batches (a ``lax.scan``) → optax → new params

The input batch is the raw token batch from the pipeline (``ids, attention: int32[B, L]``); the
pipeline never masks, so a resumed run (same seed, step and data order) reproduces the same masks.
Micro-batch ``j`` of a step holds rows ``j, j + A, j + 2A, ...`` (``A = grad_accum``), so every
device's contiguous block of the sharded batch feeds every micro-batch without resharding.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gemsjax import masking
from gemsjax.curriculum import CurriculumState
from gemsjax.models.bert import Pack
from gemsjax.train import sharding
from gemsjax.train.spec import StepSpec


class TrainState(NamedTuple):
    """Everything a run checkpoints, as arrays (Orbax-saveable); built by
    :func:`init_train_state`.

    Attributes:
      step: ``int32[]`` optimizer updates done.
      params: the model's ``nnx.State`` (``nnx.Param`` leaves, float32).
      opt_state: optax state.
      curriculum: the curriculum's validation history.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    curriculum: CurriculumState


def init_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, spec: StepSpec
) -> TrainState:
    """Step 0: ``model``'s parameters, the optimizer's initial state, a fresh curriculum."""
    params = nnx.state(model, nnx.Param)
    return TrainState(
        step=jnp.int32(0),
        params=params,
        opt_state=tx.init(params),
        curriculum=spec.curriculum.init(),
    )


def step_graphdefs(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.GraphDef]:
    """``(train, eval)`` graph definitions of ``model`` (dropout on / off) for the steps; works on
    an ``nnx.eval_shape`` model. Leaves ``model`` in eval mode."""
    model.train()
    train_graphdef, _ = nnx.split(model, nnx.Param)
    model.eval()
    eval_graphdef, _ = nnx.split(model, nnx.Param)
    return train_graphdef, eval_graphdef


def special_positions(ids: jax.Array, attention: jax.Array, spec: StepSpec) -> jax.Array:
    """``bool[B, L]``: special tokens and padding (attention 0), never masked."""
    return masking.special_mask(ids, range(spec.vocab.num_specials)) | (attention == 0)


def masked_batch(
    spec: StepSpec,
    key: jax.Array,
    step: jax.Array,
    curriculum_state: CurriculumState,
    ids: jax.Array,
    attention: jax.Array,
    rank_table: jax.Array,
) -> dict:
    """Mask and corrupt one (micro-)batch.

    Args:
      key: this micro-batch's key.
      step: ``int32[]`` optimizer step (the curriculum's clock).
      ids, attention: ``int32[B, L]``.
      rank_table: ``int32[V]`` PMI ranks by token id.

    Returns:
      dict with ``inputs int32[B, L]`` (model input ids), ``targets int32[B, L]``,
      ``weights float32[B, L]`` (loss weights), ``mask bool[B, L]``, ``special bool[B, L]`` and
      ``strategy int32[]`` or ``int32[B]``.
    """
    k_strategy, k_mask, k_corrupt = jax.random.split(key, 3)
    special = special_positions(ids, attention, spec)
    if spec.kind == "mae":
        strategy = jnp.int32(masking.strategy_index("mae_drop"))
        ratio = spec.masking.mae_ratio
        mask = (
            masking.mae_drop_fixed(k_mask, ids, special, ratio)
            if spec.mae_draw == "fixed"
            else masking.mae_drop(k_mask, ids, special, ratio)
        )
        targets = jnp.maximum(ids - spec.vocab.num_specials, 0)
        return dict(
            inputs=ids,
            targets=targets,
            weights=mask.astype(jnp.float32),
            mask=mask,
            special=special,
            strategy=strategy,
        )
    cur = spec.curriculum
    strategy = cur.sample(k_strategy, step, curriculum_state, ids.shape[0])
    mask = masking.make_mask(k_mask, strategy, ids, special, rank_table, spec.masking, cur.active)
    inputs, targets, weights = masking.corrupt(
        k_corrupt,
        ids,
        mask,
        spec.vocab.size,
        spec.vocab.mask_id,
        mask_frac=spec.mask_frac,
        random_frac=spec.random_frac,
        random_low=spec.random_low,
    )
    if spec.loss_on == "all":
        weights = (~special).astype(jnp.float32)
    return dict(
        inputs=inputs,
        targets=targets,
        weights=weights,
        mask=mask,
        special=special,
        strategy=strategy,
    )


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict:
    """Weighted cross-entropy and accuracy sums (fp32): ``loss_sum, correct, count``.

    ``logits: float[..., C]``, ``targets: int32[...]``, ``weights: float32[...]``. A prediction
    is correct when the target's logit is the row maximum (an ``argmax`` up to exact ties, which
    it counts as correct); the maximum is the one the log-sum-exp needs anyway, where a separate
    ``argmax`` (an index-carrying reduction) cost XLA's CPU backend a full pass of its own.
    """
    logits = logits.astype(jnp.float32)
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    log_norm = jnp.log(jnp.sum(jnp.exp(logits - peak), axis=-1)) + peak[..., 0]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    hit = (target_logit >= peak[..., 0]).astype(jnp.float32)
    return dict(
        loss_sum=((log_norm - target_logit) * weights).sum(),
        correct=(hit * weights).sum(),
        count=weights.sum(),
    )


def loss_sums(
    spec: StepSpec,
    model: nnx.Module,
    batch: dict,
    attention: jax.Array,
    dropout_key: jax.Array | None,
    head_slots: MlmSlots | MaeSlots | None = None,
) -> dict:
    """:func:`cross_entropy_sums` of ``model`` on a masked ``batch``.

    ``head_slots`` (MLM, :class:`MlmSlots`): the head and the encoder's last layer run on each
    row's loss positions only, gathered in position order into ``rows`` slots (unused slots
    weigh 0), and after the last layer's attention packed per batch shard into ``packed`` slots
    when it is set (:func:`batch_groups`); the rest of the encoder runs on the whole batch (rows
    stay where they are, so this shards like the batch). Exact only where :func:`head_fits`
    (and :func:`pack_fits`). None: the model's output at every position.
    ``head_slots`` (MAE, :class:`MaeSlots`): the encoder runs on ``visible`` slots
    (:meth:`StepSpec.num_visible`), the decoder's last block and classifier on ``masked`` slots
    of loss positions as the MLM head does (:meth:`StepSpec.head_slots`); exact where
    :func:`visible_fits` and :func:`head_fits`. None: the encoder on ``L`` slots and the
    decoder's output at every position.
    """
    rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
    targets, weights = batch["targets"], batch["weights"]
    if spec.kind == "mae":
        # The dropped-token encoder sees every unmasked token but padding ([UNK] k-mers too, as
        # the reference), in ``head_slots`` slots (None: L); padding is never a key nor a target,
        # so dropping it changes no output. The BERT-style baseline feeds [MASK] instead.
        dropped = batch["mask"] | (attention == 0) if model.variant == "dropped" else batch["mask"]
        run = lambda **kw: model(batch["inputs"], attention, dropped, rngs=rngs, **kw)
        if head_slots is None:
            return cross_entropy_sums(run(num_visible=attention.shape[1]), targets, weights)
        return _at_loss_positions(
            lambda positions: run(num_visible=head_slots.visible, positions=positions),
            targets,
            weights,
            head_slots.masked,
        )
    if head_slots is None:
        return cross_entropy_sums(model(batch["inputs"], attention, rngs=rngs), targets, weights)
    inputs = batch["inputs"]
    return _at_loss_positions(
        lambda positions: model(inputs, attention, positions=positions, rngs=rngs),
        targets,
        weights,
        head_slots.rows,
        head_slots.packed,
        lambda positions, pack, data: model.packed_sums(
            inputs, attention, positions, pack, cross_entropy_sums, data, rngs=rngs
        ),
    )


def _first(flags: jax.Array, size: int) -> jax.Array:
    """``int32[..., size]``: the indices of the first ``size`` true entries of each row of
    ``flags: bool[..., N]``, in order (0 past the last one)."""
    nonzero = lambda row: jnp.nonzero(row, size=size, fill_value=0)[0]
    return jax.vmap(nonzero)(flags.reshape(-1, flags.shape[-1])).reshape(*flags.shape[:-1], size)


def _at_loss_positions(
    logits_at,
    targets: jax.Array,
    weights: jax.Array,
    slots: int,
    packed: int | None = None,
    packed_sums=None,
) -> dict:
    """:func:`cross_entropy_sums` of ``logits_at(positions)`` (``float[B, slots, C]``) at each
    row's loss positions (``weights != 0``, in position order) gathered into ``slots``
    positions; unused slots weigh 0. ``targets: int32[B, L]``, ``weights: float32[B, L]``.
    ``packed``: ``packed_sums(positions, pack, (targets, weights))`` instead (the model's
    :meth:`~gemsjax.models.bert.BertForMaskedLM.packed_sums` of :func:`cross_entropy_sums`),
    the used slots of each group of ``B / G`` rows (:func:`batch_groups`) packed in order:
    ``pack`` (:class:`~gemsjax.models.bert.Pack`) indexes each group's ``B / G * slots`` slots
    with ``packed`` entries, its ``used`` the fullest group's count."""
    on_loss = weights != 0
    positions = _first(on_loss, slots)
    used = jnp.arange(slots) < on_loss.sum(axis=1, keepdims=True)
    pick = functools.partial(jnp.take_along_axis, indices=positions, axis=1)
    targets, weights = pick(targets), jnp.where(used, pick(weights), 0.0)
    if packed is None:
        return cross_entropy_sums(logits_at(positions), targets, weights)
    grouped = lambda x: x.reshape(batch_groups(x.shape[0]), -1)
    index = _first(grouped(used), packed)
    take = functools.partial(jnp.take_along_axis, indices=index, axis=1)
    counts = grouped(used).sum(axis=1, keepdims=True)
    in_pack = jnp.arange(packed) < counts
    pack = Pack(index, jnp.minimum(counts.max(), packed).astype(jnp.int32))
    data = (take(grouped(targets)), jnp.where(in_pack, take(grouped(weights)), 0.0))
    return packed_sums(positions, pack, data)


def batch_groups(rows: int) -> int:
    """The shards of a batch of ``rows`` rows under the active mesh: the product of its batch
    axes' sizes (``sharding.BATCH_AXES``; 1 without a mesh), or its largest divisor of
    ``rows``."""
    return math.gcd(sharding.batch_shards(jax.sharding.get_abstract_mesh()), rows)


def head_fits(batch: dict, slots: int) -> jax.Array:
    """``bool[]``: no row of the masked ``batch`` has more than ``slots`` loss positions."""
    return jnp.all((batch["weights"] != 0).sum(axis=1) <= slots)


def pack_fits(batch: dict, packed: int) -> jax.Array:
    """``bool[]``: no group of rows (:func:`batch_groups`) of the masked ``batch`` has more than
    ``packed`` loss positions."""
    counts = (batch["weights"] != 0).sum(axis=1)
    return jnp.all(counts.reshape(batch_groups(counts.shape[0]), -1).sum(axis=1) <= packed)


def visible_fits(batch: dict, attention: jax.Array, slots: int) -> jax.Array:
    """``bool[]`` (MAE): no row of the masked ``batch`` has more than ``slots`` tokens that are
    neither masked nor padding."""
    return jnp.all((~batch["mask"] & (attention != 0)).sum(axis=1) <= slots)


class MaeSlots(NamedTuple):
    """The MAE step's static slot counts per row: ``visible`` for the encoder, ``masked`` for
    the decoder's last block and classifier."""

    visible: int
    masked: int


class MlmSlots(NamedTuple):
    """The MLM step's static slot counts: ``rows`` per row for the last layer's queries (and
    everything after them unless packed), ``packed`` per batch shard after its attention (None:
    no packing)."""

    rows: int
    packed: int | None


def _slots(
    spec: StepSpec, batch: dict, attention: jax.Array
) -> tuple[MlmSlots | MaeSlots | None, jax.Array]:
    """``(slots, fits)``: the MLM's :class:`MlmSlots` or the MAE's :class:`MaeSlots` (None:
    every position) and whether this batch fits them."""
    length = attention.shape[1]
    if spec.kind == "mae":
        slots = MaeSlots(spec.num_visible(length), spec.head_slots(length))
        if min(slots) >= length:
            return None, None
        fits = visible_fits(batch, attention, slots.visible) & head_fits(batch, slots.masked)
        return slots, fits
    slots = spec.head_slots(length)
    if slots is None:
        return None, None
    rows = attention.shape[0]
    packed = spec.pack_slots(rows // batch_groups(rows), length)
    fits = head_fits(batch, slots)
    return MlmSlots(slots, packed), fits if packed is None else fits & pack_fits(batch, packed)


def _strategy_counts(strategy: jax.Array, batch_size: int) -> jax.Array:
    """``float32[S]``: sequences masked by each strategy."""
    one_hot = jax.nn.one_hot(strategy, len(masking.STRATEGIES), dtype=jnp.float32)
    return one_hot * batch_size if strategy.ndim == 0 else one_hot.sum(axis=0)


def _micro_batches(x: jax.Array, accum: int) -> jax.Array:
    """``[B, ...] -> [A, B / A, ...]`` with micro-batch ``j`` = rows ``j, j + A, ...``."""
    if x.shape[0] % accum:
        raise ValueError(
            f"batch of {x.shape[0]} rows does not split into grad_accum={accum} "
            "micro-batches; make data.batch_size a multiple of train.grad_accum"
        )
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)


def make_train_step(
    spec: StepSpec,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
):
    """``train_step(state, batch, rank_table) -> (state, metrics)``, pure (jit it with shardings).

    Args of the returned function:
      state: :class:`TrainState`.
      batch: ``{"ids", "attention"}: int32[B, L]`` (global batch, ``B % grad_accum == 0``).
      rank_table: ``int32[V]``.

    Metrics (scalars unless noted): ``loss`` (mean masked cross-entropy), ``masked_accuracy``,
    ``mask_rate`` (masked / maskable tokens), ``grad_norm``, ``param_norm`` (after the update),
    ``lr``, ``tokens`` (non-pad tokens),
    ``strategy_mix float32[S]`` (share of sequences per strategy).
    """

    def mean_loss(params, batch, attention, dropout_key, head_slots):
        sums = loss_sums(
            spec, nnx.merge(graphdef, params), batch, attention, dropout_key, head_slots
        )
        return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), sums

    loss_and_grads = jax.value_and_grad(mean_loss, has_aux=True)

    def micro_grads(params, micro, key, step, curriculum_state, rank_table):
        ids, attention = micro["ids"], micro["attention"]
        mask_key, dropout_key = jax.random.split(key)
        batch = masked_batch(spec, mask_key, step, curriculum_state, ids, attention, rank_table)
        slots, fits = _slots(spec, batch, attention)
        everywhere = lambda: loss_and_grads(params, batch, attention, dropout_key, None)
        if slots is None:
            (loss, sums), grads = everywhere()
        else:
            # The cond wraps the gradient computation, so the full head's [B, L, V] residuals
            # are never materialized while the masked-only head runs.
            at_masked = lambda: loss_and_grads(params, batch, attention, dropout_key, slots)
            (loss, sums), grads = jax.lax.cond(fits, at_masked, everywhere)
        aux = dict(
            sums,
            masked=batch["mask"].sum(),
            maskable=(~batch["special"]).sum(),
            tokens=(attention != 0).sum(),
            strategy=_strategy_counts(batch["strategy"], ids.shape[0]),
        )
        return (loss, aux), grads

    def train_step(state: TrainState, batch: dict, rank_table: jax.Array):
        key = jax.random.fold_in(jax.random.key(spec.seed), state.step)
        micro = jax.tree.map(lambda x: _micro_batches(x, spec.grad_accum), batch)

        def accumulate(carry, inputs):
            index, micro_batch = inputs
            (loss, aux), grads = micro_grads(
                state.params,
                micro_batch,
                jax.random.fold_in(key, index),
                state.step,
                state.curriculum,
                rank_table,
            )
            total = jax.tree.map(jnp.add, carry, (grads, loss, aux))
            return total, None

        zeros = jax.tree.map(
            jnp.zeros_like,
            jax.eval_shape(
                lambda: micro_grads(
                    state.params,
                    jax.tree.map(lambda x: x[0], micro),
                    key,
                    state.step,
                    state.curriculum,
                    rank_table,
                )
            ),
        )
        (_, aux0), grads0 = zeros
        (grads, loss, aux), _ = jax.lax.scan(
            accumulate, (grads0, jnp.float32(0), aux0), (jnp.arange(spec.grad_accum), micro)
        )
        grads = jax.tree.map(lambda g: g / spec.grad_accum, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(
            loss=loss / spec.grad_accum,
            masked_accuracy=aux["correct"] / jnp.maximum(aux["count"], 1.0),
            mask_rate=aux["masked"] / jnp.maximum(aux["maskable"], 1),
            grad_norm=optax.tree.norm(grads),
            param_norm=optax.tree.norm(params),
            lr=lr_schedule(state.step),
            tokens=aux["tokens"],
            strategy_mix=aux["strategy"] / batch["ids"].shape[0],
        )
        new_state = state._replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(spec: StepSpec, graphdef: nnx.GraphDef):
    """``eval_step(state, batch, rank_table, batch_index) -> sums`` under the current masking.

    Masks come from ``fold_in(fold_in(key(seed + 1), step), batch_index)``: fixed for a given
    step, so a validation pass is repeatable. Returns ``loss_sum, correct, count`` (float32[]) to
    be summed over batches; perplexity = ``exp(loss_sum / count)``.
    """

    def eval_step(state: TrainState, batch: dict, rank_table: jax.Array, batch_index: jax.Array):
        key = jax.random.fold_in(
            jax.random.fold_in(jax.random.key(spec.seed + 1), state.step), batch_index
        )
        ids, attention = batch["ids"], batch["attention"]
        masked = masked_batch(spec, key, state.step, state.curriculum, ids, attention, rank_table)
        model = nnx.merge(graphdef, state.params)
        slots, fits = _slots(spec, masked, attention)
        everywhere = lambda: loss_sums(spec, model, masked, attention, None)
        if slots is None:
            return everywhere()
        return jax.lax.cond(
            fits, lambda: loss_sums(spec, model, masked, attention, None, slots), everywhere
        )

    return eval_step
