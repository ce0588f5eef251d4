"""Global-PMI baseline: mask +-5 around the k best-ranked positions, k ~ Binomial(n, p).

Presets: "" (embedded sample, minutes on a CPU), "paper", "smoke", a size name, key=value;
see gemsjax/config.py.
"""

from gemsjax.config import pretraining_config


def get_config(arg=None):
    return pretraining_config("global_pmi", arg)
