"""Downstream evaluation: fine-tuning, few-shot, GUE, embeddings and barcode protocols.

``python -m gemsjax.main --mode=evaluate --config=configs/eval/<protocol>.py`` (and
``--mode=finetune``) runs the protocol named by ``config.protocol``: :data:`PROTOCOLS` maps it
to ``module:function`` with the signature ``run(config, workdir) -> summary dict``.
"""

PROTOCOLS = {
    "finetune": "gemsjax.eval.task_run:run",
    "fewshot": "gemsjax.eval.fewshot:evaluate",
    "gue": "gemsjax.eval.gue:evaluate",
    "barcodes": "gemsjax.eval.barcodes:evaluate",
}
