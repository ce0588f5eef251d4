"""Optimizer schedules, weight-decay mask and clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gemsjax import config as config_lib
from gemsjax.models.registry import build_model, get_model_config
from gemsjax.train import optim


def _mu(opt_state):
    return optax.tree_utils.tree_get(opt_state, "mu")


def test_cm_gems_schedule_values():
    cfg = config_lib.load("cm_gems:paper").optimizer
    _, lr = optim.make_optimizer(cfg, max_steps=10_000)
    # Warmup 0 -> 8e-4 over 500 updates, then linear to 0 at update 10,000.
    expected = {
        0: 0.0,
        250: 4e-4,
        500: 8e-4,
        1000: 8e-4 * 9000 / 9500,
        9999: 8e-4 / 9500,
        10_000: 0.0,
        12_000: 0.0,
    }
    for step, want in expected.items():
        np.testing.assert_allclose(float(lr(step)), want, rtol=1e-6, atol=8e-4 * 1e-6, err_msg=step)


def test_schedule_config_errors():
    cfg = config_lib.load("cm_gems:paper").optimizer
    with pytest.raises(ValueError, match="warmup_steps=500 must be in"):
        optim.make_optimizer(cfg, max_steps=500)
    cfg.schedule = "cosine"
    with pytest.raises(ValueError, match="'schedule' = 'cosine'"):
        optim.make_optimizer(cfg, max_steps=1000)
    cfg = config_lib.load("cm_gems:paper").optimizer
    cfg.decay_mask = "no_bias"
    with pytest.raises(ValueError, match="'decay_mask'"):
        optim.make_optimizer(cfg, max_steps=1000)


def test_onecycle_lr_and_b1():
    cfg = config_lib.load("barcode_mae:optimizer.learning_rate=4e-4").optimizer
    _, lr = optim.make_optimizer(cfg, max_steps=1000)
    b1 = optim.b1_schedule(cfg, 1000)
    peak, start, end = 4e-4, 4e-4 / 25, 4e-4 / 25 / 1e4
    # Rise over updates [0, 300], fall over [300, 1000]; cosine halfway points at 150 and 650.
    lr_want = {0: start, 150: (start + peak) / 2, 300: peak, 650: (peak + end) / 2, 1000: end}
    b1_want = {0: 0.95, 150: 0.90, 300: 0.85, 650: 0.90, 1000: 0.95}
    for step in lr_want:
        np.testing.assert_allclose(float(lr(step)), lr_want[step], rtol=1e-5, err_msg=step)
        np.testing.assert_allclose(float(b1(step)), b1_want[step], rtol=1e-6, err_msg=step)
    # 75 updates into the rise: cos(pi/4) interpolation.
    frac = (1 - math.cos(math.pi * 75 / 300)) / 2
    np.testing.assert_allclose(float(lr(75)), start + frac * (peak - start), rtol=1e-5)


def test_cycled_b1_reaches_adam():
    cfg = config_lib.load("barcode_mae").optimizer
    tx, _ = optim.make_optimizer(cfg, max_steps=100)
    params = {"w": jnp.ones((3, 2))}
    grads = {"w": jnp.full((3, 2), 2.0)}
    _, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(_mu(state)["w"], (1 - 0.95) * 2.0, rtol=1e-6)  # b1(0) = 0.95


@pytest.fixture(scope="module")
def real_params():
    """Parameters of the real BERT MLM model at the registry's "test" size."""
    model = nnx.jit(lambda: build_model(get_model_config("test"), nnx.Rngs(0)))()
    return nnx.state(model, nnx.Param)


def test_decay_mask_on_real_model_tree(real_params):
    params = real_params
    mask = optim.decay_mask(params)
    flat_mask = dict(nnx.to_flat_state(mask))
    decayed = {path for path, m in flat_mask.items() if m.get_value()}
    # HF BERT: everything except `bias` and LayerNorm weights is decayed.
    want = {path for path, _ in nnx.to_flat_state(params) if path[-1] in ("kernel", "embedding")}
    assert decayed == want
    assert ("head", "bias") not in decayed and ("head", "norm", "scale") not in decayed
    assert len(decayed) == 2 * 6 + 1 + 3  # 2 blocks x 6 kernels, head dense, 3 embedding tables
    plain = nnx.to_pure_dict(params)
    assert optim.decay_mask(plain)["encoder"]["word_embeddings"]["embedding"] is True


@pytest.mark.parametrize("recipe,all_decayed", [("cm_gems", False), ("barcode_mae", True)])
def test_weight_decay_applies_where_masked(recipe, all_decayed, real_params):
    cfg = config_lib.load(recipe).optimizer
    if recipe == "cm_gems":
        cfg.warmup_steps = 0
    tx, lr = optim.make_optimizer(cfg, max_steps=100)
    params = real_params
    zeros = jax.tree.map(jnp.zeros_like, params)  # Adam term is exactly 0 for a zero gradient
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    mask = optim.decay_mask(params)
    factor = -float(lr(0)) * cfg.weight_decay
    for (path, u), (_, p), (_, m) in zip(
        nnx.to_flat_state(updates), nnx.to_flat_state(params), nnx.to_flat_state(mask), strict=True
    ):
        decayed = all_decayed or m.get_value()
        want = factor * np.asarray(p.get_value()) if decayed else 0.0
        np.testing.assert_allclose(u.get_value(), want, rtol=1e-6, atol=1e-12, err_msg=str(path))


@pytest.mark.parametrize("clip,want_norm", [(1.0, 0.1 * 1.0), (0.0, 0.1 * 100.0)])
def test_clipping_bounds_the_gradient_adam_sees(clip, want_norm):
    cfg = config_lib.load("cm_gems").optimizer
    cfg.clip_norm = clip
    tx, _ = optim.make_optimizer(cfg, max_steps=1000)
    params = {"w": jnp.zeros((10, 10)), "b": jnp.zeros(10)}
    value = 100.0 / math.sqrt(110)  # global norm 100 over 110 entries
    grads = {"w": jnp.full((10, 10), value), "b": jnp.full(10, value)}
    _, state = tx.update(grads, tx.init(params), params)
    norm = float(optax.tree.norm(_mu(state)))  # mu = (1 - b1) * gradient after clipping
    np.testing.assert_allclose(norm, want_norm, rtol=1e-4)
