"""GeneMask baseline (Roy et al., ECAI 2023): PMI-guided 6- and 11-token spans, p = 0.0176.

Presets: "" (embedded sample, minutes on a CPU), "paper", "smoke", a size name, key=value;
see gemsjax/config.py.
"""

from gemsjax.config import pretraining_config


def get_config(arg=None):
    return pretraining_config("genemask", arg)
