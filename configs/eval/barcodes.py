"""Barcode evaluation (``--mode=evaluate``): closed-world species (linear probe; full fine-tuning
with ``full_finetune``), open-world genus (cosine 1-NN of unseen species), BIN reconstruction
(UMAP + Ward, AMI) and their harmonic mean, for an encoder (``init``) and, with ``baseline``,
its random-init twin, 6-mer frequencies and exact lookup.

    python -m gemsjax.eval.barcode_split insect_coi_barcodes.tsv.gz runs/bold_split
    python -m gemsjax.main --mode=evaluate --workdir=runs/eval_barcodes \\
        --config=configs/eval/barcodes.py --config.init=runs/barcode_mae-<date>-<time> \\
        --config.tsv=runs/bold_split/insect_coi_barcodes.split.tsv.gz

Presets: "" (the shipped sample), "smoke" (a random tiny encoder, small probe and UMAP),
"finetune" (also fine-tune the whole encoder on the species), a model size, key=value; keys in
gemsjax/eval/config.py (``barcodes_base``).
"""

from gemsjax import config as config_lib
from gemsjax.eval import config as base


def smoke(c):
    """Seconds (after UMAP's first compile): a random test-size encoder on the sample."""
    c.init, c.model.name, c.batch_size = "random", "test_mae", 32
    c.probe_max_iter, c.umap_components = 100, 8


def finetune(c):
    """Also fine-tune the whole encoder (and its random twin) on the seen species."""
    c.full_finetune = True


PRESETS = {"smoke": smoke, "finetune": finetune}


def get_config(arg=None):
    return config_lib.apply_presets(base.barcodes_base(), arg, PRESETS)
