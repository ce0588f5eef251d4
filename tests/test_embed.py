"""Embeddings: pooled hidden states equal the model's own, padding never changes them, layers and
poolings, the file readers, and the embed command end to end."""

import numpy as np
import pytest
from flax import nnx

from gemsjax.data import samples, tables
from gemsjax.errors import UserError
from gemsjax.eval import embed
from gemsjax.models.bert import masked_mean
from gemsjax.models.registry import build_model, get_model_config
from gemsjax.train import sharding


@pytest.fixture(scope="module")
def barcodes():
    table = tables.read_barcode_tsv(samples.sample_path(samples.BARCODES))["species_name"]
    return table.sequences[:21]


@pytest.fixture(scope="module")
def mae():
    return build_model(get_model_config("test_mae", dropout=0.0, attn_dropout=0.0), nnx.Rngs(3))


@pytest.fixture(scope="module")
def mlm():
    return build_model(get_model_config("test", dropout=0.0, attn_dropout=0.0), nnx.Rngs(4))


def test_mean_embedding_is_the_encoders_masked_mean(mae, barcodes):
    got = embed.embed_sequences(mae, barcodes, vocab="barcodebert", max_len=110, batch_size=8)
    ids, attention = embed.tokenizer_for("barcodebert").encode(barcodes, 110)
    want = masked_mean(mae.encode(ids, attention), attention)
    assert got.shape == (21, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.asarray(want), rtol=2e-5, atol=2e-6)


def test_padding_does_not_change_valid_tokens_or_the_embedding(mae, barcodes):
    """One barcode alone at its exact token count (no padding) vs in a batch padded to 110 tokens
    and with empty filler rows: same hidden states on its tokens, same pooled vector."""
    seq = barcodes[5]
    tok = embed.tokenizer_for("barcodebert")
    n = len(seq) // 6
    ids, attention = tok.encode([seq], n)
    assert attention.all()
    padded_ids, padded_att = tok.encode([seq, barcodes[0]], 110)
    exact = np.asarray(mae.encode(ids, attention))[0]
    padded = np.asarray(mae.encode(padded_ids, padded_att))[0]
    np.testing.assert_allclose(padded[:n], exact, rtol=2e-5, atol=2e-5)
    alone = embed.embed_sequences(mae, [seq], vocab="barcodebert", max_len=n, batch_size=8)
    batched = embed.embed_sequences(mae, barcodes, vocab="barcodebert", max_len=110, batch_size=16)
    np.testing.assert_allclose(batched[5], alone[0], rtol=2e-5, atol=2e-5)


def test_sharded_equals_single_device(mae, barcodes):
    import jax

    one = sharding.make_mesh(devices=jax.devices()[:1])
    eight = sharding.make_mesh(2, 4)
    a = embed.embed_sequences(mae, barcodes, vocab="barcodebert", max_len=110, mesh=one)
    b = embed.embed_sequences(mae, barcodes, vocab="barcodebert", max_len=110, mesh=eight)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_layers_and_cls_pooling_on_dnabert(mlm):
    seqs = ["ACGTACGTTAGCATTACGATCGATCGGGCTA", "ttagcaNNacgatcgatcgatcgggctaacgtac"]
    ids, attention = embed.tokenizer_for("dnabert").encode(seqs, 40)
    encoder = mlm.encoder
    last = embed.embed_sequences(mlm, seqs, vocab="dnabert", max_len=40, layer=-1)
    also_last = embed.embed_sequences(mlm, seqs, vocab="dnabert", max_len=40, layer=2)
    np.testing.assert_allclose(last, also_last, rtol=1e-6, atol=1e-6)
    first = embed.embed_sequences(mlm, seqs, vocab="dnabert", max_len=40, layer=1)
    x = encoder.embeddings(
        encoder.word_embeddings(ids), np.broadcast_to(np.arange(40), ids.shape), np.zeros_like(ids)
    )
    x = encoder.stack.blocks[0](x, attention != 0)
    np.testing.assert_allclose(first, np.asarray(masked_mean(x, attention)), rtol=2e-5, atol=2e-6)
    assert not np.allclose(first, last)
    cls = embed.embed_sequences(mlm, seqs, vocab="dnabert", max_len=40, pooling="cls")
    np.testing.assert_allclose(cls, np.asarray(encoder(ids, attention))[:, 0], rtol=2e-5, atol=2e-6)


def test_bad_options_are_user_errors(mae, mlm, barcodes):
    with pytest.raises(UserError, match="pooling='cls' needs a \\[CLS\\]"):
        embed.embed_sequences(mae, barcodes, vocab="barcodebert", max_len=110, pooling="cls")
    with pytest.raises(UserError, match="layer=7, but the encoder has 2 blocks"):
        embed.embed_sequences(mae, barcodes, vocab="barcodebert", max_len=110, layer=7)
    with pytest.raises(UserError, match="4098 rows, fewer than the 4101 ids of the dnabert"):
        embed.embed_sequences(mae, barcodes, vocab="dnabert", max_len=110)


def test_readers_keep_ids_and_columns(tmp_path, shared_data):
    seqs, index = embed.read_sequences(samples.sample_path(samples.PROM_CORE_TRAIN))
    assert len(seqs) == 20 and set(index) == {"id", "line", "label"} and len(seqs[0]) == 70
    seqs, index = embed.read_sequences(shared_data / "phage_lambda" / "lambda_virus.fa.gz")
    assert len(seqs) == 1 and len(seqs[0]) == 48502 and index["id"][0].startswith("gi")
    seqs, index = embed.read_sequences(samples.sample_path(samples.BARCODES))
    assert len(seqs) == 4000 and index["id"][0] and "genus_name" in index and "split" in index
    bad = tmp_path / "x.csv"
    bad.write_text("name,label\nACGT,1\n")
    with pytest.raises(tables.TableFormatError, match="x.csv, line 1: missing required column"):
        embed.read_sequences(bad)
    with pytest.raises(UserError, match="cannot tell the format"):
        embed.read_sequences(tmp_path / "x.txt")
