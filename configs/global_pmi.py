"""Global-PMI baseline: mask +-5 tokens around the k best-ranked (highest-PMI) positions of
each sequence, k ~ Binomial(n, p), throughout.

Presets: "" (the shipped 1 Mb chr22 sample, 200 steps, minutes on a CPU), "paper", "smoke", a
model size, key=value (see gemsjax/config.py).
"""

import ml_collections

from gemsjax import config as base


def get_config(arg=None):
    c = base.genome_base("global_pmi")
    c.data.batch_size, c.data.max_len = 8, 512  # the shipped chr22 sample (data.fasta=())
    c.model.name = "logo"  # 2 layers x 256, 8 heads (~5.0M)
    c.masking.curriculum, c.masking.strategy = "constant", "global_pmi"
    c.masking.global_pmi_prob = 0.0176  # the baseline used mlm_probability
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
