"""Models: sizes, tied MLM head, BarcodeMAE compaction, precision, split/merge, sharding."""

import csv
import dataclasses
import gzip
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from gemsjax.data import samples
from gemsjax.models import backend
from gemsjax.models.bert import BertClassifier, Dropout, dropout_layer, masked_mean
from gemsjax.models.mae import compact_visible, expand_visible
from gemsjax.models.registry import build_model, get_model_config, param_count
from gemsjax.vocab import get_vocab

BARCODE_LEN = 660  # BarcodeMAE pads / truncates barcodes to 660 nt = 110 non-overlapping 6-mers


# ---------------------------------------------------------------------------------------------
# Real data, tokenized with the published vocab layouts.


def _dna_batch(lengths, max_len):
    """DNABERT layout ``[CLS] 6-mers [SEP] [PAD]...`` of chunks of DNA (bp ``lengths``; the
    shipped human chr22 segment, whose first 500 kb hold no N)."""
    vocab = get_vocab("dnabert", 6)
    with gzip.open(samples.sample_path(samples.GENOME), "rt") as f:
        genome = "".join(line.strip() for line in f if not line.startswith(">"))
    ids = np.zeros((len(lengths), max_len), np.int32)
    for row, n in enumerate(lengths):
        start = 1000 * row
        kmers = vocab.kmer_ids(vocab.base_codes(genome[start : start + n]))
        row_ids = np.concatenate([[vocab.special_id("[CLS]")], kmers, [vocab.special_id("[SEP]")]])
        ids[row, : len(row_ids)] = row_ids
    return jnp.asarray(ids), jnp.asarray((ids != 0).astype(np.int32))


def _barcode_batch(rows):
    """BarcodeBERT layout of the first ``rows`` BOLD barcodes (the shipped sample): 110 6-mers,
    [UNK] padding."""
    vocab = get_vocab("barcodebert", 6)
    with gzip.open(samples.sample_path(samples.BARCODES)) as f:
        reader = csv.DictReader(io.TextIOWrapper(f), delimiter="\t")
        seqs = [next(reader)["nucleotides"].replace("-", "").rstrip("N") for _ in range(rows)]
    codes = np.stack([vocab.base_codes(s[:BARCODE_LEN].ljust(BARCODE_LEN, "N")) for s in seqs])
    ids = vocab.kmer_ids(codes, stride=6)
    n_real = np.array([min(len(s), BARCODE_LEN) // 6 for s in seqs])
    attention = (np.arange(ids.shape[1])[None, :] < n_real[:, None]).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(attention)


def _mae_mask(ids, seed=0):
    """BarcodeMAE masking: Bernoulli(0.5) over tokens with id >= 2 -> bool[B, L]."""
    draw = np.random.default_rng(seed).random(ids.shape)
    return jnp.asarray((draw < 0.5) & (np.asarray(ids) >= 2))


@pytest.fixture(scope="module")
def dna_batch():
    return _dna_batch(lengths=[120, 60, 90, 30, 100, 45, 75, 110], max_len=128)


@pytest.fixture(scope="module")
def barcodes():
    ids, attention = _barcode_batch(rows=6)
    mask = _mae_mask(ids)
    assert int(attention.sum()) < attention.size, "need some padded barcodes"
    return ids, attention, mask


@pytest.fixture(scope="module")
def mlm():
    return build_model(get_model_config("test"), nnx.Rngs(0))  # dropout starts off (eval mode)


@pytest.fixture(scope="module")
def mae():
    model = build_model(get_model_config("test_mae"), nnx.Rngs(1))
    assert not np.any(model.mask_vector[...]), "the mask vector starts at zero"
    model.mask_vector[...] = jax.random.normal(jax.random.key(7), model.mask_vector[...].shape)
    return model


# Jitted calls: compiling one program is much faster on CPU than running op by op.


@nnx.jit
def _call(model, *args):
    return model(*args)


@nnx.jit
def _logits_at(model, ids, attention, positions):
    return model(ids, attention, positions=positions)


@nnx.jit
def _encode(encoder, ids, attention, position_ids=None):
    return encoder(ids, attention, position_ids=position_ids)


@nnx.jit(static_argnames="num_visible")
def _mae_logits(model, ids, attention, mask, num_visible=None):
    return model(ids, attention, mask, num_visible=num_visible)


@nnx.jit
def _mae_reference(model, ids, attention, mask):
    """BarcodeMAE written the long way: full-length encoder with masked tokens hidden as keys
    (dropped variant) or replaced by [MASK] (baseline), projection, decoder."""
    if model.variant == "baseline":
        projected = model.projection(model.encode(jnp.where(mask, 0, ids), attention))
        return model.decoder(projected, attention)
    projected = model.projection(model.encode(ids, attention * ~mask))
    return model.decoder(jnp.where(mask[..., None], model.mask_vector[...], projected), attention)


# ---------------------------------------------------------------------------------------------
# Registry and parameter counts.


def _hf_bert(v, h, layers, ffn, positions=512, types=2):
    """Parameters of a Hugging Face ``BertModel`` without pooler (embeddings + blocks)."""
    embeddings = (v + positions + types) * h + 2 * h
    block = 4 * (h * h + h) + 2 * h + (h * ffn + ffn) + (ffn * h + h) + 2 * h
    return embeddings + layers * block


def _hf_pooler(h):
    return h * h + h


def _hf_mlm_head(v, h):
    """BertOnlyMLMHead: transform dense + LayerNorm + decoder bias (decoder weight is tied)."""
    return h * h + h + 2 * h + v


def _abstract(name):
    return nnx.eval_shape(lambda: build_model(get_model_config(name), nnx.Rngs(0)))


def test_dnabert6_count_equals_hf_bert_for_masked_lm():
    count = param_count(_abstract("dnabert6"))
    assert count == _hf_bert(4101, 768, 12, 3072) + _hf_mlm_head(4101, 768) == 89_196_549
    assert abs(count - 89e6) / 89e6 < 0.005


def test_logo_and_barcode_bert_counts():
    logo = param_count(_abstract("logo"))
    assert logo == _hf_bert(4101, 256, 2, 3072) + _hf_mlm_head(4101, 256)
    assert abs(logo - 5.0e6) / 5.0e6 < 0.02  # 4.93M; "≈5.0M" in the GeneMask paper
    barcode_bert = param_count(_abstract("barcode_bert"))
    assert barcode_bert == _hf_bert(4098, 768, 6, 3072) + _hf_mlm_head(4098, 768)


def test_barcode_mae_counts_match_reference_up_to_unused_tables():
    """The reference also holds an unused encoder pooler and a full decoder word table of which
    only row 0 (the mask vector) is used; everything else matches parameter for parameter."""
    model = _abstract("barcode_mae")
    h, v, classes = 768, 4098, 4096
    reference_encoder = _hf_bert(v, h, 6, 3072) + _hf_pooler(h)
    reference_decoder = _hf_bert(v, h, 6, 3072) + h * classes + classes
    reference = reference_encoder + (h * h + h) + reference_decoder
    unused = _hf_pooler(h) + (v - 1) * h
    assert param_count(model) == reference - unused
    assert param_count(model.encoder) == reference_encoder - _hf_pooler(h)
    assert abs(reference - 96.5e6) / 96.5e6 < 0.001
    assert abs(param_count(model.encoder) - 46e6) / 46e6 < 0.01
    baseline = _abstract("barcode_mae_baseline")
    assert param_count(baseline) == param_count(model) - h  # no mask vector


def test_registry_errors_and_overrides():
    with pytest.raises(ValueError, match="unknown model size 'bert9'.*dnabert6"):
        get_model_config("bert9")
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['hiden'\]"):
        get_model_config("logo", hiden=3)
    with pytest.raises(ValueError, match="'hidden' must be divisible by heads=8"):
        get_model_config("logo", hidden=260)
    with pytest.raises(ValueError, match="'decoder_layers' must be positive"):
        get_model_config("barcode_mae", decoder_layers=0)
    config = get_model_config("dnabert6", dropout=0.0, layers=3)
    assert (config.dropout, config.layers, config.hidden) == (0.0, 3, 768)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.layers = 4


# ---------------------------------------------------------------------------------------------
# MLM head.


def test_mlm_decoder_is_the_word_embedding_table(mlm, dna_batch):
    ids, attention = dna_batch
    assert set(nnx.state(mlm.head, nnx.Param)) == {"dense", "norm", "bias"}
    hidden = _call(mlm.encoder, ids, attention)
    transformed = mlm.head.norm(jax.nn.gelu(mlm.head.dense(hidden), approximate=False))
    table = mlm.encoder.word_embeddings.embedding[...]
    expected = transformed @ table.T + mlm.head.bias[...]
    np.testing.assert_allclose(_call(mlm, ids, attention), expected, atol=1e-4, rtol=1e-4)


def test_gradient_through_logits_reaches_unseen_embedding_rows(mlm, dna_batch):
    """Rows of tokens absent from the input get gradient only through the tied decoder."""
    ids, attention = dna_batch
    graphdef, params, rest = nnx.split(mlm, nnx.Param, ...)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(ids, attention) ** 2)
    grad_table = jax.jit(jax.grad(loss))(params)["encoder"]["word_embeddings"]["embedding"][...]
    unseen = np.setdiff1d(np.arange(grad_table.shape[0]), np.asarray(ids))
    assert unseen.size > 3000
    assert np.all(np.abs(np.asarray(grad_table)[unseen]).sum(axis=1) > 0)


def test_logits_at_positions_equal_gathered_full_logits(mlm, dna_batch):
    ids, attention = dna_batch
    positions = jnp.asarray(np.random.default_rng(0).integers(0, ids.shape[1], (8, 3)), jnp.int32)
    full = _call(mlm, ids, attention)
    picked = _logits_at(mlm, ids, attention, positions)
    assert picked.shape == (8, 3, 4101) and picked.dtype == jnp.float32
    np.testing.assert_allclose(
        picked, jnp.take_along_axis(full, positions[..., None], 1), atol=1e-5
    )


def test_last_layer_at_positions_drops_what_the_full_layer_drops(dna_batch):
    """With dropout on (hidden and attention probabilities, 0.1), logits at ``positions`` (the
    last layer run at those rows only) equal the full logits there, for the same dropout key;
    padding positions and repeated positions included."""
    ids, attention = dna_batch
    model = build_model(get_model_config("test"), nnx.Rngs(0))
    model.train()
    positions = jnp.asarray(np.random.default_rng(1).integers(0, ids.shape[1], (8, 5)), jnp.int32)
    positions = positions.at[:, 4].set(positions[:, 0]).at[0, 1].set(ids.shape[1] - 1)

    @nnx.jit
    def logits(model, positions, key):
        return model(ids, attention, positions=positions, rngs=nnx.Rngs(dropout=key))

    key = jax.random.key(5)
    full = jnp.take_along_axis(logits(model, None, key), positions[..., None], 1)
    np.testing.assert_allclose(logits(model, positions, key), full, atol=1e-5)
    other = jnp.take_along_axis(logits(model, None, jax.random.key(6)), positions[..., None], 1)
    assert float(jnp.max(jnp.abs(other - full))) > 1e-2  # dropout is really on


def test_padding_is_never_a_key_in_mlm(mlm, dna_batch):
    ids, attention = dna_batch
    noise = jax.random.randint(jax.random.key(3), ids.shape, 5, 4101)
    changed = jnp.where(attention == 0, noise, ids)
    assert int((changed != ids).sum()) > 100
    real = np.asarray(attention, bool)
    np.testing.assert_allclose(
        np.asarray(_call(mlm, changed, attention))[real],
        np.asarray(_call(mlm, ids, attention))[real],
        atol=1e-6,
    )


def test_position_ids_default_to_arange(mlm, dna_batch):
    ids, attention = dna_batch
    arange = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    default = _encode(mlm.encoder, ids, attention)
    np.testing.assert_array_equal(_encode(mlm.encoder, ids, attention, arange), default)
    shifted = _encode(mlm.encoder, ids, attention, arange + 1)
    assert float(jnp.max(jnp.abs(shifted - default))) > 1e-3


# ---------------------------------------------------------------------------------------------
# BarcodeMAE.


def test_compact_visible_keeps_order_positions_and_padding(barcodes):
    ids, attention, mask = barcodes
    num_visible = int((~mask).sum(1).max()) + 3
    slot_ids, slot_pos, key_mask = compact_visible(ids, attention, mask, num_visible)
    assert slot_ids.shape == slot_pos.shape == key_mask.shape == (ids.shape[0], num_visible)
    for row in range(ids.shape[0]):
        visible = np.flatnonzero(~np.asarray(mask[row]))
        n = visible.size
        np.testing.assert_array_equal(slot_pos[row, :n], visible)
        np.testing.assert_array_equal(slot_ids[row, :n], np.asarray(ids[row])[visible])
        np.testing.assert_array_equal(key_mask[row, :n], np.asarray(attention[row])[visible] != 0)
        assert np.all(slot_ids[row, n:] == 1) and np.all(slot_pos[row, n:] == 0)
        assert not np.any(key_mask[row, n:])


def test_expand_visible_inverts_compaction(barcodes):
    ids, attention, mask = barcodes
    num_visible = int((~mask).sum(1).max())
    _, slot_pos, _ = compact_visible(ids, attention, mask, num_visible)
    full = expand_visible(slot_pos[..., None].astype(jnp.float32), mask, jnp.array([-1.0]))
    expected = jnp.where(mask, -1.0, jnp.arange(ids.shape[1], dtype=jnp.float32))
    np.testing.assert_array_equal(full[..., 0], expected)


def test_gathered_encoder_equals_full_encoder_with_masked_keys(mae, barcodes):
    ids, attention, mask = barcodes
    num_visible = int((~mask).sum(1).max()) + 2
    slot_ids, slot_pos, key_mask = compact_visible(ids, attention, mask, num_visible)
    gathered = _encode(mae.encoder, slot_ids, key_mask, slot_pos)
    full = _encode(mae.encoder, ids, attention * ~mask)
    for row in range(ids.shape[0]):
        visible = np.flatnonzero(~np.asarray(mask[row]))
        np.testing.assert_allclose(gathered[row, : visible.size], full[row, visible], atol=1e-5)


def test_mae_logits_equal_reference_composition(mae, barcodes):
    """Encoder on visible tokens == full encoder with masked keys, then projection, mask vector
    at masked positions, decoder with the padding mask."""
    ids, attention, mask = barcodes
    num_visible = int((~mask).sum(1).max())
    logits = _mae_logits(mae, ids, attention, mask, num_visible=num_visible)
    assert logits.shape == ids.shape + (4096,) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, _mae_reference(mae, ids, attention, mask), atol=1e-5)
    np.testing.assert_allclose(_mae_logits(mae, ids, attention, mask), logits, atol=1e-5)


def test_mae_logits_at_positions_drop_what_the_full_decoder_drops(barcodes):
    """With dropout on, the decoder's logits at ``positions`` (its last block, output dropout
    and classifier run at those rows only) equal the full logits there, for the same key."""
    ids, attention, mask = barcodes
    model = build_model(get_model_config("test_mae"), nnx.Rngs(2))
    model.train()
    positions = jax.vmap(lambda row: jnp.nonzero(row, size=12, fill_value=0)[0])(mask)
    num_visible = int((~mask).sum(1).max())

    @nnx.jit
    def logits(model, positions, key):
        rngs = nnx.Rngs(dropout=key)
        return model(ids, attention, mask, num_visible=num_visible, positions=positions, rngs=rngs)

    key = jax.random.key(5)
    at = logits(model, positions, key)
    assert at.shape == (ids.shape[0], 12, 4096) and at.dtype == jnp.float32
    full = jnp.take_along_axis(logits(model, None, key), positions[..., None], 1)
    np.testing.assert_allclose(at, full, atol=1e-5)
    other = jnp.take_along_axis(logits(model, None, jax.random.key(6)), positions[..., None], 1)
    assert float(jnp.max(jnp.abs(other - full))) > 1e-2  # dropout is really on


def test_padding_is_never_a_key_in_mae(mae, barcodes):
    ids, attention, mask = barcodes
    changed = jnp.where(attention == 0, 1234, ids)
    real = np.asarray(attention, bool)
    np.testing.assert_allclose(
        np.asarray(_mae_logits(mae, changed, attention, mask))[real],
        np.asarray(_mae_logits(mae, ids, attention, mask))[real],
        atol=1e-5,
    )


def test_mae_baseline_feeds_mask_tokens_to_the_encoder(barcodes):
    model = build_model(get_model_config("test_mae", arch="mae_baseline"), nnx.Rngs(2))
    np.testing.assert_allclose(
        _mae_logits(model, *barcodes), _mae_reference(model, *barcodes), atol=1e-5
    )


# ---------------------------------------------------------------------------------------------
# Classifier head.


def test_classifier_pools_and_reuses_a_pretrained_encoder(mlm, dna_batch):
    ids, attention = dna_batch
    config = get_model_config("test")
    hidden = _call(mlm.encoder, ids, attention)
    weights = np.asarray(attention, np.float32)[..., None]
    expected_mean = (np.asarray(hidden) * weights).sum(1) / weights.sum(1)
    np.testing.assert_allclose(masked_mean(hidden, attention), expected_mean, atol=1e-5)
    for pooling in ("cls", "mean"):
        clf = BertClassifier(config, num_labels=3, pooling=pooling, rngs=nnx.Rngs(5))
        nnx.update(clf.encoder, nnx.state(mlm.encoder))
        np.testing.assert_array_equal(_call(clf.encoder, ids, attention), hidden)
        logits = _call(clf, ids, attention)
        assert logits.shape == (8, 3) and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        BertClassifier(config, 3, pooling="max", rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------
# Precision, dropout, split / merge.


def test_bf16_compute_keeps_fp32_params_and_logits(dna_batch, barcodes):
    ids, attention = dna_batch
    config = get_model_config("test")
    fp32 = build_model(config, nnx.Rngs(0))
    bf16 = build_model(config, nnx.Rngs(0), dtype=jnp.bfloat16)
    params = jax.tree.leaves(nnx.state(bf16, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    assert _call(bf16.encoder, ids, attention).dtype == jnp.bfloat16
    logits, reference = _call(bf16, ids, attention), _call(fp32, ids, attention)
    assert logits.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(logits - reference))) < 0.05 * float(jnp.std(reference))
    mae = build_model(get_model_config("test_mae"), nnx.Rngs(0), dtype=jnp.bfloat16)
    assert _mae_logits(mae, *barcodes).dtype == jnp.float32


def test_dropout_drops_the_rate_and_rescales_the_rest():
    x = jnp.ones((64, 512, 32))
    layer = Dropout(0.1, deterministic=False)
    y = np.asarray(layer(x, rngs=nnx.Rngs(dropout=0)))
    kept = y != 0
    assert kept.mean() == pytest.approx(0.9, abs=0.002)
    np.testing.assert_allclose(y[kept], 1 / 0.9, rtol=1e-6)
    other = np.asarray(layer(x, rngs=nnx.Rngs(dropout=1)))
    assert 0.1 < ((other != 0) != kept).mean() < 0.25
    np.testing.assert_array_equal(layer(x, deterministic=True), x)
    np.testing.assert_array_equal(dropout_layer(0.1, None)(x), x)  # built deterministic (eval)


def test_attention_equals_jax_dot_product_attention():
    """Every platform's attention computes the same: tiled (CPU), einsums (``xla``, and
    attention dropout on CPU), the fused GPU call and the TPU kernel's path as a CPU host runs it
    (the einsums: the Mosaic kernel lowers for TPU only)."""
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (2, 7, 3, 8)) for key in keys)
    key_mask = jnp.arange(7)[None, :] < jnp.array([[7], [4]])
    fused = jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :])
    assert backend.layers("cpu").attention is backend.attend_cpu
    xla = {backend.layers(p, "xla").attention for p in ("cpu", "gpu", "tpu")}
    assert xla == {backend.attend}
    assert backend.layers("tpu").attention.func is backend.attend_splash
    assert backend.layers("gpu").attention.func is backend.attend_dot_product
    for platform in ("cpu", "tpu", "gpu"):
        attend = backend.layers(platform).attention
        got = jax.jit(lambda *a, f=attend: f(*a, Dropout(0.0), None))(q, k, v, key_mask)
        np.testing.assert_allclose(got, fused, atol=1e-5, err_msg=platform)
    dropout = Dropout(1e-9, deterministic=False)
    einsum = nnx.jit(lambda d, *a: backend.attend_cpu(*a, d, nnx.Rngs(dropout=1)))(
        dropout, q, k, v, key_mask
    )
    np.testing.assert_allclose(einsum, fused, atol=1e-5)


def test_a_model_built_for_another_platform_computes_the_same(dna_batch):
    """``platform="tpu"`` on this CPU host builds the accelerator layers (stock dense, GELU,
    einsum attention, tied decoder); same parameters, same logits and gradients as the CPU
    model, dropout off."""
    models = {
        p: build_model(get_model_config("test", platform=p), nnx.Rngs(0)) for p in ("cpu", "tpu")
    }
    assert type(models["cpu"].head.dense) is backend.Dense2D
    assert type(models["tpu"].head.dense) is nnx.Linear
    cpu_params, tpu_params = (nnx.state(m, nnx.Param) for m in models.values())
    for a, b in zip(jax.tree.leaves(cpu_params), jax.tree.leaves(tpu_params), strict=True):
        np.testing.assert_array_equal(a, b)

    def loss(params, model):
        graphdef, _ = nnx.split(model, nnx.Param)
        return jnp.mean(nnx.merge(graphdef, params)(*dna_batch) ** 2)

    (cpu_loss, cpu_grads), (tpu_loss, tpu_grads) = (
        jax.value_and_grad(loss)(nnx.state(m, nnx.Param), m) for m in models.values()
    )
    np.testing.assert_allclose(tpu_loss, cpu_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(cpu_grads), jax.tree.leaves(tpu_grads), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_jitted_pure_function_over_split_state(dna_batch):
    """The train-step pattern: split once, jit a pure function of (state, batch, key)."""
    ids, attention = dna_batch
    model = build_model(get_model_config("test"), nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    train_graphdef, _ = nnx.split(nnx.view(model, deterministic=False))

    @jax.jit
    def forward(state, ids, attention, key):
        train = nnx.merge(train_graphdef, state)(ids, attention, rngs=nnx.Rngs(dropout=key))
        return nnx.merge(graphdef, state)(ids, attention), train

    evaluated, train_a = forward(state, ids, attention, jax.random.key(0))
    _, train_b = forward(state, ids, attention, jax.random.key(0))
    _, train_c = forward(state, ids, attention, jax.random.key(1))
    np.testing.assert_allclose(evaluated, _call(model, ids, attention), atol=1e-5)
    np.testing.assert_array_equal(train_a, train_b)
    assert float(jnp.max(jnp.abs(train_a - train_c))) > 1e-2
    assert float(jnp.max(jnp.abs(train_a - evaluated))) > 1e-2


# ---------------------------------------------------------------------------------------------
# Sharding annotations on a ("data", "fsdp") mesh of the 8 fake CPU devices.


def _auto_mesh():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 fake CPU devices"
    return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def test_annotations_shard_params_and_forward_runs_on_mesh(mlm, dna_batch):
    ids, attention = dna_batch
    expected = _call(mlm, ids, attention)
    graphdef, state = nnx.split(mlm)
    specs = nnx.get_partition_spec(state)
    block = specs["encoder"]["stack"]["blocks"][0]
    spec = lambda variable: variable.get_value()
    assert spec(specs["encoder"]["word_embeddings"]["embedding"]) == P(None, "fsdp")
    assert spec(block["ffn_in"]["kernel"]) == P(None, "fsdp")
    assert spec(block["attention"]["query"]["kernel"]) == P("fsdp", None)
    assert spec(block["ffn_in"]["bias"]) == P() and spec(block["ffn_norm"]["scale"]) == P()
    mesh = _auto_mesh()
    sharded = jax.device_put(state, nnx.get_named_sharding(state, mesh))
    kernel = sharded["encoder"]["stack"]["blocks"][0]["ffn_in"]["kernel"][...]
    assert kernel.addressable_shards[0].data.shape == (64, 128 // 4)
    batch = jax.NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        forward = jax.jit(lambda s, i, a: nnx.merge(graphdef, s)(i, a))
        logits = forward(sharded, jax.device_put(ids, batch), jax.device_put(attention, batch))
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_models_built_under_a_mesh_are_born_sharded(barcodes):
    mesh = _auto_mesh()
    with jax.set_mesh(mesh):
        model = build_model(get_model_config("test_mae"), nnx.Rngs(0))
        logits = jax.jit(lambda i, a, m: model(i, a, m, num_visible=110))(*barcodes)
    classifier = model.decoder.classifier.kernel[...]
    assert classifier.sharding.spec == P(None, "fsdp")
    assert classifier.addressable_shards[0].data.shape == (64, 4096 // 4)
    assert logits.shape == barcodes[0].shape + (4096,)


def test_explicit_axis_mesh_is_refused_with_a_clear_error(mlm, dna_batch):
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="AxisType.Auto"):
        mlm(*dna_batch)


@pytest.mark.parametrize("budget", [(81, None), (162, None), (324, None), (1 << 21, 2), None])
@pytest.mark.parametrize("devices", [1, 4])
def test_tiled_attention_values_and_gradients_match_the_plain_formula(budget, devices, monkeypatch):
    """The custom-VJP tiled path equals softmax(QK^T/sqrt(d) masked) V, gradients included,
    also for a row whose keys are all padding: tiles of 1, 2 and 4 (row, head) pairs by the
    element budget, of 2 by the pair cap, or this host's default, with no mesh and with the
    rows spread over 4 devices."""
    if budget:
        monkeypatch.setattr(backend, "TILE_ELEMENTS", budget[0])
        monkeypatch.setattr(backend, "TILE_PAIRS", budget[1])
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v = (jax.random.normal(key, (4, 9, 2, 8)) for key in keys[:3])
    weights = jax.random.normal(keys[3], (4, 9, 2, 8))
    key_mask = jnp.arange(9)[None, :] < jnp.array([[9], [4], [0], [7]])

    def plain(q, k, v):
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / jnp.sqrt(8.0)
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        return jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(scores, axis=-1), v)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    tiled = lambda q, k, v: backend.attend_tiled(q, k, v, key_mask)
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):
        np.testing.assert_allclose(jax.jit(tiled)(q, k, v), plain(q, k, v), atol=1e-6)
        got = jax.jit(jax.grad(loss(tiled), argnums=(0, 1, 2)))(q, k, v)
        if devices > 1:  # each device looped over its own rows
            text = jax.jit(tiled).lower(q, k, v).as_text()
            assert "shard_map" in text or "manual" in text, text[:2000]
    want = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_attention_tiles_are_sized_from_the_hosts_l2_cache(tmp_path):
    """sysfs's level-2 data/unified cache sets the tile budget: one 512-token (row, head) pair
    per step below 2 MiB of L2, up to 8 pairs (2^21 scores) from 2 MiB; no sysfs: the small
    budget."""
    for name, (level, kind, size) in {
        "index0": ("1", "Data", "48K"),
        "index1": ("1", "Instruction", "32K"),
        "index2": ("2", "Unified", "2048K"),
        "index3": ("3", "Unified", "491520K"),
    }.items():
        (tmp_path / name).mkdir()
        for field, value in (("level", level), ("type", kind), ("size", size)):
            (tmp_path / name / field).write_text(value + "\n")
    assert backend.l2_cache_bytes(str(tmp_path)) == 2 << 20
    assert backend.l2_cache_bytes(str(tmp_path / "absent")) is None
    assert backend.tile_budget(2 << 20) == (1 << 21, 8)
    assert backend.tile_budget(512 << 10) == (1 << 16, None)
    assert backend.tile_budget(None) == (1 << 16, None)


@pytest.mark.parametrize("leading", [1, 4, 5, 9])
@pytest.mark.parametrize("devices", [1, 4])
def test_leading_query_attention_is_the_tiled_attention_of_those_slots(
    leading, devices, monkeypatch
):
    """attend_leading computes attend_tiled's values and gradients for the first ``leading``
    query slots (in the smallest bucket of 4 that holds them, or all 9), zeros after them, and
    passes no gradient through the slots it skips; one compiled program for every count, also
    with the rows spread over 4 devices."""
    monkeypatch.setattr(backend, "QUERY_BUCKET", 4)
    keys = jax.random.split(jax.random.key(2), 4)
    q, weights = (jax.random.normal(key, (4, 9, 2, 8)) for key in keys[:2])
    k, v = (jax.random.normal(key, (4, 11, 2, 8)) for key in keys[2:])
    key_mask = jnp.arange(11)[None, :] < jnp.array([[11], [5], [8], [0]])
    front = (jnp.arange(9) < leading)[None, :, None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights * front)

    tiled = lambda q, k, v: backend.attend_tiled(q, k, v, key_mask)
    run = jax.jit(lambda q, k, v, n: backend.attend_leading(q, k, v, key_mask, n))
    grad = jax.jit(jax.grad(lambda q, k, v, n: loss(lambda *a: run(*a, n))(q, k, v), (0, 1, 2)))
    with jax.set_mesh(jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Auto,))):
        got = run(q, k, v, jnp.int32(leading))
        got_grads = grad(q, k, v, jnp.int32(leading))
    np.testing.assert_allclose(got[:, :leading], tiled(q, k, v)[:, :leading], atol=1e-6)
    bucket = min(9, -(-leading // 4) * 4)
    assert not np.any(np.asarray(got[:, bucket:]))
    want = jax.grad(loss(tiled), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got_grads, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_row_buckets_run_from_half_to_all_rows_in_sixteenths():
    """The packed tail's row counts: ceil(i * P / 16) for i = 8..16, rounded up to 8 (LOGO's 820
    packed slots: 9 sizes; a test batch's 40: 3)."""
    assert backend.row_buckets(820) == [416, 464, 520, 568, 616, 672, 720, 776, 820]
    assert backend.row_buckets(40) == [24, 32, 40]
    assert backend.row_buckets(5) == [5]


@pytest.mark.parametrize("leading", [0, 13, 25, 40])
def test_sums_on_leading_rows_equal_the_sums_on_every_row(leading):
    """sums_on_leading_rows gives the all-rows sums and the all-rows gradient of "loss_sum"
    (parameters and row inputs, zero past ``leading``) when no row from ``leading`` on carries
    weight, computing on the smallest of 24 / 32 / 40 rows that holds ``leading``; ``data``
    (integer targets, float weights, a None) is cut alongside and not differentiated."""
    groups, total, width, classes = 2, 40, 6, 5
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (groups, total, width))
    kernel = jax.random.normal(keys[1], (width, classes))
    bias = jax.random.normal(keys[2], (classes,))
    targets = jax.random.randint(keys[3], (groups, total), 0, classes)
    counts = jnp.array([[leading], [max(leading - 3, 0)]])
    weights = (jnp.arange(total) < counts).astype(jnp.float32) * 0.5

    def fn(params, rows, data):
        (kernel, bias), (x,), (weights, targets, none) = params, rows, data
        assert none is None
        logits = jnp.tanh(x @ kernel + bias) * 3.0
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        loss = jax.nn.logsumexp(logits, axis=-1) - picked
        seen = jnp.float32(x.shape[1])
        return dict(loss_sum=(loss * weights).sum(), count=weights.sum(), seen=seen)

    def run(sums_fn, n):
        loss = lambda params, x: sums_fn(fn, n, params, (x,), (weights, targets, None))
        value = loss((kernel, bias), x)
        grads = jax.grad(lambda p, x: loss(p, x)["loss_sum"], argnums=(0, 1))((kernel, bias), x)
        return value, grads

    got, got_grads = jax.jit(lambda n: run(backend.sums_on_leading_rows, n))(jnp.int32(leading))
    want, want_grads = run(backend._sums_on_all_rows, jnp.int32(leading))
    assert float(got["seen"]) == {0: 24, 13: 24, 25: 32, 40: 40}[leading]
    np.testing.assert_allclose(got["loss_sum"], want["loss_sum"], rtol=1e-6)
    assert float(got["count"]) == float(want["count"])
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(got_grads[1][:, leading:]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_layer_norm_equals_the_stock_layer_norm(dtype):
    """The CPU LayerNorm (its closed-form backward pass) gives nnx.LayerNorm's output and
    gradients (two-pass variance, scale and bias away from their initial 1 and 0); bfloat16
    inputs take nnx.LayerNorm's own path."""
    x = (3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 5, 16))).astype(dtype)
    g = jax.random.normal(jax.random.key(1), (2, 5, 16))
    layers = [
        cls(16, epsilon=1e-12, use_fast_variance=False, rngs=nnx.Rngs(0))
        for cls in (backend.LayerNormLastAxis, nnx.LayerNorm)
    ]
    for layer in layers:
        layer.scale[...] = 1.0 + 0.3 * jax.random.normal(jax.random.key(2), (16,))
        layer.bias[...] = 0.3 * jax.random.normal(jax.random.key(3), (16,))

    def grads(layer):
        graphdef, params = nnx.split(layer)
        out, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
        return out, vjp(g.astype(out.dtype))

    (out, (d_params, d_x)), (want, (want_params, want_x)) = map(grads, layers)
    tol = 1e-5 if dtype == jnp.float32 else 0.0
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
    np.testing.assert_allclose(d_x, want_x, rtol=tol, atol=tol)
    for got_leaf, want_leaf in zip(
        jax.tree.leaves(d_params), jax.tree.leaves(want_params), strict=True
    ):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=tol, atol=tol)
    jaxpr = str(jax.make_jaxpr(lambda x: layers[0](x))(x))
    assert ("custom_vjp_call" in jaxpr) == (dtype == jnp.float32)


@pytest.mark.parametrize("shape", [(24, 8), (8, 24), (8, 8)])
def test_cpu_dense_gradients_equal_the_stock_linear(shape):
    """The CPU dense layer (Dense2D through matmul_2d: the C++ products on one device, else the
    kernel gradient of a tall kernel computed transposed) gives nnx.Linear's output and
    gradients, for 3-D inputs; a float32
    output over bfloat16 inputs (the logits' case) still takes nnx.Linear's own path."""
    din, dout = shape
    x = jax.random.normal(jax.random.key(0), (2, 5, din))
    g = jax.random.normal(jax.random.key(1), (2, 5, dout))
    kw = dict(bias_init=nnx.initializers.normal(1.0))
    cpu, stock = (
        backend.Dense2D(din, dout, rngs=nnx.Rngs(3), **kw),
        nnx.Linear(din, dout, rngs=nnx.Rngs(3), **kw),
    )

    def grads(layer):
        graphdef, params = nnx.split(layer)
        out, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
        return out, vjp(g)

    (out, (d_params, d_x)), (want, (want_params, want_x)) = grads(cpu), grads(stock)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d_x, want_x, rtol=1e-6, atol=1e-6)
    for got_leaf, want_leaf in zip(
        jax.tree.leaves(d_params), jax.tree.leaves(want_params), strict=True
    ):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-5)
    if din > dout:  # XLA's products (a multi-device mesh): the tall kernel's gradient transposed
        with jax.set_mesh(jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))):
            text = jax.jit(lambda x: grads(cpu)[1]).lower(x).as_text()
        assert "optimization_barrier" in text
    mixed = backend.Dense2D(
        din, dout, dtype=jnp.bfloat16, preferred_element_type=jnp.float32, rngs=nnx.Rngs(3)
    )
    assert mixed(x).dtype == jnp.float32


@pytest.mark.parametrize("dtype", [None, jnp.float32, np.float32, np.dtype("float32")])
def test_cpu_dense_takes_matmul_2d_however_float32_is_named(dtype):
    """The model builds its layers with ``dtype=jnp.float32`` (a scalar type, not a
    ``np.dtype``): the float32 dense layer must still go through matmul_2d. A set of the raw
    dtypes once held both spellings, so every dense layer of the float32 training step took
    nnx.Linear's path instead (the LOGO step 3.5 % slower, BENCHMARKS.md)."""
    layer = backend.Dense2D(8, 24, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    jaxpr = str(jax.make_jaxpr(lambda x: layer(x))(jnp.ones((2, 5, 8))))
    assert "name=matmul_2d" in jaxpr
    model = build_model(get_model_config("test"), nnx.Rngs(0))
    ids = jnp.full((2, 16), 5, jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda ids: model(ids, jnp.ones_like(ids)))(ids))
    assert jaxpr.count("name=matmul_2d") == 2 * 6 + 1  # 6 per block (2 blocks), 1 in the head


def test_gelu_is_exact_erf_gelu_with_its_exact_derivative():
    """The custom-VJP GELU equals jax.nn.gelu(approximate=False), value and gradient, also far
    in the tails (x = -12 .. 12) and under jit/vmap."""
    gelu = backend.gelu
    x = jnp.linspace(-12.0, 12.0, 4001)
    reference = lambda t: jax.nn.gelu(t, approximate=False)
    np.testing.assert_allclose(gelu(x), reference(x), atol=2e-6, rtol=1e-6)
    got = jax.jit(jax.vmap(jax.grad(gelu)))(x)
    want = jax.vmap(jax.grad(reference))(x)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6)
    assert float(jax.grad(gelu)(0.0)) == 0.5  # Phi(0) + 0 * phi(0)
    g = jax.random.normal(jax.random.key(0), x.shape)
    _, vjp = jax.vjp(gelu, x)
    np.testing.assert_allclose(vjp(g)[0], g * want, atol=2e-6, rtol=1e-6)


def _splash(*args, **kw):
    return backend.attend_splash(*args, interpret=True, **kw)


def test_splash_attention_equals_the_einsums_with_padding_query_rows_and_a_mesh():
    """The TPU splash kernel (run by the Pallas interpreter on this CPU) computes what the
    einsum attention computes, values and gradients: padded keys (a row with no key at all stays
    finite), queries that are a subset of the rows (the masked-token head's last layer), and
    under an 8-device mesh, where it runs per device through shard_map."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((8, 256, 2, 32)), jnp.float32) for _ in range(3))
    lengths = np.array([256, 200, 17, 0, 256, 128, 255, 1])
    key_mask = jnp.asarray(np.arange(256)[None, :] < lengths[:, None])
    real = lengths > 0
    off = Dropout(0.1, deterministic=True)
    for queries in (q, q[:, 64:192]):  # every row; 128 query rows of 256 keys

        def loss(f, q, k, v, queries=queries):
            out = f(q if queries is q else q[:, 64:192], k, v, key_mask, off, None)
            return jnp.sum(jnp.where(real[:, None, None, None], out, 0.0) ** 2), out

        (_, want), grads = jax.value_and_grad(
            lambda *a: loss(backend.attend, *a), argnums=(0, 1, 2), has_aux=True
        )(q, k, v)
        (_, got), got_grads = jax.jit(
            jax.value_and_grad(lambda *a: loss(_splash, *a), argnums=(0, 1, 2), has_aux=True)
        )(q, k, v)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got[real], want[real], atol=2e-6)
        for a, b in zip(got_grads, grads, strict=True):
            # O(1e-2), but O(1e2) for the keys of the 1-key row: relative there (2e-6 on an
            # AVX-512 Xeon)
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    rows = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        args = [jax.device_put(t, rows) for t in (q, k, v, key_mask)]
        sharded = jax.jit(lambda q, k, v, m: _splash(q, k, v, m, off, None))(*args)
    alone = jax.jit(lambda q, k, v, m: _splash(q, k, v, m, off, None))(q, k, v, key_mask)
    np.testing.assert_allclose(sharded, alone, atol=1e-6)


def test_the_gpu_attention_call_equals_the_einsums():
    """``jax.nn.dot_product_attention`` as the GPU path calls it (on CPU: its XLA version): the
    same outputs on padded rows, finite on a row without keys."""
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 40, 2, 16)), jnp.float32) for _ in range(3))
    key_mask = jnp.asarray(np.arange(40)[None, :] < np.array([[40], [7], [0]]))
    off = Dropout(0.0)
    got = backend.attend_dot_product(q, k, v, key_mask, off, None)
    want = backend.attend(q, k, v, key_mask, off, None)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got[:2], want[:2], atol=1e-5)


def test_splash_attention_falls_back_where_the_kernel_cannot_run():
    """Attention-probability dropout (the kernel has none) and lengths that are not whole
    128-position blocks (a barcode's 110 tokens) take the einsum attention, bit for bit."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 110, 2, 16)), jnp.float32) for _ in range(3))
    key_mask = jnp.ones((2, 110), bool)
    off = Dropout(0.0)
    np.testing.assert_array_equal(
        _splash(q, k, v, key_mask, off, None), backend.attend(q, k, v, key_mask, off, None)
    )
    q, k, v = (jnp.pad(t, ((0, 0), (0, 18), (0, 0), (0, 0))) for t in (q, k, v))
    key_mask = jnp.pad(key_mask, ((0, 0), (0, 18)))
    dropout = Dropout(0.1, deterministic=False)
    got = nnx.jit(lambda d, *a: _splash(*a, d, nnx.Rngs(dropout=3)))(dropout, q, k, v, key_mask)
    want = nnx.jit(lambda d, *a: backend.attend(*a, d, nnx.Rngs(dropout=3)))(
        dropout, q, k, v, key_mask
    )
    np.testing.assert_array_equal(got, want)


def test_a_fused_attention_model_computes_what_the_einsum_model_computes(dna_batch):
    """``attention="fused"`` (on CPU: the splash kernel, interpreted) and ``"xla"`` models with
    the same parameters give the same hidden states on real DNA (128 tokens: one kernel block)."""
    ids, attention = dna_batch
    models = {
        a: build_model(
            get_model_config("test", attention=a, dropout=0.0, attn_dropout=0.0), nnx.Rngs(0)
        )
        for a in ("xla", "fused")
    }
    hidden = {a: np.asarray(m.encoder(ids, attention)) for a, m in models.items()}
    real = np.asarray(attention) != 0
    np.testing.assert_allclose(hidden["fused"][real], hidden["xla"][real], atol=1e-5)
    with pytest.raises(ValueError, match="attention"):
        get_model_config("test", attention="flash")


def test_forward_only_programs_compile_without_ynnpack_fusions_on_cpu(mlm, dna_batch):
    """``inference_compiler_options``: on CPU the embedding and prediction steps are compiled
    without XLA's YNNPACK fusions (slower there, BENCHMARKS.md, Embeddings), with the same
    values; elsewhere nothing is set."""
    assert backend.inference_compiler_options("tpu") is None
    options = backend.inference_compiler_options("cpu")
    forward = lambda ids, attention: mlm(ids, attention)
    default = jax.jit(forward).lower(*dna_batch).compile()
    plain = jax.jit(forward, compiler_options=options).lower(*dna_batch).compile()
    assert "ynn_fusion" in default.as_text() and "ynn_fusion" not in plain.as_text()
    np.testing.assert_allclose(plain(*dna_batch), default(*dna_batch), atol=1e-5)
