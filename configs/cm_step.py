"""CM-STEP: per batch, Global-PMI (p = 0.0136) with probability
floor(step / floor(steps/100)) / 100, otherwise DNABERT random spans (p = 0.025).

Presets: "" (embedded sample, minutes on a CPU), "paper", "smoke", a size name, key=value;
see gemsjax/config.py.
"""

from gemsjax.config import pretraining_config


def get_config(arg=None):
    return pretraining_config("cm_step", arg)
