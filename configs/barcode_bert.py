"""BarcodeBERT-style encoder-only MLM baseline: 50% of tokens replaced by [MASK], loss on all
non-special tokens.

Presets: "" (embedded sample, minutes on a CPU), "paper", "smoke", a size name, key=value;
see gemsjax/config.py.
"""

from gemsjax.config import pretraining_config


def get_config(arg=None):
    return pretraining_config("barcode_bert", arg)
