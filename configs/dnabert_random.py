"""DNABERT baseline: random 6-token spans around centres drawn with p = 0.025, throughout.

Presets: "" (the shipped 1 Mb chr22 sample, 200 steps, minutes on a CPU), "paper", "smoke", a
model size, key=value (see gemsjax/config.py).
"""

import ml_collections

from gemsjax import config as base


def get_config(arg=None):
    c = base.genome_base("dnabert_random")
    c.data.batch_size, c.data.max_len = 8, 512  # the shipped chr22 sample (data.fasta=())
    c.model.name = "logo"  # 2 layers x 256, 8 heads (~5.0M)
    c.masking.curriculum, c.masking.strategy = "constant", "random_span"
    c.masking.random_span_prob = 0.025  # span centres
    c.optimizer = ml_collections.ConfigDict(
        dict(  # GeneMask's AdamW
            schedule="warmup_linear",
            learning_rate=8e-4,
            warmup_steps=15,
            b1=0.9,
            b2=0.98,
            eps=1e-6,
            weight_decay=0.01,
            decay_mask="matrices",
            clip_norm=1.0,
        )
    )
    return base.apply_presets(c, arg, PRESETS)


PRESETS = {"paper": base.genemask_paper, "smoke": base.genome_smoke}
