"""The output head on masked positions only (``StepSpec.head_slots``): same loss, metrics and
updates as the head on every position, for the MLM on real chr22 tokens and the BarcodeMAE
decoder on real barcodes, including the fallback path."""

import contextlib
import dataclasses
import functools

import cli_runs
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gemsjax import curriculum, pmi
from gemsjax.data import fasta, pipelines, samples
from gemsjax.models import registry
from gemsjax.models.bert import Pack
from gemsjax.train import optim, sharding
from gemsjax.train import spec as spec_lib
from gemsjax.train import step as step_lib
from gemsjax.train.spec import StepSpec
from gemsjax.train.step import (
    cross_entropy_sums,
    init_train_state,
    make_eval_step,
    make_train_step,
    step_graphdefs,
)
from gemsjax.vocab import get_vocab

VOCAB = get_vocab("dnabert", 6)


@pytest.fixture(scope="module")
def genome_batch():
    """8 rows of 128 tokens: consecutive N-free chunks of the shipped chr22 sample."""
    ((_, seq),) = fasta.read_fasta(samples.sample_path(samples.GENOME))
    seq = seq.replace("N", "")
    ids, attention = pipelines.dnabert_tokenizer().encode(
        [seq[i * 130 : (i + 1) * 130] for i in range(8)], 128
    )
    return {"ids": jnp.asarray(ids), "attention": jnp.asarray(attention)}


@pytest.fixture(scope="module")
def rank_table():
    return jnp.asarray(pmi.load_genemask_ranks(samples.sample_path(samples.GENEMASK_RANKS), VOCAB))


def _two_steps(
    batch, rank_table, mlm_head_share, grad_accum=1, mlm_pack_share=None, mesh=None, dropout=-1.0
):
    """Two train steps and one eval step of the ``cm_gems`` smoke model on ``batch``, under
    ``mesh`` (batch sharded over it) when given; returns ``(state, [metrics x 2], eval sums,
    whether the first step's masked batch fit the slots)``."""
    config = cli_runs.config("cm_gems")
    config.model.dropout = dropout
    spec = dataclasses.replace(
        spec_lib.step_spec(config),
        mlm_head_share=mlm_head_share,
        mlm_pack_share=mlm_pack_share,
        grad_accum=grad_accum,
    )
    tx, lr = optim.make_optimizer(config.optimizer, 1000)
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        if mesh is not None:
            batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        model = registry.build_model(spec_lib.model_config(config), nnx.Rngs(0))
        state = init_train_state(model, tx, spec)
        train_graphdef, eval_graphdef = step_graphdefs(model)
        step = jax.jit(make_train_step(spec, train_graphdef, tx, lr))
        fits = jax.jit(functools.partial(_first_step_fits, spec, grad_accum))(
            state, batch, rank_table
        )
        state, first = step(state, batch, rank_table)
        state, second = step(state, batch, rank_table)
        sums = jax.jit(make_eval_step(spec, eval_graphdef))(state, batch, rank_table, jnp.int32(0))
    return state, [first, second], sums, fits


def _first_step_fits(spec, grad_accum, state, batch, rank_table):
    """Whether every micro-batch of the first step's masked batch fits the step's slots."""
    key = jax.random.fold_in(jax.random.key(spec.seed), state.step)
    fits = []
    for index in range(grad_accum):
        mask_key, _ = jax.random.split(jax.random.fold_in(key, index))
        micro = {k: v[index::grad_accum] for k, v in batch.items()}
        masked = step_lib.masked_batch(
            spec,
            mask_key,
            state.step,
            state.curriculum,
            micro["ids"],
            micro["attention"],
            rank_table,
        )
        slots, micro_fits = step_lib._slots(spec, masked, micro["attention"])
        fits.append(jnp.bool_(True) if slots is None else micro_fits)
    return jnp.all(jnp.stack(fits))


def _assert_same_steps(expected, got):
    for want, have in zip(expected[1], got[1], strict=True):
        assert 0.10 < float(want["mask_rate"]) < 0.25
        for key in ("loss", "masked_accuracy", "grad_norm", "mask_rate"):
            np.testing.assert_allclose(have[key], want[key], rtol=1e-5, err_msg=key)
    for want, have in zip(
        jax.tree.leaves(expected[0].params), jax.tree.leaves(got[0].params), strict=True
    ):
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-7)
    for key in ("loss_sum", "correct", "count"):
        np.testing.assert_allclose(got[2][key], expected[2][key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("mlm_head_share, grad_accum", [(0.5, 1), (0.5, 2), (0.01, 1)])
def test_head_on_masked_positions_matches_head_everywhere(
    genome_batch, rank_table, mlm_head_share, grad_accum
):
    """0.5: the masked tokens (~15%) fit the slots; 0.01: they do not, the head falls back to
    every position. Either way the step computes the same numbers."""
    expected = _two_steps(genome_batch, rank_table, None, grad_accum)
    got = _two_steps(genome_batch, rank_table, mlm_head_share, grad_accum)
    assert bool(got[3]) == (mlm_head_share == 0.5)
    _assert_same_steps(expected, got)


@pytest.mark.parametrize(
    "pack_share, grad_accum, mesh_devices, dropout, fits",
    [
        (0.25, 1, None, 0.0, True),  # one group of 8 rows, ~150 masked tokens in 256 slots;
        # no dropout: the last layer attends only the query slots its fullest row uses
        (0.25, 2, None, 0.1, True),  # two micro-batches of 4 rows; dropout masks gathered
        (0.25, 1, 2, 0.1, True),  # a 2-device mesh: two groups of 4 rows, one per device
        (0.25, 1, 8, -1.0, False),  # 8 devices, groups of 1 row: 32 slots, some row has more
        (0.1, 1, None, -1.0, False),  # 103 slots for the 8 rows: falls back to every position
    ],
)
def test_packed_head_matches_head_everywhere(
    genome_batch, rank_table, pack_share, grad_accum, mesh_devices, dropout, fits
):
    """The masked tokens packed per batch shard after the last layer's attention
    (``mlm_pack_share``) give the same loss, metrics, updates and eval sums as every position,
    with dropout on, across micro-batches and over a sharded batch; a shard over its packed
    slots falls back to every position."""
    mesh = None
    if mesh_devices is not None:
        mesh = sharding.make_mesh(mesh_devices, 1, devices=jax.devices()[:mesh_devices])
    expected = _two_steps(genome_batch, rank_table, None, grad_accum, dropout=dropout)
    got = _two_steps(genome_batch, rank_table, 0.5, grad_accum, pack_share, mesh, dropout)
    assert bool(got[3]) == fits
    _assert_same_steps(expected, got)


def test_packed_slots_index_each_shard_of_the_per_row_slots():
    """``Pack`` takes the used per-row slots of each group in row-major order; its unused
    slots repeat the group's first slot (the step gives them weight 0)."""
    rows = jnp.arange(4 * 3).reshape(4, 3)  # 4 rows x 3 slots, value = row * 3 + slot
    used = jnp.asarray([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], bool)
    pack = step_lib._first(used.reshape(2, -1), 4)
    np.testing.assert_array_equal(Pack(pack).take(rows), [[0, 1, 3, 0], [9, 10, 11, 6]])
    spec = StepSpec(
        kind="mlm",
        vocab=VOCAB,
        curriculum=curriculum.cm_gems(1.0),
        mlm_head_share=0.375,
        mlm_pack_share=0.2,
    )
    assert spec.pack_slots(8, 512) == 820 and spec.pack_slots(1, 512) == 103
    assert (
        StepSpec(
            kind="mlm",
            vocab=VOCAB,
            curriculum=curriculum.cm_gems(1.0),
            mlm_head_share=0.375,
            mlm_pack_share=0.9,
        ).pack_slots(2, 512)
        == 384
    )


@pytest.mark.parametrize("draw, slack, fits", [("fixed", 16, True), ("bernoulli", 0, False)])
def test_mae_decoder_head_on_masked_positions_matches_head_everywhere(draw, slack, fits):
    """One BarcodeMAE train step (dropout 0.1 on, 8 shipped barcodes) equals the update from the
    gradient of the loss with the decoder's output at every position. The fixed draw fits its
    slots (encoder 71, head exactly 55 of 110): the reference runs the encoder on the same 71
    slots (its dropout masks are drawn for that layout). The Bernoulli draw with no slack
    overflows them and the step falls back to every position, encoder included."""
    config = cli_runs.config("barcode_mae", f"masking.mae_draw={draw}")
    config.train.mae_visible_slack = slack
    spec = spec_lib.step_spec(config)
    assert spec.head_slots(110) == 55 and spec.num_visible(110) == 55 + slack
    batch = next(pipelines.make_pretraining_iterator(config, "train", 0, 1))
    batch = {key: jnp.asarray(batch[key]) for key in ("ids", "attention")}
    tx, lr = optim.make_optimizer(config.optimizer, 1000)
    model = registry.build_model(spec_lib.model_config(config), nnx.Rngs(0))
    assert model.decoder.dropout.rate == 0.1
    state = init_train_state(model, tx, spec)
    graphdef, _ = step_graphdefs(model)
    new_state, metrics = jax.jit(make_train_step(spec, graphdef, tx, lr))(state, batch, None)

    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(spec.seed), state.step), 0)
    mask_key, dropout_key = jax.random.split(key)
    ids, attention = batch["ids"], batch["attention"]
    masked = step_lib.masked_batch(spec, mask_key, state.step, None, ids, attention, None)
    slots, batch_fits = step_lib._slots(spec, masked, attention)
    assert slots == step_lib.MaeSlots(55 + slack, 55) and bool(batch_fits) == fits

    def everywhere(params):
        model = nnx.merge(graphdef, params)
        if fits:
            dropped = masked["mask"] | (attention == 0)
            rngs = nnx.Rngs(dropout=dropout_key)
            logits = model(masked["inputs"], attention, dropped, num_visible=71, rngs=rngs)
            sums = cross_entropy_sums(logits, masked["targets"], masked["weights"])
        else:
            sums = step_lib.loss_sums(spec, model, masked, attention, dropout_key)
        return sums["loss_sum"] / sums["count"]

    @jax.jit
    def reference(params):
        loss, grads = jax.value_and_grad(everywhere)(params)
        updates, _ = tx.update(grads, state.opt_state, params)
        return loss, optax.tree.norm(grads), optax.apply_updates(params, updates)

    loss, grad_norm, params = reference(state.params)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-5)
    for want, have in zip(jax.tree.leaves(params), jax.tree.leaves(new_state.params), strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mlm_head_share=0.0),
        dict(mlm_head_share=1.5),
        dict(mlm_head_share=0.25, loss_on="all"),
        dict(mlm_head_share=0.25, kind="mae"),
    ],
)
def test_mlm_head_share_needs_masked_mlm_and_a_share(kwargs):
    kwargs = {"kind": "mlm", **kwargs}
    with pytest.raises(ValueError, match="mlm_head_share"):
        StepSpec(vocab=VOCAB, curriculum=curriculum.cm_gems(1.0), **kwargs)


@pytest.mark.parametrize(
    "kwargs", [dict(mlm_pack_share=0.2), dict(mlm_pack_share=1.5, mlm_head_share=0.375)]
)
def test_mlm_pack_share_needs_a_head_share_and_a_share(kwargs):
    with pytest.raises(ValueError, match="mlm_pack_share"):
        StepSpec(kind="mlm", vocab=VOCAB, curriculum=curriculum.cm_gems(1.0), **kwargs)


def test_cross_entropy_sums_are_weighted_cross_entropy_and_argmax_accuracy():
    """``cross_entropy_sums`` = optax's integer-label cross-entropy and argmax accuracy, weighted,
    with the gradient of the cross-entropy; an exact tie for the maximum counts as correct."""
    keys = jax.random.split(jax.random.key(3), 3)
    logits = 4.0 * jax.random.normal(keys[0], (4, 16, 37))
    targets = jax.random.randint(keys[1], (4, 16), 0, 37)
    weights = (jax.random.uniform(keys[2], (4, 16)) < 0.4).astype(jnp.float32)
    sums = cross_entropy_sums(logits, targets, weights)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    np.testing.assert_allclose(sums["loss_sum"], (ce * weights).sum(), rtol=1e-6)
    assert float(sums["correct"]) == float((hit * weights).sum()) > 0
    assert float(sums["count"]) == float(weights.sum())
    got = jax.grad(lambda z: cross_entropy_sums(z, targets, weights)["loss_sum"])(logits)
    want = jax.grad(
        lambda z: (optax.softmax_cross_entropy_with_integer_labels(z, targets) * weights).sum()
    )(logits)
    np.testing.assert_allclose(got, want, atol=1e-6)
    tie = cross_entropy_sums(jnp.array([[1.0, 3.0, 3.0]]), jnp.array([2]), jnp.array([1.0]))
    assert float(tie["correct"]) == 1.0
    np.testing.assert_allclose(
        tie["loss_sum"], -jax.nn.log_softmax(jnp.array([1.0, 3, 3]))[2], rtol=1e-6
    )
