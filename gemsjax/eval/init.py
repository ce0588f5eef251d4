"""Where a downstream model's encoder comes from: a pretraining run, random init, or HF.

An *init spec* is a string (``config.init``):

- ``runs/x`` or ``runs/x:latest``: the newest checkpoint of the gemsjax pretraining run folder
  ``runs/x`` (its ``checkpoints/`` as :mod:`gemsjax.train.checkpoint` writes them);
- ``runs/x:best``: its checkpoint with the lowest validation loss (for CM-GEMS runs the
  validation loss is measured under the masking of the moment, so it jumps at the curriculum
  switch; ``latest`` is the usual choice there);
- ``runs/x:step=200``: the checkpoint of update 200;
- ``random``: random initialization of the size ``model_name`` with the vocab ``vocab``;
- ``random:<run spec>``: random initialization of the size and vocab of that run (the
  from-scratch baseline beside a pretrained model);
- ``hf:<folder>``: the encoder of a Hugging Face BERT folder (DNABERT, BarcodeBERT, a gemsjax
  export), read by :func:`gemsjax.interop.hf.import_encoder` (safetensors, or
  ``pytorch_model.bin`` through ``torch.load(weights_only=True)``); ``random:hf:<folder>`` is its
  randomly initialized twin.

Only the encoder (the run's ``params["encoder"]``, a :class:`~gemsjax.models.bert.BertModel`
in both the MLM and the BarcodeMAE models) is loaded; the MLM head, the MAE decoder and the
optimizer state are not read.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from gemsjax import remote
from gemsjax.errors import UserError
from gemsjax.models import registry
from gemsjax.models.bert import BertModel
from gemsjax.models.sizes import SIZES
from gemsjax.train import checkpoint
from gemsjax.vocab import get_vocab

VOCABS = ("dnabert", "barcodebert")


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A resolved init spec.

    Attributes:
      model_cfg: the encoder's size (a ``BertConfig``; ``arch`` says what it was pretrained as).
      vocab: ``"dnabert"`` or ``"barcodebert"``: the token layout the encoder was trained on.
      params: the encoder's parameters as a pure nested dict of numpy float32 arrays (what
        ``nnx.update(BertModel(...), params)`` takes; no variable metadata, so they fit a model
        built under any mesh), or None for random init.
      source: what to call it in a table (``runs/x@step=300``, ``random (logo)``).
      step: the checkpoint's step, or None.
      k: the k-mer length of its tokens (6; 8 for BarcodeBERT-5M's barcode 8-mers).
    """

    model_cfg: Any
    vocab: str
    params: Any
    source: str
    step: int | None = None
    k: int = 6

    def random_baseline(self) -> Encoder:
        """The same size and vocab, randomly initialized."""
        return dataclasses.replace(
            self, params=None, step=None, source=f"random ({self.source} size)"
        )


def parse_spec(spec: str) -> tuple[str, str, str]:
    """``spec`` -> ``(kind, target, which)``: kind ``run`` / ``random`` / ``hf``; ``which`` is
    ``latest``, ``best`` or ``step=N`` for runs."""
    spec = spec.strip()
    if not spec:
        raise UserError(
            "config.init is empty; give a run folder (runs/x[:best|:latest|:step=N]),"
            " 'random' or 'random:<run folder>'"
        )
    if spec.startswith("hf:"):
        return "hf", spec.removeprefix("hf:"), ""
    if spec == "random":
        return "random", "", ""
    if spec.startswith("random:"):
        return "random", spec.removeprefix("random:"), ""
    path, sep, which = spec.rpartition(":")
    if not sep or not (which in ("latest", "best") or which.startswith("step=")):
        path, which = spec, "latest"
    return "run", path, which


def load_encoder(spec: str, *, model_name: str = "", vocab: str = "") -> Encoder:
    """Resolve an init spec (see the module docstring); ``model_name`` and ``vocab`` give the size
    and token layout of a plain ``random`` spec, and for a run must match it when set.

    Raises UserError on a folder that is not a gemsjax run, a missing step, a checkpoint whose
    arrays do not fit the size its metadata names, or a size / vocab that differs from the
    ``model_name`` / ``vocab`` asked for."""
    kind, target, which = parse_spec(spec)
    if kind == "random" and not target:
        if not model_name or vocab not in VOCABS:
            raise UserError(
                f"config.init='random' needs config.model.name (a size: "
                f"{', '.join(SIZES)}) and a vocab {VOCABS}"
            )
        cfg = registry.get_model_config(model_name)
        return Encoder(cfg, vocab, None, f"random ({model_name})", k=_k_of_size(cfg, vocab))
    if kind == "hf" or target.startswith("hf:"):
        run = _load_hf(target.removeprefix("hf:"))
    else:
        run = _load_run(target, which if kind == "run" else "latest", params=kind == "run")
    if model_name and _size(run.model_cfg) != _size(registry.get_model_config(model_name)):
        raise UserError(
            f"config.init={spec!r} is a run of another size than config.model.name="
            f"{model_name!r}; leave config.model.name empty to use the run's size"
        )
    if vocab and run.vocab != vocab:
        raise UserError(
            f"config.init={spec!r} is a {run.vocab} model, but this task is tokenized "
            f"for {vocab} (a barcode model cannot read genome 6-mers and vice versa); "
            "pick a run pretrained on the same kind of data"
        )
    return run if kind != "random" else run.random_baseline()


def _k_of_size(cfg, vocab: str) -> int:
    """The k-mer length whose ``vocab`` layout fills the size's embedding table (barcode sizes
    exist for 6- and 8-mers); 6 when none does (a table larger than the vocab is allowed)."""
    for k in (6, 8):
        if get_vocab(vocab, k).size == cfg.vocab_size:
            return k
    return 6


def _size(cfg) -> tuple[int, ...]:
    """The fields that shape an encoder's arrays (dropout rates do not)."""
    return cfg.vocab_size, cfg.hidden, cfg.layers, cfg.heads, cfg.ffn, cfg.max_positions


def _run_meta(folder: epath.Path, step: int) -> dict:
    path = folder / "checkpoints" / str(step) / "meta" / "metadata"
    if not path.is_file():
        raise UserError(
            f"{folder}: checkpoint step {step} has no run metadata ({path}); it was "
            "not written by gemsjax pretraining"
        )
    return json.loads(path.read_text())


def _steps(folder: epath.Path) -> list[int]:
    ckpt = folder / "checkpoints"
    if not ckpt.is_dir():
        raise UserError(
            f"config.init={str(folder)!r}: not a gemsjax run folder (no checkpoints/ "
            "inside); pass the --workdir of a pretraining run"
        )
    steps = sorted(
        int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and (p / "state").is_dir()
    )
    if not steps:
        raise UserError(
            f"{ckpt}: no finished checkpoint; let the run save one (it saves every "
            "train.checkpoint_every steps and at its end)"
        )
    return steps


def _pick_step(folder: epath.Path, which: str) -> int:
    steps = _steps(folder)
    if which == "latest":
        return steps[-1]
    if which == "best":
        best = checkpoint.best_step(folder / "checkpoints", steps)
        if best is None:
            raise UserError(
                f"{folder}: no checkpoint carries a validation loss, so there is no "
                "best one; use :latest or :step=N"
            )
        return best
    try:
        step = int(which.removeprefix("step="))
    except ValueError:
        raise UserError(f"{folder}:{which}: the step must be an integer (e.g. :step=200)") from None
    if step not in steps:
        raise UserError(f"{folder}: no checkpoint at step {step}; saved steps: {steps}")
    return step


def _load_run(target: str, which: str, *, params: bool) -> Encoder:
    folder = remote.readable(target)  # a local folder or a URL (gs://...), read in place
    step = _pick_step(folder, which)
    config = _run_meta(folder, step)["config"]
    model = config["model"]
    overrides = {}
    if model.get("dropout", -1.0) >= 0:
        overrides = dict(dropout=model["dropout"], attn_dropout=model["dropout"])
    cfg = registry.get_model_config(model["name"], **overrides)
    vocab = "barcodebert" if config["data"]["kind"] == "barcode" else "dnabert"
    k = int(config["data"].get("k", 6))  # 8 for BarcodeBERT-5M's barcode 8-mers
    source = f"{target}@step={step}"
    weights = (
        _restore_encoder(folder / "checkpoints" / str(step) / "state", cfg, source)
        if params
        else None
    )
    return Encoder(cfg, vocab, weights, source, step, k)


def _load_hf(folder: str) -> Encoder:
    from gemsjax.interop import hf

    cfg, vocab, params = hf.import_encoder(folder)
    if vocab is None or vocab.name not in VOCABS:
        raise UserError(
            f"config.init='hf:{folder}': its vocab.txt matches neither the DNABERT "
            "nor the BarcodeBERT id layout; gemsjax tokenizers cannot feed it"
        )
    return Encoder(cfg, vocab.name, params, f"hf:{folder}", k=vocab.k)


def _abstract_encoder(cfg) -> nnx.State:
    model = nnx.eval_shape(lambda: BertModel(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)[1]


def _restore_encoder(state_dir: epath.Path, cfg, source: str) -> dict:
    """The ``params["encoder"]`` sub-tree of a saved train state, as a pure dict of numpy
    arrays."""
    target = {"params": {"encoder": _abstract_encoder(cfg)}}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            out = checkpointer.restore(
                state_dir,
                args=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True
                ),
            )
    except (ValueError, KeyError) as err:
        raise UserError(
            f"{source}: cannot restore the checkpoint's encoder ({err}); the run folder is "
            "damaged or mixes runs (its encoder does not fit the size its metadata names)"
        ) from err
    restored = out["params"]["encoder"]
    for (path, want), got in zip(
        jax.tree_util.tree_leaves_with_path(target["params"]["encoder"]),
        jax.tree.leaves(restored),
        strict=True,
    ):
        if tuple(want.shape) != tuple(np.shape(got)):
            raise UserError(
                f"{source}: encoder array {jax.tree_util.keystr(path)} has shape "
                f"{np.shape(got)}, the size in its metadata needs {want.shape}; the "
                "run folder is damaged or mixes runs"
            )
    return nnx.to_pure_dict(restored)


def build_encoder(encoder: Encoder, rngs: nnx.Rngs, *, dtype: Any = jnp.float32) -> BertModel:
    """A :class:`BertModel` of the encoder's size, holding its weights (random when None)."""
    model = BertModel(encoder.model_cfg, dtype=dtype, rngs=rngs)
    if encoder.params is not None:
        nnx.update(model, encoder.params)
    return model
