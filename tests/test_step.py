"""The train step in process: sharded step == 1-device step (data-parallel and FSDP meshes) and
gradient accumulation == the mean of micro-batch gradients (8 fake CPU devices,
tests/conftest.py)."""

import itertools

import cli_runs
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gemsjax.data import pipelines
from gemsjax.models import registry
from gemsjax.train import optim, sharding
from gemsjax.train import spec as spec_lib
from gemsjax.train import step as step_lib

STEP_CASES = {  # recipe -> presets; barcode_mae also accumulates 2 micro-batches per step
    "cm_gems": ("data.max_len=64", "optimizer.warmup_steps=0"),
    "barcode_mae": ("data.max_len=64", "data.batch_size=16", "train.grad_accum=2"),
}


class StepCase:
    """A recipe's step spec, optimizer, initial state, rank table and first two real batches."""

    def __init__(self, config):
        self.config = config
        self.spec = spec_lib.step_spec(config)
        self.tx, self.schedule = optim.make_optimizer(config.optimizer, config.train.steps)
        build = lambda: registry.build_model(spec_lib.model_config(config), nnx.Rngs(config.seed))
        self.graphdef, _ = step_lib.step_graphdefs(nnx.eval_shape(build))
        self.state = jax.jit(lambda: step_lib.init_train_state(build(), self.tx, self.spec))()
        self.rank_table = jnp.asarray(spec_lib.rank_table(config, self.spec.vocab))
        self.batches = list(itertools.islice(
            pipelines.make_pretraining_iterator(config, "train", 0, 1), 2))

    def train(self, mesh):
        """The batches' jitted train steps on ``mesh``: (final state, host metrics per step)."""
        state_sh = sharding.state_shardings(self.state, mesh)
        repl = sharding.replicated(mesh)
        train_step = jax.jit(
            step_lib.make_train_step(self.spec, self.graphdef, self.tx, self.schedule),
            in_shardings=(state_sh, sharding.batch_sharding(mesh), repl),
            out_shardings=(state_sh, repl))
        state = jax.device_put(self.state, state_sh)
        rank_table = jax.device_put(self.rank_table, repl)
        history = []
        with jax.set_mesh(mesh):
            for batch in self.batches:
                state, metrics = train_step(state, sharding.shard_batch(batch, mesh), rank_table)
                history.append(jax.device_get(metrics))
        return state, history


@pytest.fixture(scope="module")
def step_reference(genome):
    """recipe -> (StepCase, flat host state and metrics after its steps on 1 device); lazy."""
    cache = {}

    def get(recipe):
        if recipe not in cache:
            case = StepCase(cli_runs.config(recipe, *STEP_CASES[recipe],
                                    *(genome if recipe == "cm_gems" else ())))
            state, history = case.train(sharding.make_mesh(1, 1, devices=jax.devices()[:1]))
            cache[recipe] = (case, cli_runs.flat(jax.device_get(state)), history)
        return cache[recipe]

    return get


@pytest.mark.parametrize("recipe", sorted(STEP_CASES))
@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4)])
def test_sharded_steps_match_one_device(step_reference, recipe, data, fsdp):
    """Two steps from the same initial state on the same real batches: the data-parallel and
    the FSDP mesh give the 1-device losses, metrics and parameters (<= 1e-5), and Adam's first
    moments (0.05-0.1 x the gradients, a leaf-by-leaf gradient check) to 1e-7."""
    case, reference, ref_history = step_reference(recipe)
    state, history = case.train(sharding.make_mesh(data, fsdp))
    if fsdp > 1:  # the FSDP mesh really splits parameters
        assert [p for p in jax.tree.leaves(state.params)
                if p.sharding.shard_shape(p.shape) != p.shape]
    for ref, got in zip(ref_history, history, strict=True):
        assert ref["lr"] > 0 and ref["mask_rate"] > 0 and ref["grad_norm"] > 0.1
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-5)
        for key in ("masked_accuracy", "mask_rate", "tokens", "strategy_mix"):
            np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-6)
    got = cli_runs.flat(jax.device_get(state))
    assert got.keys() == reference.keys()
    for key, want in reference.items():
        atol = 1e-5 if key.startswith(".params") else 1e-7
        np.testing.assert_allclose(got[key], want, rtol=0, atol=atol, err_msg=key)


def test_grad_accum_is_the_mean_of_micro_batch_gradients(genome):
    """A grad_accum=2 step equals one optimizer update with the mean of the gradients of its two
    micro-batches (rows j::2, masks from fold_in(step key, j)), each computed on its own."""
    case = StepCase(cli_runs.config("cm_gems", "data.max_len=64", "train.grad_accum=2",
                            "optimizer.warmup_steps=0", *genome))
    spec, graphdef, tx, state = case.spec, case.graphdef, case.tx, case.state
    batch = jax.tree.map(jnp.asarray, case.batches[0])
    new_state, metrics = jax.jit(step_lib.make_train_step(spec, graphdef, tx, case.schedule))(
        state, batch, case.rank_table)

    def micro_loss(params, j):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(spec.seed), state.step), j)
        mask_key, dropout_key = jax.random.split(key)
        ids, attention = batch["ids"][j::2], batch["attention"][j::2]
        masked = step_lib.masked_batch(spec, mask_key, state.step, state.curriculum, ids,
                                       attention, case.rank_table)
        sums = step_lib.loss_sums(spec, nnx.merge(graphdef, params), masked, attention,
                                  dropout_key)
        return sums["loss_sum"] / sums["count"]

    @jax.jit
    def reference():
        (loss0, grads0), (loss1, grads1) = (jax.value_and_grad(micro_loss)(state.params, j)
                                            for j in range(2))
        mean = jax.tree.map(lambda a, b: (a + b) / 2, grads0, grads1)
        updated = [optax.apply_updates(state.params, tx.update(g, state.opt_state,
                                                               state.params)[0])
                   for g in (mean, grads0)]
        return jnp.stack([loss0, loss1]), optax.tree.norm(mean), *updated

    losses, mean_norm, expected, first_only = reference()
    assert abs(float(losses[0] - losses[1])) > 1e-3  # two different micro-batches
    np.testing.assert_allclose(metrics["loss"], losses.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], mean_norm, rtol=1e-5)
    assert float(metrics["tokens"]) == float(batch["attention"].sum())
    for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(new_state.params),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(first_only), jax.tree.leaves(new_state.params), strict=True)) > 1e-5


def test_step_spec_is_built_from_the_keys_each_recipe_offers():
    """One builder for every recipe: the genome MLM recipes carry their curriculum and masking
    probabilities, BarcodeBERT masks by mae_drop without a curriculum, BarcodeMAE reads only
    mae_ratio; the vocabulary follows the data kind."""
    cm_gems = spec_lib.step_spec(cli_runs.config("cm_gems", "masking.genemask_prob=0.02"))
    assert (cm_gems.kind, cm_gems.vocab.name, cm_gems.curriculum.name) == (
        "mlm", "dnabert", "cm_gems")
    assert cm_gems.masking.genemask_prob == 0.02 and cm_gems.mlm_head_share == 0.375
    assert cm_gems.head_slots(512) == 192
    cm_step = spec_lib.step_spec(cli_runs.config("cm_step", "train.mlm_head_share=0"))
    assert cm_step.curriculum.name == "cm_step" and cm_step.head_slots(512) is None
    bert = spec_lib.step_spec(cli_runs.config("barcode_bert", "masking.mae_ratio=0.3"))
    assert (bert.kind, bert.vocab.name, bert.curriculum.name) == ("mlm", "barcodebert", "mae_drop")
    assert bert.masking.mae_ratio == 0.3 and bert.loss_on == "all"
    mae = spec_lib.step_spec(cli_runs.config("barcode_mae", "masking.mae_ratio=0.25"))
    assert (mae.kind, mae.vocab.name, mae.mlm_head_share) == ("mae", "barcodebert", None)
    assert mae.num_visible(110) == 82  # at most 110 - floor(0.25 * 110 + 0.5) visible
    table = spec_lib.rank_table(cli_runs.config("barcode_mae"), mae.vocab)
    assert table.shape == (mae.vocab.size,) and (table == 4**6).all()
