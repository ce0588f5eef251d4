"""Benchmark: BarcodeMAE (encoder on the visible tokens only) vs the same encoder-decoder run
BERT-style on full sequences ([MASK] fed to the encoder), both through the real train step.

Both models are the ``barcode_mae`` / ``barcode_mae_baseline`` sizes of
``gemsjax.models.registry`` (6 + 6 layers x 768, 4096 k-mer classes, dropout 0.1) with identical
parameters shapes; the batch is the first ``--batch`` BOLD COI barcodes of the shipped sample,
110 non-overlapping 6-mers each. Each is trained with ``gemsjax.train.step.make_train_step``
under ``jax.jit`` (BarcodeMAE recipe: exactly half of each barcode's maskable tokens dropped,
``masking.mae_drop_fixed``, inside the step; AdamW one-cycle), ``--warmup`` untimed steps then
``--steps`` timed ones (``jax.block_until_ready``); medians are reported with the speed-up of the
visible-only encoder and the ratio of model FLOPs (``gemsjax.train.metrics.mae_train_flops``:
encoder over ``visible_len(110, 0.5) = 55`` slots vs all 110 positions).

Run: ``python benchmarks/bench_mae.py`` (``--batch``, ``--steps``, ``--warmup``).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from benchutil import barcode_batch, machine_info, median_seconds
from flax import nnx

from gemsjax import curriculum, masking
from gemsjax.models import registry
from gemsjax.train import metrics, optim
from gemsjax.train.step import Task, TrainState, make_train_step
from gemsjax.vocab import get_vocab

MASK_RATIO = 0.5
MAX_STEPS = 10_000


def time_mae(size: str, batch: dict, warmup: int, steps: int) -> tuple[float, dict]:
    """Median seconds of the jitted train step of MAE model ``size`` on ``batch``."""
    vocab = get_vocab("barcodebert", 6)
    length = batch["ids"].shape[1]
    task = Task(kind="mae", vocab=vocab,
                curriculum=curriculum.constant("mae_drop", mae_ratio=MASK_RATIO),
                mask_frac=1.0, random_frac=0.0,
                num_visible=masking.visible_len(length, MASK_RATIO))
    tx, lr_schedule = optim.make_optimizer(
        optim.barcode_mae_config(total_batch=batch["ids"].shape[0]), MAX_STEPS)
    model = registry.build_model(registry.get_model_config(size), nnx.Rngs(0))
    model.train()
    graphdef, params = nnx.split(model, nnx.Param)
    box = {"state": TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                               curriculum=task.curriculum.init())}
    step = jax.jit(make_train_step(task, graphdef, tx, lr_schedule), donate_argnums=0)

    def run(_):
        box["state"], box["metrics"] = step(box["state"], batch, None)
        jax.block_until_ready(box)

    seconds = median_seconds(run, steps, warmup)
    return seconds, jax.device_get(box["metrics"])


def model_flops(size: str, length: int, visible: int) -> float:
    """Training FLOPs per sequence (module docstring of ``gemsjax.train.metrics``)."""
    c = registry.get_model_config(size)
    return metrics.mae_train_flops(c.layers, c.hidden, c.ffn, c.decoder_layers, c.num_classes,
                                   length, visible)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    host = barcode_batch(args.batch)
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    length = host["ids"].shape[1]
    visible = masking.visible_len(length, MASK_RATIO)
    print(machine_info())
    print(f"batch {args.batch} x {length} barcode tokens ({host['attention'].sum(1).mean():.0f} "
          f"real per row), mask ratio {MASK_RATIO}, encoder slots {visible}; medians of "
          f"{args.steps} steps after {args.warmup} warm-up steps; float32")
    t_mae, out_mae = time_mae("barcode_mae", batch, args.warmup, args.steps)
    t_base, out_base = time_mae("barcode_mae_baseline", batch, args.warmup, args.steps)
    f_mae = model_flops("barcode_mae", length, visible)
    f_base = model_flops("barcode_mae_baseline", length, length)
    tokens = host["ids"].size
    for name, t, out, f in (("barcode_mae (visible-only encoder)", t_mae, out_mae, f_mae),
                            ("baseline ([MASK] in the encoder)", t_base, out_base, f_base)):
        print(f"{name:<36} {t:.3f} s/step {tokens / t:,.0f} tok/s, {f / 1e9:.1f} GFLOP/seq, "
              f"loss {out['loss']:.3f}, mask rate {out['mask_rate']:.3f}")
    print(f"speed-up of the visible-only encoder: {t_base / t_mae:.2f}x (model FLOPs ratio "
          f"{f_base / f_mae:.2f}x)")


if __name__ == "__main__":
    main()
