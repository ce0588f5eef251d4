"""The training loop, top to bottom: mesh → data → model → shard → step → checkpoint → loop.

``train_and_evaluate(config, workdir)`` is what ``python -m gemsjax.main`` runs. It resumes from
the newest readable checkpoint in ``workdir`` (model, optimizer, curriculum state, step, data
iterator and rank table together), stops cleanly on SIGTERM (saves, returns) and on a NaN/Inf
loss (raises, leaving the last good checkpoint intact).
"""

from __future__ import annotations

import itertools
import logging
import pathlib
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gemsjax import config as config_lib
from gemsjax import curriculum as curriculum_lib
from gemsjax import masking, pmi
from gemsjax.data import pipelines, samples
from gemsjax.models import registry
from gemsjax.train import checkpoint, metrics, optim, sharding
from gemsjax.train.step import Task, TrainState, head_slots, make_eval_step, make_train_step
from gemsjax.vocab import get_vocab

_log = logging.getLogger(__name__)


def say(message: str) -> None:
    """Print a line on process 0 only."""
    if jax.process_index() == 0:
        print(message, flush=True)


def compute_dtype(name: str, platform: str | None = None) -> Any:
    """``auto``: bfloat16 on GPU/TPU, float32 on CPU (where bf16 matmuls are slow); ``platform``
    is the one the step is compiled for (default: ``jax.default_backend()``)."""
    if name == "auto":
        return jnp.float32 if (platform or jax.default_backend()) == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def make_curriculum(config: ml_collections.ConfigDict) -> curriculum_lib.Curriculum:
    """The masking curriculum named by ``config.masking``."""
    m = config.masking
    mask_kwargs = dict(random_span_prob=m.random_span_prob, genemask_prob=m.genemask_prob,
                       global_pmi_prob=m.global_pmi_prob, mae_ratio=m.mae_ratio,
                       reference_code_compat=m.reference_code_compat or False)
    kwargs = dict(per_example=m.per_example, **mask_kwargs)
    if m.curriculum == "cm_gems":
        return curriculum_lib.cm_gems(m.threshold, **kwargs)
    if m.curriculum == "cm_step":
        return curriculum_lib.cm_step(config.train.steps, **kwargs)
    if m.curriculum == "constant":
        return curriculum_lib.constant(m.strategy, **kwargs)
    raise ValueError(f"config.masking.curriculum={m.curriculum!r}; expected cm_gems, cm_step or "
                     "constant")


def load_rank_table(config: ml_collections.ConfigDict, vocab) -> np.ndarray:
    """``int32[vocab.size]`` PMI ranks: the published GeneMask table (``genemask``), counted from
    the training genome (``fasta``), or a rank-table file written by ``--mode=pmi``."""
    source = config.masking.rank_table
    if vocab.name != "dnabert":  # barcode runs never use PMI ranks
        return np.full(vocab.size, 4**vocab.k, np.int32)
    if source == "genemask":
        return pmi.load_genemask_ranks(samples.sample_path(samples.GENEMASK_RANKS), vocab)
    if source == "fasta":
        counts = pmi.count_kmers(pipelines.fasta_paths(config.data.fasta), max_n=vocab.k)
        return pmi.rank_table(counts, k=vocab.k, vocab=vocab)
    table, table_vocab, _ = pmi.load_rank_table(source)
    if table_vocab != vocab:
        raise ValueError(f"config.masking.rank_table={source!r} is for the {table_vocab.name} "
                         f"k={table_vocab.k} vocab; this run uses {vocab.name} k={vocab.k}")
    return table


def _model_config(config: ml_collections.ConfigDict) -> registry.BertConfig:
    overrides = {}
    if config.model.dropout >= 0:
        overrides = dict(dropout=config.model.dropout, attn_dropout=config.model.dropout)
    return registry.get_model_config(config.model.name, **overrides)


def _flops_per_step(model_cfg, task: Task, batch: int, seq_len: int) -> float:
    """Model FLOPs of one optimizer step (see gemsjax.train.metrics for the formulas)."""
    if task.kind == "mae":
        return batch * metrics.mae_train_flops(
            model_cfg.layers, model_cfg.hidden, model_cfg.ffn, model_cfg.decoder_layers,
            model_cfg.num_classes, seq_len, task.num_visible)
    head_len = None if task.head_fraction is None else head_slots(task, seq_len)
    return batch * metrics.bert_train_flops(model_cfg.layers, model_cfg.hidden, model_cfg.ffn,
                                            model_cfg.vocab_size, seq_len, head_len)


def _scalar_metrics(device_metrics: dict) -> dict:
    """Split the per-strategy mix vector into ``mix/<strategy>`` scalars (device arrays)."""
    out = {k: v for k, v in device_metrics.items() if k != "strategy_mix"}
    mix = device_metrics["strategy_mix"]
    for index, name in enumerate(masking.STRATEGIES):
        out[f"mix/{name}"] = mix[index]
    return out


def evaluate(eval_step, state: TrainState, val_batches: list, rank_table) -> dict[str, float]:
    """Masked-LM loss, perplexity and masked accuracy over the fixed validation batches."""
    totals = [eval_step(state, batch, rank_table, jnp.int32(i))
              for i, batch in enumerate(val_batches)]
    sums = jax.device_get(jax.tree.map(lambda *xs: sum(xs), *totals))
    loss = float(sums["loss_sum"] / max(sums["count"], 1.0))
    return {"val_loss": loss, "val_perplexity": float(np.exp(loss)),
            "val_masked_accuracy": float(sums["correct"] / max(sums["count"], 1.0))}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); returns a summary."""
    config_lib.check_config(config)
    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(config.train.mesh_data, config.train.mesh_fsdp)
    with jax.set_mesh(mesh), checkpoint.sigterm_watch() as sigterm:
        return _train(config, pathlib.Path(workdir), mesh, sigterm)


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh,
           sigterm: threading.Event) -> dict:
    # Data: raw token batches; masks are made in the step.
    vocab = get_vocab("barcodebert" if config.data.kind == "barcode" else "dnabert", 6)
    train_iter = pipelines.make_pretraining_iterator(config, "train")
    val_batches = [sharding.shard_batch(b, mesh) for b in itertools.islice(
        pipelines.make_pretraining_iterator(config, "validation"), config.train.eval_batches)]
    if not val_batches:
        raise ValueError("the validation split is empty; use more data or a smaller "
                         "config.data.batch_size")

    # Model, optimizer and the static description of the step.
    model_cfg = _model_config(config)
    if model_cfg.vocab_size < vocab.size:
        raise ValueError(f"model {config.model.name!r} has vocab_size {model_cfg.vocab_size} < "
                         f"{vocab.size} ids of the {vocab.name} vocab")
    dtype = compute_dtype(config.model.compute_dtype)
    tx, lr_schedule = optim.make_optimizer(config.optimizer, config.train.steps)
    cur = make_curriculum(config)
    m = config.masking
    mae = model_cfg.arch != "mlm"
    task = Task(kind="mae" if mae else "mlm", vocab=vocab, curriculum=cur, seed=config.seed,
                grad_accum=config.train.grad_accum, mask_frac=m.mask_frac,
                random_frac=m.random_frac, random_low=m.random_low, loss_on=m.loss_on,
                num_visible=masking.visible_len(config.data.max_len, m.mae_ratio) if mae else None,
                head_fraction=config.train.head_fraction or None)

    def build():
        return registry.build_model(model_cfg, nnx.Rngs(config.seed), dtype=dtype)

    def init() -> TrainState:
        _, params = nnx.split(build(), nnx.Param)
        return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                          curriculum=cur.init())

    abstract_model = nnx.eval_shape(build)
    abstract_model.eval()
    eval_graphdef, _ = nnx.split(abstract_model, nnx.Param)
    abstract_model.train()
    train_graphdef, _ = nnx.split(abstract_model, nnx.Param)
    abstract_state = nnx.eval_shape(init)
    state_sh = sharding.state_shardings(abstract_state, mesh)
    repl = sharding.replicated(mesh)

    # Resume (state, data position, rank table) or start fresh.
    manager = checkpoint.make_manager(str((workdir / "checkpoints").resolve()),
                                      save_every=config.train.checkpoint_every,
                                      keep_last=config.train.keep_checkpoints)
    restored = checkpoint.restore_latest(manager, sharding.with_shardings(abstract_state, state_sh),
                                         train_iter)
    if restored is None:
        state = jax.jit(init, out_shardings=state_sh)()
        rank_table = load_rank_table(config, vocab)
        say(f"gemsjax: new run in {workdir}")
    else:
        state, rank_table = restored.state, restored.rank_table
        say(f"gemsjax: resumed {workdir} at step {restored.step}")
    rank_table_dev = jax.device_put(jnp.asarray(rank_table, jnp.int32), repl)
    meta = checkpoint.run_metadata(config)

    batch_sh = sharding.batch_sharding(mesh)
    train_step = jax.jit(make_train_step(task, train_graphdef, tx, lr_schedule),
                         in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
                         donate_argnums=0)
    eval_step = jax.jit(make_eval_step(task, eval_graphdef),
                        in_shardings=(state_sh, batch_sh, repl, repl), out_shardings=repl)
    update_curriculum = jax.jit(cur.update, out_shardings=repl)

    batch_size, seq_len = config.data.batch_size, config.data.max_len
    writer = metrics.MetricsWriter(
        workdir, total_steps=config.train.steps, tokens_per_step=batch_size * seq_len,
        flops_per_step=_flops_per_step(model_cfg, task, batch_size, seq_len),
        peak_flops=metrics.peak_flops_per_device(), console_every=config.train.log_every)
    buffer = metrics.MetricsBuffer()
    step = int(state.step)
    val: dict[str, float] = {}
    started, first_step = time.perf_counter(), step
    stopped = None
    try:
        while step < config.train.steps:
            batch = sharding.shard_batch(next(train_iter), mesh)
            state, device_metrics = train_step(state, batch, rank_table_dev)
            writer.write(buffer.push(step, _scalar_metrics(device_metrics)))
            step += 1
            is_last = step == config.train.steps
            evaluated = step % config.train.eval_every == 0 or is_last
            stopped = "SIGTERM" if checkpoint.stop_requested(manager, step, sigterm) else None
            force = is_last or stopped is not None
            if evaluated or force or manager.should_save(step):
                writer.write(buffer.flush())  # a NaN step raises here, before it is saved
            if evaluated:
                val = evaluate(eval_step, state, val_batches, rank_table_dev)
                state = state._replace(curriculum=update_curriculum(state.curriculum,
                                                                    val["val_perplexity"]))
                writer.write(metrics.StepMetrics(step - 1, val, None))
            checkpoint.save(manager, step, state, data_iter=train_iter, rank_table=rank_table,
                            meta=meta, metrics={"val_loss": val["val_loss"]} if evaluated else None,
                            force=force)
            if evaluated:
                buffer.restart_clock()
            if stopped:
                say(f"gemsjax: {stopped} received; saved step {step} in {workdir} and stopped "
                    "(run the same command to resume)")
                break
        writer.write(buffer.flush())
    finally:
        checkpoint.close(manager)
        writer.close()
    summary = dict(step=step, steps=config.train.steps, stopped=stopped,
                   seconds=time.perf_counter() - started, steps_this_run=step - first_step,
                   switched=bool(state.curriculum.switched), **val)
    return summary
