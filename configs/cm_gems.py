"""CM-GEMS (Roy et al., ECAI 2024): GeneMask masking until validation perplexity plateaus
(running min |delta ppl| < masking.threshold), then Global-PMI for good.

Presets: "" (embedded sample, minutes on a CPU), "paper", "smoke", a size name, key=value;
see gemsjax/config.py.
"""

from gemsjax.config import pretraining_config


def get_config(arg=None):
    return pretraining_config("cm_gems", arg)
