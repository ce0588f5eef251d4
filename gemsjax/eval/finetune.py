"""Fine-tuning a sequence classifier on a pretrained (or randomly initialized) encoder.

The model is :class:`~gemsjax.models.bert.BertClassifier`: the encoder of an init spec
(:mod:`gemsjax.eval.init`) plus a new head (BERT's tanh pooler on ``[CLS]`` for DNABERT
tokens, as DNABERT fine-tunes; the attention-masked mean for barcodes, which have no
``[CLS]``). The step is the training machinery's: one ``jax.jit`` with ``NamedSharding``
in/out shardings over the ``("data", "fsdp")`` mesh (:mod:`gemsjax.train.sharding`), donated
state, AdamW with linear warmup and decay (:mod:`gemsjax.train.optim`), dropout keys
``fold_in(fold_in(key(0), seed), step)``.

:class:`Finetuner` compiles init, train step and predict step once for a shape (model size,
classes, batch, tokens per row, number of updates); fine-tuning again with another seed or
another training set of the same batch shape reuses the same executables (the few-shot
protocol's draws). :func:`finetune` adds what a long run needs: Orbax checkpoints (state +
data position, resumed automatically), the dev split evaluated every epoch with the
best-dev-loss checkpoint kept and used for the test split, metrics (console, ``metrics.jsonl``,
TensorBoard) and a clean stop on SIGTERM.

Batches come from :func:`gemsjax.data.pipelines.labelled_pipeline`. A training batch whose
rows do not split evenly over the devices (the few-shot batch of 5 on 8 devices) is padded with
rows of weight 0, so the loss and the update are those of the real rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from gemsjax import remote
from gemsjax.data import pipelines, tables
from gemsjax.errors import UserError
from gemsjax.eval import scores
from gemsjax.eval.init import Encoder
from gemsjax.models import backend, flops
from gemsjax.models.bert import BertClassifier
from gemsjax.train import checkpoint, metrics, optim, sharding


@dataclasses.dataclass(frozen=True)
class Hyper:
    """Fine-tuning hyper-parameters.

    Attributes:
      learning_rate: AdamW peak learning rate.
      epochs: passes over the training split.
      batch_size: global batch per update (each epoch drops its last partial batch).
      warmup: linear warmup, as a fraction of all updates (< 1) or a number of updates (>= 1).
      weight_decay: AdamW decoupled decay (not on biases and LayerNorm).
      dropout: hidden and attention dropout while fine-tuning.
      pooling: ``cls`` | ``mean`` | ``auto`` (cls for dnabert tokens, mean for barcodes).
      clip_norm: gradient clipping (HF Trainer's 1.0).
      eval_batch_size: rows per prediction batch.
      seed: base seed of head init, data order and dropout.
    """

    learning_rate: float
    epochs: int
    batch_size: int
    warmup: float = 0.1
    weight_decay: float = 0.01
    dropout: float = 0.1
    pooling: str = "auto"
    clip_norm: float = 1.0
    eval_batch_size: int = 64
    seed: int = 0

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict) -> Hyper:
        """From a config's ``finetune`` section (same field names)."""
        return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls)})


_OWN = object()
"""Default of :meth:`Finetuner.init`: the Finetuner's own encoder weights."""


class ClassifierState(NamedTuple):
    """Fine-tuning state (Orbax-saveable arrays): ``step, seed: int32[]``, params, opt_state."""

    step: jax.Array
    seed: jax.Array
    params: Any
    opt_state: Any


def _cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> dict:
    """Weighted sums over rows: ``loss_sum``, ``correct``, ``count`` (float32[])."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(log_probs, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
    hit = (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)
    return dict(loss_sum=(nll * weights).sum(), correct=(hit * weights).sum(), count=weights.sum())


def pad_rows(batch: dict, multiple: int) -> dict:
    """Append rows of weight 0 (``valid == 0``) so the batch has a multiple of ``multiple``."""
    rows = batch["labels"].shape[0]
    extra = -rows % multiple
    if not extra:
        return batch
    return {
        k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]) for k, v in batch.items()
    }


class Finetuner:
    """Compiled init / train / predict for one fine-tuning shape on ``mesh``.

    Args:
      encoder: where the encoder comes from (its size, vocab and weights).
      num_labels: classes.
      hyper: hyper-parameters (learning rate, batch, ...).
      max_len: tokens per row.
      total_steps: updates of one fine-tuning run (the learning-rate schedule's length).
      mesh: the ``("data", "fsdp")`` mesh.
    """

    def __init__(
        self,
        encoder: Encoder,
        num_labels: int,
        hyper: Hyper,
        max_len: int,
        total_steps: int,
        mesh: jax.sharding.Mesh,
        compute_dtype: Any = jnp.float32,
    ):
        self.encoder, self.num_labels, self.hyper = encoder, num_labels, hyper
        self.max_len, self.total_steps, self.mesh = max_len, total_steps, mesh
        pooling = hyper.pooling
        if pooling == "auto":
            pooling = "cls" if encoder.vocab == "dnabert" else "mean"
        self.pooling = pooling
        cfg = dataclasses.replace(
            encoder.model_cfg, dropout=hyper.dropout, attn_dropout=hyper.dropout
        )
        warmup = hyper.warmup if hyper.warmup >= 1 else round(hyper.warmup * total_steps)
        opt_cfg = ml_collections.ConfigDict(
            dict(
                schedule="warmup_linear",
                learning_rate=hyper.learning_rate,
                warmup_steps=min(int(warmup), total_steps - 1),
                b1=0.9,
                b2=0.999,
                eps=1e-8,
                weight_decay=hyper.weight_decay,
                decay_mask="matrices",
                clip_norm=hyper.clip_norm,
            )
        )
        tx, self.lr_schedule = optim.make_optimizer(opt_cfg, total_steps)

        def build(key):
            return BertClassifier(
                cfg, num_labels, pooling=pooling, dtype=compute_dtype, rngs=nnx.Rngs(key)
            )

        def init(encoder_params, seed) -> ClassifierState:
            model = build(jax.random.fold_in(jax.random.key(hyper.seed), seed))
            if encoder_params is not None:
                nnx.update(model.encoder, encoder_params)
            params = nnx.split(model, nnx.Param)[1]
            return ClassifierState(jnp.int32(0), jnp.int32(seed), params, tx.init(params))

        with jax.set_mesh(mesh):  # annotated parameters shard eagerly under a mesh (bert.py)
            abstract = nnx.eval_shape(lambda: build(jax.random.key(0)))
            abstract_state = nnx.eval_shape(lambda: init(None, 0))
        abstract.eval()
        eval_graphdef = nnx.split(abstract, nnx.Param)[0]
        abstract.train()
        train_graphdef = nnx.split(abstract, nnx.Param)[0]
        self.state_sharding = sharding.state_shardings(abstract_state, mesh)
        self.abstract_state = sharding.with_shardings(abstract_state, self.state_sharding)
        batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)

        def train_step(state: ClassifierState, batch: dict):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), state.seed), state.step)

            def loss_fn(params):
                model = nnx.merge(train_graphdef, params)
                logits = model(batch["ids"], batch["attention"], rngs=nnx.Rngs(dropout=key))
                sums = _cross_entropy(logits, batch["labels"], batch["valid"].astype(jnp.float32))
                return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), sums

            (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            out = dict(
                loss=loss,
                accuracy=sums["correct"] / jnp.maximum(sums["count"], 1.0),
                grad_norm=optax.tree.norm(grads),
                lr=self.lr_schedule(state.step),
            )
            return state._replace(step=state.step + 1, params=params, opt_state=opt_state), out

        def predict_step(params, batch: dict) -> jax.Array:
            model = nnx.merge(eval_graphdef, params)
            return model(batch["ids"], batch["attention"])

        self._init = jax.jit(init, out_shardings=self.state_sharding)
        self.train_step = jax.jit(
            train_step,
            in_shardings=(self.state_sharding, batch_sh),
            out_shardings=(self.state_sharding, repl),
            donate_argnums=0,
        )
        self.predict_step = jax.jit(
            predict_step,
            in_shardings=(self.state_sharding.params, batch_sh),
            out_shardings=batch_sh,
            compiler_options=backend.inference_compiler_options(),
        )
        self.local_shards = len(mesh.local_devices)

    def meta(self) -> dict[str, Any]:
        """What rebuilds this classifier from a checkpoint (JSON): ``kind="classifier"``, the
        encoder's size (``model``, a ``BertConfig`` as a dict), ``vocab`` and ``k``, ``num_labels``,
        ``pooling``, ``max_len`` and the hyper-parameters."""
        return dict(
            kind="classifier",
            model={**dataclasses.asdict(self.encoder.model_cfg), "platform": None},
            vocab=self.encoder.vocab,
            k=self.encoder.k,
            num_labels=self.num_labels,
            pooling=self.pooling,
            max_len=self.max_len,
            hyper=dataclasses.asdict(self.hyper),
        )

    def init(self, seed: int, encoder_params: Any = _OWN) -> ClassifierState:
        """A fresh state for ``seed``: a new head on the encoder's weights, or on
        ``encoder_params`` when given (None: a random encoder; same shapes, so the random-init
        baseline reuses this Finetuner's compiled steps)."""
        params = self.encoder.params if encoder_params is _OWN else encoder_params
        with jax.set_mesh(self.mesh):
            return self._init(params, jnp.int32(seed))

    def train_batches(self, table: tables.LabelledTable, seed: int, num_epochs: int | None = None):
        """A checkpointable iterator of training batches (per process), shuffled by ``seed``."""
        return iter(
            pipelines.labelled_pipeline(
                table,
                vocab=self.encoder.vocab,
                k=self.encoder.k,
                batch_size=self.hyper.batch_size // jax.process_count(),
                max_len=self.max_len,
                training=True,
                seed=seed,
                num_epochs=num_epochs,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
        )

    def step(self, state: ClassifierState, host_batch: dict) -> tuple[ClassifierState, dict]:
        """One update on a host batch (padded to the local shards, then sharded)."""
        batch = sharding.shard_batch(pad_rows(host_batch, self.local_shards), self.mesh)
        return self.train_step(state, batch)

    def predict(
        self, state: ClassifierState, table: tables.LabelledTable
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(logits float32[N, C], labels int32[N])`` over ``table`` (every row once; the
        row order may differ from the table's on several processes, labels travel along)."""
        per_process = (
            math.ceil(self.hyper.eval_batch_size / jax.process_count() / self.local_shards)
            * self.local_shards
        )
        batches = pipelines.labelled_pipeline(
            table,
            vocab=self.encoder.vocab,
            k=self.encoder.k,
            batch_size=per_process,
            max_len=self.max_len,
            training=False,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        logits, labels = [], []
        for host in batches:
            out = self.predict_step(state.params, sharding.shard_batch(host, self.mesh))
            keep = sharding.shard_batch(host["valid"], self.mesh)
            labs = sharding.shard_batch(host["labels"], self.mesh)
            out, keep, labs = (
                np.asarray(multihost_utils.process_allgather(x, tiled=True))
                for x in (out, keep, labs)
            )
            logits.append(out[keep == 1])
            labels.append(labs[keep == 1])
        return np.concatenate(logits), np.concatenate(labels)


def evaluate_split(tuner: Finetuner, state: ClassifierState, table: tables.LabelledTable) -> dict:
    """Loss, :data:`~gemsjax.eval.scores.SCORES` and the confusion matrix on a split."""
    logits, labels = tuner.predict(state, table)
    log_probs = jax.nn.log_softmax(jnp.asarray(logits), axis=1)
    loss = float(-np.take_along_axis(np.asarray(log_probs), labels[:, None], 1).mean())
    preds = logits.argmax(axis=1)
    matrix = scores.confusion(labels, preds, tuner.num_labels)
    return dict(loss=loss, **scores.scores_from_confusion(matrix), confusion=matrix.tolist())


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Updates per epoch (the last partial batch is dropped); at least one batch must fit."""
    if rows < batch_size:
        raise UserError(
            f"{rows} training rows make no whole batch of {batch_size}; lower the batch size"
        )
    return rows // batch_size


def train_run(
    tuner: Finetuner, state: ClassifierState, train_iter, steps: int
) -> tuple[ClassifierState, list[float]]:
    """``steps`` updates from ``train_iter``; returns the state and the loss of every step
    (fetched one step late, so the device never waits)."""
    losses, pending = [], None
    for _ in range(steps):
        state, out = tuner.step(state, next(train_iter))
        if pending is not None:
            losses.append(float(pending))
        pending = out["loss"]
    if pending is not None:
        losses.append(float(pending))
    return state, losses


def finetune(
    tuner: Finetuner,
    train: tables.LabelledTable,
    dev: tables.LabelledTable | None,
    test: tables.LabelledTable,
    workdir: str | pathlib.Path,
    *,
    encoder_params: Any = _OWN,
    checkpoint_every: int = 500,
    log_every: int = 50,
    sigterm=None,
    facts: Mapping[str, Any] | None = None,
) -> dict:
    """Fine-tune with checkpoints in ``workdir`` (resumed when present); returns a summary.

    ``encoder_params`` as in :meth:`Finetuner.init` (another arm of the same shapes); ``facts``
    (JSON values: task, init source, ...) go into every checkpoint's metadata with what
    ``--mode=export`` needs to rebuild the classifier (:meth:`Finetuner.meta`).

    The dev split (when given) is evaluated after every epoch and its loss ranks the
    checkpoints; the test split is scored with the best-dev-loss state (the last state without
    a dev split). Keys: ``test`` (loss, scores, confusion), ``dev_history`` (per epoch),
    ``train_losses`` (this process's run), ``best_step``, ``stopped``, ``seconds``.
    """
    workdir = pathlib.Path(workdir)
    per_epoch = steps_per_epoch(len(train), tuner.hyper.batch_size)
    total = per_epoch * tuner.hyper.epochs
    if total != tuner.total_steps:
        raise ValueError(
            f"the Finetuner was built for {tuner.total_steps} updates, this run has {total}"
        )
    train_iter = tuner.train_batches(train, tuner.hyper.seed, tuner.hyper.epochs)
    manager = checkpoint.make_manager(
        remote.checkpoint_dir(workdir),
        save_every=checkpoint_every,
        keep_last=1,
        keep_best=1,
    )
    history_path = workdir / "dev_history.jsonl"
    started = time.perf_counter()
    stopped, losses = None, []
    writer = None
    try:
        restored = checkpoint.restore_latest(manager, tuner.abstract_state, train_iter)
        state = tuner.init(tuner.hyper.seed, encoder_params) if restored is None else restored.state
        step = int(state.step)
        # Records past the restored step were written by the interrupted run: they go, and the
        # resumed run writes them again (one record per step, as in pretraining).
        writer = _metrics_writer(workdir, tuner, total, log_every, resume_step=step)
        if jax.process_index() == 0:
            metrics.drop_records_after(history_path, step)
        buffer = metrics.MetricsBuffer()
        while step < total:
            state, out = tuner.step(state, next(train_iter))
            done = buffer.push(step, out)
            if done is not None:
                losses.append(done.values["loss"])
            writer.write(done)
            step += 1
            epoch_end = step % per_epoch == 0
            val = None
            if epoch_end and dev is not None:
                writer.write(last := buffer.flush())
                losses.append(last.values["loss"])
                val = evaluate_split(tuner, state, dev)
                writer.write(
                    metrics.StepMetrics(
                        step - 1, {"val_loss": val["loss"], "val_accuracy": val["accuracy"]}, None
                    )
                )
                _append_json(
                    history_path,
                    dict(
                        step=step,
                        epoch=step // per_epoch,
                        **{k: v for k, v in val.items() if k != "confusion"},
                    ),
                )
                buffer.restart_clock()
            if sigterm is not None and checkpoint.stop_requested(manager, step, sigterm):
                stopped = "SIGTERM"
            if checkpoint.save(
                manager,
                step,
                state,
                data_iter=train_iter,
                meta={**tuner.meta(), **(facts or {})},
                metrics={"val_loss": val["loss"]} if val else None,
                force=epoch_end or stopped is not None,
            ):
                writer.sync()
            if stopped:
                break
        if (last := buffer.flush()) is not None:
            writer.write(last)
            losses.append(last.values["loss"])
        checkpoint.wait(manager)
        best_step = manager.best_step() if dev is not None else None
        if stopped is None and best_step is not None and best_step != step:
            state = checkpoint.restore(manager, best_step, tuner.abstract_state).state
        test_scores = None if stopped else evaluate_split(tuner, state, test)
    finally:
        checkpoint.close(manager)
        if writer is not None:
            writer.close()
    history = _read_jsonl(history_path)
    return dict(
        test=test_scores,
        dev_history=history,
        train_losses=losses,
        best_step=best_step if stopped is None else None,
        steps=total,
        stopped=stopped,
        seconds=time.perf_counter() - started,
    )


def _metrics_writer(
    workdir: pathlib.Path, tuner: Finetuner, total: int, log_every: int, *, resume_step: int
) -> metrics.MetricsWriter:
    """The fine-tuning run's ``metrics.jsonl`` / TensorBoard / console writer (model FLOPs from
    the encoder's size and the padded length)."""
    return metrics.MetricsWriter(
        workdir,
        total_steps=total,
        tokens_per_step=tuner.hyper.batch_size * tuner.max_len,
        flops_per_step=tuner.hyper.batch_size
        * 3
        * flops.transformer_forward_flops(
            tuner.encoder.model_cfg.layers,
            tuner.encoder.model_cfg.hidden,
            tuner.encoder.model_cfg.ffn,
            tuner.max_len,
            tuner.max_len,
        ),
        peak_flops=metrics.peak_flops_per_device(),
        console_every=log_every,
        resume_step=resume_step,
    )


def _append_json(path: pathlib.Path, record: dict) -> None:
    if jax.process_index() == 0:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
