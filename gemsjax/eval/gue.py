"""The GUE protocol (DNABERT-2's benchmark) over any folder of GUE-format tasks.

A task is a folder holding ``dev.csv`` and ``test.csv`` (plain or ``.gz``) and normally
``train.csv``; the task's name is its path under ``gue_dir`` (``prom/prom_core_tata``).
Each task is fine-tuned as DNABERT-2 does for CM-GEMS (:func:`reference`): AdamW lr 3e-5,
global batch 32, weight decay 0.01, warmup 50 updates (30 for mouse and tf), the task's
epochs and maximum length, the dev split evaluated every epoch, the best-dev-loss checkpoint
used for the test split. Scored by MCC, except ``virus/covid`` by macro-F1; averaged over the
tasks scored.

A task without ``train.csv`` is reported as skipped, with the reason, unless
``train_on_dev_split=s`` > 0: then a fixed stratified share ``s`` of its dev file (seed 0)
trains and the rest is its dev split, and the table says so. ``max_train_rows`` /
``max_eval_rows`` cut fixed stratified subsamples (seed 0) for CPU runs; the table says so too.
"""

from __future__ import annotations

import pathlib
import time

import jax
import ml_collections
import numpy as np

from gemsjax.errors import UserError
from gemsjax.eval import finetune as ft
from gemsjax.eval import init as init_lib
from gemsjax.eval import labelled, report, task_run
from gemsjax.eval.config import validate
from gemsjax.train import checkpoint, sharding

COLUMNS = ["task", "metric", "pretrained", "random", "train rows", "note"]


def reference(task: str) -> dict:
    """Per-task settings of the CM-GEMS GUE scripts: ``max_len`` (tokens) and ``epochs``, and
    the warmup (updates)."""
    leaf = task.rstrip("/").split("/")[-1]
    if task.startswith("EMP"):
        return dict(max_len=512, epochs=3, warmup=50)
    if leaf.startswith("prom_core"):
        return dict(
            max_len=80,
            epochs=10 if leaf.endswith("tata") and "notata" not in leaf else 4,
            warmup=50,
        )
    if leaf.startswith("prom_300"):
        return dict(
            max_len=310,
            epochs=10 if leaf.endswith("tata") and "notata" not in leaf else 4,
            warmup=50,
        )
    if task.startswith("splice"):
        return dict(max_len=410, epochs=5, warmup=50)
    if leaf == "covid":
        return dict(max_len=1024, epochs=9, warmup=50)
    if task.startswith("mouse"):
        return dict(max_len=110, epochs=5, warmup=30)
    if task.startswith("tf"):
        return dict(max_len=110, epochs=3, warmup=30)
    return dict(max_len=512, epochs=3, warmup=50)


def find_tasks(gue_dir: pathlib.Path) -> list[str]:
    """Task names (paths under ``gue_dir``) of every folder with a test file, sorted."""
    if not gue_dir.is_dir():
        raise UserError(
            f"gue_dir={str(gue_dir)!r} is not a folder; point it at a GUE folder "
            "(holding EMP/, prom/, splice/, tf/, ...)"
        )
    tasks = sorted({str(p.parent.relative_to(gue_dir)) for p in gue_dir.rglob("test.csv*")})
    if not tasks:
        raise UserError(f"{gue_dir}: no task folder (one with test.csv) inside; is it GUE?")
    return tasks


def _split_file(folder: pathlib.Path, split: str) -> pathlib.Path | None:
    return next(
        (p for p in (folder / f"{split}.csv", folder / f"{split}.csv.gz") if p.is_file()), None
    )


def load_task(
    config: ml_collections.ConfigDict, gue_dir: pathlib.Path, task: str
) -> task_run.Splits | str:
    """The task's splits, or the reason it is skipped."""
    folder = gue_dir / task
    files = {s: _split_file(folder, s) for s in ("train", "dev", "test")}
    if files["test"] is None or files["dev"] is None:
        return f"no {'test' if files['test'] is None else 'dev'}.csv in {folder}"
    dev = labelled.read_split(files["dev"], "gue")
    test = labelled.read_split(files["test"], "gue")
    notes = []
    if files["train"] is not None:
        train = labelled.read_split(files["train"], "gue")
    elif config.train_on_dev_split:
        rows = labelled.stratified_subsample(
            dev.labels, round(config.train_on_dev_split * len(dev))
        )
        rest = np.setdiff1d(np.arange(len(dev)), rows)
        train, dev = labelled.subset(dev, rows), labelled.subset(dev, rest)
        notes.append(f"no train.csv: trained on {len(train)} dev rows, dev = the other {len(dev)}")
    else:
        return "no train.csv (set train_on_dev_split to train on a share of dev)"
    if config.max_train_rows and len(train) > config.max_train_rows:
        train = labelled.subset(
            train, labelled.stratified_subsample(train.labels, config.max_train_rows)
        )
        notes.append(f"train subsample {len(train)}")
    if config.max_eval_rows:
        cut = []
        for name in ("dev", "test"):
            table = dev if name == "dev" else test
            if len(table) > config.max_eval_rows:
                table = labelled.subset(
                    table, labelled.stratified_subsample(table.labels, config.max_eval_rows)
                )
                cut.append(name)
            dev, test = (table, test) if name == "dev" else (dev, table)
        if cut:
            notes.append(f"{'/'.join(cut)} subsample {config.max_eval_rows}")
    return task_run.Splits(
        task, train, dev, test, labelled.num_labels_of(train, dev, test), "; ".join(notes)
    )


def metric_of(task: str) -> str:
    """MCC for every task, macro-F1 for covid (the DNABERT-2 convention)."""
    return "macro_f1" if task.rstrip("/").endswith("covid") else "mcc"


def evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Run every task; writes ``results.json``, ``results.md`` and plots into ``workdir``."""
    validate(config)
    workdir, gue_dir = pathlib.Path(workdir), pathlib.Path(config.gue_dir)
    started = time.perf_counter()
    tasks = list(config.tasks) or find_tasks(gue_dir)
    encoder = init_lib.load_encoder(
        config.init,
        vocab="dnabert",
        model_name=config.model.name if config.init.startswith("random") else "",
    )
    encoders = task_run.arms(encoder, config.baseline)
    mesh = sharding.make_mesh(config.mesh_data, config.mesh_fsdp)
    rows, runs, stopped = [], [], False
    with jax.set_mesh(mesh), checkpoint.sigterm_watch() as sigterm:
        for task in tasks:
            metric = metric_of(task)
            splits = load_task(config, gue_dir, task)
            if isinstance(splits, str):
                rows.append(dict(task=task, metric=metric, note=f"skipped: {splits}"))
                continue
            ref = reference(task)
            hyper = ft.Hyper(
                **{
                    **config.finetune.to_dict(),
                    "learning_rate": config.finetune.learning_rate or 3e-5,
                    "batch_size": config.finetune.batch_size or 32,
                    "epochs": config.finetune.epochs or ref["epochs"],
                    "warmup": ref["warmup"],
                }
            )
            max_len = config.max_len or min(ref["max_len"], _data_len(splits))
            results = task_run.run_task(
                splits,
                encoders,
                hyper,
                max_len,
                workdir / task.replace("/", "_"),
                mesh,
                checkpoint_every=config.checkpoint_every,
                log_every=config.log_every,
                sigterm=sigterm,
            )
            runs += results
            row = dict(
                task=task, metric=metric, **{"train rows": len(splits.train)}, note=splits.note
            )
            for r in results:
                row[r["arm"]] = r["test"][metric] if r["test"] is not None else None
                if sum(r["truncated"].values()):
                    row["note"] = "; ".join(
                        filter(None, [row["note"], f"truncated {r['truncated']}"])
                    )
            rows.append(row)
            if any(r["stopped"] for r in results):
                stopped = True
                break
    scored = [r for r in rows if r.get("pretrained", r.get("random")) is not None]
    average = dict(task=f"average ({len(scored)} tasks)", metric="")
    for arm in ("pretrained", "random"):
        values = [r[arm] for r in scored if r.get(arm) is not None]
        if values:
            average[arm] = float(np.mean(values))
    rows.append(average)
    notes = [
        f"pretrained = {encoder.source}; random = the same size from random init",
        "DNABERT-2 protocol: lr 3e-5, batch 32, wd 0.01, dev every epoch, test on the "
        "best-dev-loss checkpoint; MCC (covid: macro-F1)",
        f"{time.perf_counter() - started:.0f} s in all",
    ]
    if stopped:
        notes.append("stopped by SIGTERM: run the same command to resume")
    _plot(workdir, scored)
    text = report.write_report(
        workdir,
        f"GUE: {gue_dir}",
        rows,
        COLUMNS,
        notes=notes,
        extra=dict(runs=[{k: v for k, v in r.items() if k != "train_losses"} for r in runs]),
    )
    return dict(
        rows=rows,
        markdown=text,
        tasks=len(tasks),
        scored=len(scored),
        stopped=stopped,
        seconds=time.perf_counter() - started,
    )


def _data_len(splits: task_run.Splits) -> int:
    """Tokens of the longest row, rounded up to a multiple of 8."""
    needed = labelled.tokens_needed(splits.train.sequences + splits.test.sequences, "dnabert")
    return int(-(-needed.max() // 8) * 8)


def _plot(workdir: pathlib.Path, scored: list[dict]) -> None:
    if jax.process_index() != 0 or not scored:
        return
    labels, means = [], []
    for r in scored:
        for arm in ("pretrained", "random"):
            if r.get(arm) is not None:
                labels.append(f"{r['task']} {arm}")
                means.append(r[arm])
    report.plot_bars(
        workdir / "gue_scores.png",
        labels,
        means,
        [0.0] * len(means),
        "test MCC (covid: macro-F1)",
        "GUE",
    )
