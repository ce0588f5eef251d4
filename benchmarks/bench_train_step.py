"""Benchmark: the jitted gemsjax MLM train step vs Hugging Face ``BertForMaskedLM`` in PyTorch.

Both sides train the same model (``logo`` and ``dnabert6`` from ``gemsjax.models.sizes``:
vocabulary 4101, the size's hidden / layers / heads / FFN / 512 positions / dropout, exact GELU,
LayerNorm eps 1e-12) on the same batch of real tokens (consecutive 510-bp chunks of the shipped
chr22 sample, N deleted, DNABERT 6-mers: CLS + 505 tokens + SEP + padding to 512) on the CPU,
with AdamW (lr 8e-4 warm-up/linear schedule, betas 0.9/0.98, eps 1e-6, weight decay 0.01 off
biases and LayerNorm, gradient clipping 1.0: the CM-GEMS recipe) in float32.

- ``jax``: the real ``gemsjax.train.step.make_train_step`` under ``jax.jit`` (state donated),
  built from ``configs/cm_gems.py:paper`` (one micro-batch of ``--logo-batch`` /
  ``--dnabert-batch`` rows) by the loop's builder (``gemsjax.train.spec.step_spec``): CM-GEMS
  masking (GeneMask phase) and 80/10/10 corruption made inside the step from the raw batch,
  forward, backward and the optax update; timed twice, with the output head on every position
  (``StepSpec.mlm_head_share=None``, what torch does) and on the masked positions only
  (``--mlm-head-share``, same results).
- ``torch``: ``model(input_ids, attention_mask, labels)`` (labels -100 off the mask), backward,
  ``clip_grad_norm_``, ``torch.optim.AdamW.step``, scheduler step, ``zero_grad``. Its masked
  batches are precomputed (with gemsjax's GeneMask + corruption, so the masking statistics
  match): torch is given the advantage of no masking cost. Contenders: stock, the head on the
  masked tokens only, head and last layer on them (:func:`torch_gathered_loss`), and the last
  with ``torch.compile`` on its fixed-shape layers (:func:`compile_fixed_shape_layers`;
  ``--no-torch-compile`` skips it).

The contenders take turns (``benchutil.interleaved_turns``): ``--rounds`` rounds, in each of
which every contender runs one untimed step (compilation in the first round, cache warm-up after
the others' turns) and ``--steps`` timed steps, each waited for (``jax.block_until_ready``;
torch is synchronous on CPU), so a change in the machine's load hits all of them alike. Medians
are reported as tokens/s (padded tokens, B x L) with the jax/torch ratio, and for each jax
contender its ratio to the fastest torch contender per round (``benchutil.round_ratios``: the
median and range over rounds; neighbouring turns share the machine's state, so these hold when
the shared VM's speed drifts between rounds). Threads: JAX's CPU client uses all cores (its
default); torch gets ``torch.set_num_threads(os.cpu_count())``. Both run on the allocator that
``python -m gemsjax.main`` sets up (:func:`gemsjax.host_memory.keep_freed_memory`: freed memory
reused rather than mapped afresh every step; ``GEMSJAX_KEEP_FREED_MEMORY=0`` for glibc's
defaults).

Also measured for ``logo`` (``--share``): the share of the step spent on masking and corruption,
i.e. the step's own ``masked_batch`` (special positions, curriculum draw, mask, corruption) jitted
alone on the same batch, over the median step time (masked-token head, the default), in both
CM-GEMS phases (GeneMask, Global-PMI).

Run: ``python benchmarks/bench_train_step.py`` (``--sizes``, ``--logo-batch``, ``--dnabert-batch``,
``--rounds``, ``--steps`` to change the defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from benchutil import (
    call_medians,
    genome_batch,
    interleaved_turns,
    machine_info,
    median_seconds,
    round_ratios,
)
from flax import nnx

from gemsjax import config as config_lib
from gemsjax import host_memory, masking
from gemsjax.models import registry
from gemsjax.train import optim
from gemsjax.train import spec as spec_lib
from gemsjax.train.step import init_train_state, make_train_step, masked_batch, step_graphdefs
from gemsjax.vocab import get_vocab

VOCAB = get_vocab("dnabert", 6)


def recipe(size: str, batch_size: int):
    """CM-GEMS as the paper trains it (10K steps, warm-up 500: the timed steps sit in the
    warm-up) for model ``size``, one micro-batch of ``batch_size`` rows per step."""
    return config_lib.load(
        f"cm_gems:paper,{size}", {"data.batch_size": str(batch_size), "train.grad_accum": "1"}
    )


def jax_train_step(
    config, mlm_head_share: float | None = None, mlm_pack_share: float | None = None
):
    """``(jitted step, initial TrainState, StepSpec)`` for ``config``, as the train loop builds
    them on one device, with the given masked-token slots."""
    spec = dataclasses.replace(
        spec_lib.step_spec(config), mlm_head_share=mlm_head_share, mlm_pack_share=mlm_pack_share
    )
    tx, lr_schedule = optim.make_optimizer(config.optimizer, config.train.steps)
    model = registry.build_model(spec_lib.model_config(config), nnx.Rngs(config.seed))
    state = init_train_state(model, tx, spec)
    graphdef, _ = step_graphdefs(model)
    step = jax.jit(make_train_step(spec, graphdef, tx, lr_schedule), donate_argnums=0)
    return step, state, spec


def jax_runner(
    config, batch: dict, rank_table, switched: bool = False, slots: tuple = (None, None)
) -> tuple[Callable[[int], None], dict]:
    """``(run, box)``: ``run(i)`` does one jax train step and waits for it (CM-GEMS phase:
    Global-PMI when ``switched``; ``slots``: ``(mlm_head_share, mlm_pack_share)``);
    ``box["metrics"]`` holds the last step's metrics."""
    step, state, _ = jax_train_step(config, *slots)
    state = state._replace(curriculum=state.curriculum._replace(switched=jnp.bool_(switched)))
    box = {"state": state}

    def run(_):
        box["state"], out = step(box["state"], batch, rank_table)
        jax.block_until_ready((box["state"], out))
        box["metrics"] = out

    return run, box


def torch_model(config) -> transformers.BertForMaskedLM:
    """Hugging Face ``BertForMaskedLM`` with the model configuration of ``config``."""
    c = spec_lib.model_config(config)
    config = transformers.BertConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        intermediate_size=c.ffn,
        hidden_act="gelu",
        hidden_dropout_prob=c.dropout,
        attention_probs_dropout_prob=c.attn_dropout,
        max_position_embeddings=c.max_positions,
        type_vocab_size=c.type_vocab,
        layer_norm_eps=c.ln_eps,
    )
    return transformers.BertForMaskedLM(config).train()


def torch_batches(batch: dict, rank_table, count: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` masked batches ``(input_ids, attention_mask, labels)``: gemsjax GeneMask +
    80/10/10 corruption of the same token batch with different keys, labels -100 off the mask."""
    ids, attention = jnp.asarray(batch["ids"]), jnp.asarray(batch["attention"])
    special = masking.special_mask(ids, range(VOCAB.num_specials)) | (attention == 0)
    out = []
    for i in range(count):
        mask_key, corrupt_key = jax.random.split(jax.random.key(i))
        mask = masking.genemask(mask_key, ids, special, rank_table)
        inputs, _, _ = masking.corrupt(corrupt_key, ids, mask, VOCAB.size, VOCAB.mask_id)
        labels = jnp.where(mask, ids, -100)
        out.append(
            tuple(
                torch.as_tensor(np.array(x), dtype=torch.long) for x in (inputs, attention, labels)
            )
        )
    return out


def _last_layer_on_rows(layer, rows: torch.Tensor, hidden: torch.Tensor, bias: torch.Tensor):
    """A ``transformers`` ``BertLayer`` computed for the query ``rows`` ``[B, S, H]`` only,
    attending to every position of ``hidden`` ``[B, L, H]`` (``bias``: additive key mask
    ``[B, 1, 1, L]``): what a competent user writes to skip the unmasked rows' last layer."""
    sa = layer.attention.self
    heads, size = sa.num_attention_heads, sa.attention_head_size
    split = lambda x: x.view(*x.shape[:2], heads, size).transpose(1, 2)
    context = torch.nn.functional.scaled_dot_product_attention(
        split(sa.query(rows)),
        split(sa.key(hidden)),
        split(sa.value(hidden)),
        attn_mask=bias,
        dropout_p=sa.dropout.p if sa.training else 0.0,
    )
    attended = layer.attention.output(context.transpose(1, 2).flatten(2), rows)
    return layer.output(layer.intermediate(attended), attended)


def torch_gathered_loss(model: transformers.BertForMaskedLM, last_layer: bool) -> Callable:
    """``loss(inputs, attention, labels)`` of ``model`` with the MLM head on the masked tokens
    only (``labels != -100``, gathered before the head), and with ``last_layer`` also the last
    encoder layer on the masked rows only (queries gathered per row into ``max count`` slots;
    keys and values from every position). Same loss as ``model(..., labels=labels).loss``."""
    bert = model.bert

    def loss(inputs, attention, labels):
        bias = (1.0 - attention[:, None, None, :].float()) * torch.finfo(torch.float32).min
        hidden = bert.embeddings(input_ids=inputs)
        layers = bert.encoder.layer
        for layer in layers[:-1] if last_layer else layers:
            hidden = layer(hidden, attention_mask=bias)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        masked = labels != -100
        if last_layer:
            counts = masked.sum(1)
            order = torch.argsort((~masked).to(torch.int8), dim=1, stable=True)[:, : counts.max()]
            rows = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
            valid = torch.arange(order.shape[1])[None] < counts[:, None]
            out = _last_layer_on_rows(layers[-1], rows, hidden, bias)
            tokens, targets = out[valid], labels.gather(1, order)[valid]
        else:
            tokens, targets = hidden[masked], labels[masked]
        return torch.nn.functional.cross_entropy(model.cls(tokens), targets)

    return loss


def check_gathered_losses(config, batch: dict, rank_table) -> float:
    """The gathered contenders' loss equals stock ``BertForMaskedLM``'s on a masked batch
    (dropout off); returns the largest difference (asserted < 1e-4)."""
    torch.manual_seed(0)
    model = torch_model(config).eval()
    inputs, attention, labels = torch_batches(batch, rank_table, 1)[0]
    with torch.no_grad():
        stock = model(input_ids=inputs, attention_mask=attention, labels=labels).loss
        diffs = [
            abs(float(torch_gathered_loss(model, last)(inputs, attention, labels) - stock))
            for last in (False, True)
        ]
    assert max(diffs) < 1e-4, diffs
    return max(diffs)


def compile_fixed_shape_layers(model: transformers.BertForMaskedLM) -> None:
    """``torch.compile`` (inductor) the embeddings and every encoder layer but the last in
    place: the part of the gathered step whose shapes never change (``[B, L, H]``). The last
    layer and the head run on as many rows as the batch's masked tokens need, which changes
    from batch to batch; compiling the whole loss instead (``dynamic=True``) broke its graph
    at those data-dependent sizes and was slower than eager (BENCHMARKS.md)."""
    layers = model.bert.encoder.layer
    for i in range(len(layers) - 1):
        layers[i] = torch.compile(layers[i])
    model.bert.embeddings = torch.compile(model.bert.embeddings)


def torch_runner(
    config, batch: dict, rank_table, count: int, gather: str = "", compiled: bool = False
) -> Callable[[int], None]:
    """``run(i)``: one PyTorch train step (forward with labels, backward, clip, AdamW) on
    precomputed masked batch ``i`` (``0 <= i < count``). ``gather``: ``""`` (stock
    ``BertForMaskedLM``, head on every position), ``"head"`` or ``"head+last"``
    (:func:`torch_gathered_loss`); ``compiled``: with :func:`compile_fixed_shape_layers`."""
    torch.manual_seed(0)
    model = torch_model(config)
    if compiled:
        compile_fixed_shape_layers(model)
    gathered = torch_gathered_loss(model, gather == "head+last") if gather else None
    no_decay = ("bias", "LayerNorm.weight")
    named = list(model.named_parameters())
    cfg = config.optimizer
    groups = [
        {
            "params": [p for n, p in named if not any(k in n for k in no_decay)],
            "weight_decay": cfg.weight_decay,
        },
        {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    schedule = transformers.get_linear_schedule_with_warmup(
        opt, cfg.warmup_steps, config.train.steps
    )
    batches = torch_batches(batch, rank_table, count)

    def run(i):
        inputs, attention, labels = batches[i]
        if gathered is None:
            loss = model(input_ids=inputs, attention_mask=attention, labels=labels).loss
        else:
            loss = gathered(inputs, attention, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)

    return run


def time_masking(config, batch: dict, rank_table, switched: bool, repeats: int) -> float:
    """Median seconds of the step's masking and corruption (``masked_batch``) jitted alone."""
    _, state, spec = jax_train_step(config)
    cur_state = state.curriculum._replace(switched=jnp.bool_(switched))
    fn = jax.jit(
        lambda key, step, ids, attention: masked_batch(
            spec, key, step, cur_state, ids, attention, rank_table
        )
    )
    keys = jax.random.split(jax.random.key(1), repeats + 1)
    return median_seconds(
        lambda i: jax.block_until_ready(
            fn(keys[i], jnp.int32(i), batch["ids"], batch["attention"])
        ),
        repeats,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["logo", "dnabert6"])
    parser.add_argument("--logo-batch", type=int, default=8)
    parser.add_argument("--dnabert-batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per turn")
    parser.add_argument("--mlm-head-share", type=float, default=0.375)
    parser.add_argument("--mlm-pack-share", type=float, default=0.2)
    parser.add_argument("--share-repeats", type=int, default=30)
    parser.add_argument("--no-share", dest="share", action="store_false")
    parser.add_argument(
        "--no-torch-compile",
        dest="torch_compile",
        action="store_false",
        help="skip the torch.compile contender (its compilation takes a minute or more)",
    )
    args = parser.parse_args()
    kept = host_memory.keep_freed_memory()
    torch.set_num_threads(os.cpu_count())
    rank_table = jnp.asarray(spec_lib.rank_table(recipe("logo", 1), VOCAB))
    print(machine_info())
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}; medians of {args.rounds} x {args.steps} steps, "
        f"contenders taking turns of 1 untimed + {args.steps} timed steps; float32; tokens/s "
        "counts padded tokens (B x L); allocator: "
        + ("freed memory kept (gemsjax.host_memory)" if kept else "glibc's defaults")
    )
    for size in args.sizes:
        batch_size = args.logo_batch if size == "logo" else args.dnabert_batch
        config = recipe(size, batch_size)
        host = genome_batch(batch_size)
        batch = {k: jnp.asarray(v) for k, v in host.items()}
        tokens = host["ids"].size
        head = f"mlm_head_share={args.mlm_head_share}"
        packed = f"{head}, mlm_pack_share={args.mlm_pack_share}"
        slots = (args.mlm_head_share, args.mlm_pack_share)
        diff = check_gathered_losses(config, batch, rank_table)
        print(f"{size}: gathered PyTorch losses equal the stock loss within {diff:.1e}")
        calls = args.rounds * (1 + args.steps)
        runners = {"torch": torch_runner(config, batch, rank_table, calls)}
        contenders = {
            "torch, head on masked": ("head", False),
            "torch, head + last layer on masked": ("head+last", False),
        }
        if args.torch_compile:
            contenders["torch, head + last layer on masked, torch.compile"] = ("head+last", True)
        for label, (gather, compiled) in contenders.items():
            runners[label] = torch_runner(config, batch, rank_table, calls, gather, compiled)
        boxes = {}
        for label, label_slots in (
            ("head on all positions", (None, None)),
            (head, (args.mlm_head_share, None)),
            (packed, slots),
        ):
            runners[label], boxes[label] = jax_runner(config, batch, rank_table, slots=label_slots)
        share = size == "logo" and args.share
        if share:
            runners["Global-PMI phase"], _ = jax_runner(
                config, batch, rank_table, switched=True, slots=slots
            )
        turns = interleaved_turns(runners, args.rounds, args.steps)
        seconds = call_medians(turns)
        t_torch = seconds["torch"]
        print(
            f"{size}: batch {batch_size} x {host['ids'].shape[1]} | torch {t_torch:.3f} s/step "
            f"{tokens / t_torch:,.0f} tok/s"
        )
        for label in contenders:
            print(f"  {label}: {seconds[label]:.3f} s/step {tokens / seconds[label]:,.0f} tok/s")
        best = min(contenders, key=seconds.get)
        for label, box in boxes.items():
            t_jax = seconds[label]
            per_round = round_ratios(turns, best, label)
            print(
                f"  jax ({label}): {t_jax:.3f} s/step {tokens / t_jax:,.0f} tok/s, loss "
                f"{box['metrics']['loss']:.3f} | jax/torch {t_torch / t_jax:.2f}x, jax/"
                f"({best}) {seconds[best] / t_jax:.2f}x; per round "
                f"{statistics.median(per_round):.2f}x ({min(per_round):.2f}-"
                f"{max(per_round):.2f}x over {len(per_round)} rounds)"
            )
        if share:
            for phase, step_label, switched in (
                ("GeneMask", packed, False),
                ("Global-PMI", "Global-PMI phase", True),
            ):
                t_step = seconds[step_label]
                t_mask = time_masking(config, batch, rank_table, switched, args.share_repeats)
                print(
                    f"  masking share ({phase} phase): masking + corruption {t_mask * 1e3:.2f} "
                    f"ms of a {t_step:.3f} s step = {t_mask / t_step:.2%}"
                )


if __name__ == "__main__":
    main()
