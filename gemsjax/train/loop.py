"""The training loop, top to bottom: mesh → data → model → shard → step → checkpoint → loop.

``train_and_evaluate(config, workdir)`` is what ``python -m gemsjax.main`` runs. It resumes from
the newest readable checkpoint in ``workdir`` (model, optimizer, curriculum state, step, data
iterator and rank table together), stops cleanly on SIGTERM (saves, returns) and on a NaN/Inf
loss (raises, leaving the last good checkpoint intact).
"""

from __future__ import annotations

import itertools
import logging
import math
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
from gemsjax import masking, remote
from gemsjax.data import pipelines
from gemsjax.errors import UserError
from gemsjax.models import flops, registry
from gemsjax.train import checkpoint, metrics, optim, run_files, sharding
from gemsjax.train import spec as spec_lib
from gemsjax.train import workdir as workdir_lib
from gemsjax.train.step import (
    TrainState,
    init_train_state,
    make_eval_step,
    make_train_step,
    step_graphdefs,
)

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


def flops_per_step(
    config: ml_collections.ConfigDict,
    batch_size: int,
    *,
    every_position: bool = False,
    shards: int = 1,
) -> float:
    """Model FLOPs of one optimizer step over ``batch_size`` rows (:mod:`gemsjax.models.flops`),
    counting what the step computes: the MLM head on its slots (packed per each of ``shards``
    batch shards with ``train.mlm_pack_share``), the MAE encoder on its visible slots and its
    decoder head on its masked slots. ``every_position``: the step's fallback branch instead
    (head and encoder on all ``data.max_len`` positions; what XLA's cost model charges for the
    ``lax.cond``)."""
    spec, seq_len = spec_lib.step_spec(config), config.data.max_len
    micro = batch_size // config.train.grad_accum
    rows = micro // math.gcd(shards, micro)  # as step.batch_groups groups them
    packed = spec.pack_slots(rows, seq_len)
    return batch_size * flops.train_flops(
        spec_lib.model_config(config),
        seq_len,
        head_len=None if every_position else spec.head_slots(seq_len),
        visible_len=None if every_position else spec.num_visible(seq_len),
        packed_len=None if every_position or packed is None else packed / rows,
    )


def _scalar_metrics(device_metrics: dict) -> dict:
    """Split the per-strategy mix vector into ``mix/<strategy>`` scalars (device arrays)."""
    out = {k: v for k, v in device_metrics.items() if k != "strategy_mix"}
    mix = device_metrics["strategy_mix"]
    for index, name in enumerate(masking.STRATEGIES):
        out[f"mix/{name}"] = mix[index]
    return out


def evaluate(eval_step, state: TrainState, val_batches: list, rank_table) -> dict[str, float]:
    """Masked-LM loss, perplexity and masked accuracy over the fixed validation batches."""
    totals = [
        eval_step(state, batch, rank_table, jnp.int32(i)) for i, batch in enumerate(val_batches)
    ]
    sums = jax.device_get(jax.tree.map(lambda *xs: sum(xs), *totals))
    if sums["count"] == 0:  # exp(0 / 0 -> 0) would read as a perfect perplexity of 1.00
        raise UserError(
            f"the {len(val_batches)} validation batch(es) hold no masked token, so "
            "there is no validation loss; raise the masking probabilities "
            "(config.masking.*_prob), config.data.max_len or "
            "config.train.eval_batches"
        )
    loss = float(sums["loss_sum"] / sums["count"])
    return {
        "val_loss": loss,
        "val_perplexity": float(np.exp(loss)),
        "val_masked_accuracy": float(sums["correct"] / sums["count"]),
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); returns a summary."""
    config_lib.validate(config)
    sharding.maybe_initialize_distributed()
    try:
        mesh = sharding.make_mesh(config.train.mesh_data, config.train.mesh_fsdp)
    except ValueError as err:
        raise UserError(
            f"train.mesh_data={config.train.mesh_data} x train.mesh_fsdp="
            f"{config.train.mesh_fsdp} does not cover the {jax.device_count()} devices ({err}); "
            "set train.mesh_data=-1 (every device fsdp leaves) or a product equal to the "
            "device count"
        ) from None
    sharding.check_batch(
        config.data.batch_size, config.train.grad_accum, mesh.size, f"the mesh {dict(mesh.shape)}"
    )
    with (
        workdir_lib.lock(workdir, enabled=jax.process_index() == 0),
        jax.set_mesh(mesh),
        checkpoint.sigterm_watch() as sigterm,
    ):
        return _train(config, pathlib.Path(workdir), mesh, sigterm)


def _train(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh, sigterm: threading.Event
) -> dict:
    # Data: raw token batches; masks are made in the step.
    train_iter = pipelines.make_pretraining_iterator(config, "train")
    val_batches = [
        sharding.shard_batch(b, mesh)
        for b in itertools.islice(
            pipelines.make_pretraining_iterator(config, "validation"),
            config.train.eval_batches or None,
        )
    ]  # 0: the whole validation split
    if not val_batches:
        raise ValueError(
            "the validation split is empty; use more data or a smaller config.data.batch_size"
        )
    corpus = pipelines.corpus_report(config)  # base counts; warns about U and ambiguity codes

    # Model, optimizer and the static description of the step.
    spec = spec_lib.step_spec(config)
    model_cfg = spec_lib.model_config(config)
    dtype = compute_dtype(config.model.compute_dtype)
    tx, lr_schedule = optim.make_optimizer(config.optimizer, config.train.steps)

    def build():
        return registry.build_model(model_cfg, nnx.Rngs(config.seed), dtype=dtype)

    def init() -> TrainState:
        return init_train_state(build(), tx, spec)

    abstract_model = nnx.eval_shape(build)
    train_graphdef, eval_graphdef = step_graphdefs(abstract_model)
    abstract_state = nnx.eval_shape(init)
    state_sh = sharding.state_shardings(abstract_state, mesh)
    repl = sharding.replicated(mesh)

    # Resume (state, data position, rank table) or start fresh.
    manager = checkpoint.make_manager(
        remote.checkpoint_dir(workdir),
        save_every=config.train.checkpoint_every,
        keep_last=config.train.keep_checkpoints,
    )
    meta = checkpoint.run_metadata(config)
    restored = checkpoint.restore_latest(
        manager,
        sharding.with_shardings(abstract_state, state_sh),
        train_iter,
        check_meta=lambda saved: workdir_lib.check_resume(
            saved, meta["config"], remote.shown(workdir)
        ),
    )
    if restored is None:
        state = jax.jit(init, out_shardings=state_sh)()
        if config.model.init:  # continue from a transformers model (gemsjax.interop.hf)
            from gemsjax.interop import hf

            params = hf.load_params(
                config.model.init.removeprefix("hf:"),
                state.params,
                model_cfg,
                encoder_only=model_cfg.arch != "mlm",
            )
            state = state._replace(params=jax.device_put(params, state_sh.params))
        rank_table = spec_lib.rank_table(config, spec.vocab)
        say(
            f"gemsjax: new run in {workdir}: {config.model.name}, "
            f"{registry.param_count(abstract_model) / 1e6:.2f}M parameters"
        )
    else:
        state, rank_table = restored.state, restored.rank_table
        say(
            f"gemsjax: resumed {workdir} at step {restored.step}"
            + "".join(f" (passed over unreadable {reason})" for reason in restored.skipped)
        )
    if jax.process_index() == 0:  # after the resume check: a refused run keeps the old one
        run_files.write_config(workdir, config)
    rank_table_dev = jax.device_put(jnp.asarray(rank_table, jnp.int32), repl)

    batch_sh = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(spec, train_graphdef, tx, lr_schedule),
        in_shardings=(state_sh, batch_sh, repl),
        out_shardings=(state_sh, repl),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        make_eval_step(spec, eval_graphdef),
        in_shardings=(state_sh, batch_sh, repl, repl),
        out_shardings=repl,
    )
    update_curriculum = jax.jit(spec.curriculum.update, out_shardings=repl)

    batch_size, seq_len = config.data.batch_size, config.data.max_len
    writer = metrics.MetricsWriter(
        workdir,
        total_steps=config.train.steps,
        tokens_per_step=batch_size * seq_len,
        flops_per_step=flops_per_step(config, batch_size, shards=sharding.batch_shards(mesh)),
        peak_flops=metrics.peak_flops_per_device(),
        console_every=config.train.log_every,
        resume_step=int(state.step),
    )
    writer.write_config(config.to_dict())
    buffer = metrics.MetricsBuffer()
    step = int(state.step)
    val: dict[str, float] = {}
    started, first_step = time.perf_counter(), step
    stopped = None
    switched = bool(state.curriculum.switched)
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
                state = state._replace(
                    curriculum=update_curriculum(state.curriculum, val["val_perplexity"], step)
                )
                writer.write(metrics.StepMetrics(step - 1, val, None))
                if not switched and (switched := bool(state.curriculum.switched)):
                    say(
                        f"gemsjax: curriculum switched after the validation at step {step} "
                        f"(perplexity plateau); Global-PMI masking from step {step + 1}"
                    )
            if checkpoint.save(
                manager,
                step,
                state,
                data_iter=train_iter,
                rank_table=rank_table,
                meta=meta,
                metrics={"val_loss": val["val_loss"]} if evaluated else None,
                force=force,
            ):
                writer.sync()
            if evaluated:
                buffer.restart_clock()
            if stopped:
                say(
                    f"gemsjax: {stopped} received; saved step {step} in "
                    f"{remote.shown(workdir)} and stopped "
                    "(run the same command to resume)"
                )
                break
        writer.write(buffer.flush())
    finally:
        checkpoint.close(manager)
        writer.close()
    summary = dict(
        step=step,
        steps=config.train.steps,
        stopped=stopped,
        seconds=time.perf_counter() - started,
        steps_this_run=step - first_step,
        switched=bool(state.curriculum.switched),
        switch_step=int(state.curriculum.switch_step) if state.curriculum.switched else None,
        corpus=corpus,
        **val,
    )
    return summary
