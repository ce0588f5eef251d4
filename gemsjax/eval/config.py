"""Configs of the downstream commands (``--mode=finetune`` / ``evaluate`` / ``embed``).

One base per protocol, with every key the protocol reads; the config files in ``configs/eval/``
(``finetune.py``, ``fewshot.py``, ``gue.py``, ``barcodes.py``, ``embed.py``; the pretraining
recipes are ``configs/*.py``) set values on it and apply presets with
:func:`gemsjax.config.apply_presets` (a preset name, a model size, or ``key=value``);
:func:`load` sets the ``--config.<key>=`` overrides and :func:`validate` checks the result once
(each key's type against the base, then its range), naming each bad key and the fix.

Keys shared by the fine-tuning protocols:

- ``protocol``: ``finetune`` | ``fewshot`` | ``gue`` (``--mode=evaluate`` dispatches on it);
- ``init``: the encoder (:mod:`gemsjax.eval.init`: ``runs/x[:best|:latest|:step=N]``,
  ``random``, ``random:runs/x``, ``hf:<transformers folder>``); ``baseline``: also fine-tune
  the random-init model of the
  same size, reported beside it; ``model.name``: the size for ``init=random`` (a run brings
  its own);
- ``finetune.*``: :class:`gemsjax.eval.finetune.Hyper` (``learning_rate=0`` and friends mean
  "the protocol's reference value");
- ``max_len``: tokens per row, 0 = from the data (longest row, capped at the model's positions;
  longer rows are truncated and counted in the report);
- ``seed``, ``mesh_data``, ``mesh_fsdp``.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from gemsjax import config as config_lib
from gemsjax import remote
from gemsjax.data import samples
from gemsjax.errors import UserError
from gemsjax.models.sizes import SIZES

PROTOCOLS = ("finetune", "fewshot", "gue", "barcodes", "embed")
FORMATS = ("gue", "genemask")


def _common(protocol: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            protocol=protocol,
            init="random",
            baseline=True,
            model=dict(name="logo"),
            finetune=dict(
                learning_rate=0.0,
                epochs=0,
                batch_size=0,
                warmup=0.1,
                weight_decay=0.01,
                dropout=0.1,
                pooling="auto",
                clip_norm=1.0,
                eval_batch_size=64,
                seed=0,
            ),
            max_len=0,
            seed=0,
            mesh_data=-1,
            mesh_fsdp=1,
        )
    )


def finetune_base() -> ml_collections.ConfigDict:
    """One labelled task: ``task.train`` / ``task.dev`` (optional) / ``task.test`` files."""
    c = _common("finetune")
    c.task = dict(
        train=str(samples.sample_path(samples.PROM_CORE_TRAIN)),
        dev="",
        test=str(samples.sample_path(samples.PROM_CORE_TEST)),
        format="genemask",
        name="prom_core_sample",
        num_labels=0,
    )
    c.finetune.learning_rate, c.finetune.epochs, c.finetune.batch_size = 1e-4, 20, 5
    c.checkpoint_every, c.log_every = 500, 10
    return c


def fewshot_base() -> ml_collections.ConfigDict:
    """GeneMask few-shot: ``task.dir`` (a GeneMask task folder; ``task.test`` overrides its test
    file) or ``task.pool`` + ``task.test`` files (default: the shipped Prom-core sample);
    ``task.name`` defaults to the folder's or the pool file's name; ``shots`` per class,
    ``draws`` per setting, ``test_subsample`` rows (0 = all)."""
    c = _common("fewshot")
    c.task = dict(dir="", pool="", test="", name="", num_labels=0)
    c.shots = (10,)
    c.draws = 10
    c.test_subsample = 0
    return c


def gue_base() -> ml_collections.ConfigDict:
    """GUE: every task folder (holding ``dev.csv`` / ``test.csv``) under ``gue_dir``."""
    c = _common("gue")
    c.gue_dir = ""
    c.tasks = ()  # task names (``prom/prom_core_tata``); empty: every task found
    c.train_on_dev_split = 0.0  # > 0: a task without train.csv trains on this share of dev
    c.max_train_rows = 0  # > 0: a fixed stratified subsample of train (CPU runs)
    c.max_eval_rows = 0  # > 0: the same for dev and test
    c.checkpoint_every, c.log_every = 500, 50
    return c


def barcodes_base() -> ml_collections.ConfigDict:
    """Barcodes (:mod:`gemsjax.eval.barcodes`): ``tsv`` (a table with a ``split`` column; empty:
    the shipped sample), the embedding ``layer`` / ``pooling`` / ``batch_size``, the linear
    probe (``probe``, ``probe_max_iter``), BIN clustering (``cluster``, ``umap_components``),
    full fine-tuning of the encoder on the species (``full_finetune`` with ``finetune.*``),
    ``baseline`` (the random-init twin, 6-mer frequency and exact-lookup rows; a study scores
    them once, not for every arm) and ``max_query_rows`` (> 0: fixed stratified subsamples of
    the seen-test rows by species and the unseen rows by genus, seed 0, for CPU runs; the keys
    stay whole)."""
    c = _common("barcodes")
    c.model.name = "barcode_mae_small"
    c.tsv = ""
    c.max_len = 0  # tokens per row; 0: a 660-bp barcode's k-mers (110 6-mers, 82 8-mers)
    c.batch_size, c.layer, c.pooling = 64, -1, "mean"
    c.probe, c.probe_max_iter = True, 300
    c.cluster, c.umap_components = True, 64
    c.max_query_rows = 0
    c.full_finetune = False
    c.finetune.learning_rate, c.finetune.epochs, c.finetune.batch_size = 1e-4, 3, 32
    c.finetune.weight_decay = 1e-5
    return c


def embed_base() -> ml_collections.ConfigDict:
    """Embeddings (``--mode=embed``, :mod:`gemsjax.eval.embed`): ``input`` (FASTA / CSV / TSV),
    ``format``, ``layer``, ``pooling``, ``batch_size``, ``max_len`` (0: 512 DNABERT,
    a 660-bp barcode's k-mers for barcodes) and ``vocab`` (for ``init=random``; a run knows its
    own)."""
    c = ml_collections.ConfigDict(
        dict(
            protocol="embed",
            init="random",
            model=dict(name="logo"),
            vocab="",
            input="",
            format="auto",
            layer=-1,
            pooling="mean",
            batch_size=64,
            max_len=0,
            seed=0,
            mesh_data=-1,
            mesh_fsdp=1,
        )
    )
    return c


MODE_PROTOCOLS = {
    "finetune": ("finetune",),
    "evaluate": ("fewshot", "gue", "barcodes"),
    "embed": ("embed",),
}
"""The protocols each downstream ``--mode`` runs."""
_BASES = {
    "finetune": finetune_base,
    "fewshot": fewshot_base,
    "gue": gue_base,
    "barcodes": barcodes_base,
    "embed": embed_base,
}


def load(spec: str, overrides: Mapping[str, str], mode: str) -> ml_collections.ConfigDict:
    """``path[:presets]`` (or a bare name in ``configs/eval/``) -> its config with the
    ``--config.<key>=<value>`` ``overrides`` set, validated and locked; a pretraining recipe, or
    a protocol ``mode`` does not run, raises :class:`UserError` naming the right command."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py") and "/" not in path:
        path = str(config_lib.CONFIGS_DIR / "eval" / f"{path}.py")
    try:
        c = config_lib.load_module(path).get_config(arg or None)
        if "protocol" in c:
            for key, text in dict(overrides).items():
                config_lib.set_key(c, key, text)
            remote.localize_config(c)
    except UserError as err:
        raise type(err)(f"{spec}: {err}") from None
    wanted = MODE_PROTOCOLS[mode]
    if "protocol" not in c:
        raise UserError(
            f"{spec} is a pretraining recipe (--mode=train); --mode={mode} needs "
            + " or ".join(f"configs/eval/{p}.py" for p in wanted)
        )
    if c.protocol not in wanted:
        right = next(m for m, protocols in MODE_PROTOCOLS.items() if c.protocol in protocols)
        raise UserError(f"{spec} runs the {c.protocol!r} protocol: use --mode={right}")
    validate(c, spec)
    c.lock()
    return c


def _type_problems(c: ml_collections.ConfigDict) -> list[str]:
    """Keys whose value has another type than the protocol base's (a float key takes an int)."""
    base = _BASES[c.protocol]()
    problems = []
    for key in config_lib.valid_keys(base):
        want, value = base, c
        for part in key.split("."):
            want, value = want[part], value.get(part) if hasattr(value, "get") else None
        kind = (int, float) if isinstance(want, float) else type(want)
        if isinstance(value, bool) != isinstance(want, bool) or not isinstance(value, kind):
            problems.append(f"{key}={value!r} must be of type {type(want).__name__}")
    return problems


def validate(c: ml_collections.ConfigDict, source: str = "config") -> None:
    """Type and range checks of a downstream config; one UserError naming ``source``, each bad
    key and the fix."""
    if c.get("protocol") not in PROTOCOLS:
        raise UserError(f"{source}: protocol={c.get('protocol')!r} must be one of {PROTOCOLS}")
    config_lib.check_keys(c, set(config_lib.valid_keys(_BASES[c.protocol]())), source)
    problems = _type_problems(c)
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems))
    if c.model.name and c.model.name not in SIZES:
        problems.append(f"model.name={c.model.name!r} must be a size: {', '.join(SIZES)}")
    if c.protocol in ("barcodes", "embed"):
        problems += _embedding_problems(c)
    if c.protocol == "embed":
        if problems:
            raise UserError(f"{source}: " + "; ".join(problems))
        return
    f = c.finetune
    for key in ("learning_rate", "weight_decay", "clip_norm", "warmup"):
        if f[key] < 0:
            problems.append(f"finetune.{key}={f[key]} must be >= 0")
    for key in ("epochs", "batch_size"):
        if f[key] < 0:
            problems.append(f"finetune.{key}={f[key]} must be >= 0 (0: the protocol's value)")
    if not 0 <= f.dropout < 1:
        problems.append(f"finetune.dropout={f.dropout} must be in [0, 1)")
    if f.pooling not in ("auto", "cls", "mean"):
        problems.append(f"finetune.pooling={f.pooling!r} must be auto, cls or mean")
    if f.eval_batch_size < 1:
        problems.append(f"finetune.eval_batch_size={f.eval_batch_size} must be >= 1")
    if c.max_len < 0:
        problems.append(f"max_len={c.max_len} must be 0 (from the data) or a length")
    if c.protocol == "fewshot":
        if not c.shots or min(c.shots) < 1:
            problems.append(f"shots={c.shots} must be positive numbers of examples per class")
        if c.draws < 1:
            problems.append(f"draws={c.draws} must be >= 1")
        if c.test_subsample < 0:
            problems.append(f"test_subsample={c.test_subsample} must be >= 0 (0: every row)")
    if c.protocol == "barcodes" and c.max_query_rows < 0:
        problems.append(f"max_query_rows={c.max_query_rows} must be >= 0 (0: every query)")
    if c.protocol == "gue":
        if not c.gue_dir:
            problems.append("gue_dir is empty: point it at a GUE folder (EMP/, prom/, ...)")
        if not 0 <= c.train_on_dev_split < 1:
            problems.append(f"train_on_dev_split={c.train_on_dev_split} must be in [0, 1)")
    if c.protocol == "finetune" and c.task.format not in FORMATS:
        problems.append(f"task.format={c.task.format!r} must be one of {FORMATS}")
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems))


def _embedding_problems(c: ml_collections.ConfigDict) -> list[str]:
    """Range checks of the embedding keys (``embed`` and ``barcodes``)."""
    problems = []
    if c.batch_size < 1:
        problems.append(f"batch_size={c.batch_size} must be >= 1")
    if c.layer < -1:
        problems.append(f"layer={c.layer} must be -1 (last), 0 (embedding layer) or a block")
    if c.pooling not in ("mean", "cls"):
        problems.append(f"pooling={c.pooling!r} must be mean or cls")
    if c.protocol == "embed":
        if not c.input:
            problems.append("input is empty: name a FASTA, CSV or TSV file to embed")
        if c.vocab not in ("", "dnabert", "barcodebert"):
            problems.append(
                f"vocab={c.vocab!r} must be dnabert or barcodebert (or empty for a run folder)"
            )
        if c.format not in ("auto", "fasta", "csv", "tsv"):
            problems.append(f"format={c.format!r} must be auto, fasta, csv or tsv")
    else:
        if c.probe_max_iter < 1:
            problems.append(f"probe_max_iter={c.probe_max_iter} must be >= 1")
        if c.umap_components < 2:
            problems.append(f"umap_components={c.umap_components} must be >= 2")
    return problems
