"""Embeddings (``--mode=embed``): pooled hidden states of an encoder for every sequence of a
FASTA / CSV / TSV, written as ``embeddings.npy`` (float32[N, H]) + ``index.tsv`` into --workdir.

    python -m gemsjax.main --mode=embed --workdir=emb --config=configs/eval/embed.py \\
        --config.init=runs/barcode_mae-<date>-<time> --config.input=barcodes.tsv

Presets: "smoke" (a random tiny barcode encoder on the shipped BOLD sample), a model size,
key=value; keys in gemsjax/eval/config.py (``embed_base``).
"""

from gemsjax import config as config_lib
from gemsjax.data import samples
from gemsjax.eval import config as base


def smoke(c):
    """Seconds: a random test-size barcode encoder on the 4,000 shipped barcodes."""
    c.init, c.model.name, c.vocab = "random", "test_mae", "barcodebert"
    c.input, c.batch_size = str(samples.sample_path(samples.BARCODES)), 32


PRESETS = {"smoke": smoke}


def get_config(arg=None):
    return config_lib.apply_presets(base.embed_base(), arg, PRESETS)
