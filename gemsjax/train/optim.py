"""Optimizers from config: AdamW with the CM-GEMS and BarcodeMAE schedules.

``make_optimizer(opt_config, max_steps) -> (tx, lr_schedule)`` reads an ``ml_collections``
``ConfigDict`` with these keys (a recipe's ``config.optimizer``: ``configs/cm_gems.py`` states
GeneMask's AdamW, ``configs/barcode_mae.py`` BarcodeMAE's one-cycle):

==================  ==========================================================================
key                 meaning
==================  ==========================================================================
schedule            ``"warmup_linear"``: linear 0 -> learning_rate over ``warmup_steps``, then
                    linear to 0 at ``max_steps`` (HF ``get_linear_schedule_with_warmup``).
                    ``"onecycle"``: optax ``cosine_onecycle_schedule`` (torch ``OneCycleLR``).
learning_rate       peak learning rate.
warmup_steps        ``warmup_linear`` only.
pct_start, div_factor, final_div_factor
                    ``onecycle`` only: lr rises (cosine) from ``lr/div_factor`` to ``lr`` over the
                    first ``int(pct_start * max_steps)`` steps, then falls (cosine) to
                    ``lr/(div_factor*final_div_factor)`` at ``max_steps``.
b1, b2, eps         Adam moments and epsilon (added to ``sqrt(nu_hat)``, as in torch).
b1_cycle            ``onecycle`` only: ``(b1_max, b1_min)`` or None. When set, b1 follows the lr
                    cycle inversely: ``b1_max -> b1_min`` while lr rises, back while it falls
                    (torch ``cycle_momentum``); ``b1`` is then unused.
weight_decay        decoupled decay, multiplied by the lr (torch/HF AdamW); 0 disables it.
decay_mask          ``"matrices"``: decay only parameters with ndim >= 2 whose name is not
                    ``bias`` or ``scale`` (kernels and embedding tables; never biases or LayerNorm
                    scale/bias; this is exactly HF's ``["bias", "LayerNorm.weight"]`` exclusion
                    for BERT). ``"all"``: every parameter.
clip_norm           global-norm gradient clipping threshold; 0 disables it.
==================  ==========================================================================

All schedules are functions of the *optimizer update* count: step 0 is the first update and gets
``lr_schedule(0)``. Gradient accumulation happens inside the train step (a scan over
micro-batches, ``gemsjax.train.step``), so clipping acts on the accumulated (mean) gradient.

Small, known differences from the PyTorch references: optax's one-cycle peaks at update
``int(pct_start * max_steps)``, torch's ``OneCycleLR`` one update earlier; HF ``AdamW`` (DNABERT's
optimizer) adds ``eps`` to ``sqrt(nu)`` before bias correction, optax (like torch) after it.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

SCHEDULES = ("warmup_linear", "onecycle")
DECAY_MASKS = ("matrices", "all")
NO_DECAY_NAMES = ("bias", "scale")


def _choice(cfg: ml_collections.ConfigDict, key: str, allowed: tuple[str, ...]) -> str:
    value = cfg.get(key)
    if value not in allowed:
        raise ValueError(f"optimizer config key {key!r} = {value!r}; expected one of {allowed}")
    return value


def lr_schedule(cfg: ml_collections.ConfigDict, max_steps: int) -> optax.Schedule:
    """The learning rate as a function of the optimizer update count (see module docstring)."""
    if max_steps < 1:
        raise ValueError(f"max_steps={max_steps} must be >= 1")
    if _choice(cfg, "schedule", SCHEDULES) == "onecycle":
        return optax.cosine_onecycle_schedule(
            max_steps, cfg.learning_rate, cfg.pct_start, cfg.div_factor, cfg.final_div_factor
        )
    warmup = cfg.warmup_steps
    if not 0 <= warmup < max_steps:
        raise ValueError(
            f"optimizer config warmup_steps={warmup} must be in [0, max_steps={max_steps})"
        )
    decay = optax.linear_schedule(cfg.learning_rate, 0.0, max_steps - warmup)
    if warmup == 0:
        return decay
    rise = optax.linear_schedule(0.0, cfg.learning_rate, warmup)
    return optax.join_schedules([rise, decay], [warmup])


def b1_schedule(cfg: ml_collections.ConfigDict, max_steps: int) -> float | optax.Schedule:
    """Adam's b1: the constant ``cfg.b1``, or for ``onecycle`` with ``b1_cycle=(hi, lo)`` a cosine
    ``hi -> lo`` over the lr's rise and ``lo -> hi`` over its fall (same boundaries as the lr)."""
    if cfg.schedule != "onecycle" or not cfg.get("b1_cycle"):
        return cfg.b1
    hi, lo = cfg.b1_cycle
    return optax.piecewise_interpolate_schedule(
        "cosine", hi, {int(cfg.pct_start * max_steps): lo / hi, max_steps: hi / lo}
    )


def _leaf_name(path: tuple) -> str:
    """Name of a parameter from its pytree path, skipping ``nnx.Variable``'s ``.value`` key."""
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys.pop()
    last = keys[-1] if keys else None
    for attr in ("key", "name", "idx"):
        if hasattr(last, attr):
            return str(getattr(last, attr))
    return ""


def decay_mask(params: Any) -> Any:
    """Bool pytree (same structure as ``params``): True where weight decay applies, i.e. ndim >= 2
    and a name other than ``bias``/``scale``. Works on ``nnx.State`` and plain dicts."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and _leaf_name(path) not in NO_DECAY_NAMES, params
    )


def make_optimizer(
    cfg: ml_collections.ConfigDict, max_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, lr_schedule)`` for ``cfg`` (module docstring) over ``max_steps`` optimizer updates.

    ``tx`` = chain(clip_by_global_norm?, scale_by_adam (b1 injected when cycled),
    add_decayed_weights(mask)?, scale_by_learning_rate(lr_schedule)) -- optax's ``adamw`` with
    the pieces made configurable.
    """
    lr = lr_schedule(cfg, max_steps)
    b1 = b1_schedule(cfg, max_steps)
    parts = []
    if cfg.get("clip_norm"):
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if callable(b1):
        parts.append(optax.inject_hyperparams(optax.scale_by_adam)(b1=b1, b2=cfg.b2, eps=cfg.eps))
    else:
        parts.append(optax.scale_by_adam(b1=b1, b2=cfg.b2, eps=cfg.eps))
    mask = decay_mask if _choice(cfg, "decay_mask", DECAY_MASKS) == "matrices" else None
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=mask))
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts), lr
