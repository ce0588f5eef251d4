"""BarcodeMAE (Safari et al., 2025): encoder on visible tokens only, 50% of tokens dropped,
decoder re-inserts a learned mask vector and predicts the dropped k-mers.

Presets: "" (embedded sample, minutes on a CPU), "paper", "smoke", a size name, key=value;
see gemsjax/config.py.
"""

from gemsjax.config import pretraining_config


def get_config(arg=None):
    return pretraining_config("barcode_mae", arg)
