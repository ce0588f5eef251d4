"""Export a trained model as a Hugging Face transformers folder (``--mode=export``).

``python -m gemsjax.main --mode=export --config=configs/export.py --config.init=<run folder>``
writes ``<run folder>/hf`` (or ``--workdir``): config.json, model.safetensors, vocab.txt, the
tokenizer files and a README.md model card; see gemsjax/interop/hf.py.
"""

import ml_collections


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/export.py has no presets, got {arg!r}")
    config = ml_collections.ConfigDict()
    config.init = ""  # the run folder (training --workdir), or one checkpoint step folder
    config.step = -1  # the checkpoint step to export; -1: the newest
    return config
