"""Run configurations: one schema for every pretraining recipe, presets, and key checking.

Each ``configs/<name>.py`` calls :func:`pretraining_config` with its recipe and the preset string
from the command line (``--config=configs/cm_gems.py:paper``), so every recipe has the same keys
and a wrong key fails the same way, naming the key and listing the valid ones.

Presets (comma-separated, combinable, ``key=value`` items override single fields):

- ``""`` (default): trains on the real sample shipped in the package and finishes in minutes on a
  laptop CPU;
- ``paper``: the published recipe (CM-GEMS / GeneMask: batch 250, 10K steps, lr 8e-4; BarcodeMAE:
  batch 128, one-cycle); needs ``data.fasta`` (a genome) or ``data.tsv`` (BIOSCAN-5M);
- ``smoke``: a few steps of a tiny model, for tests;
- a model size (``logo``, ``dnabert6``, ``barcode_mae``, ...; see ``gemsjax.models.registry``);
- ``key=value``: e.g. ``train.steps=200`` (dotted keys; values parsed as Python literals).
"""

from __future__ import annotations

import ast
from collections.abc import Mapping

import ml_collections

from gemsjax.models import registry
from gemsjax.train import optim

MLM_RECIPES = ("cm_gems", "cm_step", "genemask", "global_pmi", "dnabert_random")
BARCODE_RECIPES = ("barcode_mae", "barcode_bert")


class ConfigKeyError(KeyError):
    """A config key that does not exist; the message lists the valid keys."""

    def __str__(self) -> str:
        return str(self.args[0])


def _masking(curriculum: str, strategy: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        curriculum=curriculum,          # constant | cm_gems | cm_step
        strategy=strategy,              # constant: random_span | genemask | global_pmi | mae_drop
        per_example=False,              # each sequence draws its own strategy from the mix
        threshold=1.0,                  # cm_gems: switch once min |delta val perplexity| < this
        random_span_prob=0.025,
        genemask_prob=0.0176,
        global_pmi_prob=0.0136,
        mae_ratio=0.5,
        reference_code_compat="",       # "" (intended algorithm) | genemask | cmgems
        rank_table="genemask",          # genemask (published) | fasta (count data.fasta) | file
        mask_frac=0.8,                  # BERT corruption: [MASK] / random id / unchanged
        random_frac=0.1,
        random_low=0,                   # 0: random ids from the whole vocabulary, as DNABERT
        loss_on="masked",               # masked | all (BarcodeBERT: every non-special token)
    ))


def pretraining_config(recipe: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of ``recipe`` (one of :data:`MLM_RECIPES` + :data:`BARCODE_RECIPES`) with the
    presets in ``arg`` applied; see the module docstring."""
    barcode = recipe in BARCODE_RECIPES
    if not barcode and recipe not in MLM_RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid: {MLM_RECIPES + BARCODE_RECIPES}")
    curriculum, strategy = {
        "cm_gems": ("cm_gems", "genemask"), "cm_step": ("cm_step", "random_span"),
        "genemask": ("constant", "genemask"), "global_pmi": ("constant", "global_pmi"),
        "dnabert_random": ("constant", "random_span"), "barcode_mae": ("constant", "mae_drop"),
        "barcode_bert": ("constant", "mae_drop"),
    }[recipe]
    c = ml_collections.ConfigDict()
    c.recipe = recipe
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        name={"barcode_mae": "barcode_mae_small",
              "barcode_bert": "barcode_bert_small"}.get(recipe, "logo"),
        compute_dtype="auto",           # auto: bfloat16 on GPU/TPU, float32 on CPU
        dropout=-1.0,                   # -1: the size's own value
    ))
    c.data = ml_collections.ConfigDict(dict(
        kind="barcode" if barcode else "genome",
        fasta=(),                       # genome FASTA paths; empty: the shipped chr22 sample
        prepared_dir="",                # encoded genome cache; empty: ~/.cache/gemsjax/...
        tsv="",                         # barcode TSV (BOLD or BIOSCAN-5M); empty: shipped sample
        train_splits=("pretrain",),
        validation_splits=("val",),
        batch_size=32 if barcode else 8,  # global batch per optimizer step
        max_len=110 if barcode else 512,
        seed=0,
        corpus_seed=0,
        num_threads=2,
        prefetch=4,
    ))
    c.masking = _masking(curriculum, strategy)
    if recipe == "global_pmi":
        c.masking.global_pmi_prob = 0.0176      # the Global-PMI baseline used mlm_probability
    if barcode:
        c.masking.mask_frac, c.masking.random_frac = 1.0, 0.0
        c.masking.loss_on = "all" if recipe == "barcode_bert" else "masked"
        c.optimizer = optim.barcode_mae_config(total_batch=c.data.batch_size)
    else:
        c.optimizer = optim.cm_gems_config()
    c.train = ml_collections.ConfigDict(dict(
        steps=300,
        grad_accum=1,                   # micro-batches per step (data.batch_size = accum * micro)
        log_every=10,
        eval_every=50,
        eval_batches=2,
        checkpoint_every=50,
        keep_checkpoints=3,
        mesh_data=-1,                   # -1: all devices not used by fsdp
        mesh_fsdp=1,
        head_fraction=0.0 if barcode else 0.375,  # head + last layer on masked tokens (0: off)
    ))
    c.compile = ml_collections.ConfigDict(dict(
        topology="",                    # --mode=compile target, e.g. v5p:4x4x2; "": local devices
    ))
    if not barcode:
        c.optimizer.warmup_steps = 15
        c.train.eval_every = 25         # several validations so the CM-GEMS switch can fire
    for preset in _split_presets(arg):
        _apply_preset(c, preset)
    return c


def _split_presets(arg: str | None) -> list[str]:
    return [p.strip() for p in (arg or "").split(",") if p.strip()]


def _apply_preset(c: ml_collections.ConfigDict, preset: str) -> None:
    barcode = c.recipe in BARCODE_RECIPES
    if "=" in preset:
        key, value = preset.split("=", 1)
        set_key(c, key.strip(), _literal(value.strip()))
    elif preset == "paper":
        c.train.eval_every, c.train.checkpoint_every, c.train.log_every = 500, 1000, 50
        c.train.eval_batches = 20
        if barcode:  # BarcodeMAE+ reference: batch 128, lr 1e-4 x 128/64, 35 epochs of ~2.3M
            c.model.name = c.recipe
            c.data.batch_size, c.train.steps = 128, 35 * 2_300_000 // 128
            c.optimizer.learning_rate = 1e-4 * 128 / 64
            c.data.train_splits = ("pretrain", "other_heldout")
        else:        # GeneMask Script-A: 10 x 25 accumulation = 250 sequences, 10K steps
            c.data.batch_size, c.train.grad_accum, c.train.steps = 250, 25, 10_000
            c.optimizer.warmup_steps = 500
            c.model.name = "logo"
    elif preset == "smoke":
        c.model.name = "test_mae" if c.recipe == "barcode_mae" else "test"
        c.data.batch_size, c.train.steps = 8, 6
        if c.recipe == "cm_step":  # its Global-PMI staircase has 100 stairs of >= 1 step
            c.train.steps = 100
        c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 1, 3, 3
        c.train.eval_batches = 1
        if not barcode:
            c.optimizer.warmup_steps, c.data.max_len = 2, 128
    elif preset in registry.SIZES:
        c.model.name = preset
    else:
        raise ValueError(f"unknown preset {preset!r}; valid: paper, smoke, a model size "
                         f"{sorted(registry.SIZES)}, or key=value")


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _is_dict(x) -> bool:
    return isinstance(x, Mapping | ml_collections.ConfigDict)


def valid_keys(c: Mapping, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config, e.g. ``["data.batch_size", ...]``."""
    keys = []
    for name, value in c.items():
        if _is_dict(value):
            keys += valid_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def set_key(c: ml_collections.ConfigDict, dotted: str, value) -> None:
    """Set ``c.<dotted>`` to ``value``; a key that does not exist raises :class:`ConfigKeyError`
    naming it and listing the valid keys."""
    *parents, leaf = dotted.split(".")
    node = c
    for part in parents:
        node = node.get(part) if _is_dict(node) else None
    if not _is_dict(node) or leaf not in node or _is_dict(node[leaf]):
        raise ConfigKeyError(f"unknown config key {dotted!r}; valid keys: "
                             f"{', '.join(valid_keys(c))}")
    current = node[leaf]
    if isinstance(current, tuple | list) and isinstance(value, str):
        value = (value,)
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    node[leaf] = type(current)(value) if isinstance(current, tuple | list) else value


def check_config(c: ml_collections.ConfigDict) -> None:
    """Reject a config whose keys differ from its recipe's schema (e.g. a typo in a config file
    or a ``--config.x=`` override); the message names the key(s) and lists the valid ones."""
    expected = set(valid_keys(pretraining_config(c.recipe)))
    got = set(valid_keys(c))
    unknown, missing = sorted(got - expected), sorted(expected - got)
    if unknown or missing:
        raise ConfigKeyError(f"config keys differ from the {c.recipe!r} schema: unknown "
                             f"{unknown}, missing {missing}; valid keys: "
                             f"{', '.join(sorted(expected))}")
