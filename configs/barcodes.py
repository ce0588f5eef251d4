"""Barcode evaluation (``--mode=evaluate``): closed-world species (linear probe, fine-tuning),
open-world genus (cosine 1-NN of unseen species), BIN reconstruction (UMAP + Ward, AMI) and their
harmonic mean, for a pretrained encoder, its random-init twin, 6-mer frequencies and exact lookup.

    python -m gemsjax.eval.barcode_split insect_coi_barcodes.tsv.gz runs/bold_split
    python -m gemsjax.main --mode=evaluate --workdir=runs/eval_barcodes \\
        --config=configs/barcodes.py:init=runs/barcode_mae-...,tsv=runs/bold_split/insect_coi_barcodes.split.tsv.gz

Presets (comma-separated): ``smoke`` (a random tiny encoder on the shipped sample, no
fine-tuning, small UMAP), ``finetune`` (also fine-tune the whole encoder, 3 epochs), ``key=value``.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.protocol = "barcodes"
    c.init = ""              # pretraining run folder ([:latest|:best|:step=N]) or random
    c.model = ""             # size for init=random, e.g. barcode_mae_small
    c.tsv = ""               # barcode TSV with a split column; empty: the shipped BOLD sample
    c.max_len = 110          # tokens (660 bp)
    c.batch_size = 64        # embedding batch
    c.layer = -1
    c.pooling = "mean"
    c.seed = 0
    c.random_baseline = True  # also the same size from random init (for a run folder)
    c.probe = True
    c.probe_max_iter = 300
    c.cluster = True
    c.umap_components = 64
    c.finetune = ml_collections.ConfigDict(dict(
        epochs=0,            # 0: no full fine-tuning
        learning_rate=1e-4, batch_size=32, warmup=0.1, weight_decay=1e-5, dropout=0.1,
        pooling="mean", clip_norm=1.0, eval_batch_size=64, seed=0))
    for preset in [p.strip() for p in (arg or "").split(",") if p.strip()]:
        if "=" in preset:
            key, value = preset.split("=", 1)
            _set(c, key.strip(), value.strip())
        elif preset == "smoke":
            c.init, c.model, c.batch_size = "random", "test_mae", 32
            c.probe_max_iter, c.umap_components = 100, 8
        elif preset == "finetune":
            c.finetune.epochs = 3
        else:
            raise ValueError(f"unknown preset {preset!r}; valid: smoke, finetune, key=value")
    return c


def _set(c, dotted, text):
    import ast

    from gemsjax.config import set_key

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    set_key(c, dotted, value)
