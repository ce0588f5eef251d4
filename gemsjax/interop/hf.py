"""Hugging Face ``transformers`` interop: gemsjax BERT weights out as standard BERT folders, and
standard BERT folders (DNABERT, BarcodeBERT, anything ``save_pretrained`` wrote) in.

Export (:func:`export_model`, :func:`export_run`; ``python -m gemsjax.main --mode=export``)
writes a folder that ``transformers`` loads with no custom code: ``config.json``,
``model.safetensors`` (float32; the only weights format written), ``vocab.txt`` in the
vocabulary's id order, tokenizer files and a ``README.md`` model card saying how tokens are made
(:mod:`gemsjax.interop.hf_text`):

- :class:`~gemsjax.models.bert.BertForMaskedLM` -> ``BertForMaskedLM``; the same folder loads as
  ``BertModel`` (whose pooler, which MLM pretraining does not train, transformers then
  initializes);
- :class:`~gemsjax.models.mae.BarcodeMAE` -> its encoder as ``BertModel`` (transformers has no
  counterpart of the MAE decoder);
- :class:`~gemsjax.models.bert.BertModel` -> ``BertModel``;
- :class:`~gemsjax.models.bert.BertClassifier` with ``pooling="cls"`` ->
  ``BertForSequenceClassification`` (tanh pooler on position 0, dropout, linear).

Import (:func:`load_into`, :func:`load_params`; :func:`model_config` gives the size of a folder,
:func:`import_encoder` its encoder as ``BertModel`` parameters, for ``init=hf:<folder>``)
reads ``model.safetensors`` (or a sharded ``model.safetensors.index.json``), else
``pytorch_model.bin`` with ``torch.load(weights_only=True)``, which refuses anything but
tensors: nothing is ever unpickled unrestricted. Sizes, vocabulary (layout and k, from
``vocab.txt`` or the vocabulary size), heads and label counts are checked; a mismatch is a
:class:`~gemsjax.errors.UserError` naming what differs.

The two BERTs compute the same function: post-LN blocks, exact (erf) GELU, LayerNorm with the
config's epsilon, learned absolute position and token-type embeddings summed with the word
embedding before a LayerNorm, and an MLM decoder tied to the word embeddings plus its own bias.
Parameters map one to one (``T``: a Linear kernel ``[in, out]`` is transposed to transformers'
``weight [out, in]``; the encoder prefix is ``bert.`` except in a ``BertModel`` folder):

==========================================  ==================================================
gemsjax (``nnx.Param`` path)                transformers tensor
==========================================  ==================================================
``word_embeddings/embedding``               ``embeddings.word_embeddings.weight``
``embeddings/position/embedding``           ``embeddings.position_embeddings.weight``
``embeddings/token_type/embedding``         ``embeddings.token_type_embeddings.weight``
``embeddings/norm/{scale,bias}``            ``embeddings.LayerNorm.{weight,bias}``
``stack/blocks/i/attention/{q,k,v}``        ``encoder.layer.i.attention.self.{q,k,v}`` (T)
``stack/blocks/i/attention/out``            ``encoder.layer.i.attention.output.dense`` (T)
``stack/blocks/i/attention_norm``           ``encoder.layer.i.attention.output.LayerNorm``
``stack/blocks/i/ffn_in``                   ``encoder.layer.i.intermediate.dense`` (T)
``stack/blocks/i/ffn_out``                  ``encoder.layer.i.output.dense`` (T)
``stack/blocks/i/ffn_norm``                 ``encoder.layer.i.output.LayerNorm``
MLM ``head/dense``, ``head/norm``           ``cls.predictions.transform.{dense (T),LayerNorm}``
MLM ``head/bias``                           ``cls.predictions.bias`` (= the tied decoder's bias)
classifier ``head/pooler``, ``head/out``    ``bert.pooler.dense``, ``classifier`` (T)
==========================================  ==================================================
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

import gemsjax
from gemsjax import remote
from gemsjax.errors import UserError
from gemsjax.interop import hf_text
from gemsjax.models.bert import INIT_STD, BertConfig
from gemsjax.vocab import LAYOUTS, Vocab, get_vocab

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = "pytorch_model.bin"

Entry = tuple[str, str, bool]
"""(gemsjax parameter path, transformers tensor name, whether the Linear kernel is transposed)."""


def _dense(ours: str, theirs: str) -> list[Entry]:
    return [(f"{ours}/kernel", f"{theirs}.weight", True), (f"{ours}/bias", f"{theirs}.bias", False)]


def _norm(ours: str, theirs: str) -> list[Entry]:
    return [(f"{ours}/scale", f"{theirs}.weight", False), (f"{ours}/bias", f"{theirs}.bias", False)]


def _embed(ours: str, theirs: str) -> list[Entry]:
    return [(f"{ours}/embedding", f"{theirs}.weight", False)]


def encoder_entries(layers: int, ours: str, theirs: str) -> list[Entry]:
    """The :class:`~gemsjax.models.bert.BertModel` of ``layers`` blocks at gemsjax path prefix
    ``ours`` (``""`` or ``"encoder/"``) and transformers name prefix ``theirs`` (``""`` or
    ``"bert."``)."""
    entries = (
        _embed(ours + "word_embeddings", theirs + "embeddings.word_embeddings")
        + _embed(ours + "embeddings/position", theirs + "embeddings.position_embeddings")
        + _embed(ours + "embeddings/token_type", theirs + "embeddings.token_type_embeddings")
        + _norm(ours + "embeddings/norm", theirs + "embeddings.LayerNorm")
    )
    for i in range(layers):
        a, b = f"{ours}stack/blocks/{i}/", f"{theirs}encoder.layer.{i}."
        for name in ("query", "key", "value"):
            entries += _dense(a + "attention/" + name, b + "attention.self." + name)
        entries += (
            _dense(a + "attention/out", b + "attention.output.dense")
            + _norm(a + "attention_norm", b + "attention.output.LayerNorm")
            + _dense(a + "ffn_in", b + "intermediate.dense")
            + _dense(a + "ffn_out", b + "output.dense")
            + _norm(a + "ffn_norm", b + "output.LayerNorm")
        )
    return entries


MLM_HEAD = (
    _dense("head/dense", "cls.predictions.transform.dense")
    + _norm("head/norm", "cls.predictions.transform.LayerNorm")
    + [("head/bias", "cls.predictions.bias", False)]
)
POOLER = _dense("head/pooler", "bert.pooler.dense")
CLASSIFIER = _dense("head/out", "classifier")
TIED = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
"""Copies of tied tensors that older ``transformers`` versions wrote: read, checked, not used."""

ARCHITECTURES = (
    "BertModel",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertForTokenClassification",
)
"""Folder architectures read; BertForTokenClassification is BarcodeBERT's k-mer classifier."""


# --------------------------------------------------------------------------- gemsjax side


@dataclasses.dataclass(frozen=True)
class Target:
    """What a gemsjax parameter tree holds, in transformers' terms.

    Attributes:
      kind: ``encoder`` (BertModel), ``mlm`` (BertForMaskedLM), ``classifier`` (BertClassifier)
        or ``mae`` (BarcodeMAE).
      ours: path prefix of the encoder (``""`` or ``"encoder/"``).
      layers: encoder blocks.
      head: the head's entries, or None when transformers has no counterpart (the MAE decoder,
        a mean-pooled classifier); empty for a bare encoder.
    """

    kind: str
    ours: str
    layers: int
    head: list[Entry] | None

    @property
    def architecture(self) -> str:
        """The transformers class an export is loaded as."""
        return {"mlm": "BertForMaskedLM", "classifier": "BertForSequenceClassification"}.get(
            self.kind, "BertModel"
        )

    @property
    def theirs(self) -> str:
        """The transformers name prefix of the encoder in an export."""
        return "" if self.architecture == "BertModel" else "bert."


def flat_params(tree: Any) -> dict[str, np.ndarray]:
    """A parameter tree (``nnx.state(model, nnx.Param)``, or the nested dicts a checkpoint
    restores) as host arrays keyed by path, e.g. ``"encoder/stack/blocks/0/ffn_in/kernel"``."""
    return {name: np.asarray(leaf) for name, leaf in named_leaves(jax.device_get(tree)).items()}


def named_leaves(tree: Any) -> dict[str, Any]:
    """The leaves of a parameter tree keyed by path, as they are (no copy to the host)."""
    return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _path_name(path) -> str:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(names[:-1] if names[-1] == "value" else names)


def target_of(flat: Mapping[str, Any]) -> Target:
    """The :class:`Target` of a flat parameter dict (see :func:`flat_params`)."""
    if "word_embeddings/embedding" in flat:
        kind, ours, head = "encoder", "", []
    elif "head/bias" in flat:
        kind, ours, head = "mlm", "encoder/", MLM_HEAD
    elif "head/out/kernel" in flat:
        kind, ours = "classifier", "encoder/"
        head = POOLER + CLASSIFIER if "head/pooler/kernel" in flat else None
    elif any(name.startswith("decoder/") for name in flat):
        kind, ours, head = "mae", "encoder/", None
    else:
        raise ValueError(f"not a gemsjax BERT parameter tree: {sorted(flat)[:5]}...")
    layers = sum(
        name.startswith(f"{ours}stack/blocks/") and name.endswith("/ffn_in/kernel") for name in flat
    )
    return Target(kind, ours, layers, head)


# --------------------------------------------------------------------------- export


def hf_config(
    config: BertConfig, vocab: Vocab, architecture: str, labels: Sequence[str] | None = None
) -> dict[str, Any]:
    """``config.json`` of a transformers BERT of ``config``'s size; ``labels``: the class names
    of a ``BertForSequenceClassification``."""
    out = dict(
        architectures=[architecture],
        model_type="bert",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        intermediate_size=config.ffn,
        hidden_act="gelu",
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.attn_dropout,
        max_position_embeddings=config.max_positions,
        type_vocab_size=config.type_vocab,
        layer_norm_eps=config.ln_eps,
        initializer_range=INIT_STD,
        position_embedding_type="absolute",
        pad_token_id=hf_text.pad_id(vocab),
        tie_word_embeddings=True,
        dtype="float32",
    )
    if labels is not None:
        out["id2label"] = {str(i): label for i, label in enumerate(labels)}
        out["label2id"] = {label: i for i, label in enumerate(labels)}
    return out


def hf_tensors(flat: Mapping[str, np.ndarray], target: Target) -> dict[str, np.ndarray]:
    """transformers tensors (float32, contiguous) of an export of ``flat`` (its :class:`Target`
    ``target``). Raises UserError for a model whose head transformers cannot hold."""
    if target.kind == "classifier" and target.head is None:
        raise UserError(
            "a mean-pooled BertClassifier (pooling='mean') has no transformers "
            "counterpart without custom code (BertForSequenceClassification pools "
            "[CLS] through a tanh layer); fine-tune with pooling='cls' to export it"
        )
    entries = encoder_entries(target.layers, target.ours, target.theirs)
    if target.kind in ("mlm", "classifier"):
        entries += target.head
    return {
        theirs: np.ascontiguousarray((flat[ours].T if transposed else flat[ours]), dtype=np.float32)
        for ours, theirs, transposed in entries
    }


def write_folder(
    flat: Mapping[str, np.ndarray],
    config: BertConfig,
    vocab: Vocab,
    out_dir: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    facts: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Write the transformers folder of the parameters ``flat`` (:func:`flat_params`) of a model
    of size ``config`` over ``vocab``; ``labels``: class names of a classifier (default
    ``LABEL_i``); ``facts``: what the model card says about training. Returns the folder."""
    from safetensors.numpy import save_file

    target = target_of(flat)
    tensors = hf_tensors(flat, target)
    if target.kind == "classifier":
        num_labels = flat["head/out/kernel"].shape[1]
        labels = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(num_labels)]
        if len(labels) != num_labels:
            raise UserError(
                f"{len(labels)} label names given for a classifier with {num_labels} outputs"
            )
    else:
        labels = None
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    config_json = hf_config(config, vocab, target.architecture, labels)
    (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    hf_text.write_tokenizer(out, vocab, config.max_positions)
    card = {"gemsjax_version": gemsjax.__version__, **(facts or {})}
    (out / "README.md").write_text(hf_text.model_card(vocab, target.architecture, card))
    return out


def export_model(
    model: nnx.Module,
    config: BertConfig,
    vocab: Vocab,
    out_dir: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    facts: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Export a gemsjax ``BertForMaskedLM``, ``BertModel``, ``BarcodeMAE`` (its encoder) or
    ``BertClassifier`` (``pooling="cls"``) of size ``config`` over ``vocab`` to ``out_dir``; see
    :func:`write_folder`."""
    return write_folder(
        flat_params(nnx.state(model, nnx.Param)), config, vocab, out_dir, labels=labels, facts=facts
    )


def _step_dir(path: epath.Path, step: int | None) -> epath.Path:
    """The checkpoint step directory that ``path`` (a run folder, its ``checkpoints`` folder or a
    step directory) names: ``step``, or the newest."""
    if (path / "state").is_dir():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = (
        {int(d.name): d for d in root.iterdir() if d.name.isdigit() and (d / "state").is_dir()}
        if root.is_dir()
        else {}
    )
    if not steps:
        raise UserError(
            f"{path} holds no gemsjax checkpoint (expected a run folder with "
            "checkpoints/<step>/state, or a checkpoint step folder); pass "
            "--config.init=<the --workdir of a training run>"
        )
    if step is None:
        return steps[max(steps)]
    if step not in steps:
        raise UserError(f"{root} has no checkpoint of step {step}; steps: {sorted(steps)}")
    return steps[step]


def export_run(
    path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, step: int | None = None
) -> dict[str, Any]:
    """Export the model of a gemsjax pretraining or fine-tuning run (``--mode=export``).

    A pretraining run becomes ``BertForMaskedLM`` (or the encoder as ``BertModel``); a fine-tuned
    classifier (an arm folder of ``--mode=finetune``, e.g. ``<workdir>/pretrained``) becomes
    ``BertForSequenceClassification`` with its label count.

    Args:
      path: the run folder (``--workdir`` of training, or a fine-tuning arm folder), its
        ``checkpoints`` folder or one checkpoint step folder.
      out_dir: where to write; default ``<run folder>/hf``.
      step: the checkpoint step (default: the newest; for a classifier, the best-dev-loss one,
        the state its test scores came from).
    Returns:
      A JSON-able summary: the folder, architecture, step, tokens seen (pretraining) or task
      (fine-tuning).
    """
    from gemsjax.train import checkpoint

    step_dir = _step_dir(epath.Path(path), step)  # a local folder or a URL, read in place
    meta = checkpoint.read_meta(step_dir)
    run_dir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir
    if meta and meta.get("kind") == "classifier":
        kept = [int(d.name) for d in step_dir.parent.iterdir() if d.name.isdigit()]
        best = checkpoint.best_step(step_dir.parent, kept) if step is None else None
        if best is not None:  # the best-dev-loss state; without a dev split, the newest
            step_dir = step_dir.parent / str(best)
            meta = checkpoint.read_meta(step_dir)
        config, vocab, facts, extra = _classifier_facts(meta, run_dir, int(step_dir.name))
    elif meta and meta.get("config"):
        config, vocab, facts, extra = _pretraining_facts(meta, int(step_dir.name))
    else:
        raise UserError(
            f"{step_dir} has no run metadata (meta item with the config); it was not "
            "written by gemsjax training or fine-tuning"
        )
    out = str(out_dir) if out_dir else str(run_dir / "hf")
    flat = flat_params(checkpoint.read_params(step_dir))
    with remote.staged_workdir(out) as local:  # a URL: written here, then pushed
        write_folder(flat, config, vocab, local, labels=meta.get("labels"), facts=facts)
    return dict(
        folder=remote.shown(out),
        architecture=target_of(flat).architecture,
        step=int(step_dir.name),
        checkpoint=str(step_dir),
        **extra,
    )


def _pretraining_facts(
    meta: Mapping[str, Any], steps: int
) -> tuple[BertConfig, Vocab, dict[str, Any], dict[str, Any]]:
    """Size, vocab, model-card facts and summary entries of a pretraining checkpoint."""
    import ml_collections

    from gemsjax.train import spec

    run = meta["config"]
    run_config = ml_collections.ConfigDict(run)
    config, vocab = spec.model_config(run_config), spec.run_vocab(run_config)
    tokens = steps * run["data"]["batch_size"] * run["data"]["max_len"]
    data = (
        (run["data"]["tsv"] or "the BOLD COI barcode sample shipped with gemsjax")
        if vocab.name == "barcodebert"
        else (", ".join(run["data"]["fasta"]) or "the human chr22 sample shipped with gemsjax")
    )
    facts = dict(
        recipe=run["recipe"],
        model_size=run["model"]["name"],
        steps=steps,
        tokens_seen=f"{tokens:,} ({steps} steps x {run['data']['batch_size']} sequences"
        f" x {run['data']['max_len']} tokens)",
        data=data,
        trained_with=json.dumps(meta.get("versions", {})),
        config=run,
    )
    return config, vocab, facts, dict(tokens_seen=tokens, recipe=run["recipe"])


def _classifier_facts(
    meta: Mapping[str, Any], run_dir: epath.Path, steps: int
) -> tuple[BertConfig, Vocab, dict[str, Any], dict[str, Any]]:
    """Size, vocab, model-card facts and summary entries of a fine-tuning checkpoint."""
    config = BertConfig(**meta["model"])
    hyper = meta["hyper"]
    facts = dict(
        recipe="finetune",
        task=meta.get("task", run_dir.name),
        encoder=meta.get("source", "?"),
        steps=steps,
        fine_tuning=f"lr {hyper['learning_rate']}, {hyper['epochs']} epochs, batch "
        f"{hyper['batch_size']}, {meta['pooling']} pooling, {meta['max_len']} tokens per row",
        config=dict(meta),
    )
    extra = dict(task=facts["task"], num_labels=meta["num_labels"])
    return config, get_vocab(meta["vocab"], meta.get("k", 6)), facts, extra


# --------------------------------------------------------------------------- import


@dataclasses.dataclass(frozen=True)
class HfFolder:
    """A transformers BERT folder as read from disk.

    Attributes:
      path: the folder.
      config: its ``config.json``.
      tensors: every weight by name (LayerNorm ``gamma``/``beta`` renamed ``weight``/``bias``).
      vocab: the id layout (from ``vocab.txt``, else from the vocabulary size), or None when
        neither matches a gemsjax layout.
      weights: the file the tensors came from.
    """

    path: pathlib.Path
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    vocab: Vocab | None
    weights: str

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["BertModel"])[0]

    @property
    def prefix(self) -> str:
        """``"bert."`` when the encoder sits under a head model, else ``""``."""
        return "bert." if any(name.startswith("bert.") for name in self.tensors) else ""


def read_folder(folder: str | os.PathLike) -> HfFolder:
    """Read a transformers BERT folder: ``config.json``, weights, ``vocab.txt`` if present."""
    path = pathlib.Path(folder)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a transformers model folder (no config.json)")
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "bert":
        raise UserError(
            f"{path / 'config.json'}: model_type {config.get('model_type')!r}; "
            "gemsjax reads BERT models (model_type 'bert') only"
        )
    architecture = (config.get("architectures") or ["BertModel"])[0]
    if architecture not in ARCHITECTURES:
        raise UserError(
            f"{path / 'config.json'}: architecture {architecture!r} is not read; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    tensors, weights = _read_tensors(path)
    renamed = {
        name.removesuffix(".gamma") + ".weight"
        if name.endswith("LayerNorm.gamma")
        else name.removesuffix(".beta") + ".bias"
        if name.endswith("LayerNorm.beta")
        else name: value
        for name, value in tensors.items()
    }
    return HfFolder(path, config, renamed, _folder_vocab(path, config), weights)


def _read_tensors(path: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
    from safetensors.numpy import load_file

    if (path / WEIGHTS).is_file():
        return load_file(path / WEIGHTS), WEIGHTS
    if (path / WEIGHTS_INDEX).is_file():
        shards = sorted(set(json.loads((path / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(path / shard).items()}, WEIGHTS_INDEX
    if (path / PICKLED_WEIGHTS).is_file():
        return _read_pickled(path / PICKLED_WEIGHTS), PICKLED_WEIGHTS
    found = sorted(p.name for p in path.iterdir())
    raise UserError(
        f"{path} has no {WEIGHTS}, {WEIGHTS_INDEX} or {PICKLED_WEIGHTS} (found: {', '.join(found)})"
    )


def _read_pickled(path: pathlib.Path) -> dict[str, np.ndarray]:
    """A ``pytorch_model.bin`` state dict through ``torch.load(weights_only=True)``, which
    unpickles tensors and plain containers only."""
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{path}: reading pytorch_model.bin needs torch (pip install torch); or "
            "re-save the folder with safetensors (model.safetensors)"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError, by version
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{path} is not a plain tensor state dict; torch.load(weights_only=True) "
            f"refused it ({first}). gemsjax never unpickles arbitrary objects: "
            "re-save the weights as model.safetensors"
        ) from None
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return {name: (t.float() if t.is_floating_point() else t).numpy() for name, t in state.items()}


def layout_of_size(vocab_size: int) -> Vocab | None:
    """The gemsjax vocab layout with ``vocab_size`` ids (specials + 4^k), or None."""
    for name, (_, specials) in LAYOUTS.items():
        kmers = vocab_size - len(specials)
        k = round(math.log(kmers, 4)) if kmers > 0 else 0
        if 1 <= k <= 12 and 4**k == kmers:
            return get_vocab(name, k)
    return None


def _folder_vocab(path: pathlib.Path, config: Mapping[str, Any]) -> Vocab | None:
    """The layout of ``vocab.txt`` (checked token by token), else that of ``vocab_size``."""
    vocab_txt = path / "vocab.txt"
    if not vocab_txt.is_file():
        return layout_of_size(config.get("vocab_size", 0))
    tokens = vocab_txt.read_text(encoding="utf-8").splitlines()
    vocab = layout_of_size(len(tokens))
    if vocab is None:
        raise UserError(
            f"{vocab_txt}: {len(tokens)} tokens is neither the DNABERT layout (5 "
            "specials + 4^k k-mers) nor the BarcodeBERT one (2 specials + 4^k)"
        )
    bad = next(
        (i for i, (a, b) in enumerate(zip(tokens, vocab.tokens(), strict=True)) if a != b), None
    )
    if bad is not None:
        raise UserError(
            f"{vocab_txt}:{bad + 1}: token {tokens[bad]!r} where the {vocab.name} "
            f"k={vocab.k} layout has {vocab.tokens()[bad]!r}; the ids would not match "
            "gemsjax's tokenizer"
        )
    if vocab.size != config.get("vocab_size"):
        raise UserError(
            f"{vocab_txt} has {vocab.size} tokens but config.json says vocab_size "
            f"{config.get('vocab_size')}"
        )
    return vocab


_HF_DEFAULTS = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
    type_vocab_size=2,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    layer_norm_eps=1e-12,
)
"""transformers' BertConfig defaults, for keys a config.json leaves out."""


def model_config(folder: str | os.PathLike | HfFolder, **overrides: Any) -> BertConfig:
    """The gemsjax :class:`BertConfig` (``arch="mlm"``) of a transformers BERT folder, e.g. to
    build a model for :func:`load_into`; ``overrides`` replace fields (e.g. ``dropout=0.0``)."""
    hf = folder if isinstance(folder, HfFolder) else read_folder(folder)
    c = {**_HF_DEFAULTS, **hf.config}
    where = hf.path / "config.json"
    checks = (
        ("hidden_act", "gelu", "exact (erf) GELU"),
        ("position_embedding_type", "absolute", "learned absolute positions"),
        ("is_decoder", False, "a bidirectional encoder"),
    )
    for key, expected, what in checks:
        if c.get(key, expected) != expected:
            raise UserError(
                f"{where}: {key}={c[key]!r}; gemsjax's BERT is {what} ({key}={expected!r})"
            )
    fields = dict(
        vocab_size=c["vocab_size"],
        hidden=c["hidden_size"],
        layers=c["num_hidden_layers"],
        heads=c["num_attention_heads"],
        ffn=c["intermediate_size"],
        max_positions=c["max_position_embeddings"],
        type_vocab=c["type_vocab_size"],
        dropout=c["hidden_dropout_prob"],
        attn_dropout=c["attention_probs_dropout_prob"],
        ln_eps=c["layer_norm_eps"],
    )
    return BertConfig(**{**fields, **overrides})


_COMPARED = dict(
    hidden="hidden size",
    layers="layer count",
    heads="attention heads",
    ffn="feed-forward size",
    max_positions="position limit",
    type_vocab="token types",
    ln_eps="LayerNorm eps",
)


def _differences(hf: HfFolder, config: BertConfig) -> list[str]:
    """What differs between the folder's model and a gemsjax model of size ``config``."""
    theirs = model_config(hf)
    out = []
    ours_vocab = layout_of_size(config.vocab_size)
    if theirs.vocab_size != config.vocab_size or hf.vocab != ours_vocab:

        def describe(size, vocab):
            return f"{size} ids" + (f" ({vocab.name} layout, k={vocab.k})" if vocab else "")

        what = "k" if hf.vocab and ours_vocab and hf.vocab.name == ours_vocab.name else "vocabulary"
        out.append(
            f"{what}: {describe(theirs.vocab_size, hf.vocab)} in the folder, "
            f"{describe(config.vocab_size, ours_vocab)} in the model"
        )
    out += [
        f"{label}: {getattr(theirs, key)} in the folder, {getattr(config, key)} in the model"
        for key, label in _COMPARED.items()
        if getattr(theirs, key) != getattr(config, key)
    ]
    return out


def _head_entries(hf: HfFolder, target: Target, flat: Mapping[str, Any]) -> list[Entry]:
    """The entries the head of ``target`` is read from; raises UserError when the folder has no
    such head."""
    arch = hf.architecture
    fix = "pass encoder_only=True to keep the model's own (new) head"
    if target.head is None:
        what = "BarcodeMAE decoder" if target.kind == "mae" else "mean-pooling classifier head"
        raise UserError(f"{hf.path} ({arch}) cannot hold a {what}; {fix}")
    if target.kind == "mlm":
        if "cls.predictions.transform.dense.weight" not in hf.tensors:
            raise UserError(
                f"{hf.path} ({arch}) has no masked-LM head (cls.predictions.*) for "
                f"gemsjax's BertForMaskedLM; {fix}"
            )
        for copy, tied in TIED.items():
            if copy in hf.tensors and not np.array_equal(hf.tensors[copy], hf.tensors[tied]):
                raise UserError(
                    f"{hf.path}: {copy} differs from {tied}; gemsjax's MLM decoder "
                    f"is tied to the word embeddings; {fix}"
                )
    if target.kind == "classifier":
        if arch != "BertForSequenceClassification" or "classifier.weight" not in hf.tensors:
            raise UserError(
                f"{hf.path} ({arch}) has no sequence-classification head "
                f"(bert.pooler + classifier) for gemsjax's BertClassifier; {fix}"
            )
        theirs, ours = hf.tensors["classifier.weight"].shape[0], flat["head/out/kernel"].shape[1]
        if theirs != ours:
            raise UserError(f"num_labels: {theirs} in {hf.path}, {ours} in the model")
    return target.head


def _unplaced(hf: HfFolder, used: set[str]) -> list[str]:
    """Encoder tensors of the folder the load has no place for (another BERT variant). Tensors
    outside the encoder (heads not loaded, a pooler, the NSP head) and buffers are left alone."""
    p = hf.prefix
    return sorted(
        name
        for name in hf.tensors
        if name not in used
        and name.startswith((p + "embeddings.", p + "encoder."))
        and not name.endswith("position_ids")
    )


def load_params(
    folder: str | os.PathLike | HfFolder,
    params: Any,
    config: BertConfig,
    *,
    encoder_only: bool = False,
) -> Any:
    """``params`` (the ``nnx.Param`` state of a gemsjax ``BertModel``, ``BertForMaskedLM``,
    ``BertClassifier`` or ``BarcodeMAE`` of size ``config``) with values read from a
    transformers folder: the encoder, and the head unless ``encoder_only`` (then the head keeps
    its values in ``params``; a BarcodeMAE's decoder always does, so it needs
    ``encoder_only=True``).

    Returns:
      A tree of ``params``' structure, dtypes and shapes.
    Raises:
      UserError: the folder cannot be read, or its model differs from ``config`` (vocabulary
        layout or k, layers, width, heads, position limit, ...), has no such head, a different
        label count, or tensors gemsjax's BERT has no place for.
    """
    hf = folder if isinstance(folder, HfFolder) else read_folder(folder)
    differences = _differences(hf, config)
    if differences:
        raise UserError(
            f"the transformers model in {hf.path} does not fit this gemsjax model: "
            + "; ".join(differences)
        )
    flat = named_leaves(params)
    target = target_of(flat)
    entries = encoder_entries(target.layers, target.ours, hf.prefix)
    if not encoder_only and target.kind != "encoder":
        entries += _head_entries(hf, target, flat)
    missing = [theirs for _, theirs, _ in entries if theirs not in hf.tensors]
    if missing:
        raise UserError(
            f"{hf.path / hf.weights} lacks {len(missing)} tensor(s) of a "
            f"{hf.architecture}: {', '.join(missing[:5])}"
        )
    unused = _unplaced(hf, {theirs for _, theirs, _ in entries})
    if unused:
        raise UserError(
            f"{hf.path / hf.weights} holds tensors gemsjax's BERT has no place for "
            f"(another BERT variant?): {', '.join(unused[:5])}"
        )
    values = {
        ours: hf.tensors[theirs].T if transposed else hf.tensors[theirs]
        for ours, theirs, transposed in entries
    }

    def take(path, leaf):
        value = values.get(_path_name(path))
        if value is None:
            return leaf
        if value.shape != leaf.shape:
            raise UserError(
                f"{hf.path}: {_path_name(path)} has shape {value.shape} in the folder"
                f", {leaf.shape} in the model"
            )
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(take, params)


def load_into(
    model: nnx.Module,
    folder: str | os.PathLike | HfFolder,
    config: BertConfig,
    *,
    encoder_only: bool = False,
) -> None:
    """Overwrite ``model``'s parameters (a gemsjax model of size ``config``) with a transformers
    folder's; see :func:`load_params`."""
    nnx.update(
        model, load_params(folder, nnx.state(model, nnx.Param), config, encoder_only=encoder_only)
    )


def import_encoder(folder: str | os.PathLike) -> tuple[BertConfig, Vocab | None, dict[str, Any]]:
    """The encoder of a transformers BERT folder, without building a model: its size, its
    vocab layout (None when it matches no gemsjax layout) and the parameters of a gemsjax
    :class:`~gemsjax.models.bert.BertModel` as a pure nested dict (``nnx.update(model, params)``
    puts them in place). What ``init=hf:<folder>`` resolves to."""
    from gemsjax.models.bert import BertModel

    hf = read_folder(folder)
    config = model_config(hf)
    abstract = nnx.eval_shape(lambda: BertModel(config, rngs=nnx.Rngs(0)))
    params = load_params(hf, nnx.state(abstract, nnx.Param), config)
    return config, hf.vocab, nnx.to_pure_dict(params)
