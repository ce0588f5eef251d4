"""GUE (DNABERT-2 benchmark) protocol: ``--mode=evaluate``; MCC per task and averaged.

    python -m gemsjax.main --mode=evaluate --config=configs/eval/gue.py \
        --config.gue_dir=GUE --config.init=runs/cm_gems-...

Every task folder under ``gue_dir`` runs (``tasks`` picks some: ``'("prom/prom_core_tata",)'``)
with the reference settings; a task without ``train.csv`` is skipped unless
``train_on_dev_split`` > 0. ``max_train_rows`` / ``max_eval_rows`` cut fixed stratified
subsamples for CPU runs.

Presets: "" (the reference protocol), "smoke" (tiny model, 1 epoch, 64 training and 64
evaluation rows per task), a model size, key=value; keys in gemsjax/eval/config.py.
"""

from gemsjax import config as config_lib
from gemsjax.eval import config as base


def smoke(c):
    """Seconds per task: the tiny test size, 1 epoch on 64 rows, 64 dev / test rows."""
    c.model.name, c.finetune.epochs = "test", 1
    c.max_train_rows, c.max_eval_rows, c.log_every = 64, 64, 1


PRESETS = {"smoke": smoke}


def get_config(arg=None):
    return config_lib.apply_presets(base.gue_base(), arg, PRESETS)
