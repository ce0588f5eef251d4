"""DNABERT baseline: random 6-token spans, centre probability 0.025.

Presets: "" (embedded sample, minutes on a CPU), "paper", "smoke", a size name, key=value;
see gemsjax/config.py.
"""

from gemsjax.config import pretraining_config


def get_config(arg=None):
    return pretraining_config("dnabert_random", arg)
