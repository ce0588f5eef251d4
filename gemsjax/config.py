"""The base of every config file: shared defaults, presets, loading, and the one validation.

A recipe is a file ``configs/<recipe>.py`` whose ``get_config(arg)`` states what makes the recipe
(model size, masking, curriculum, optimizer, data) on top of :func:`genome_base` or
:func:`barcode_base`, and applies the presets in ``arg`` with :func:`apply_presets`. The base
fixes the key set of each data kind; a recipe sets values and never adds keys, so a typo anywhere
(config file, preset, ``--config.<key>=`` flag) fails the same way, in :func:`validate`.

Presets (``--config=configs/cm_gems.py:paper,train.steps=20``; comma-separated, applied in order):

- the config file's own (``PRESETS``): every config has ``smoke``, every training recipe ``paper``;
- a model size from :data:`gemsjax.models.sizes.SIZES` (``logo``, ``dnabert6``, ...);
- ``key=value``: a dotted key and a Python literal (``train.steps=200``, ``data.fasta=a.fa.gz``).

This module imports neither jax, flax nor optax: loading and checking a config is instant.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import pathlib
from collections.abc import Callable, Mapping

import ml_collections

from gemsjax import remote
from gemsjax.errors import UserError
from gemsjax.models.sizes import SIZES

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
"""The recipe files of a source checkout (``--help`` lists them)."""

STRATEGIES = ("random_span", "genemask", "global_pmi", "mae_drop")
"""Masking strategies, in :data:`gemsjax.masking.STRATEGIES` order."""
CURRICULA = ("constant", "cm_gems", "cm_step")
ATTENTIONS = ("auto", "xla", "fused")
THRESHOLD_MODES = ("absolute", "relative")
SCHEDULES = ("warmup_linear", "onecycle")
DECAY_MASKS = ("matrices", "all")
OPTIMIZER_KEYS = {
    "warmup_linear": (
        "schedule",
        "learning_rate",
        "warmup_steps",
        "b1",
        "b2",
        "eps",
        "weight_decay",
        "decay_mask",
        "clip_norm",
    ),
    "onecycle": (
        "schedule",
        "learning_rate",
        "pct_start",
        "div_factor",
        "final_div_factor",
        "b1_cycle",
        "b1",
        "b2",
        "eps",
        "weight_decay",
        "decay_mask",
        "clip_norm",
    ),
}
"""The optimizer keys each ``optimizer.schedule`` reads (``gemsjax.train.optim`` documents
them)."""
MIN_MAX_LEN = {"genome": 16, "barcode": 8}
"""Shortest useful ``data.max_len`` (tokens): a GeneMask / Global-PMI span covers 11 tokens."""
PMI_RECIPE = "pmi"


class ConfigKeyError(UserError):
    """A config key that does not exist (or one a config lacks); the message lists the valid
    keys."""


# ------------------------------------------------------------------------------- the bases


def _common(recipe: str, kind: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.recipe = recipe
    c.seed = 0  # parameters, masks and dropout: fold_in(seed, step)
    c.model = ml_collections.ConfigDict(
        dict(
            name="",  # a size in gemsjax.models.sizes.SIZES
            compute_dtype="auto",  # auto: bfloat16 on GPU/TPU, float32 on CPU
            dropout=-1.0,  # -1: the size's own value
            # auto: a fused attention kernel on GPU / TPU where the attention probabilities get
            # no dropout, XLA's einsums otherwise; xla: always the einsums; fused: the kernel
            # throughout (needs dropout 0.0). gemsjax.models.backend
            attention="auto",
            init="",  # "": random; hf:<folder>: start from a transformers BERT's weights
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            kind=kind,
            batch_size=8,  # global batch per optimizer step
            max_len=512,  # tokens per row, [CLS] and [SEP] included
            seed=0,  # order of the training rows
            num_threads=2,  # grain read threads
            prefetch=4,  # batches read ahead
        )
    )
    c.downstream = ml_collections.ConfigDict(
        dict(
            eval=True,  # end with the downstream table (gemsjax.eval.downstream)
            draws=2,  # genome: few-shot draws per arm there (protocol: 10)
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=200,  # optimizer updates (the CPU demos: ~6 min on 2 cores, BENCHMARKS.md)
            grad_accum=1,  # micro-batches per step (data.batch_size = accum * micro)
            log_every=10,  # console line cadence (metrics.jsonl has every step)
            eval_every=50,
            eval_batches=2,  # fixed validation batches per evaluation; 0: all of them
            checkpoint_every=50,
            keep_checkpoints=3,
            mesh_data=-1,  # -1: all devices not used by fsdp
            mesh_fsdp=1,
            allow_config_change=(),  # keys (or sections) a resume may change on purpose
        )
    )
    c.compile = ml_collections.ConfigDict(
        dict(
            topology="",  # --mode=compile target, e.g. v5p:4x4x2; "": local devices
        )
    )
    return c


def genome_base(recipe: str) -> ml_collections.ConfigDict:
    """Shared defaults of the genome MLM recipes (overlapping 6-mers, DNABERT vocabulary): the
    shipped 1 Mb chr22 sample, 512-token rows, every masking key at the GeneMask papers'
    values. The recipe sets ``model.name``, ``masking.curriculum`` / ``strategy`` and
    ``optimizer``."""
    c = _common(recipe, "genome")
    c.data.update(
        dict(
            fasta=(),  # genome FASTA paths; empty: the shipped chr22 sample
            prepared_dir="",  # encoded genome cache; empty: ~/.cache/gemsjax/...
            corpus_seed=0,  # chunking of the genome and its train/validation split
        )
    )
    c.masking = ml_collections.ConfigDict(
        dict(
            curriculum="constant",  # constant | cm_gems | cm_step
            strategy="random_span",  # constant: random_span | genemask | global_pmi | mae_drop
            per_example=False,  # False: one strategy a batch; True: a row; g: g rows
            threshold=1.0,  # cm_gems: switch once min |delta val ppl| < threshold
            threshold_mode="absolute",  # absolute: |delta ppl|; relative: |delta ppl| / ppl
            random_span_prob=0.025,  # DNABERT span centres
            genemask_prob=0.0176,  # GeneMask span centres
            global_pmi_prob=0.0136,  # Global-PMI span centres (CM-GEMS)
            mae_ratio=0.5,  # mae_drop: share of tokens masked
            reference_code_compat="",  # "" (intended) | genemask | cmgems | genemask_2023
            rank_table="genemask",  # genemask (published) | fasta (count data.fasta) | a file
            mask_frac=0.8,  # BERT corruption: [MASK] / random id / unchanged
            random_frac=0.1,
            random_low=0,  # 0: random ids from the whole vocabulary, as DNABERT
            loss_on="masked",  # masked | all (every non-special token)
        )
    )
    c.train.update(
        dict(
            eval_every=25,  # several validations, so a plateau rule can fire
            mlm_head_share=0.375,  # share of positions given to the MLM head (0: all)
            mlm_pack_share=0.2,  # those slots packed per batch shard (0: per row)
        )
    )
    return c


def barcode_base(recipe: str) -> ml_collections.ConfigDict:
    """Shared defaults of the barcode recipes (non-overlapping 6-mers, BarcodeBERT vocabulary):
    the shipped 4,000 BOLD COI barcodes, 110-token rows, batch 32. Masking is MAE-style token
    dropping (``mae_ratio``); the recipe sets ``model.name``, the corruption and ``optimizer``."""
    c = _common(recipe, "barcode")
    c.data.update(
        dict(
            tsv="",  # barcode TSV (BOLD or BIOSCAN-5M); empty: shipped sample
            k=6,  # k-mer length, stride k (8: BarcodeBERT-5M)
            train_splits=("pretrain",),  # values of the file's split column
            validation_splits=("val",),
            batch_size=32,
            max_len=110,
        )
    )
    c.masking = ml_collections.ConfigDict(
        dict(
            mae_ratio=0.5,  # share of tokens masked (dropped, for an MAE)
            mae_draw="fixed",  # MAE: fixed (round(ratio * n)) | bernoulli (reference)
            mask_frac=1.0,  # corruption of masked inputs: [MASK] / random id / kept
            random_frac=0.0,
            random_low=0,
            loss_on="masked",  # masked | all (every non-special token)
        )
    )
    c.train.mae_visible_slack = 16  # MAE encoder slots beyond the fixed draw's bound
    c.train.steps = 150  # 32 x 110 steps cost the small MAE ~1.5 s each on a 2-core CPU
    return c


def genemask_paper(c: ml_collections.ConfigDict) -> None:
    """The GeneMask / CM-GEMS papers' pretraining (Script-A): LOGO size, 250 sequences per step
    (10 x 25 accumulated), 10K steps, 500 warmup steps; validation every 500 steps."""
    c.model.name = "logo"
    c.data.batch_size, c.train.grad_accum, c.train.steps = 250, 25, 10_000
    c.optimizer.warmup_steps = 500
    c.train.eval_every, c.train.checkpoint_every, c.train.log_every = 500, 1000, 50
    c.train.eval_batches = 20


def genome_smoke(c: ml_collections.ConfigDict) -> None:
    """Seconds: the test size, 6 steps of 8 x 128 tokens, everything every step or three."""
    c.model.name = "test"
    c.data.batch_size, c.data.max_len, c.train.steps = 8, 128, 6
    c.optimizer.warmup_steps = 2
    c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 1, 3, 3
    c.train.eval_batches = 1
    c.downstream.eval = False


def barcode_smoke(c: ml_collections.ConfigDict, size: str) -> None:
    """Seconds: ``size`` (a test size), 6 steps of 8 barcodes."""
    c.model.name = size
    c.data.batch_size, c.train.steps = 8, 6
    c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 1, 3, 3
    c.train.eval_batches = 1
    c.downstream.eval = False


# ---------------------------------------------------------------------------------- presets


Preset = Callable[[ml_collections.ConfigDict], None]


def apply_presets(
    c: ml_collections.ConfigDict,
    arg: str | None,
    presets: Mapping[str, Preset],
    *,
    sizes: bool = True,
) -> ml_collections.ConfigDict:
    """Apply the comma-separated presets in ``arg`` to ``c`` in order: a name in ``presets``, a
    model size (when ``sizes``) or ``key=value``; returns ``c``. An unknown name raises a
    :class:`UserError` listing the valid ones."""
    for item in (p.strip() for p in (arg or "").split(",")):
        if not item:
            continue
        if "=" in item:
            key, value = item.split("=", 1)
            set_key(c, key.strip(), value.strip())
        elif item in presets:
            presets[item](c)
        elif sizes and item in SIZES:
            c.model.name = item
        else:
            valid = list(presets) + ([f"a model size ({', '.join(SIZES)})"] if sizes else [])
            raise UserError(f"unknown preset {item!r}; valid: {', '.join(valid)}, or key=value")
    return c


def parse_value(text: str):
    """A ``key=value`` value: a Python literal (``200``, ``1e-3``, ``True``, ``("a", "b")``), or
    else the text itself (a path, a name)."""
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


def set_key(c: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Set ``c.<dotted>`` from the command-line text ``text`` (:func:`parse_value`; a single
    value for a tuple key becomes a 1-tuple, an int for a float key a float). Its range is
    checked later, by :func:`validate`, with everything else; so is the key itself: an unknown
    key is set as a new one, for :func:`check_keys` to report."""
    *parents, leaf = dotted.split(".")
    node = c
    for part in parents:
        if not _is_dict(node):
            break
        if part not in node:
            node[part] = ml_collections.ConfigDict()
        node = node[part]
    value = parse_value(text)
    if not _is_dict(node) or _is_dict(node.get(leaf)):  # below a value, or a whole section
        raise ConfigKeyError(
            f"config key {dotted!r} is not a single value; valid keys: "
            + ", ".join(sorted(valid_keys(c)))
        )
    if leaf not in node:
        node[leaf] = value
        return
    current = node[leaf]
    if isinstance(current, str) and not isinstance(value, str):
        value = text  # e.g. a file named 123
    elif isinstance(current, tuple) and value is not None:
        value = tuple(value) if isinstance(value, tuple | list) else (value,)
    elif isinstance(current, float) and _is_int(value):
        value = float(value)
    with node.ignore_type():  # validate() checks types and ranges, with the rest
        node[leaf] = value


# ------------------------------------------------------------------------------ validation


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _int(lo: int, hi: int | None = None) -> Callable:
    def check(x):
        if not _is_int(x) or x < lo or (hi is not None and x > hi):
            return f"must be an integer {f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'}"

    return check


def _real(
    lo: float, hi: float | None = None, *, open_lo: bool = False, open_hi: bool = False
) -> Callable:
    def check(x):
        if (
            not _is_number(x)
            or x < lo
            or (open_lo and x == lo)
            or (hi is not None and (x > hi or (open_hi and x == hi)))
        ):
            left, right = "(" if open_lo else "[", ")" if open_hi else "]"
            return (
                f"must be a number in {left}{lo}, {hi}{right}"
                if hi is not None
                else f"must be a number {'>' if open_lo else '>='} {lo}"
            )

    return check


def _one_of(*choices) -> Callable:
    def check(x):
        if x not in choices:
            return f"must be one of {', '.join(map(repr, choices))}"

    return check


def _text(x):
    if not isinstance(x, str):
        return "must be a string"


def _files(x):
    paths = (x,) if isinstance(x, str) else x
    if not isinstance(paths, tuple | list) or not all(isinstance(p, str) for p in paths):
        return "must be a path or a tuple of paths"
    missing = [p for p in paths if not pathlib.Path(p).expanduser().is_file()]
    if missing:
        return f"names missing file(s) {missing}"


def _optional_file(x):
    if not isinstance(x, str):
        return "must be a path (or empty)"
    if x and not pathlib.Path(x).expanduser().is_file():
        return "names a file that does not exist"


def _splits(x):
    if not isinstance(x, tuple) or not x or not all(isinstance(s, str) and s for s in x):
        return "must be a non-empty tuple of split names"


def _key_names(x):
    if not isinstance(x, tuple) or not all(isinstance(s, str) and s for s in x):
        return "must be a tuple of config keys or sections, e.g. ('train.steps', 'optimizer')"


def _per_example(x):
    if not isinstance(x, bool) and not (_is_int(x) and x >= 1):
        return (
            "must be False (one strategy per batch), True (per row) or an int g >= 1 (per g rows)"
        )


def _rank_table(x):
    if not isinstance(x, str) or (
        x not in ("genemask", "fasta") and not pathlib.Path(x).expanduser().is_file()
    ):
        return "must be genemask, fasta or an existing rank-table file (--mode=pmi writes one)"


def _dtype(x):
    if x not in ("auto", "float32", "bfloat16", "float16"):
        return "must be auto, float32, bfloat16 or float16"


def _dropout(x):
    if not _is_number(x) or not (x == -1 or 0 <= x < 1):
        return "must be -1 (the size's own value) or in [0, 1)"


def _hf_init(x):
    if not (isinstance(x, str) and x.startswith("hf:")):
        return "must be empty (random init) or hf:<transformers model folder>"
    if not (pathlib.Path(x.removeprefix("hf:")).expanduser() / "config.json").is_file():
        return "names no transformers model folder (no config.json there)"


def _b1_cycle(x):
    if x is not None and not (
        isinstance(x, tuple) and len(x) == 2 and all(_is_number(b) and 0 <= b < 1 for b in x)
    ):
        return "must be None or (b1_max, b1_min) with both in [0, 1)"


_FRACTION = _real(0.0, 1.0)
_POSITIVE = _int(1)
RULES: dict[str, Callable] = {
    "recipe": _text,
    "seed": _int(0),
    "model.name": _one_of(*SIZES),
    "model.compute_dtype": _dtype,
    "model.dropout": _dropout,
    "model.attention": _one_of(*ATTENTIONS),
    "model.init": lambda x: _hf_init(x) if x else None,
    "data.kind": _one_of("genome", "barcode"),
    "data.batch_size": _POSITIVE,
    "data.max_len": _int(1),
    "data.seed": _int(0),
    "data.corpus_seed": _int(0),
    "data.num_threads": _POSITIVE,
    "data.prefetch": _int(0),
    "data.fasta": lambda x: _files(x) if x else None,
    "data.prepared_dir": _text,
    "data.tsv": _optional_file,
    "data.k": _int(1, 12),
    "data.train_splits": _splits,
    "data.validation_splits": _splits,
    "masking.curriculum": _one_of(*CURRICULA),
    "masking.strategy": _one_of(*STRATEGIES),
    "masking.per_example": _per_example,
    "masking.threshold": _real(0.0, open_lo=True),
    "masking.threshold_mode": _one_of(*THRESHOLD_MODES),
    "masking.random_span_prob": _FRACTION,
    "masking.genemask_prob": _FRACTION,
    "masking.global_pmi_prob": _FRACTION,
    "masking.mae_ratio": _real(0.0, 1.0, open_lo=True, open_hi=True),
    "masking.reference_code_compat": _one_of("", "genemask", "cmgems", "genemask_2023"),
    "masking.rank_table": _rank_table,
    "masking.mask_frac": _FRACTION,
    "masking.random_frac": _FRACTION,
    "masking.random_low": _int(0),
    "masking.loss_on": _one_of("masked", "all"),
    "masking.mae_draw": _one_of("fixed", "bernoulli"),
    "train.mae_visible_slack": _int(0),
    "train.steps": _POSITIVE,
    "train.grad_accum": _POSITIVE,
    "train.log_every": _POSITIVE,
    "train.eval_every": _POSITIVE,
    "train.eval_batches": _int(0),
    "train.checkpoint_every": _POSITIVE,
    "train.keep_checkpoints": _POSITIVE,
    "train.mesh_data": lambda x: None if x == -1 else _POSITIVE(x) and "must be -1 or >= 1",
    "train.mesh_fsdp": _POSITIVE,
    "train.mlm_head_share": _FRACTION,
    "train.mlm_pack_share": _FRACTION,
    "train.allow_config_change": _key_names,
    "compile.topology": _text,
    "optimizer.schedule": _one_of(*SCHEDULES),
    "optimizer.learning_rate": _real(0.0, open_lo=True),
    "optimizer.warmup_steps": _int(0),
    "optimizer.pct_start": _real(0.0, 1.0, open_lo=True, open_hi=True),
    "optimizer.div_factor": _real(0.0, open_lo=True),
    "optimizer.final_div_factor": _real(0.0, open_lo=True),
    "optimizer.b1_cycle": _b1_cycle,
    "optimizer.b1": _real(0.0, 1.0, open_hi=True),
    "optimizer.b2": _real(0.0, 1.0, open_hi=True),
    "optimizer.eps": _real(0.0, open_lo=True),
    "optimizer.weight_decay": _real(0.0),
    "optimizer.decay_mask": _one_of(*DECAY_MASKS),
    "optimizer.clip_norm": _real(0.0),
    "downstream.eval": lambda x: None if isinstance(x, bool) else "must be True or False",
    "downstream.draws": _POSITIVE,
}
"""Each key's range: ``check(value) -> None`` when fine, else what the value must be."""

PMI_RULES: dict[str, Callable] = {
    "recipe": _one_of(PMI_RECIPE),
    "fasta_paths": lambda x: _files(x) if x else None,
    "out": lambda x: None if isinstance(x, str) and x else "must be a file name",
    "k": _int(1, 8),
    "max_n": _int(1, 10),
    "min_count": _int(2),
    "denominator": _one_of("genemask", "per_length"),
}


def _schema(c: ml_collections.ConfigDict) -> set[str]:
    """The keys ``c`` must have: its data kind's base, plus its optimizer schedule's keys."""
    if c.get("recipe") == PMI_RECIPE:
        return set(PMI_RULES)
    kind = c.get("data", {}).get("kind")
    base = barcode_base if kind == "barcode" else genome_base
    optimizer = OPTIMIZER_KEYS.get(
        c.get("optimizer", {}).get("schedule"), OPTIMIZER_KEYS["warmup_linear"]
    )
    return set(valid_keys(base(""))) | {f"optimizer.{k}" for k in optimizer}


def allowed_changes(names: tuple[str, ...]) -> list[str]:
    """``train.allow_config_change`` as a list of names (comma-separated items are split, so
    ``--config.train.allow_config_change=train.steps,optimizer`` names two)."""
    return [name.strip() for item in names for name in item.split(",") if name.strip()]


def _cross_checks(c: ml_collections.ConfigDict) -> list[str]:
    """Problems between keys, as ``key=value: what to do`` lines."""
    d, t, m, o = c.data, c.train, c.masking, c.optimizer
    problems = []
    if c.model.attention == "fused" and c.model.dropout != 0.0:
        problems.append(
            f"model.attention='fused' with model.dropout={c.model.dropout}: the fused kernels "
            "have no dropout on the attention probabilities; set model.dropout=0.0, or "
            "model.attention=auto (fused wherever no dropout applies)"
        )
    keys = valid_keys(c)
    unknown = [
        name
        for name in allowed_changes(t.allow_config_change)
        if not any(k == name or k.startswith(f"{name}.") for k in keys)
    ]
    if unknown:
        problems.append(
            f"train.allow_config_change names {unknown}, which are neither keys nor "
            "sections of this config: name keys such as 'train.steps' or sections "
            "such as 'optimizer'"
        )
    if d.batch_size % t.grad_accum:
        problems.append(
            f"data.batch_size={d.batch_size} is not divisible by train.grad_accum="
            f"{t.grad_accum}: make the batch a multiple of the accumulation"
        )
    positions = SIZES[c.model.name].get("max_positions", 512)
    if not MIN_MAX_LEN[d.kind] <= d.max_len <= positions:
        problems.append(
            f"data.max_len={d.max_len} must be in [{MIN_MAX_LEN[d.kind]}, "
            f"{positions}] (the {c.model.name!r} size has {positions} positions)"
        )
    if m.mask_frac + m.random_frac > 1:
        problems.append(
            f"masking.mask_frac={m.mask_frac} + masking.random_frac={m.random_frac} must be <= 1"
        )
    if o.schedule == "warmup_linear" and o.warmup_steps >= t.steps:
        problems.append(
            f"optimizer.warmup_steps={o.warmup_steps} must be below train.steps={t.steps}"
        )
    mae = SIZES[c.model.name].get("arch", "mlm") != "mlm"
    if mae and (m.mask_frac, m.random_frac, m.loss_on) != (1.0, 0.0, "masked"):
        problems.append(
            f"model.name={c.model.name!r} is a masked autoencoder: it drops the "
            "masked tokens (no corruption) and scores them only; keep "
            "masking.mask_frac=1.0, random_frac=0.0, loss_on='masked'"
        )
    if t.get("mlm_head_share") and m.loss_on != "masked":
        problems.append(
            f"train.mlm_head_share={t.mlm_head_share} needs masking.loss_on="
            "'masked' (set train.mlm_head_share=0 to compute the loss on all tokens)"
        )
    return problems


def check_keys(c: ml_collections.ConfigDict, expected: set[str], source: str) -> set[str]:
    """The one key check (training and downstream configs alike): ``c``'s dotted keys are
    ``expected``, none unknown (a typo in a file or a ``--config.<key>``), none missing. Raises
    :class:`ConfigKeyError` naming ``source``, the keys and the valid ones. Returns the keys."""
    got = set(valid_keys(c))
    if got != expected:
        unknown, missing = sorted(got - expected), sorted(expected - got)
        raise ConfigKeyError(
            f"{source}: "
            + "; ".join(
                ([f"unknown config key(s) {unknown}"] if unknown else [])
                + ([f"missing config key(s) {missing}"] if missing else [])
            )
            + f"; valid keys: {', '.join(sorted(expected))}"
        )
    return got


def validate(c: ml_collections.ConfigDict, source: str = "config") -> None:
    """The one check of a config: its keys are its kind's (no unknown, none missing) and every
    value is in range (:data:`RULES`, :data:`PMI_RULES`, then checks between keys). Raises one
    :class:`UserError` naming ``source``, each bad key with its value, and the fix."""
    got = check_keys(c, _schema(c), source)
    rules = PMI_RULES if c.recipe == PMI_RECIPE else RULES
    problems = []
    for key in sorted(got):
        value = c
        for part in key.split("."):
            value = value[part]
        if (why := rules[key](value)) is not None:
            problems.append(f"{key}={value!r} {why}")
    if not problems and c.recipe != PMI_RECIPE:
        problems = _cross_checks(c)
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems))


# --------------------------------------------------------------------------------- loading


def recipes() -> list[str]:
    """The recipe names in :data:`CONFIGS_DIR` (file stems), sorted."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.py"))


def load_module(path: str | pathlib.Path):
    """Import a config file by path; a missing file raises :class:`UserError` listing the
    recipes."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(
            f"config file {str(path)!r} not found; recipes in {CONFIGS_DIR.name}/: "
            f"{', '.join(recipes())}"
        )
    spec = importlib.util.spec_from_file_location(f"gemsjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(spec: str, overrides: Mapping[str, str] = ()) -> ml_collections.ConfigDict:
    """``path[:presets]`` -> its ``get_config(presets)`` with ``overrides`` (dotted key -> value
    text, from ``--config.<key>=<value>``) set, validated (:func:`validate`), locked. A bare
    recipe name (``cm_gems:smoke``) means that file in :data:`CONFIGS_DIR`."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py") and "/" not in path:
        path = str(CONFIGS_DIR / f"{path}.py")
    try:
        config = load_module(path).get_config(arg or None)
        for key, text in dict(overrides).items():
            set_key(config, key, text)
        remote.localize_config(config)
    except UserError as err:
        raise type(err)(f"{spec}: {err}") from None
    validate(config, spec)
    config.lock()
    return config
