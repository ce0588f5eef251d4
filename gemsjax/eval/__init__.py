"""Downstream evaluation: fine-tuning, few-shot, GUE, embeddings and barcode protocols.

``python -m gemsjax.main --mode=evaluate --config=configs/<protocol>.py`` runs the protocol
named by ``config.protocol``: :data:`PROTOCOLS` maps it to ``module:function`` with the
signature ``evaluate(config, workdir) -> summary dict``.
"""

PROTOCOLS = {
    "fewshot": "gemsjax.eval.fewshot:evaluate",
    "gue": "gemsjax.eval.gue:evaluate",
    "barcodes": "gemsjax.eval.barcodes:evaluate",
}
