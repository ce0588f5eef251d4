"""Benchmark: BarcodeMAE (encoder on the visible tokens only) vs the same encoder-decoder run
BERT-style on full sequences ([MASK] fed to the encoder), both through the real train step.

Both models are the ``barcode_mae`` / ``barcode_mae_baseline`` sizes of
``gemsjax.models.sizes`` (6 + 6 layers x 768, 4096 k-mer classes, dropout 0.1) with identical
parameters shapes; the batch is the first ``--batch`` BOLD COI barcodes of the shipped sample,
110 non-overlapping 6-mers each. Each is trained with ``gemsjax.train.step.make_train_step``
under ``jax.jit``, built from ``configs/barcode_mae.py`` by the loop's builder (exactly half of
each barcode's maskable tokens dropped, ``masking.mae_drop_fixed``, inside the step; AdamW
one-cycle over 10K steps), timed to completion (``jax.block_until_ready``). The two take
turns (``benchutil.interleaved_medians``: each round, each contender one untimed step then
``--steps`` timed ones), so drift in the load of a shared machine hits both alike; medians are
reported with the speed-up of the visible-only encoder and the ratio of model FLOPs
(``gemsjax.models.flops.train_flops``: encoder over ``num_visible(110) = 71`` slots vs all 110
positions; both decoders run their last block and classifier on the 55 masked slots).

Run: ``python benchmarks/bench_mae.py`` (``--batch``, ``--rounds``, ``--steps``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp
from benchutil import barcode_batch, interleaved_medians, machine_info
from flax import nnx

from gemsjax import config as config_lib
from gemsjax.models import flops, registry
from gemsjax.train import optim
from gemsjax.train import spec as spec_lib
from gemsjax.train.step import init_train_state, make_train_step, step_graphdefs


def recipe(size: str, batch_size: int):
    """The BarcodeMAE recipe for model ``size``: ``batch_size`` rows, a 10K-step one-cycle."""
    return config_lib.load(
        f"barcode_mae:{size}", {"data.batch_size": str(batch_size), "train.steps": "10000"}
    )


def mae_runner(size: str, batch: dict) -> tuple[Callable[[int], None], dict]:
    """``(run, box)``: ``run(i)`` takes one jitted train step of MAE model ``size`` on ``batch``
    and waits for it; ``box["metrics"]`` holds the last step's metrics."""
    config = recipe(size, batch["ids"].shape[0])
    spec = spec_lib.step_spec(config)
    tx, lr_schedule = optim.make_optimizer(config.optimizer, config.train.steps)
    model = registry.build_model(spec_lib.model_config(config), nnx.Rngs(config.seed))
    box = {"state": init_train_state(model, tx, spec)}
    graphdef, _ = step_graphdefs(model)
    step = jax.jit(make_train_step(spec, graphdef, tx, lr_schedule), donate_argnums=0)

    def run(_):
        box["state"], box["metrics"] = step(box["state"], batch, None)
        jax.block_until_ready(box)

    return run, box


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    host = barcode_batch(args.batch)
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    length = host["ids"].shape[1]
    spec = spec_lib.step_spec(recipe("barcode_mae", args.batch))
    visible, head = spec.num_visible(length), spec.head_slots(length)
    print(machine_info())
    print(
        f"batch {args.batch} x {length} barcode tokens ({host['attention'].sum(1).mean():.0f} "
        f"real per row), mask ratio {spec.masking.mae_ratio}, encoder slots {visible}, decoder "
        f"head slots {head}; medians "
        f"over {args.rounds} rounds of turns (1 untimed + {args.steps} timed steps each); float32"
    )
    (run_mae, box_mae), (run_base, box_base) = (
        mae_runner(size, batch) for size in ("barcode_mae", "barcode_mae_baseline")
    )
    times = interleaved_medians({"mae": run_mae, "base": run_base}, args.rounds, args.steps)
    t_mae, t_base = times["mae"], times["base"]
    out_mae, out_base = (jax.device_get(box["metrics"]) for box in (box_mae, box_base))
    sizes = (registry.get_model_config(s) for s in ("barcode_mae", "barcode_mae_baseline"))
    f_mae, f_base = (
        flops.train_flops(size, length, head_len=head, visible_len=slots)
        for size, slots in zip(sizes, (visible, length), strict=True)
    )
    tokens = host["ids"].size
    for name, t, out, f in (
        ("barcode_mae (visible-only encoder)", t_mae, out_mae, f_mae),
        ("baseline ([MASK] in the encoder)", t_base, out_base, f_base),
    ):
        print(
            f"{name:<36} {t:.3f} s/step {tokens / t:,.0f} tok/s, {f / 1e9:.1f} GFLOP/seq, "
            f"loss {out['loss']:.3f}, mask rate {out['mask_rate']:.3f}"
        )
    print(
        f"speed-up of the visible-only encoder: {t_base / t_mae:.2f}x (model FLOPs ratio "
        f"{f_base / f_mae:.2f}x)"
    )


if __name__ == "__main__":
    main()
