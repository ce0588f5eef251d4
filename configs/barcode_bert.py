"""BarcodeBERT-style encoder-only MLM baseline: 50% of the non-overlapping 6-mers replaced by
[MASK], loss on every non-special token.

Presets: "" (the shipped 4,000 BOLD barcodes, 150 steps, minutes on a CPU), "paper", "smoke", a
model size, key=value (see gemsjax/config.py).
"""

import ml_collections

from gemsjax import config as base


def get_config(arg=None):
    c = base.barcode_base("barcode_bert")
    c.data.batch_size, c.data.max_len = 32, 110  # the shipped BOLD sample (data.tsv="")
    c.model.name = "barcode_bert_small"
    c.masking.mae_ratio = 0.5  # share of tokens masked
    c.masking.mask_frac, c.masking.random_frac = 1.0, 0.0  # all of them become [MASK]
    c.masking.loss_on = "all"  # loss on every non-special token
    c.optimizer = ml_collections.ConfigDict(
        dict(  # BarcodeMAE's AdamW + one-cycle
            schedule="onecycle",
            learning_rate=1e-4 * c.data.batch_size / 64,
            pct_start=0.3,
            div_factor=25.0,
            final_div_factor=1e4,
            b1_cycle=(0.95, 0.85),
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=1e-5,
            decay_mask="all",
            clip_norm=0.0,
        )
    )
    return base.apply_presets(c, arg, PRESETS)


def paper(c):
    """The paper: 6 layers x 768, batch 128, lr 1e-4 x 128 / 64,
    35 epochs of ~2.3M BIOSCAN-5M barcodes (pretrain + other_heldout splits); needs data.tsv."""
    c.model.name = "barcode_bert"
    c.data.batch_size, c.train.steps = 128, 35 * 2_300_000 // 128
    c.data.train_splits = ("pretrain", "other_heldout")
    c.optimizer.learning_rate = 1e-4 * 128 / 64
    c.train.eval_every, c.train.checkpoint_every, c.train.log_every = 500, 1000, 50
    c.train.eval_batches = 20


def smoke(c):
    """Seconds: the test size, 6 steps of 8 barcodes."""
    base.barcode_smoke(c, "test")


PRESETS = {"paper": paper, "smoke": smoke}
