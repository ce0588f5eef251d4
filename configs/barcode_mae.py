"""BarcodeMAE (Safari et al., 2025): the encoder sees only the visible tokens (50% of the
non-overlapping 6-mers dropped); the decoder re-inserts a learned mask vector and predicts the
dropped k-mers.

Presets: "" (the shipped 4,000 BOLD barcodes, 150 steps, minutes on a CPU), "paper", "smoke", a
model size, key=value (see gemsjax/config.py).
"""

import ml_collections

from gemsjax import config as base


def get_config(arg=None):
    c = base.barcode_base("barcode_mae")
    c.data.batch_size, c.data.max_len = 32, 110  # the shipped BOLD sample (data.tsv="")
    c.model.name = "barcode_mae_small"
    c.masking.mae_ratio = 0.5  # share of tokens dropped
    c.masking.mask_frac, c.masking.random_frac = 1.0, 0.0
    c.masking.loss_on = "masked"  # loss on the dropped tokens
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
    """The paper: 6 + 6 layers x 768 (encoder + decoder) on ~2.3M BIOSCAN-5M barcodes (pretrain +
    other_heldout splits; needs data.tsv), with the authors' final BIOSCAN-5M script
    (bioscan-ml/BarcodeMAE slurm/final_scripts/bioscan5m_final.sh @ c6e9262, reference/
    barcodemae.md section 1.6): batch 128, 35 epochs, --lr 0.00007 per 64 sequences (7e-5 x
    128 / 64 = 1.4e-4 peak), weight decay 1e-5, --max-norm 0.5. The code defaults of the
    workshop release (main @ 290e39f) differ: --lr 1e-4 per 64, 45 epochs, no clipping."""
    c.model.name = "barcode_mae"
    c.data.batch_size, c.train.steps = 128, 35 * 2_300_000 // 128
    c.data.train_splits = ("pretrain", "other_heldout")
    c.optimizer.learning_rate = 7e-5 * 128 / 64
    c.optimizer.clip_norm = 0.5
    c.masking.mae_draw = "bernoulli"  # the reference's per-token draw
    c.train.eval_every, c.train.checkpoint_every, c.train.log_every = 500, 1000, 50
    c.train.eval_batches = 20


def smoke(c):
    """Seconds: the test size, 6 steps of 8 barcodes."""
    base.barcode_smoke(c, "test_mae")


PRESETS = {"paper": paper, "smoke": smoke}
