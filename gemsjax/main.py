"""Command-line entry: ``python -m gemsjax.main --config=configs/<recipe>.py[:presets]``.

``--help`` lists the modes, the recipes in ``configs/`` with their presets, and how to resume.
Mistakes in the command or the config print one line, ``gemsjax: <what and how to fix it>``, and
exit with status 2 (``--traceback`` shows where).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import sys
import textwrap

from absl import app, flags, logging

from gemsjax import config as config_lib
from gemsjax import host_memory, remote
from gemsjax.errors import UserError

MODES = {
    "train": "pretrain the recipe in --workdir (default: a new runs/<recipe>-<date>-<time>/)",
    "data": "build the recipe's training pipeline and summarize its first batch",
    "pmi": "write a PMI rank table for FASTA files (with --config=configs/pmi.py)",
    "compile": "compile the train step for --config.compile.topology (a TPU slice, e.g. "
    "v5p:4x4x2; default the local devices) and print per-chip memory, FLOPs and "
    "the compiler's step-time estimate",
    "export": "write a trained or fine-tuned run as a Hugging Face transformers folder: "
    "--config.init=<run folder, fine-tuning arm folder or checkpoint> [--config.step=N] (no "
    "--config; --workdir default: <run folder>/hf)",
    "finetune": "fine-tune a classifier on one labelled task (configs/eval/finetune.py)",
    "evaluate": "run a downstream protocol, write its report (configs/eval/fewshot.py, gue.py, "
    "barcodes.py)",
    "embed": "write embeddings of a FASTA / CSV / TSV file (configs/eval/embed.py)",
}
EXPORT_KEYS = ("init", "step")
DOWNSTREAM_MODES = ("finetune", "evaluate", "embed")
USAGE_ERROR = 2
_CONFIG = flags.DEFINE_string(
    "config",
    None,
    "Config file and presets, path[:preset,key=value,...]; single keys also "
    "as --config.<key>=<value>.",
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run folder; give an existing one to resume it. Default: a new runs/<recipe>-<date>-<time>.",
)
_MODE = flags.DEFINE_string("mode", "train", f"What to run: {', '.join(MODES)}.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the traceback of a usage error.")
_OVERRIDES: dict[str, str] = {}  # --config.<key>=<value>, in command-line order


def help_text() -> str:
    """The ``--help`` page: usage, modes, recipes with presets, resuming, flags."""
    lines = [
        "Pretrain DNA language models with smart masking (CM-GEMS / GeneMask, BarcodeMAE).",
        "",
        "usage: python -m gemsjax.main --config=configs/<recipe>.py[:preset,...] "
        "[--mode=MODE] [--workdir=DIR] [--config.<key>=<value> ...]",
        "",
        "modes:",
    ]
    width = max(map(len, MODES))
    lines += [f"  {name:<{width}} {what}" for name, what in MODES.items()]
    lines += ["", f"recipes ({config_lib.CONFIGS_DIR.name}/<recipe>.py) and their presets:"]
    lines += _config_entries(config_lib.CONFIGS_DIR / f"{name}.py" for name in config_lib.recipes())
    lines += [
        "",
        "downstream configs (configs/eval/<name>.py, with the mode that runs them) and their "
        "presets:",
    ]
    lines += _config_entries(
        sorted((config_lib.CONFIGS_DIR / "eval").glob("*.py")), eval_modes=True
    )
    lines += [
        "",
        "--config also takes a bare recipe name: --config=cm_gems:smoke.",
        "Presets combine with commas, in order: a preset above, a model size of a training",
        "recipe (:dnabert6, :logo, ...) or key=value (:train.steps=200). Every run checks",
        "all keys and ranges before it starts.",
        "",
        "resume: a training run resumes from the newest checkpoint in its workdir. The",
        "default workdir is new each time, so resume with the folder the run printed:",
        "  python -m gemsjax.main --config=configs/cm_gems.py --workdir=runs/cm_gems-<date>-<time>",
        "",
        "flags:",
        flags.FLAGS.module_help(sys.modules[__name__].__name__) or "",
    ]
    return "\n".join(lines)


def _config_entries(paths, eval_modes: bool = False) -> list[str]:
    """``--help`` lines for config files: name (and the ``--mode`` of a downstream config), the
    first paragraph of its docstring, its presets."""
    from gemsjax.eval import config as eval_config

    modes = {p: m for m, protocols in eval_config.MODE_PROTOCOLS.items() for p in protocols}
    entries = []
    for path in paths:
        module = config_lib.load_module(path)
        name = path.stem
        if eval_modes:
            name += f" (--mode={modes[module.get_config().protocol]})"
        summary = " ".join(module.__doc__.split("\n\n")[0].replace("``", "").split())
        entries.append((name, summary, module.PRESETS))
    indent = " " * (3 + max(len(name) for name, _, _ in entries))
    lines = []
    for name, summary, presets in entries:
        lines += textwrap.wrap(
            summary, 96, initial_indent=f"  {name:<{len(indent) - 3}} ", subsequent_indent=indent
        )
        lines.append(indent + "presets: " + ", ".join(presets))
    return lines


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing; ``--config.<key>=<value>`` items are set aside for the config and
    ``--help`` prints :func:`help_text`. A bad flag is a one-line usage error."""
    rest = []
    for arg in argv:
        if arg in ("--help", "-h", "--helpshort", "-?"):
            print(help_text())
            sys.exit(0)
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                _usage_error(f"{arg}: write config overrides as --config.<key>=<value>")
            _OVERRIDES[key] = value
        else:
            rest.append(arg)
    try:
        return flags.FLAGS(rest)
    except flags.Error as err:
        _usage_error(f"{err}; see --help")


def _usage_error(message: str) -> None:
    print(f"gemsjax: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


def load_config(spec: str | None, mode: str, overrides: dict[str, str]):
    """The validated config for ``mode``; a missing ``--config``, an unknown mode or a config of
    the other kind (the PMI config for training, a training config for ``pmi``) raise
    :class:`UserError` naming the choices."""
    if mode not in MODES:
        raise UserError(f"unknown --mode={mode}; valid: {', '.join(MODES)}")
    recipes = ", ".join(f"configs/{name}.py" for name in config_lib.recipes())
    if not spec:
        raise UserError(
            f"--config is required, e.g. --config=configs/cm_gems.py; recipes: {recipes}"
        )
    if mode in DOWNSTREAM_MODES:
        from gemsjax.eval import config as eval_config

        return eval_config.load(spec, overrides, mode)
    if spec.partition(":")[0].startswith("configs/eval/"):
        raise UserError(
            f"{spec} is a downstream config: run it with --mode=finetune, evaluate or "
            "embed (as its docstring says)"
        )
    config = config_lib.load(spec, overrides)
    is_pmi = config.recipe == config_lib.PMI_RECIPE
    if mode == "pmi" and not is_pmi:
        raise UserError(
            f"--mode=pmi needs the PMI config (--config=configs/pmi.py); {spec} "
            "is a training recipe: run it with --mode=train or --mode=data"
        )
    if mode != "pmi" and is_pmi:
        raise UserError(
            f"{spec} is the PMI config: run it with --mode=pmi; --mode={mode} "
            f"needs a training recipe: "
            + ", ".join(
                f"configs/{name}.py"
                for name in config_lib.recipes()
                if name != config_lib.PMI_RECIPE
            )
        )
    return config


def default_workdir(config) -> pathlib.Path:
    """``runs/<recipe or protocol>-<date>-<time>``; multi-process runs must name one shared
    ``--workdir``."""
    if os.environ.get("GEMSJAX_DISTRIBUTED") == "1":
        raise UserError("a multi-process run needs --workdir (the same folder for every process)")
    name = config.get("recipe") or config.protocol
    return pathlib.Path("runs") / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def run_pmi(config, workdir: pathlib.Path) -> dict:
    """Count n-grams of ``config.fasta_paths`` (default: the shipped genome sample), rank 6-mers."""
    from gemsjax import pmi
    from gemsjax.data import samples

    paths = list(config.fasta_paths) or [str(samples.sample_path(samples.GENOME))]
    out = workdir / config.out
    workdir.mkdir(parents=True, exist_ok=True)
    pmi.rank_table_from_fasta(
        paths,
        out,
        k=config.k,
        max_n=config.max_n,
        min_count=config.min_count,
        denominator=config.denominator,
    )
    # Rank 4**k is both "unscored" and the worst scored rank: the header counts the scored k-mers.
    scored = pmi.load_rank_table(out)[2]["n_scored"]
    summary = dict(rank_table=str(out), fasta=paths, scored_kmers=scored)
    if scored < 4**config.k:
        summary["note"] = (
            f"{4**config.k - scored} k-mers were seen fewer than min_count="
            f"{config.min_count} times and share the worst rank; count a larger "
            "genome or lower --config.min_count"
        )
    return summary


def run_data(config) -> dict:
    """Build the training pipeline and summarize its first batch; ``unk_fraction`` is the share
    of ``[UNK]`` among the real (attended) tokens, padding excluded (barcodes pad with
    ``[UNK]``)."""
    import numpy as np

    from gemsjax.data import pipelines
    from gemsjax.tokenizers import data_tokenizer

    batch = next(pipelines.make_pretraining_iterator(config, "train"))
    ids, attention = batch["ids"], batch["attention"]
    tokenizer = data_tokenizer(config.data.kind, config.data.get("k", 6))
    first = tokenizer.decode(ids[:1])[0]
    unk = (ids == tokenizer.vocab.unk_id) & (attention > 0)
    return dict(
        shape=list(ids.shape),
        dtype=str(ids.dtype),
        tokens_per_row=float(attention.sum(axis=1).mean()),
        unk_fraction=float(unk.sum() / max(attention.sum(), 1)),
        distinct_ids=int(np.unique(ids).size),
        first_sequence=first[:60] + "...",
    )


def run_export(overrides: dict[str, str], workdir: pathlib.Path | None) -> dict:
    """Export the run or checkpoint ``--config.init`` (step ``--config.step``, default the
    newest) with :func:`gemsjax.interop.hf.export_run`."""
    from gemsjax.interop import hf

    unknown = sorted(set(overrides) - set(EXPORT_KEYS))
    if unknown or not overrides.get("init"):
        raise UserError(
            "--mode=export takes --config.init=<run folder or checkpoint> and "
            "optionally --config.step=<step>" + (f"; unknown key(s) {unknown}" if unknown else "")
        )
    step = overrides.get("step")
    if step is not None and not step.isdigit():
        raise UserError(f"--config.step={step}: must be a checkpoint step (an integer >= 0)")
    return hf.export_run(overrides["init"], workdir, step=None if step is None else int(step))


def run_train(config, workdir: pathlib.Path) -> dict:
    """Train in ``workdir`` with its run files (config.json, train.log, the curve picture)."""
    import jax

    from gemsjax.train import run_files
    from gemsjax.train import workdir as workdir_lib
    from gemsjax.train.loop import train_and_evaluate

    lead = jax.process_index() == 0
    # Locked first: a refused second run writes nothing into the folder (config.json is written
    # by the loop once the checkpoint's settings are accepted).
    with workdir_lib.lock(workdir, enabled=lead), run_files.tee_log(workdir, enabled=lead):
        summary = train_and_evaluate(config, workdir)
        summary["workdir"] = remote.shown(workdir)
        if lead:
            summary["curves"] = str(run_files.plot_curves(workdir, summary["switch_step"]))
        if config.downstream.eval and not summary["stopped"]:
            from gemsjax.eval.downstream import after_pretraining

            summary["downstream"] = after_pretraining(config, workdir)
        _print_summary(summary)
    return summary


def run_downstream(mode: str, config, workdir: pathlib.Path) -> dict:
    """``finetune`` / ``evaluate`` (the protocol in ``gemsjax.eval.PROTOCOLS``) / ``embed``; the
    summary leaves out the table, which the run printed."""
    import importlib

    from gemsjax.eval import PROTOCOLS

    if mode == "embed":
        from gemsjax.eval import embed

        return embed.run(config, workdir)
    module, _, function = PROTOCOLS[config.protocol].partition(":")
    summary = getattr(importlib.import_module(module), function)(config, workdir)
    return {k: v for k, v in summary.items() if k not in ("markdown", "rows")}


def _print_summary(summary: dict) -> None:
    import jax

    if jax.process_index() == 0:
        print("gemsjax summary: " + json.dumps(summary, sort_keys=True, default=str), flush=True)


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument(s) {argv[1:]}; flags are --name=value, see --help")
    if not flags.FLAGS["verbosity"].present:  # Orbax / XLA info lines drown the progress line
        logging.set_verbosity(logging.WARNING)
    if os.environ.get("GEMSJAX_DISTRIBUTED", "0") != "0":  # before anything starts JAX
        from gemsjax.train import sharding

        try:
            sharding.maybe_initialize_distributed()
        except ValueError as err:
            raise UserError(str(err)) from None
    if _MODE.value == "export":
        if _CONFIG.value:
            raise UserError(
                "--mode=export reads the run's own config; drop --config and name "
                "the run with --config.init=<run folder or checkpoint>"
            )
        with _workdir(_WORKDIR.value) as workdir:
            _print_summary(run_export(_OVERRIDES, workdir))
        return
    config = load_config(_CONFIG.value, _MODE.value, _OVERRIDES)
    with _workdir(_WORKDIR.value or str(default_workdir(config))) as workdir:
        if _MODE.value == "train":
            run_train(config, workdir)
        elif _MODE.value in DOWNSTREAM_MODES:
            _print_summary(run_downstream(_MODE.value, config, workdir))
        elif _MODE.value == "compile":
            from gemsjax.train import compile_ahead

            _print_summary(compile_ahead.run(config))
        else:
            _print_summary(run_pmi(config, workdir) if _MODE.value == "pmi" else run_data(config))


@contextlib.contextmanager
def _workdir(value: str | None):
    """``--workdir`` as the local folder the command writes in: the path itself, or for a URL
    (``gs://bucket/run``) its staging copy, pushed to the URL when the command ends
    (:mod:`gemsjax.remote`); None stays None (``--mode=export``'s default)."""
    if value is None or not remote.is_url(value):
        yield None if value is None else pathlib.Path(value)
        return
    import jax

    with remote.staged_workdir(value, lead=jax.process_index() == 0) as local:
        yield local


def run(argv):
    """``main`` with user errors as one line and exit status 2 (``--traceback``: re-raised)."""
    try:
        main(argv)
    except UserError as err:
        if _TRACEBACK.value:
            raise
        _usage_error(str(err))


if __name__ == "__main__":
    host_memory.keep_freed_memory()
    app.run(run, flags_parser=parse_flags)
