"""GeneMask few-shot protocol: ``--mode=evaluate``; n shots per class, 10 draws, mean ± std.

Default: the shipped Prom-core sample (10 shots per class, 500 test rows); ``task.dir`` runs a
whole GeneMask task folder, e.g. ``--config.task.dir=Data-B_fewshot-task-datasets/Prom-core
--config.shots='(10,50,100,500,1000)'``; ``test_subsample=N`` scores on a fixed stratified
subsample of the test file (CPU runs). ``init`` names the pretrained encoder; its random-init
twin is reported beside it (``baseline``).

Presets: "" (the sample), "smoke" (tiny model, 2 draws, 2 epochs), "genemask" (the published
grid's settings for ``task.dir``), a model size, key=value; keys in gemsjax/eval/config.py.
"""

from gemsjax import config as config_lib
from gemsjax.eval import config as base


def smoke(c):
    """Seconds: the tiny test size, 2 draws of 2 epochs."""
    c.model.name, c.draws, c.finetune.epochs = "test", 2, 2


def genemask(c):
    """The GeneMask grid: 10, 50, 100, 500, 1000 shots per class, 10 draws each."""
    c.shots, c.draws = (10, 50, 100, 500, 1000), 10


PRESETS = {"smoke": smoke, "genemask": genemask}


def get_config(arg=None):
    return config_lib.apply_presets(base.fewshot_base(), arg, PRESETS)
