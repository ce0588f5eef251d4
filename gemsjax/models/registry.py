"""The one place that turns a named size into a model config and a config into a model.

``get_model_config("dnabert6", dropout=0.0)`` gives a frozen :class:`BertConfig` (sizes in
:mod:`gemsjax.models.sizes`);
``build_model(config, nnx.Rngs(0))`` builds the pretraining model it describes
(:class:`~gemsjax.models.bert.BertForMaskedLM` for ``arch="mlm"``,
:class:`~gemsjax.models.mae.BarcodeMAE` for ``arch="mae"`` / ``"mae_baseline"``).
Build a big size under ``nnx.eval_shape`` to inspect it without allocating.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gemsjax.models.bert import BertConfig, BertForMaskedLM
from gemsjax.models.mae import BarcodeMAE
from gemsjax.models.sizes import SIZES


def get_model_config(name: str, **overrides: Any) -> BertConfig:
    """The size ``name`` from :data:`SIZES`, with ``overrides`` replacing fields.

    Raises:
      ValueError: unknown ``name`` (the message lists the valid names), unknown override key
        (the message names it and lists the valid keys), or an invalid value.
    """
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; valid: {sorted(SIZES)}")
    fields = {f.name for f in dataclasses.fields(BertConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown model config key(s) {unknown} for size {name!r}; valid keys: {sorted(fields)}"
        )
    return BertConfig(**{**SIZES[name], **overrides})


def build_model(
    config: BertConfig, rngs: nnx.Rngs, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
) -> BertForMaskedLM | BarcodeMAE:
    """The pretraining model for ``config``; ``dtype`` is the compute dtype (e.g. bfloat16),
    ``param_dtype`` the parameter dtype (keep float32). ``rngs`` seeds the parameter init."""
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if config.arch == "mlm":
        return BertForMaskedLM(config, **kwargs)
    variant = "dropped" if config.arch == "mae" else "baseline"
    return BarcodeMAE(config, variant=variant, **kwargs)


def param_count(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param``); works on ``nnx.eval_shape`` models."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
