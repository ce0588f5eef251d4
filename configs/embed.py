"""Embeddings (``--mode=embed``): pooled hidden states of a pretrained encoder for every sequence
of a FASTA / CSV / TSV, written as ``embeddings.npy`` + ``index.tsv`` into ``--workdir``.

    python -m gemsjax.main --mode=embed --workdir=emb \
        --config=configs/embed.py:init=runs/barcode_mae-...,input=x.tsv

Presets (comma-separated): ``smoke`` (a random tiny barcode model on the shipped BOLD sample),
``key=value`` for any key below.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.init = ""          # pretraining run folder ([:latest|:best|:step=N]) or random (see model)
    c.model = ""         # size for init=random (gemsjax.models sizes), e.g. barcode_mae_small
    c.vocab = ""         # for init=random: dnabert | barcodebert (a run folder knows its own)
    c.input = ""         # FASTA, CSV or TSV (column sequence, nucleotides or dna_barcode)
    c.format = "auto"    # auto (from the file name) | fasta | csv | tsv
    c.layer = -1         # -1: last layer; 0: embedding layer; i: after block i
    c.pooling = "mean"   # mean over valid tokens | cls (DNABERT vocab)
    c.batch_size = 64
    c.max_len = 0        # tokens per row; 0: 110 for barcodes (660 bp), 512 for DNABERT
    c.seed = 0           # init of a random encoder
    from gemsjax.config import set_key

    for preset in [p.strip() for p in (arg or "").split(",") if p.strip()]:
        if "=" in preset:
            key, value = preset.split("=", 1)
            set_key(c, key.strip(), _literal(value.strip()))
        elif preset == "smoke":
            from gemsjax.data import samples

            c.init, c.model, c.vocab = "random", "test_mae", "barcodebert"
            c.input, c.batch_size = str(samples.sample_path(samples.BARCODES)), 16
        else:
            raise ValueError(f"unknown preset {preset!r}; valid: smoke or key=value")
    return c


def _literal(text):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
