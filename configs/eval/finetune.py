"""Fine-tune a sequence classifier on one labelled task: ``--mode=finetune``.

Default: the shipped GeneMask Prom-core 10-shot sample (train) and 500 of its test rows, from a
random-init LOGO-size model; point ``init`` at a pretraining run to fine-tune it (the random
baseline of the same size runs beside it unless ``baseline=False``)::

    python -m gemsjax.main --mode=finetune --config=configs/eval/finetune.py \
        --config.init=runs/cm_gems-... --config.task.train=train.csv \
        --config.task.dev=dev.csv --config.task.test=test.csv --config.task.format=gue

Presets: "" (the sample), "smoke" (tiny model, 2 epochs), a model size, key=value; keys in
gemsjax/eval/config.py.
"""

from gemsjax import config as config_lib
from gemsjax.eval import config as base


def smoke(c):
    """Seconds: the tiny test size, 2 epochs."""
    c.model.name, c.finetune.epochs, c.log_every = "test", 2, 1


PRESETS = {"smoke": smoke}


def get_config(arg=None):
    return config_lib.apply_presets(base.finetune_base(), arg, PRESETS)
