"""Hugging Face interop: exports load in transformers and compute what gemsjax computes (MLM
logits, hidden states, classifier logits; padding included) on real chr22 and BOLD sequences;
transformers-initialized models import with equal outputs; round trips are bit-exact; the exported
tokenizers give KmerTokenizer's ids; every mismatch is a UserError naming what differs."""

import csv
import dataclasses
import gzip
import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from genemask_formats import sequence_to_kmer_text

from gemsjax import main
from gemsjax.data import samples
from gemsjax.errors import UserError
from gemsjax.interop import hf
from gemsjax.models import registry
from gemsjax.models.bert import BertClassifier, BertConfig, BertForMaskedLM, BertModel
from gemsjax.models.mae import BarcodeMAE
from gemsjax.tokenizers import KmerTokenizer
from gemsjax.train import checkpoint
from gemsjax.vocab import get_vocab

ROOT = pathlib.Path(__file__).resolve().parents[1]
DNABERT = get_vocab("dnabert", 6)
BARCODE = get_vocab("barcodebert", 6)
SMALL = registry.get_model_config("test")  # 2 layers x 64, DNABERT vocab
SMALL_BARCODE = dataclasses.replace(SMALL, vocab_size=BARCODE.size)
TOL = 1e-4


# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def chr22() -> list[str]:
    """Windows of the shipped chr22 sample, of different lengths (padding, truncation at 128
    tokens) and one across an N run."""
    with gzip.open(samples.sample_path(samples.GENOME), "rt") as f:
        genome = "".join(line.strip() for line in f if not line.startswith(">"))
    n_at = genome.index("N")
    return [genome[200_000:200_300], genome[n_at - 40 : n_at + 30], genome[500_000:500_090]]


@pytest.fixture(scope="module")
def bold() -> list[str]:
    """Raw BOLD COI barcodes of the shipped sample (gaps and N kept), the gapped ones first."""
    with gzip.open(samples.sample_path(samples.BARCODES)) as f:
        rows = [r["nucleotides"] for r in csv.DictReader(io.TextIOWrapper(f), delimiter="\t")]
    gapped = [s for s in rows if "-" in s][:2]
    return gapped + [s for s in rows if "N" in s.strip("N")][:1] + [rows[0][:400]]


def _dnabert_batch(seqs, max_len=128):
    ids, attention = KmerTokenizer(6).encode(seqs, max_len)
    return ids, attention


def _barcode_batch(seqs, max_len=110):
    return KmerTokenizer(6, vocab="barcodebert", strip_gaps=True).encode(seqs, max_len)


# ----------------------------------------------------------------------------- helpers


def _perturbed(model: nnx.Module, seed: int) -> nnx.Module:
    """``model`` with noise on every parameter, so that zero biases and unit LayerNorm scales
    cannot hide a wrong mapping."""
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(tree, noisy))
    return model


def _torch_perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _hf_config(config, vocab, **extra) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        intermediate_size=config.ffn,
        max_position_embeddings=config.max_positions,
        pad_token_id=0 if vocab is DNABERT else 1,
        **extra,
    )


def _torch_out(model, ids, attention, **kwargs):
    with torch.no_grad():
        return model(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(attention, dtype=torch.long),
            **kwargs,
        )


def _loaded(cls, folder, unused_prefix=None, **kwargs):
    """``cls.from_pretrained(folder)``, asserting that every weight came from the folder and
    that the folder's tensors were all used (but those starting with ``unused_prefix``)."""
    model, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert all(unused_prefix and k.startswith(unused_prefix) for k in info["unexpected_keys"])
    return model.eval()


def _close(ours, theirs):
    theirs = theirs.numpy() if isinstance(theirs, torch.Tensor) else theirs
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOL, rtol=0)


def _same_logits(ours, theirs, ids, attention):
    """gemsjax model ``ours`` and transformers model ``theirs`` give the same logits."""
    expected = _torch_out(theirs, ids, attention).logits
    _close(ours(jnp.asarray(ids), jnp.asarray(attention)), expected)


def _no_custom_code(folder: pathlib.Path):
    files = sorted(p.name for p in folder.iterdir())
    assert not [f for f in files if f.endswith((".py", ".bin", ".pt", ".pkl"))], files
    assert "auto_map" not in json.loads((folder / "config.json").read_text())
    return files


# ----------------------------------------------------------------------------- export


def test_mlm_export_loads_as_bert_for_masked_lm_with_equal_logits(tmp_path, chr22):
    model = _perturbed(BertForMaskedLM(SMALL, rngs=nnx.Rngs(0)), 1)
    folder = hf.export_model(model, SMALL, DNABERT, tmp_path / "mlm")
    files = _no_custom_code(folder)
    assert {
        "config.json",
        "model.safetensors",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
    } <= set(files)
    ids, attention = _dnabert_batch(chr22)
    assert (attention == 0).any() and (ids == DNABERT.unk_id).any()  # padding and N k-mers

    mlm = _loaded(transformers.AutoModelForMaskedLM, folder)
    assert type(mlm).__name__ == "BertForMaskedLM"
    out = _torch_out(mlm, ids, attention, output_hidden_states=True)
    _close(model(jnp.asarray(ids), jnp.asarray(attention)), out.logits)
    hidden = model.encoder(jnp.asarray(ids), jnp.asarray(attention))
    _close(hidden, out.hidden_states[-1])

    encoder = _loaded(transformers.AutoModel, folder, "cls.predictions.", add_pooling_layer=False)
    assert type(encoder).__name__ == "BertModel"
    _close(hidden, _torch_out(encoder, ids, attention).last_hidden_state)


def test_exported_dnabert_tokenizer_gives_kmer_tokenizer_ids(tmp_path, chr22):
    folder = hf.export_model(BertModel(SMALL, rngs=nnx.Rngs(0)), SMALL, DNABERT, tmp_path / "m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert (folder / "vocab.txt").read_text().splitlines() == DNABERT.tokens()
    for max_len in (128, 512):
        ids, attention = _dnabert_batch(chr22, max_len)
        batch = tokenizer(
            [sequence_to_kmer_text(s) for s in chr22],
            padding="max_length",
            truncation=True,
            max_length=max_len,
            return_tensors="np",
        )
        np.testing.assert_array_equal(batch["input_ids"], ids)
        np.testing.assert_array_equal(batch["attention_mask"], attention)
    assert tokenizer.convert_tokens_to_ids(["AAAAAA", "AAAAAT", "[MASK]"]) == [5, 6, 4]


def test_barcode_mae_export_is_its_encoder_as_bert_model(tmp_path, bold):
    config = registry.get_model_config("test_mae")
    model = _perturbed(BarcodeMAE(config, rngs=nnx.Rngs(0)), 2)
    folder = hf.export_model(model, config, BARCODE, tmp_path / "mae")
    _no_custom_code(folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertModel"]
    readme = (folder / "README.md").read_text()
    assert "non-overlapping 6-mers" in readme and "`[UNK]` (id 1) with attention 0" in readme

    ids, attention = _barcode_batch(bold)
    assert (attention == 0).any() and ((ids == BARCODE.unk_id) & (attention == 1)).any()
    encoder = _loaded(transformers.AutoModel, folder, add_pooling_layer=False)
    out = _torch_out(encoder, ids, attention)
    _close(model.encode(jnp.asarray(ids), jnp.asarray(attention)), out.last_hidden_state)

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = [sequence_to_kmer_text(s.replace("-", ""), 6, stride=6) for s in bold]
    batch = tokenizer(
        text, padding="max_length", truncation=True, max_length=110, return_tensors="np"
    )
    np.testing.assert_array_equal(batch["input_ids"], ids)
    np.testing.assert_array_equal(batch["attention_mask"], attention)


def test_barcode_bert_mlm_export_keeps_its_head(tmp_path, bold):
    model = _perturbed(BertForMaskedLM(SMALL_BARCODE, rngs=nnx.Rngs(0)), 3)
    folder = hf.export_model(model, SMALL_BARCODE, BARCODE, tmp_path / "bb")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["pad_token_id"] == 1
    ids, attention = _barcode_batch(bold)
    out = _torch_out(_loaded(transformers.AutoModelForMaskedLM, folder), ids, attention)
    _close(model(jnp.asarray(ids), jnp.asarray(attention)), out.logits)


def test_classifier_export_is_bert_for_sequence_classification(tmp_path, chr22):
    model = _perturbed(BertClassifier(SMALL, 3, rngs=nnx.Rngs(0)), 4)
    labels = ["promoter", "enhancer", "other"]
    folder = hf.export_model(model, SMALL, DNABERT, tmp_path / "clf", labels=labels)
    clf = _loaded(transformers.AutoModelForSequenceClassification, folder)
    assert type(clf).__name__ == "BertForSequenceClassification"
    assert clf.config.num_labels == 3 and clf.config.id2label[1] == "enhancer"
    ids, attention = _dnabert_batch(chr22)
    _close(model(jnp.asarray(ids), jnp.asarray(attention)), _torch_out(clf, ids, attention).logits)


def test_fine_tuned_run_exports_its_best_state_as_bert_for_sequence_classification(tmp_path, chr22):
    """A fine-tuning arm folder (checkpoints + dev history) -> ``hf.export_run`` picks the
    best-dev-loss checkpoint (the state the test split was scored with), not the newest, and
    transformers gives the logits of that state. The dev split is the training rows with their
    labels swapped, so learning the training split raises the dev loss: the best is epoch 1."""
    from gemsjax.eval import finetune as ft
    from gemsjax.eval import init, labelled
    from gemsjax.train import sharding

    train = labelled.read_split(samples.sample_path(samples.PROM_CORE_TRAIN), "genemask")
    swapped = dataclasses.replace(train, labels=1 - train.labels)
    encoder = init.load_encoder("random", model_name="test", vocab="dnabert")
    hyper = ft.Hyper(learning_rate=3e-3, epochs=4, batch_size=5, dropout=0.0)
    mesh = sharding.make_mesh()
    tuner = ft.Finetuner(encoder, 2, hyper, 72, ft.steps_per_epoch(20, 5) * 4, mesh)
    arm = tmp_path / "prom_core" / "pretrained"
    with jax.set_mesh(mesh):
        facts = dict(task="prom_core", labels=["non-promoter", "promoter"])
        out = ft.finetune(tuner, train, swapped, swapped, arm, facts=facts)
    losses = [h["loss"] for h in out["dev_history"]]
    assert losses == sorted(losses) and out["best_step"] == 4, losses

    summary = hf.export_run(arm)
    assert summary["step"] == 4 and summary["num_labels"] == 2
    assert summary["architecture"] == "BertForSequenceClassification"
    assert summary["folder"] == str(arm / "hf") and summary["task"] == "prom_core"
    readme = (arm / "hf" / "README.md").read_text()
    assert "- task: prom_core" in readme and "cls pooling, 72 tokens per row" in readme
    theirs = _loaded(transformers.AutoModelForSequenceClassification, arm / "hf")
    assert theirs.config.num_labels == 2 and theirs.config.id2label[1] == "promoter"
    ours = BertClassifier(SMALL, 2, rngs=nnx.Rngs(0))
    hf.load_into(ours, arm / "hf", SMALL)
    best = hf.flat_params(checkpoint.read_params(arm / "checkpoints" / "4"))
    loaded = hf.flat_params(nnx.state(ours, nnx.Param))
    assert loaded.keys() == best.keys()
    assert all(np.array_equal(loaded[name], best[name]) for name in best)
    _same_logits(ours, theirs, *_dnabert_batch(chr22))
    newest = hf.export_run(arm, tmp_path / "newest", step=16)
    assert newest["step"] == 16 and newest["folder"] == str(tmp_path / "newest")
    # a run folder named relative to the current folder (Orbax reads absolute paths only)
    relative = hf.export_run(os.path.relpath(arm), tmp_path / "relative", step=16)
    assert relative["step"] == 16
    assert (tmp_path / "relative" / "model.safetensors").read_bytes() == (
        tmp_path / "newest" / "model.safetensors"
    ).read_bytes()


def test_mean_pooled_classifier_is_refused(tmp_path):
    model = BertClassifier(SMALL, 2, pooling="mean", rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match="mean-pooled BertClassifier"):
        hf.export_model(model, SMALL, DNABERT, tmp_path / "x")
    with pytest.raises(UserError, match="2 label names given for a classifier with 3 outputs"):
        hf.export_model(
            BertClassifier(SMALL, 3, rngs=nnx.Rngs(0)),
            SMALL,
            DNABERT,
            tmp_path / "y",
            labels=["a", "b"],
        )


# ----------------------------------------------------------------------------- import


def test_dnabert6_size_transformers_model_imports_with_equal_logits(tmp_path, chr22):
    """A transformers-initialized BertForMaskedLM of DNABERT-6 size (89M) -> gemsjax -> equal
    logits; and back to transformers bit-exact."""
    torch.manual_seed(0)
    theirs = _torch_perturbed(
        transformers.BertForMaskedLM(_hf_config(registry.get_model_config("dnabert6"), DNABERT)), 5
    )
    theirs.save_pretrained(tmp_path / "dnabert6")
    KmerTokenizer(6).write_vocab_txt(tmp_path / "dnabert6" / "vocab.txt")

    config = hf.model_config(tmp_path / "dnabert6")
    assert config == registry.get_model_config("dnabert6")
    ours = BertForMaskedLM(config, rngs=nnx.Rngs(0))
    hf.load_into(ours, tmp_path / "dnabert6", config)
    ids, attention = _dnabert_batch(chr22[1:], 96)
    _same_logits(ours, theirs, ids, attention)

    back = hf.export_model(ours, config, DNABERT, tmp_path / "back")
    from safetensors.numpy import load_file

    exported, original = load_file(back / hf.WEIGHTS), theirs.state_dict()
    assert set(exported) == set(load_file(tmp_path / "dnabert6" / hf.WEIGHTS))
    for name, value in exported.items():
        np.testing.assert_array_equal(value, original[name].numpy(), err_msg=name)


def test_transformers_classifier_imports_with_equal_logits(tmp_path, chr22):
    theirs = _torch_perturbed(
        transformers.BertForSequenceClassification(_hf_config(SMALL, DNABERT, num_labels=4)), 6
    )
    theirs.save_pretrained(tmp_path / "clf")
    ours = BertClassifier(SMALL, 4, rngs=nnx.Rngs(0))
    hf.load_into(ours, tmp_path / "clf", SMALL)
    ids, attention = _dnabert_batch(chr22)
    _same_logits(ours, theirs, ids, attention)


def test_barcodebert_format_folder_imports_its_encoder(tmp_path, bold):
    """BarcodeBERT's layout: BertForTokenClassification over 4^k k-mer classes, no vocab.txt."""
    theirs = _torch_perturbed(
        transformers.BertForTokenClassification(
            _hf_config(SMALL_BARCODE, BARCODE, num_labels=4096)
        ),
        7,
    )
    theirs.save_pretrained(tmp_path / "barcodebert")
    assert hf.read_folder(tmp_path / "barcodebert").vocab == BARCODE
    ids, attention = _barcode_batch(bold)
    expected = _torch_out(theirs.bert, ids, attention).last_hidden_state

    encoder = BertModel(SMALL_BARCODE, rngs=nnx.Rngs(0))
    hf.load_into(encoder, tmp_path / "barcodebert", SMALL_BARCODE)
    _close(encoder(jnp.asarray(ids), jnp.asarray(attention)), expected)

    config, vocab, params = hf.import_encoder(tmp_path / "barcodebert")
    assert (config.vocab_size, config.layers, config.hidden, vocab) == (4098, 2, 64, BARCODE)
    built = BertModel(config, rngs=nnx.Rngs(1))
    nnx.update(built, params)
    _close(built(jnp.asarray(ids), jnp.asarray(attention)), expected)

    mae_config = registry.get_model_config("test_mae")
    mae = BarcodeMAE(mae_config, rngs=nnx.Rngs(0))
    decoder_before = hf.flat_params(nnx.state(mae.decoder, nnx.Param))
    with pytest.raises(UserError, match="cannot hold a BarcodeMAE decoder; pass encoder_only"):
        hf.load_into(mae, tmp_path / "barcodebert", mae_config)
    hf.load_into(mae, tmp_path / "barcodebert", mae_config, encoder_only=True)
    _close(mae.encode(jnp.asarray(ids), jnp.asarray(attention)), expected)
    decoder_after = hf.flat_params(nnx.state(mae.decoder, nnx.Param))
    assert all(np.array_equal(decoder_before[k], decoder_after[k]) for k in decoder_before)

    mlm = BertForMaskedLM(SMALL_BARCODE, rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match=r"\(BertForTokenClassification\) has no masked-LM head"):
        hf.load_into(mlm, tmp_path / "barcodebert", SMALL_BARCODE)


@pytest.mark.parametrize("kind", ["mlm", "classifier", "encoder", "mae"])
def test_round_trip_gemsjax_transformers_gemsjax_is_bit_exact(tmp_path, kind):
    config = registry.get_model_config("test_mae") if kind == "mae" else SMALL
    vocab = BARCODE if kind == "mae" else DNABERT
    build = dict(
        mlm=lambda s: BertForMaskedLM(config, rngs=nnx.Rngs(s)),
        classifier=lambda s: BertClassifier(config, 5, rngs=nnx.Rngs(s)),
        encoder=lambda s: BertModel(config, rngs=nnx.Rngs(s)),
        mae=lambda s: BarcodeMAE(config, rngs=nnx.Rngs(s)),
    )[kind]
    original = _perturbed(build(0), 8)
    folder = hf.export_model(original, config, vocab, tmp_path / kind)
    copy = build(1)
    hf.load_into(copy, folder, config, encoder_only=kind == "mae")
    before = hf.flat_params(nnx.state(original.encoder if kind == "mae" else original, nnx.Param))
    after = hf.flat_params(nnx.state(copy.encoder if kind == "mae" else copy, nnx.Param))
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_pytorch_model_bin_is_read_with_weights_only(tmp_path, chr22):
    theirs = _torch_perturbed(transformers.BertForMaskedLM(_hf_config(SMALL, DNABERT)), 9)
    theirs.save_pretrained(tmp_path / "st")
    legacy = tmp_path / "bin"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(theirs.state_dict(), legacy / hf.PICKLED_WEIGHTS)
    ours = BertForMaskedLM(SMALL, rngs=nnx.Rngs(0))
    hf.load_into(ours, legacy, SMALL)
    ids, attention = _dnabert_batch(chr22)
    _same_logits(ours, theirs, ids, attention)

    torch.save({"weights": theirs.state_dict(), "made_by": _Opaque()}, legacy / hf.PICKLED_WEIGHTS)
    with pytest.raises(UserError, match=r"weights_only=True\) refused it .*never unpickles"):
        hf.load_into(ours, legacy, SMALL)


def test_sharded_safetensors_and_tf_layer_norm_names_are_read(tmp_path, chr22):
    """A folder saved in shards (model.safetensors.index.json) and one whose LayerNorm tensors
    carry the TF-era names gamma/beta load the same weights."""
    from safetensors.numpy import load_file, save_file

    theirs = _torch_perturbed(transformers.BertForMaskedLM(_hf_config(SMALL, DNABERT)), 10)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    assert (tmp_path / "sharded" / hf.WEIGHTS_INDEX).is_file()
    ids, attention = _dnabert_batch(chr22)
    sharded = BertForMaskedLM(SMALL, rngs=nnx.Rngs(0))
    hf.load_into(sharded, tmp_path / "sharded", SMALL)
    _same_logits(sharded, theirs, ids, attention)

    theirs.save_pretrained(tmp_path / "tf")
    tensors = load_file(tmp_path / "tf" / hf.WEIGHTS)
    renamed = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in tensors.items()
    }
    assert sum(k.endswith("gamma") for k in renamed) == 1 + 2 * SMALL.layers + 1
    save_file(renamed, tmp_path / "tf" / hf.WEIGHTS, metadata={"format": "pt"})
    tf_names = BertForMaskedLM(SMALL, rngs=nnx.Rngs(0))
    hf.load_into(tf_names, tmp_path / "tf", SMALL)
    _same_logits(tf_names, theirs, ids, attention)


class _Opaque:
    """An object only an unrestricted unpickler rebuilds."""

    def __reduce__(self):
        return (os.getcwd, ())


# ----------------------------------------------------------------------------- mismatches


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Factory: a saved transformers BertForMaskedLM folder of ``SMALL`` size with changes."""
    root = tmp_path_factory.mktemp("folders")

    def make(name, model_cls=transformers.BertForMaskedLM, vocab=DNABERT, **changes):
        fields = dict(dataclasses.asdict(SMALL), vocab_size=vocab.size)
        fields.update({k: v for k, v in changes.items() if k in fields})
        extra = {k: v for k, v in changes.items() if k not in fields}
        config = _hf_config(BertConfig(**fields), vocab, **extra)
        model_cls(config).save_pretrained(root / name)
        KmerTokenizer(vocab.k, vocab=vocab.name).write_vocab_txt(root / name / "vocab.txt")
        return root / name

    return make


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(vocab=BARCODE),
            r"vocabulary: 4098 ids \(barcodebert layout, k=6\) in the folder, "
            r"4101 ids \(dnabert layout, k=6\) in the model",
        ),
        (
            dict(vocab=get_vocab("dnabert", 4)),
            r"k: 261 ids \(dnabert layout, k=4\) in the folder, "
            r"4101 ids \(dnabert layout, k=6\)",
        ),
        (dict(layers=3), "layer count: 3 in the folder, 2 in the model"),
        (dict(max_positions=256), "position limit: 256 in the folder, 512 in the model"),
        (dict(hidden=32), "hidden size: 32 in the folder, 64 in the model"),
        (dict(heads=4), "attention heads: 4 in the folder, 2 in the model"),
        (dict(hidden_act="gelu_new"), "hidden_act='gelu_new'; gemsjax's BERT is exact"),
        (dict(layer_norm_eps=1e-5), "LayerNorm eps: 1e-05 in the folder, 1e-12 in the model"),
        (
            dict(model_cls=transformers.BertModel),
            r"\(BertModel\) has no masked-LM head \(cls.predictions.\*\)",
        ),
    ],
)
def test_mismatch_is_a_user_error_naming_it(saved, changes, message, request):
    folder = saved(request.node.callspec.id, **changes)
    with pytest.raises(UserError, match=message):
        hf.load_into(BertForMaskedLM(SMALL, rngs=nnx.Rngs(0)), folder, SMALL)


def test_classifier_mismatches(saved):
    folder = saved("clf3", model_cls=transformers.BertForSequenceClassification, num_labels=3)
    with pytest.raises(UserError, match="num_labels: 3 in .*, 2 in the model"):
        hf.load_into(BertClassifier(SMALL, 2, rngs=nnx.Rngs(0)), folder, SMALL)
    mean = BertClassifier(SMALL, 3, pooling="mean", rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match="cannot hold a mean-pooling classifier head"):
        hf.load_into(mean, folder, SMALL)
    hf.load_into(mean, folder, SMALL, encoder_only=True)
    mlm_folder = saved("mlm-for-clf")
    with pytest.raises(UserError, match="has no sequence-classification head"):
        hf.load_into(BertClassifier(SMALL, 3, rngs=nnx.Rngs(0)), mlm_folder, SMALL)


def test_folder_format_errors(saved, tmp_path):
    model = BertForMaskedLM(SMALL, rngs=nnx.Rngs(0))
    folder = saved("formats")

    lines = (folder / "vocab.txt").read_text().splitlines()
    lines[5], lines[6] = lines[6], lines[5]
    (folder / "vocab.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        UserError,
        match=r"vocab.txt:6: token 'AAAAAT' where the dnabert k=6 "
        r"layout has 'AAAAAA'",
    ):
        hf.load_into(model, folder, SMALL)
    (folder / "vocab.txt").unlink()

    untied = saved("untied", tie_word_embeddings=False)
    with pytest.raises(
        UserError,
        match="cls.predictions.decoder.weight differs from "
        "bert.embeddings.word_embeddings.weight; gemsjax's MLM "
        "decoder is tied",
    ):
        hf.load_into(model, untied, SMALL)

    (folder / "vocab.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(UserError, match="4100 tokens is neither the DNABERT layout"):
        hf.load_into(model, folder, SMALL)
    KmerTokenizer(5).write_vocab_txt(folder / "vocab.txt")
    with pytest.raises(
        UserError, match="vocab.txt has 1029 tokens but config.json says vocab_size 4101"
    ):
        hf.load_into(model, folder, SMALL)
    (folder / "vocab.txt").unlink()

    from safetensors.numpy import load_file, save_file

    original = load_file(folder / hf.WEIGHTS)
    edits = [
        (
            {k: v for k, v in original.items() if k != "bert.encoder.layer.1.output.dense.bias"},
            r"lacks 1 tensor\(s\) of a BertForMaskedLM: bert.encoder.layer.1.output.dense.bias",
        ),
        (
            dict(
                original,
                **{
                    "bert.encoder.layer.0.crossattention.self.query.weight": original[
                        "bert.encoder.layer.0.attention.self.query.weight"
                    ]
                },
            ),
            "no place for .*: bert.encoder.layer.0.crossattention.self.query.weight",
        ),
        (
            dict(
                original,
                **{"bert.embeddings.token_type_embeddings.weight": np.zeros((3, 64), np.float32)},
            ),
            r"encoder/embeddings/token_type/embedding has shape \(3, 64\) in the folder, \(2, 64\)",
        ),
    ]
    for tensors, message in edits:
        save_file(tensors, folder / hf.WEIGHTS, metadata={"format": "pt"})
        with pytest.raises(UserError, match=message):
            hf.load_into(model, folder, SMALL)
    save_file(original, folder / hf.WEIGHTS, metadata={"format": "pt"})

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="roberta")))
    with pytest.raises(UserError, match="model_type 'roberta'; gemsjax reads BERT models"):
        hf.load_into(model, folder, SMALL)
    (folder / "config.json").write_text(json.dumps(config))

    (folder / hf.WEIGHTS).rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(UserError, match="has no model.safetensors, .* or pytorch_model.bin"):
        hf.load_into(model, folder, SMALL)
    with pytest.raises(UserError, match="not a transformers model folder"):
        hf.load_into(model, tmp_path, SMALL)
    with pytest.raises(UserError, match="holds no gemsjax checkpoint"):
        hf.export_run(tmp_path)


def test_export_mode_argument_errors(tmp_path):
    with pytest.raises(
        UserError,
        match=r"takes --config.init=<run folder or checkpoint>.*"
        r"unknown key\(s\) \['steps'\]",
    ):
        main.run_export({"init": str(tmp_path), "steps": "3"}, None)
    with pytest.raises(UserError, match="--mode=export takes --config.init="):
        main.run_export({}, None)
    with pytest.raises(UserError, match="--config.step=last: must be a checkpoint step"):
        main.run_export({"init": str(tmp_path), "step": "last"}, None)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_export_mode_writes_a_trained_run_that_transformers_loads(tmp_path, chr22):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu"
    )
    run = tmp_path / "run"
    train = [
        sys.executable,
        "-m",
        "gemsjax.main",
        "--config=configs/genemask.py:smoke",
        f"--workdir={run}",
    ]
    export = [
        sys.executable,
        "-m",
        "gemsjax.main",
        "--mode=export",
        f"--config.init={run}",
        "--config.step=3",
    ]
    for args in (train, export):
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.split("gemsjax summary: ")[-1])
    with pytest.raises(UserError, match=r"has no checkpoint of step 4; steps: \[3, 6\]"):
        hf.export_run(run, step=4)
    assert summary["folder"] == str(run / "hf") and summary["step"] == 3
    assert summary["tokens_seen"] == 3 * 8 * 128  # steps x batch x max_len of the smoke preset

    readme = (run / "hf" / "README.md").read_text()
    for fact in (
        "recipe: genemask",
        "steps: 3",
        "tokens seen: 3,072",
        "human chr22 sample",
        "gemsjax version: ",
        '"genemask_prob": 0.0176',
    ):
        assert fact in readme, fact
    trained = hf.flat_params(checkpoint.read_params(run / "checkpoints" / "3"))
    ours = BertForMaskedLM(SMALL, rngs=nnx.Rngs(0))
    hf.load_into(ours, run / "hf", SMALL)
    loaded = hf.flat_params(nnx.state(ours, nnx.Param))
    assert loaded.keys() == trained.keys()
    assert all(np.array_equal(loaded[name], trained[name]) for name in trained)
    ids, attention = _dnabert_batch(chr22)
    theirs = _loaded(transformers.AutoModelForMaskedLM, run / "hf")
    _same_logits(ours, theirs, ids, attention)

    # Continued pretraining from the export: the first update runs at learning rate 0 (warm-up),
    # so the checkpoint after it holds exactly the imported weights.
    again = tmp_path / "again"
    args = train[:-1] + [
        f"--workdir={again}",
        f"--config.model.init=hf:{run / 'hf'}",
        "--config.train.steps=3",
        "--config.train.checkpoint_every=1",
        "--config.downstream.eval=False",
    ]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    continued = hf.flat_params(checkpoint.read_params(again / "checkpoints" / "1"))
    assert all(np.array_equal(continued[name], trained[name]) for name in trained)


def test_init_spec_hf_resolves_to_the_exported_encoder(tmp_path):
    """``config.init=hf:<folder>`` (fine-tuning, embedding) gives the folder's encoder exactly,
    with its vocab; ``random:hf:<folder>`` its randomly initialized twin."""
    from gemsjax.eval import init

    model = _perturbed(BertForMaskedLM(SMALL, rngs=nnx.Rngs(0)), 3)
    folder = hf.export_model(model, SMALL, DNABERT, tmp_path / "mlm")
    encoder = init.load_encoder(f"hf:{folder}", vocab="dnabert")
    assert encoder.vocab == "dnabert" and encoder.source == f"hf:{folder}"
    built = init.build_encoder(encoder, nnx.Rngs(1))
    want = nnx.to_pure_dict(nnx.state(model.encoder, nnx.Param))
    got = nnx.to_pure_dict(nnx.state(built, nnx.Param))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert init.load_encoder(f"random:hf:{folder}").params is None
    with pytest.raises(UserError, match="barcodebert"):
        init.load_encoder(f"hf:{folder}", vocab="barcodebert")
