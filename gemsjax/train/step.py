"""The jitted train and eval steps: masks are made on device, inside the step.

One optimizer update per call::

    key      = fold_in(key(seed), step)
    strategy = curriculum.sample(key_strategy, step, curriculum_state)      (per micro-batch)
    mask     = masking.make_mask(key_mask, strategy, ids, special, rank_table)
    inputs   = masking.corrupt(key_corrupt, ids, mask)                      (MLM)
    loss     = cross-entropy of model(inputs) at the masked positions
    grads    = mean over ``grad_accum`` micro-batches (a ``lax.scan``) → optax → new params

The input batch is the raw token batch from the pipeline (``ids, attention: int32[B, L]``); the
pipeline never masks, so a resumed run (same seed, step and data order) reproduces the same masks.
Micro-batch ``j`` of a step holds rows ``j, j + A, j + 2A, ...`` (``A = grad_accum``), so every
device's contiguous block of the sharded batch feeds every micro-batch without resharding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gemsjax import masking
from gemsjax.curriculum import Curriculum, CurriculumState
from gemsjax.vocab import Vocab

TASKS = ("mlm", "mae")


class TrainState(NamedTuple):
    """Everything a run checkpoints, as arrays (Orbax-saveable).

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


@dataclasses.dataclass(frozen=True)
class Task:
    """Static description of what a step computes (hashable; closed over by the jitted step).

    Attributes:
      kind: ``"mlm"`` (BERT masked-LM: mask, corrupt, predict token ids) or ``"mae"``
        (BarcodeMAE: drop a fixed number of tokens, predict the k-mer class ``id - specials``).
      vocab: the token layout (specials are never masked).
      curriculum: strategy schedule and masking probabilities.
      seed: base of every step key, ``fold_in(key(seed), step)``.
      grad_accum: micro-batches per optimizer update.
      mask_frac, random_frac, random_low: BERT corruption (see :func:`masking.corrupt`).
      loss_on: ``"masked"`` or ``"all"`` (every non-special token, BarcodeBERT).
      num_visible: MAE encoder length, :func:`masking.visible_len`: a static bound on the
        visible maskable tokens per row. The encoder is given those only; ``[UNK]`` k-mers and
        padding are dropped with the masked tokens (they are never targets), which keeps the
        bound exact, and the decoder sees them as mask-vector slots.
      head_fraction: MLM with ``loss_on="masked"`` only: run the output head (dense, LayerNorm,
        the ``V``-way tied decoder, softmax) and the encoder's last layer (its queries, residual
        stream and feed-forward; keys and values still cover every position) on the masked
        tokens only, gathered per row into ``ceil(head_fraction * L)`` slots; when a row has
        more masked tokens everything runs on every position instead, so the loss, accuracy and
        gradients are the same either way, dropout included. 0.375 suits the ~15% masking of
        the MLM recipes: over 9,500 rows of chr22 at L = 512 the most masked tokens in a row
        were 162 (GeneMask), 149 (random spans) and 145 (Global-PMI), against 192 slots.
        ``None``: every position.
    """

    kind: str
    vocab: Vocab
    curriculum: Curriculum
    seed: int = 0
    grad_accum: int = 1
    mask_frac: float = 0.8
    random_frac: float = 0.1
    random_low: int = 0
    loss_on: str = "masked"
    num_visible: int | None = None
    head_fraction: float | None = None

    def __post_init__(self):
        if self.kind not in TASKS:
            raise ValueError(f"task kind must be one of {TASKS}, got {self.kind!r}")
        if self.loss_on not in ("masked", "all"):
            raise ValueError(f"loss_on must be 'masked' or 'all', got {self.loss_on!r}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.head_fraction is not None and not (
                self.kind == "mlm" and self.loss_on == "masked" and 0 < self.head_fraction <= 1):
            raise ValueError(f"head_fraction={self.head_fraction} needs kind='mlm', "
                             "loss_on='masked' and a value in (0, 1]; use None otherwise")


def special_positions(ids: jax.Array, attention: jax.Array, vocab: Vocab) -> jax.Array:
    """``bool[B, L]``: special tokens and padding (attention 0), never masked."""
    return masking.special_mask(ids, range(vocab.num_specials)) | (attention == 0)


def masked_batch(task: Task, key: jax.Array, step: jax.Array, curriculum_state: CurriculumState,
                 ids: jax.Array, attention: jax.Array, rank_table: jax.Array) -> dict:
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
    special = special_positions(ids, attention, task.vocab)
    cur = task.curriculum
    if task.kind == "mae":
        strategy = jnp.int32(masking.strategy_index("mae_drop"))
        mask = masking.mae_drop_fixed(k_mask, ids, special, cur.mask_params.mae_ratio)
        targets = jnp.maximum(ids - task.vocab.num_specials, 0)
        return dict(inputs=ids, targets=targets, weights=mask.astype(jnp.float32), mask=mask,
                    special=special, strategy=strategy)
    strategy = cur.sample(k_strategy, step, curriculum_state, ids.shape[0])
    mask = masking.make_mask(k_mask, strategy, ids, special, rank_table, cur.mask_params,
                             cur.active)
    inputs, targets, weights = masking.corrupt(
        k_corrupt, ids, mask, task.vocab.size, task.vocab.mask_id, mask_frac=task.mask_frac,
        random_frac=task.random_frac, random_low=task.random_low)
    if task.loss_on == "all":
        weights = (~special).astype(jnp.float32)
    return dict(inputs=inputs, targets=targets, weights=weights, mask=mask, special=special,
                strategy=strategy)


def forward(task: Task, model: nnx.Module, batch: dict, attention: jax.Array,
            dropout_key: jax.Array | None) -> jax.Array:
    """Logits ``float32[B, L, C]`` of the model on a masked batch."""
    rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
    if task.kind == "mae":
        # The dropped-token encoder sees the visible k-mers only (no [UNK], no padding); the
        # BERT-style baseline feeds [MASK] at the masked positions and keeps everything else.
        dropped = batch["mask"] | batch["special"] if model.variant == "dropped" else batch["mask"]
        return model(batch["inputs"], attention, dropped, num_visible=task.num_visible,
                     rngs=rngs)
    return model(batch["inputs"], attention, rngs=rngs)


def loss_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict:
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
    return dict(loss_sum=((log_norm - target_logit) * weights).sum(),
                correct=(hit * weights).sum(), count=weights.sum())


def head_slots(task: Task, length: int) -> int:
    """Head slots per row when the MLM head runs on masked tokens only: ``ceil(f * L)``."""
    return math.ceil(task.head_fraction * length)


def head_fits(batch: dict, slots: int) -> jax.Array:
    """``bool[]``: no row of the masked ``batch`` has more than ``slots`` loss positions."""
    return jnp.all((batch["weights"] != 0).sum(axis=1) <= slots)


def masked_head_loss_sums(model: nnx.Module, batch: dict, attention: jax.Array,
                          dropout_key: jax.Array | None, slots: int) -> dict:
    """:func:`loss_sums` of a ``BertForMaskedLM`` whose head runs on the masked tokens only.

    Each row's masked positions fill its ``slots`` (in position order; unused slots weigh 0);
    the head and the encoder's last layer (queries, residual stream, feed-forward) run on those,
    the rest of the encoder on the whole batch (rows stay where they are, so this shards like
    the batch). Exact only where :func:`head_fits`; callers choose
    between this and the full head with a ``lax.cond`` on it.
    """
    rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
    masked = batch["weights"] != 0
    positions = jax.vmap(lambda row: jnp.nonzero(row, size=slots, fill_value=0)[0])(masked)
    used = jnp.arange(slots) < masked.sum(axis=1, keepdims=True)
    logits = model(batch["inputs"], attention, positions=positions, rngs=rngs)
    pick = functools.partial(jnp.take_along_axis, indices=positions, axis=1)
    return loss_sums(logits, pick(batch["targets"]),
                     jnp.where(used, pick(batch["weights"]), 0.0))


def full_loss_sums(task: Task, model: nnx.Module, batch: dict, attention: jax.Array,
                   dropout_key: jax.Array | None) -> dict:
    """:func:`loss_sums` of the model's output at every position."""
    logits = forward(task, model, batch, attention, dropout_key)
    return loss_sums(logits, batch["targets"], batch["weights"])


def with_head_placement(task: Task, batch: dict, compute):
    """``compute(loss_sums_fn)`` with the head placement ``task`` asks for.

    ``loss_sums_fn(model, batch, attention, dropout_key) -> sums``. With ``head_fraction`` set,
    a ``lax.cond`` on :func:`head_fits` picks the masked-only head or the full head; the cond
    wraps all of ``compute`` (the gradient computation, in the train step) so that no residual
    of the full-head branch, e.g. its ``[B, L, V]`` softmax, is materialized when the other
    branch runs.
    """
    full = functools.partial(full_loss_sums, task)
    if task.head_fraction is None:
        return compute(full)
    slots = head_slots(task, batch["weights"].shape[1])
    at_masked = lambda *args: masked_head_loss_sums(*args, slots)
    return jax.lax.cond(head_fits(batch, slots), lambda: compute(at_masked),
                        lambda: compute(full))


def _strategy_counts(strategy: jax.Array, batch_size: int) -> jax.Array:
    """``float32[S]``: sequences masked by each strategy."""
    one_hot = jax.nn.one_hot(strategy, len(masking.STRATEGIES), dtype=jnp.float32)
    return one_hot * batch_size if strategy.ndim == 0 else one_hot.sum(axis=0)


def _micro_batches(x: jax.Array, accum: int) -> jax.Array:
    """``[B, ...] -> [A, B / A, ...]`` with micro-batch ``j`` = rows ``j, j + A, ...``."""
    if x.shape[0] % accum:
        raise ValueError(f"batch of {x.shape[0]} rows does not split into grad_accum={accum} "
                         "micro-batches; make data.batch_size a multiple of train.grad_accum")
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)


def make_train_step(task: Task, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule):
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

    def micro_grads(params, micro, key, step, curriculum_state, rank_table):
        ids, attention = micro["ids"], micro["attention"]
        mkey, dkey = jax.random.split(key)
        batch = masked_batch(task, mkey, step, curriculum_state, ids, attention, rank_table)

        def value_and_grad(loss_sums_fn):
            def loss_fn(params):
                sums = loss_sums_fn(nnx.merge(graphdef, params), batch, attention, dkey)
                return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), sums
            return jax.value_and_grad(loss_fn, has_aux=True)(params)

        (loss, sums), grads = with_head_placement(task, batch, value_and_grad)
        aux = dict(sums, masked=batch["mask"].sum(), maskable=(~batch["special"]).sum(),
                   tokens=(attention != 0).sum(),
                   strategy=_strategy_counts(batch["strategy"], ids.shape[0]))
        return (loss, aux), grads

    def train_step(state: TrainState, batch: dict, rank_table: jax.Array):
        key = jax.random.fold_in(jax.random.key(task.seed), state.step)
        micro = jax.tree.map(lambda x: _micro_batches(x, task.grad_accum), batch)

        def accumulate(carry, inputs):
            index, micro_batch = inputs
            (loss, aux), grads = micro_grads(state.params, micro_batch,
                                             jax.random.fold_in(key, index), state.step,
                                             state.curriculum, rank_table)
            total = jax.tree.map(jnp.add, carry, (grads, loss, aux))
            return total, None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
            lambda: micro_grads(state.params, jax.tree.map(lambda x: x[0], micro), key,
                                state.step, state.curriculum, rank_table)))
        (_, aux0), grads0 = zeros
        (grads, loss, aux), _ = jax.lax.scan(
            accumulate, (grads0, jnp.float32(0), aux0),
            (jnp.arange(task.grad_accum), micro))
        grads = jax.tree.map(lambda g: g / task.grad_accum, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(
            loss=loss / task.grad_accum,
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


def make_eval_step(task: Task, graphdef: nnx.GraphDef):
    """``eval_step(state, batch, rank_table, batch_index) -> sums`` under the current masking.

    Masks come from ``fold_in(fold_in(key(seed + 1), step), batch_index)``: fixed for a given
    step, so a validation pass is repeatable. Returns ``loss_sum, correct, count`` (float32[]) to
    be summed over batches; perplexity = ``exp(loss_sum / count)``.
    """

    def eval_step(state: TrainState, batch: dict, rank_table: jax.Array, batch_index: jax.Array):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(task.seed + 1), state.step),
                                 batch_index)
        ids, attention = batch["ids"], batch["attention"]
        masked = masked_batch(task, key, state.step, state.curriculum, ids, attention,
                              rank_table)
        model = nnx.merge(graphdef, state.params)
        return with_head_placement(task, masked, lambda loss_sums_fn: loss_sums_fn(
            model, masked, attention, None))

    return eval_step
