"""CM-STEP: a staircase from DNABERT random spans to Global-PMI. Per batch, Global-PMI
(p = 0.0136) with probability floor(step / floor(steps / 100)) / 100, otherwise random 6-token
spans (p = 0.025).

Presets: "" (the shipped 1 Mb chr22 sample, 200 steps, minutes on a CPU), "paper", "smoke", a
model size, key=value (see gemsjax/config.py).
"""

import ml_collections

from gemsjax import config as base


def get_config(arg=None):
    c = base.genome_base("cm_step")
    c.data.batch_size, c.data.max_len = 8, 512  # the shipped chr22 sample (data.fasta=())
    c.model.name = "logo"  # 2 layers x 256, 8 heads (~5.0M)
    c.masking.curriculum = "cm_step"  # random_span -> global_pmi staircase
    c.masking.random_span_prob = 0.025  # span centres, random spans
    c.masking.global_pmi_prob = 0.0136  # CM-STEP_pretraining_code.py's own value
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


def smoke(c):
    """The shared smoke run, 100 steps: the staircase has 100 stairs of >= 1 step."""
    base.genome_smoke(c)
    c.train.steps = 100


PRESETS = {"paper": base.genemask_paper, "smoke": smoke}
