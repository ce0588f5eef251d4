"""Command-line entry: ``python -m gemsjax.main --config=configs/<recipe>.py[:presets]``.

Modes:

- ``train`` (default): pretrain with the config's masking recipe in ``--workdir`` (default: a new
  folder ``runs/<recipe>-<date>-<time>``); running the same command again resumes it.
- ``pmi``: write a PMI rank table for FASTA files (``--config=configs/pmi.py``).
- ``data``: build the input pipeline and print a summary of one batch.
- ``compile``: compile the train step for ``--config.compile.topology`` (a TPU slice such as
  ``v5p:4x4x2``, from any machine with libtpu; default the local devices) and print what one chip
  needs: memory against HBM, FLOPs, the compiler's step-time estimate
  (:mod:`gemsjax.train.compile_ahead`).
"""

from __future__ import annotations

import datetime
import json
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "pmi", "data", "compile")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (with :presets).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default runs/<recipe>-<time>.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")


def _process_index() -> int:
    import jax

    return jax.process_index()


def default_workdir(config) -> pathlib.Path:
    """``runs/<recipe>-<date>-<time>``; multi-process runs must name one shared ``--workdir``."""
    import os

    if os.environ.get("GEMSJAX_DISTRIBUTED") == "1":
        sys.exit("gemsjax: a multi-process run needs --workdir (the same folder for every process)")
    name = config.get("recipe", "pmi")
    return pathlib.Path("runs") / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def run_pmi(config, workdir: pathlib.Path) -> dict:
    """Count n-grams of ``config.fasta_paths`` (default: the shipped genome sample), rank 6-mers."""
    from gemsjax import pmi
    from gemsjax.data import samples

    paths = list(config.fasta_paths) or [str(samples.sample_path(samples.GENOME))]
    out = workdir / config.out
    workdir.mkdir(parents=True, exist_ok=True)
    table = pmi.rank_table_from_fasta(paths, out, k=config.k, max_n=config.max_n,
                                      min_count=config.min_count, denominator=config.denominator)
    scored = int((table[5:] < 4**config.k).sum())
    summary = dict(rank_table=str(out), fasta=paths, scored_kmers=scored)
    if scored < 4**config.k:
        summary["note"] = (f"{4**config.k - scored} k-mers were seen fewer than min_count="
                           f"{config.min_count} times and share the worst rank; count a larger "
                           "genome or lower --config.min_count")
    return summary


def run_data(config) -> dict:
    """Build the training pipeline and summarize its first batch."""
    import numpy as np

    from gemsjax.data import pipelines
    from gemsjax.tokenizers import KmerTokenizer

    batch = next(pipelines.make_pretraining_iterator(config, "train"))
    ids, attention = batch["ids"], batch["attention"]
    vocab = "barcodebert" if config.data.kind == "barcode" else "dnabert"
    first = KmerTokenizer(6, vocab=vocab).decode(ids[:1])[0]
    return dict(shape=list(ids.shape), dtype=str(ids.dtype),
                tokens_per_row=float(attention.sum(axis=1).mean()),
                unk_fraction=float((ids == 1).sum() / max(attention.sum(), 1)),
                distinct_ids=int(np.unique(ids).size), first_sequence=first[:60] + "...")


def _load_config_file(spec: str):
    """``path[:arg]`` -> the config its ``get_config(arg)`` returns."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("gemsjax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with wrong ``--config.<key>`` overrides and ``key=value`` presets
    reported by name together with the valid keys instead of a traceback."""
    from gemsjax.config import ConfigKeyError, valid_keys

    try:
        return flags.FLAGS(argv)
    except ConfigKeyError as err:  # a wrong key in --config=<file>:<presets>
        sys.exit(f"gemsjax: {err}")
    except (AttributeError, KeyError) as err:
        spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
        if spec is None:
            raise
        valid = valid_keys(_load_config_file(spec))
        bad = [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]
        bad = [key for key in bad if key not in valid]
        sys.exit(f"gemsjax: unknown config key(s) {bad or err}; valid keys for {spec}: "
                 f"{', '.join(valid)}")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # Orbax / XLA info lines drown the progress line
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    workdir = pathlib.Path(_WORKDIR.value) if _WORKDIR.value else default_workdir(config)
    if _MODE.value == "pmi":
        summary = run_pmi(config, workdir)
    elif _MODE.value == "data":
        summary = run_data(config)
    elif _MODE.value == "compile":
        from gemsjax.train import compile_ahead

        summary = compile_ahead.run(config)
    else:
        from gemsjax.train.loop import train_and_evaluate

        summary = train_and_evaluate(config, workdir)
        summary["workdir"] = str(workdir)
    if _process_index() == 0:
        print("gemsjax summary: " + json.dumps(summary, sort_keys=True, default=str), flush=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_flags)
