"""Benchmark: gemsjax embeddings vs Hugging Face PyTorch ``BertModel`` forward, same CPU.

Both sides embed the same batch of real tokens with the same model and the same weights (the
gemsjax encoder's parameters copied into ``transformers.BertModel``; the pooled outputs are
checked to agree) in float32, and pool the last hidden layer by the attention-masked mean:

- ``jax``: the step :func:`gemsjax.eval.embed.embed_sequences` compiles (``make_embed_step``
  under ``jax.jit``: encoder forward in eval mode + :func:`~gemsjax.models.bert.masked_mean`),
  on the tokenized batch already on the device;
- ``torch``: ``BertModel(input_ids, attention_mask).last_hidden_state`` under
  ``torch.inference_mode()`` (eager, SDPA attention: transformers' default), then the same
  masked mean.

Sizes: ``barcode_mae`` (the BarcodeMAE encoder, 6 x 768; 110 tokens of shipped BOLD barcodes)
and ``logo`` (2 x 256, 512 tokens of the shipped chr22 sample), batch 32 by default.
The contenders take turns (``benchutil.interleaved_medians``: each round, each contender one
untimed call then ``--steps`` timed ones), so drift in the load of the shared machine hits both
alike. Also printed: end-to-end ``embed_sequences`` throughput (tokenization and transfer
included) for 512 barcodes. Threads: all cores for both (JAX's default; torch.set_num_threads).

Run: ``python benchmarks/bench_embed.py`` (``--sizes``, ``--batch``, ``--rounds``, ``--steps``).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
import torch
import transformers
from benchutil import barcode_batch, genome_batch, interleaved_medians, machine_info
from flax import nnx

from gemsjax.data import samples, tables
from gemsjax.eval import embed
from gemsjax.models import backend, registry
from gemsjax.models.bert import BertModel

SEQ_LEN = {"barcode_mae": 110, "barcode_bert": 110, "logo": 512, "dnabert6": 512}


def torch_bert(model: BertModel, c) -> transformers.BertModel:
    """A ``transformers.BertModel`` (no pooler, eval mode) holding ``model``'s weights."""
    config = transformers.BertConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        intermediate_size=c.ffn,
        hidden_act="gelu",
        max_position_embeddings=c.max_positions,
        type_vocab_size=c.type_vocab,
        layer_norm_eps=c.ln_eps,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf = transformers.BertModel(config, add_pooling_layer=False).eval()
    t = lambda x, transpose=False: torch.tensor(
        np.asarray(x[...]).T if transpose else np.asarray(x[...])
    )
    state = {
        "embeddings.word_embeddings.weight": t(model.word_embeddings.embedding),
        "embeddings.position_embeddings.weight": t(model.embeddings.position.embedding),
        "embeddings.token_type_embeddings.weight": t(model.embeddings.token_type.embedding),
        "embeddings.LayerNorm.weight": t(model.embeddings.norm.scale),
        "embeddings.LayerNorm.bias": t(model.embeddings.norm.bias),
    }
    names = {
        "attention.self.query": "attention.query",
        "attention.self.key": "attention.key",
        "attention.self.value": "attention.value",
        "attention.output.dense": "attention.out",
        "intermediate.dense": "ffn_in",
        "output.dense": "ffn_out",
    }
    norms = {"attention.output.LayerNorm": "attention_norm", "output.LayerNorm": "ffn_norm"}
    for i, block in enumerate(model.stack.blocks):
        for hf_name, ours in names.items():
            layer = block
            for part in ours.split("."):
                layer = getattr(layer, part)
            state[f"encoder.layer.{i}.{hf_name}.weight"] = t(layer.kernel, transpose=True)
            state[f"encoder.layer.{i}.{hf_name}.bias"] = t(layer.bias)
        for hf_name, ours in norms.items():
            state[f"encoder.layer.{i}.{hf_name}.weight"] = t(getattr(block, ours).scale)
            state[f"encoder.layer.{i}.{hf_name}.bias"] = t(getattr(block, ours).bias)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    return hf


def runners(size: str, batch_size: int):
    """``({"jax": run, "torch": run}, check)``: each ``run(i)`` embeds the batch once and waits;
    ``check()`` returns the largest absolute difference of the two pooled outputs."""
    c = registry.get_model_config(size, dropout=0.0, attn_dropout=0.0)
    model = BertModel(c, rngs=nnx.Rngs(0))
    batch = (barcode_batch if SEQ_LEN[size] == 110 else genome_batch)(batch_size, SEQ_LEN[size])
    graphdef, params = nnx.split(model)
    step = jax.jit(
        embed.make_embed_step(graphdef, -1, "mean"),
        compiler_options=backend.inference_compiler_options(),
    )
    ids, attention = jax.device_put(batch["ids"]), jax.device_put(batch["attention"])
    hf = torch_bert(model, c)
    t_ids = torch.as_tensor(batch["ids"], dtype=torch.long)
    t_att = torch.as_tensor(batch["attention"], dtype=torch.long)

    def torch_embed():
        with torch.inference_mode():
            hidden = hf(input_ids=t_ids, attention_mask=t_att).last_hidden_state
            weights = t_att.unsqueeze(-1).float()
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    box = {}

    def run_jax(_):
        box["jax"] = jax.block_until_ready(step(params, ids, attention))

    def run_torch(_):
        box["torch"] = torch_embed()

    def check():
        run_jax(0)
        run_torch(0)
        return float(np.max(np.abs(np.asarray(box["jax"]) - box["torch"].numpy())))

    return {"jax": run_jax, "torch": run_torch}, check


def end_to_end(rows: int = 512) -> float:
    """Barcodes per second of :func:`embed_sequences` (tokenize, shard, forward, pool, fetch)
    with the BarcodeMAE encoder on the first ``rows`` barcodes of the shipped sample."""
    c = registry.get_model_config("barcode_mae", dropout=0.0, attn_dropout=0.0)
    model = BertModel(c, rngs=nnx.Rngs(0))
    seqs = tables.read_barcode_tsv(samples.sample_path(samples.BARCODES))["species_name"]
    seqs = seqs.sequences[:rows]
    embed.embed_sequences(model, seqs[:32], vocab="barcodebert", max_len=110, batch_size=32)
    start = time.perf_counter()
    embed.embed_sequences(model, seqs, vocab="barcodebert", max_len=110, batch_size=32)
    return rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="barcode_mae,logo")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-end-to-end", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(machine_info())
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}"
    )
    for size in args.sizes.split(","):
        fns, check = runners(size, args.batch)
        diff = check()
        seconds = interleaved_medians(fns, args.rounds, args.steps)
        rows = args.batch
        print(
            f"{size}: batch {rows} x {SEQ_LEN[size]} fp32 | max |jax - torch| {diff:.2e} | "
            f"torch {seconds['torch']:.3f} s ({rows / seconds['torch']:.1f} seq/s) | jax "
            f"{seconds['jax']:.3f} s ({rows / seconds['jax']:.1f} seq/s) | jax/torch "
            f"{seconds['torch'] / seconds['jax']:.2f}x"
        )
    if not args.no_end_to_end:
        print(
            f"end to end (embed_sequences, barcode_mae, 512 barcodes, batch 32): "
            f"{end_to_end():.1f} seq/s"
        )


if __name__ == "__main__":
    main()
