"""GeneMask baseline (Roy et al., ECAI 2023): PMI-guided 6- and 11-token spans around
centres drawn with p = 0.0176, throughout.

Presets: "" (the shipped 1 Mb chr22 sample, 200 steps, minutes on a CPU), "paper", "smoke", a
model size, key=value (see gemsjax/config.py).
"""

import ml_collections

from gemsjax import config as base


def get_config(arg=None):
    c = base.genome_base("genemask")
    c.data.batch_size, c.data.max_len = 8, 512  # the shipped chr22 sample (data.fasta=())
    c.model.name = "logo"  # 2 layers x 256, 8 heads (~5.0M)
    c.masking.curriculum, c.masking.strategy = "constant", "genemask"
    c.masking.genemask_prob = 0.0176  # span centres
    c.masking.rank_table = "genemask"  # the published PMI ranking
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
