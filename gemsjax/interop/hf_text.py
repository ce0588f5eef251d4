"""The text files of an exported Hugging Face folder: tokenizer files and the README model card.

Tokenizers use only classes that ship with ``transformers`` (no ``trust_remote_code``) and give
the ids of :class:`~gemsjax.tokenizers.KmerTokenizer` for space-separated k-mer text (DNABERT's
input format):

- ``dnabert`` layout: DNABERT-6's own files (``vocab.txt``, ``tokenizer_config.json``,
  ``special_tokens_map.json``): a ``BertTokenizer`` without lower-casing over space-separated
  overlapping k-mers, which adds ``[CLS]`` and ``[SEP]`` and pads with ``[PAD]``.
- ``barcodebert`` layout: a ``tokenizer.json`` read by ``PreTrainedTokenizerFast``: whitespace
  split, word-level lookup (an unknown k-mer is ``[UNK]``), no ``[CLS]``/``[SEP]``, padding
  ``[UNK]``; plus ``vocab.txt`` for tools that read one.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

from gemsjax.tokenizers import KmerTokenizer
from gemsjax.vocab import Vocab

_BERT_SPECIALS = dict(
    unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]"
)
_BARCODE_SPECIALS = dict(unk_token="[UNK]", pad_token="[UNK]", mask_token="[MASK]")


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def pad_id(vocab: Vocab) -> int:
    """Id of the padding token: ``[PAD]`` (dnabert) or ``[UNK]`` (barcodebert, no PAD token)."""
    return vocab.special_id("[PAD]") if "[PAD]" in vocab.specials else vocab.unk_id


def write_tokenizer(out: pathlib.Path, vocab: Vocab, max_length: int) -> None:
    """Write the tokenizer files of ``vocab`` into ``out``; ``max_length``: the tokenizer's
    ``model_max_length`` (the model's position limit)."""
    stride = 1 if vocab.name == "dnabert" else vocab.k
    KmerTokenizer(vocab.k, stride, vocab.name).write_vocab_txt(out / "vocab.txt")
    if vocab.name == "dnabert":
        specials = _BERT_SPECIALS
        config = dict(tokenizer_class="BertTokenizer", do_lower_case=False)
    else:
        specials = _BARCODE_SPECIALS
        config = dict(tokenizer_class="PreTrainedTokenizerFast")
        _write_json(out / "tokenizer.json", _word_level_tokenizer(vocab))
    _write_json(
        out / "tokenizer_config.json", dict(config, model_max_length=max_length, **specials)
    )
    _write_json(out / "special_tokens_map.json", specials)


def _word_level_tokenizer(vocab: Vocab) -> dict[str, Any]:
    """A ``tokenizers`` JSON: whitespace split, then each word looked up whole (no sub-words)."""
    added = [
        dict(
            id=i,
            content=token,
            single_word=False,
            lstrip=False,
            rstrip=False,
            normalized=False,
            special=True,
        )
        for i, token in enumerate(vocab.specials)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "WordLevel",
            "unk_token": "[UNK]",
            "vocab": {token: i for i, token in enumerate(vocab.tokens())},
        },
    }


def _tokens_section(vocab: Vocab) -> str:
    k = vocab.k
    example = "ACGTACGTTAGC"
    if vocab.name == "dnabert":
        text = " ".join(example[i : i + k] for i in range(len(example) - k + 1))
        return (
            f"Tokens are **overlapping {k}-mers** (stride 1), as in DNABERT: the input text is the "
            f"upper-case sequence written as space-separated {k}-mers (`{example}` → "
            f"`{text}`). The tokenizer adds `[CLS]` before and `[SEP]` after them and pads with "
            f"`[PAD]` (id 0, attention 0). A {k}-mer holding a base outside ACGT (N, IUPAC codes) "
            f"is `[UNK]` (id 1). `vocab.txt` holds the ids in DNABERT's order: `[PAD] [UNK] "
            f"[CLS] [SEP] [MASK]`, then the 4^{k} {k}-mers in A,T,C,G lexicographic order "
            f"(`{'A' * k}` = 5, `{'A' * (k - 1)}T` = 6, ...).\n"
        )
    text = " ".join(example[i : i + k] for i in range(0, len(example) - k + 1, k))
    return (
        f"Tokens are **non-overlapping {k}-mers** (stride {k}), as in BarcodeBERT and BarcodeMAE: "
        f"remove alignment gaps `-`, then write the upper-case sequence as space-separated "
        f"{k}-mers, leaving out a trailing partial {k}-mer (`{example}` → `{text}`). There is no "
        f"`[CLS]` or `[SEP]`. Padding is `[UNK]` (id 1) with attention 0; a {k}-mer holding a base "
        f"outside ACGT (N, IUPAC codes) is `[UNK]` too, with attention 1. `vocab.txt` holds the "
        f"ids: `[MASK]` = 0, `[UNK]` = 1, then the 4^{k} {k}-mers in A,C,G,T lexicographic order "
        f"(`{'A' * k}` = 2, `{'A' * (k - 1)}C` = 3, ...). BarcodeMAE reads at most 660 bases "
        f"(110 tokens).\n"
    )


def _usage(vocab: Vocab, architecture: str) -> str:
    k = vocab.k
    auto = {
        "BertForMaskedLM": "AutoModelForMaskedLM",
        "BertForSequenceClassification": "AutoModelForSequenceClassification",
    }.get(architecture, "AutoModel")
    stride = "1" if vocab.name == "dnabert" else str(k)
    clean = "s.upper()" if vocab.name == "dnabert" else 's.upper().replace("-", "")'
    return (
        "```python\n"
        f"from transformers import AutoTokenizer, {auto}\n\n"
        "tokenizer = AutoTokenizer.from_pretrained(folder)\n"
        f"model = {auto}.from_pretrained(folder)\n"
        f'kmers = lambda seq: " ".join(seq[i:i + {k}] for i in range(0, len(seq) - {k - 1}, '
        f"{stride}))\n"
        f"batch = tokenizer([kmers({clean}) for s in sequences], padding=True, "
        'return_tensors="pt")\n'
        "out = model(**batch)\n"
        "```\n\n"
        + (
            ""
            if architecture == "BertForSequenceClassification"
            else "For hidden states, `AutoModel.from_pretrained(folder, add_pooling_layer=False)`: "
            "gemsjax pretraining has no pooler (transformers would initialize one at random).\n"
        )
    )


def model_card(vocab: Vocab, architecture: str, facts: Mapping[str, Any]) -> str:
    """``README.md``: YAML front matter, what the model is, how tokens are made, how to load it,
    and ``facts`` (recipe, steps, tokens seen, data, gemsjax version, config, ...) as a list;
    a ``config`` fact is written as a JSON block."""
    facts = dict(facts)
    config = facts.pop("config", None)
    recipe = facts.get("recipe", "gemsjax")
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- dna",
        "- gemsjax",
        f"- {recipe}",
        "---",
        "",
        f"# {recipe} ({architecture}, exported from gemsjax)",
        "",
        f"A DNA language model trained with gemsjax (JAX/Flax) and exported as a standard "
        f"`transformers` `{architecture}` (no custom code, `model.safetensors`).",
        "",
        "## Tokens",
        "",
        _tokens_section(vocab),
        "## Use",
        "",
        _usage(vocab, architecture),
        "## Training",
        "",
    ]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in facts.items()]
    if config is not None:
        lines += [
            "",
            "gemsjax config:",
            "",
            "```json",
            json.dumps(config, indent=2, default=str),
            "```",
        ]
    return "\n".join(lines) + "\n"
