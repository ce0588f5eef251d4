"""The downstream table that ends a pretraining run (``downstream.eval=True``).

Genome recipes: the GeneMask 10-shot Prom-core protocol on the shipped sample (20 training rows,
500 test rows) for the run's final checkpoint next to the same size from random init,
``downstream.draws`` draws each (the protocol's 10 in a full evaluation; fewer keep the CPU demo
short), written to ``<workdir>/downstream/`` and printed. Barcode recipes: 1-NN genus on unseen
species against the 6-mer baseline (:func:`gemsjax.eval.barcodes.after_pretraining`).
"""

from __future__ import annotations

import pathlib

import ml_collections

from gemsjax.eval import config as eval_config
from gemsjax.eval import fewshot


def after_pretraining(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Run the downstream table for a finished pretraining run in ``workdir``."""
    if config.data.kind == "barcode":
        from gemsjax.eval import barcodes

        return barcodes.after_pretraining(config, workdir)
    return prom_core_table(config, workdir)


def prom_core_table(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """10-shot Prom-core (shipped sample): the run's latest checkpoint vs random init."""
    c = eval_config.fewshot_base()
    c.init = str(workdir)
    c.task.name = "prom_core_10shot_sample"
    c.draws = config.downstream.draws
    c.seed = config.seed
    c.mesh_data, c.mesh_fsdp = config.train.mesh_data, config.train.mesh_fsdp
    summary = fewshot.evaluate(c, pathlib.Path(workdir) / "downstream")
    return {k: v for k, v in summary.items() if k not in ("markdown", "rows")}
