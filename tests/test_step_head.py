"""The output head on masked positions only (``StepSpec.head_slots``): same loss, metrics and
updates as the head on every position, for the MLM on real chr22 tokens and the BarcodeMAE
decoder on real barcodes, including the fallback path."""

import dataclasses

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
from gemsjax.train import optim
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


def _two_steps(batch, rank_table, mlm_head_share, grad_accum=1):
    config = cli_runs.config("cm_gems")
    spec = dataclasses.replace(
        spec_lib.step_spec(config), mlm_head_share=mlm_head_share, grad_accum=grad_accum
    )
    tx, lr = optim.make_optimizer(config.optimizer, 1000)
    model = registry.build_model(spec_lib.model_config(config), nnx.Rngs(0))
    state = init_train_state(model, tx, spec)
    train_graphdef, eval_graphdef = step_graphdefs(model)
    step = jax.jit(make_train_step(spec, train_graphdef, tx, lr))
    state, first = step(state, batch, rank_table)
    state, second = step(state, batch, rank_table)
    sums = jax.jit(make_eval_step(spec, eval_graphdef))(state, batch, rank_table, jnp.int32(0))
    return state, [first, second], sums


@pytest.mark.parametrize("mlm_head_share, grad_accum", [(0.5, 1), (0.5, 2), (0.01, 1)])
def test_head_on_masked_positions_matches_head_everywhere(
    genome_batch, rank_table, mlm_head_share, grad_accum
):
    """0.5: the masked tokens (~15%) fit the slots; 0.01: they do not, the head falls back to
    every position. Either way the step computes the same numbers."""
    expected = _two_steps(genome_batch, rank_table, None, grad_accum)
    got = _two_steps(genome_batch, rank_table, mlm_head_share, grad_accum)
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
