"""Fidelity gap 5: how noisy is the validation perplexity that CM-GEMS's plateau switch reads?

The switch compares consecutive validation perplexities against a threshold (``:paper``: 1.0,
absolute). gemsjax validates on ``train.eval_batches`` batches (0: the whole validation split),
with masks drawn from a key that changes at every validation (``make_eval_step``). This script
takes one checkpoint of a genome run and evaluates it with ``--keys`` different mask keys, once
on ``--batches`` batches and once on the whole split, so that the spread of the perplexity comes
from the masks alone (the model is fixed)::

    python reproduce/val_noise.py runs/cm_gems-<time> [--batches=20] [--keys=10]

It prints one JSON line per setting: batches, masked tokens, perplexity mean and sample std.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gemsjax.data import pipelines
from gemsjax.models import registry
from gemsjax.train import checkpoint, loop, optim, sharding
from gemsjax.train import spec as spec_lib
from gemsjax.train.step import init_train_state, make_eval_step, step_graphdefs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=pathlib.Path)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--keys", type=int, default=10)
    args = parser.parse_args()
    steps = sorted(int(p.name) for p in (args.run / "checkpoints").iterdir() if p.name.isdigit())
    config = ml_collections.ConfigDict(
        checkpoint.read_meta(args.run / "checkpoints" / str(steps[-1]))["config"]
    )
    mesh = sharding.make_mesh()
    spec = spec_lib.step_spec(config)
    tx, _ = optim.make_optimizer(config.optimizer, config.train.steps)
    dtype = loop.compute_dtype(config.model.compute_dtype)

    def build():
        return registry.build_model(spec_lib.model_config(config), nnx.Rngs(0), dtype=dtype)

    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: init_train_state(build(), tx, spec))
        state_sh = sharding.state_shardings(abstract, mesh)
        manager = checkpoint.make_manager(
            str((args.run / "checkpoints").resolve()), save_every=config.train.checkpoint_every
        )
        restored = checkpoint.restore_latest(manager, sharding.with_shardings(abstract, state_sh))
        checkpoint.close(manager)
        _, eval_graphdef = step_graphdefs(nnx.eval_shape(build))
        eval_step = jax.jit(make_eval_step(spec, eval_graphdef))
        ranks = jnp.asarray(restored.rank_table, jnp.int32)
        everything = [
            sharding.shard_batch(b, mesh)
            for b in pipelines.make_pretraining_iterator(config, "validation")
        ]
        for count in (args.batches, len(everything)):
            batches = list(itertools.islice(everything, count))
            ppl, masked = [], 0
            for key in range(args.keys):  # another validation step: other masks, same model
                state = restored.state._replace(step=jnp.int32(restored.step + key))
                sums = [eval_step(state, b, ranks, jnp.int32(i)) for i, b in enumerate(batches)]
                total = jax.device_get(jax.tree.map(lambda *xs: sum(xs), *sums))
                ppl.append(float(np.exp(total["loss_sum"] / total["count"])))
                masked = int(total["count"])
            print(
                json.dumps(
                    dict(
                        run=str(args.run),
                        step=restored.step,
                        batches=len(batches),
                        rows_per_batch=config.data.batch_size,
                        masked_tokens=masked,
                        keys=args.keys,
                        perplexity_mean=float(np.mean(ppl)),
                        perplexity_std=float(np.std(ppl, ddof=1)),
                    )
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
