"""The train step in process: sharded step == 1-device step (data-parallel and FSDP meshes) and
gradient accumulation == the mean of micro-batch gradients (8 fake CPU devices,
tests/conftest.py)."""

import gzip
import itertools

import cli_runs
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gemsjax import config as config_lib
from gemsjax.data import pipelines, samples, tables
from gemsjax.models import registry
from gemsjax.tokenizers import KmerTokenizer
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
        self.batches = list(
            itertools.islice(pipelines.make_pretraining_iterator(config, "train", 0, 1), 2)
        )

    def train(self, mesh):
        """The batches' jitted train steps on ``mesh``: (final state, host metrics per step)."""
        state_sh = sharding.state_shardings(self.state, mesh)
        repl = sharding.replicated(mesh)
        train_step = jax.jit(
            step_lib.make_train_step(self.spec, self.graphdef, self.tx, self.schedule),
            in_shardings=(state_sh, sharding.batch_sharding(mesh), repl),
            out_shardings=(state_sh, repl),
        )
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
            case = StepCase(
                cli_runs.config(
                    recipe, *STEP_CASES[recipe], *(genome if recipe == "cm_gems" else ())
                )
            )
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
        assert [
            p for p in jax.tree.leaves(state.params) if p.sharding.shard_shape(p.shape) != p.shape
        ]
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
    case = StepCase(
        cli_runs.config(
            "cm_gems", "data.max_len=64", "train.grad_accum=2", "optimizer.warmup_steps=0", *genome
        )
    )
    spec, graphdef, tx, state = case.spec, case.graphdef, case.tx, case.state
    batch = jax.tree.map(jnp.asarray, case.batches[0])
    new_state, metrics = jax.jit(step_lib.make_train_step(spec, graphdef, tx, case.schedule))(
        state, batch, case.rank_table
    )

    def micro_loss(params, j):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(spec.seed), state.step), j)
        mask_key, dropout_key = jax.random.split(key)
        ids, attention = batch["ids"][j::2], batch["attention"][j::2]
        masked = step_lib.masked_batch(
            spec, mask_key, state.step, state.curriculum, ids, attention, case.rank_table
        )
        sums = step_lib.loss_sums(spec, nnx.merge(graphdef, params), masked, attention, dropout_key)
        return sums["loss_sum"] / sums["count"]

    @jax.jit
    def reference():
        (loss0, grads0), (loss1, grads1) = (
            jax.value_and_grad(micro_loss)(state.params, j) for j in range(2)
        )
        mean = jax.tree.map(lambda a, b: (a + b) / 2, grads0, grads1)
        updated = [
            optax.apply_updates(state.params, tx.update(g, state.opt_state, state.params)[0])
            for g in (mean, grads0)
        ]
        return jnp.stack([loss0, loss1]), optax.tree.norm(mean), *updated

    losses, mean_norm, expected, first_only = reference()
    assert abs(float(losses[0] - losses[1])) > 1e-3  # two different micro-batches
    np.testing.assert_allclose(metrics["loss"], losses.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], mean_norm, rtol=1e-5)
    assert float(metrics["tokens"]) == float(batch["attention"].sum())
    for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(new_state.params), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert (
        max(
            float(jnp.abs(a - b).max())
            for a, b in zip(
                jax.tree.leaves(first_only), jax.tree.leaves(new_state.params), strict=True
            )
        )
        > 1e-5
    )


def test_step_spec_is_built_from_the_keys_each_recipe_offers():
    """One builder for every recipe: the genome MLM recipes carry their curriculum and masking
    probabilities, BarcodeBERT masks by mae_drop without a curriculum, BarcodeMAE reads only
    mae_ratio; the vocabulary follows the data kind."""
    cm_gems = spec_lib.step_spec(cli_runs.config("cm_gems", "masking.genemask_prob=0.02"))
    assert (cm_gems.kind, cm_gems.vocab.name, cm_gems.curriculum.name) == (
        "mlm",
        "dnabert",
        "cm_gems",
    )
    assert cm_gems.masking.genemask_prob == 0.02 and cm_gems.mlm_head_share == 0.375
    assert cm_gems.head_slots(512) == 192
    cm_step = spec_lib.step_spec(cli_runs.config("cm_step", "train.mlm_head_share=0"))
    assert cm_step.curriculum.name == "cm_step" and cm_step.head_slots(512) is None
    bert = spec_lib.step_spec(cli_runs.config("barcode_bert", "masking.mae_ratio=0.3"))
    assert (bert.kind, bert.vocab.name, bert.curriculum.name) == ("mlm", "barcodebert", "mae_drop")
    assert bert.masking.mae_ratio == 0.3 and bert.loss_on == "all"
    mae = spec_lib.step_spec(cli_runs.config("barcode_mae", "masking.mae_ratio=0.25"))
    assert (mae.kind, mae.vocab.name, mae.mlm_head_share) == ("mae", "barcodebert", None)
    # 110 - floor(0.25 * 110 + 0.5) = 82 visible under the fixed draw, + 16 slack slots
    assert (mae.num_visible(110), mae.mae_draw) == (98, "fixed")
    assert spec_lib.step_spec(cli_runs.config("barcode_mae", "paper")).mae_draw == "bernoulli"
    table = spec_lib.rank_table(cli_runs.config("barcode_mae"), mae.vocab)
    assert table.shape == (mae.vocab.size,) and (table == 4**6).all()


def _bold_barcodes(shared_data, rows: int) -> list[str]:
    """The first ``rows`` BOLD COI barcodes with their alignment gaps kept: a k-mer holding a
    gap is [UNK], as in the reference's tokenizer when gaps are not stripped."""
    path = shared_data / "bold_insect_coi_barcodes" / "insect_coi_barcodes.tsv.gz"
    with gzip.open(path, "rt") as f:
        lines = f.read(4_000_000).splitlines()[1 : rows + 1]
    return [line.split("\t")[-1] for line in lines]


def test_mae_encoder_sees_unk_kmers_and_its_slots_are_exact(shared_data):
    """The MAE encoder is fed [UNK] k-mers (the reference drops only masked positions and
    padding): rows holding one get other logits than with [UNK] dropped, rows without get the
    same. Running the encoder on num_visible slots and the decoder head on the masked ones gives
    the loss of running on all L positions."""
    config = cli_runs.config("barcode_mae")
    spec = spec_lib.step_spec(config)
    model = registry.build_model(spec_lib.model_config(config), nnx.Rngs(0))
    model.eval()
    tokens = KmerTokenizer(k=6, vocab="barcodebert").encode(_bold_barcodes(shared_data, 48), 110)
    ids, attention = map(jnp.asarray, tokens)
    mask_batch = lambda ids, attention: step_lib.masked_batch(
        spec, jax.random.key(3), jnp.int32(0), None, ids, attention, None
    )
    slots = spec.num_visible(110)
    # gap-heavy rows (up to 79 [UNK] k-mers here) overflow the slots: such a batch runs on L
    assert not bool(step_lib.visible_fits(mask_batch(ids, attention), attention, slots))
    few = np.asarray(((ids == spec.vocab.unk_id) & (attention != 0)).sum(axis=1)) <= 20
    ids, attention = ids[few], attention[few]
    batch = mask_batch(ids, attention)
    unk = np.asarray((ids == spec.vocab.unk_id) & (attention != 0) & ~batch["mask"]).any(axis=1)
    assert 0 < unk.sum() < len(unk)  # real barcodes, some with an in-sequence [UNK] left visible
    assert bool(step_lib.visible_fits(batch, attention, slots))
    fed = model(batch["inputs"], attention, batch["mask"] | (attention == 0), num_visible=slots)
    without = model(batch["inputs"], attention, batch["mask"] | batch["special"], num_visible=slots)
    differs = np.asarray(jnp.abs(fed - without).max(axis=(1, 2)) > 1e-5)
    np.testing.assert_array_equal(differs, unk)
    mae_slots = step_lib.MaeSlots(slots, spec.head_slots(110))
    assert bool(step_lib.head_fits(batch, mae_slots.masked))
    at_slots = step_lib.loss_sums(spec, model, batch, attention, None, mae_slots)
    everywhere = step_lib.loss_sums(spec, model, batch, attention, None)
    for key in ("loss_sum", "correct", "count"):
        np.testing.assert_allclose(at_slots[key], everywhere[key], rtol=2e-5)


def test_mae_bernoulli_and_fixed_draws_mask_the_same_share(shared_data):
    """Masked counts per row of 2,000 real barcodes (gaps stripped, 8 draws): the fixed draw
    masks exactly round(n / 2) (variance 0 given n), the reference's Bernoulli(0.5) draw the
    same mean with variance n / 4 (measured: deviation from n / 2 mean 0.02, variance 24.96
    against n / 4 = 25.27). Rows over the MAE encoder's 71 slots (their batch runs on all 110):
    0.10 % (fixed) and 0.13 % (Bernoulli), rows rich in N."""
    tok = KmerTokenizer(k=6, vocab="barcodebert")
    ids, attention = tok.encode(
        [s.replace("-", "") for s in _bold_barcodes(shared_data, 2000)], 110
    )
    ids, attention = jnp.asarray(ids), jnp.asarray(attention)
    counts = {}
    for draw in ("fixed", "bernoulli"):
        spec = spec_lib.step_spec(cli_runs.config("barcode_mae", f"masking.mae_draw={draw}"))
        batches = [
            step_lib.masked_batch(spec, jax.random.key(i), jnp.int32(0), None, ids, attention, None)
            for i in range(8)
        ]
        n = np.asarray((~batches[0]["special"]).sum(axis=1))
        masked = np.stack([np.asarray(b["mask"].sum(axis=1)) for b in batches])
        counts[draw] = masked - n / 2  # deviation from half the maskable tokens
        visible = np.stack(
            [np.asarray((~b["mask"] & (attention != 0)).sum(axis=1)) for b in batches]
        )
        assert (visible > spec.num_visible(110)).mean() < 0.003
    assert np.abs(counts["fixed"]).max() <= 0.5
    assert abs(counts["bernoulli"].mean()) < 0.1
    assert counts["bernoulli"].var() / (n / 4).mean() == pytest.approx(1.0, abs=0.05)


def test_barcode_bert_5m_reads_8mers_end_to_end():
    """BarcodeBERT-5M: data.k = 8 reaches the tokenizer, the vocabulary (4**8 + 2 ids), the model
    size and the batches (660 // 8 = 82 tokens of non-overlapping 8-mers)."""
    config = cli_runs.config("barcode_bert_5m")
    spec = spec_lib.step_spec(config)
    assert (spec.kind, spec.vocab.k, spec.vocab.size, spec.loss_on) == ("mlm", 8, 65538, "all")
    assert spec_lib.model_config(config).vocab_size == 65538
    full = config_lib.load("barcode_bert_5m:paper").model.name
    assert (full, spec_lib.model_config(config_lib.load("barcode_bert_5m")).layers) == (
        "barcode_bert_5m",
        4,
    )
    batch = next(pipelines.make_pretraining_iterator(config, "validation", 0, 1))
    ids, attention = np.asarray(batch["ids"]), np.asarray(batch["attention"])
    assert ids.shape == (8, 82) and ids.max() < 65538
    assert (ids[attention != 0] >= 2).mean() > 0.95  # real 8-mers, few [UNK]
    table = tables.read_barcode_tsv(
        samples.sample_path(samples.BARCODES), ("species_name",), splits=("val",), deduplicate=True
    )["species_name"]
    first = KmerTokenizer(k=8, stride=8, vocab="barcodebert").encode(table.sequences[:1], 82)[0]
    np.testing.assert_array_equal(ids[0], first[0])
