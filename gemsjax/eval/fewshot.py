"""The GeneMask few-shot protocol: n shots per class, 10 draws, mean ± std on the test file.

For each setting ``n`` (``config.shots``) and each draw ``d`` (``config.draws``):

1. draw ``n`` training rows of every class from the pool, stratified and without replacement,
   with ``default_rng([seed, n, d])`` (:func:`gemsjax.eval.labelled.stratified_draw`): seeded,
   and different across draws; the pretrained and the random-init arm get the same draws;
2. fine-tune a fresh classifier (the encoder's weights, a new head seeded by ``d``) with the
   reference hyper-parameters (:func:`reference_hyper`; ``config.finetune`` overrides them);
3. score it on the test file: accuracy, macro-F1, MCC (and the confusion matrix).

Reported: mean ± sample std over draws, per setting and arm. One :class:`Finetuner` per setting
compiles init, train step and predict step once; every draw and both arms reuse them (the
report records the number of train-step compilations).

The pool is the union of a GeneMask task folder's shot files (``<shots>/train*.tsv``, duplicate
sequences dropped), because each of those files holds exactly one setting's examples and
drawing from it alone would give every draw the same set; ``task.pool`` names a single file
instead (the shipped 20-row sample: its 10-shot draws all hold the same 20 rows, and differ in
order, head init and dropout). ``test_subsample=N`` scores on a fixed stratified subsample of N
test rows (seed 0) for CPU runs; the report says so.

Draws already done are read back from ``<workdir>/<task>/draws.jsonl`` when the command is run
again (resume); SIGTERM stops between draws.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import ml_collections
import numpy as np

from gemsjax.data import samples, tables
from gemsjax.errors import UserError
from gemsjax.eval import finetune as ft
from gemsjax.eval import init as init_lib
from gemsjax.eval import labelled, report, scores
from gemsjax.eval.config import validate
from gemsjax.train import checkpoint, sharding
from gemsjax.train.loop import compute_dtype

COLUMNS = ["task", "shots", "init", "accuracy", "macro_f1", "mcc", "draws"]


def reference_hyper(shots: int) -> dict:
    """GeneMask / DNABERT few-shot fine-tuning: lr 1e-4, 20 epochs, batch 5 below 500 shots per
    class; 5e-5, 5 epochs, batch 15 from 500; warmup 10 % in all settings."""
    if shots < 500:
        return dict(learning_rate=1e-4, epochs=20, batch_size=5, warmup=0.1)
    return dict(learning_rate=5e-5, epochs=5, batch_size=15, warmup=0.1)


def hyper_for(config: ml_collections.ConfigDict, shots: int) -> ft.Hyper:
    """:func:`reference_hyper` with the non-zero ``config.finetune`` values on top."""
    values = dict(config.finetune.to_dict())
    for key, value in reference_hyper(shots).items():
        if key != "warmup" and not values[key]:
            values[key] = value
    return ft.Hyper(**values)


def _existing(*candidates: pathlib.Path) -> pathlib.Path | None:
    return next((p for p in candidates if p.is_file()), None)


def task_files(config: ml_collections.ConfigDict) -> tuple[list[pathlib.Path], pathlib.Path]:
    """``(pool files, test file)`` of the task (see the module docstring)."""
    t = config.task
    if not t.dir:
        return [pathlib.Path(t.pool or samples.sample_path(samples.PROM_CORE_TRAIN))], (
            pathlib.Path(t.test or samples.sample_path(samples.PROM_CORE_TEST))
        )
    folder = pathlib.Path(t.dir)
    if not folder.is_dir():
        raise UserError(
            f"task.dir={t.dir!r} is not a folder; point it at a GeneMask task folder "
            "(e.g. Prom-core, holding 10/train.tsv ... and test.tsv)"
        )
    pool = sorted(
        (p for sub in folder.iterdir() if sub.name.isdigit() for p in sub.glob("train*.tsv*")),
        key=lambda p: int(p.parent.name),
    )
    test = (
        pathlib.Path(t.test)
        if t.test
        else _existing(
            *(folder / d / f"test.tsv{z}" for d in ("", "full-dataset") for z in ("", ".gz"))
        )
    )
    if not pool:
        raise UserError(
            f"{folder}: no shot files (<shots>/train*.tsv); is it a GeneMask task folder?"
        )
    if test is None:
        raise UserError(
            f"{folder}: no test.tsv (nor full-dataset/test.tsv); the GeneMask release"
            " has none for this task (Prom-300, Cohn-enh): set task.test to a file"
        )
    return pool, test


def task_name(config: ml_collections.ConfigDict) -> str:
    """``task.name``, else the task folder's name, the pool file's stem or the sample's name."""
    t = config.task
    if t.name or t.dir:
        return t.name or pathlib.Path(t.dir).name
    return pathlib.Path(t.pool).name.split(".")[0] if t.pool else "prom_core_sample"


def read_pool(paths: list[pathlib.Path]) -> tables.LabelledTable:
    """The union of the shot files, duplicate sequences dropped (first one kept)."""
    parts = [labelled.read_split(p, "genemask") for p in paths]
    if len(parts) == 1:
        return parts[0]
    seen, rows, source = set(), [], []
    for part_index, part in enumerate(parts):
        for row, seq in enumerate(part.sequences):
            if seq not in seen:
                seen.add(seq)
                rows.append((part_index, row))
    sequences = [parts[p].sequences[r] for p, r in rows]
    labels = np.asarray([parts[p].labels[r] for p, r in rows], np.int32)
    names = max((p.label_names for p in parts), key=len)
    source = " + ".join(str(p) for p in paths)
    return tables.LabelledTable(sequences, labels, names, source)


def _done_draws(path: pathlib.Path) -> dict[tuple, dict]:
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["shots"], r["arm"], r["draw"]): r for r in records}


def evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Run the protocol; writes ``results.json``, ``results.md`` and plots into ``workdir``."""
    validate(config)
    workdir = pathlib.Path(workdir)
    started = time.perf_counter()
    pool_files, test_file = task_files(config)
    pool = read_pool(pool_files)
    test = labelled.read_split(test_file, "genemask")
    num_labels = config.task.num_labels or labelled.num_labels_of(pool, test)
    labelled.check_labels(pool, num_labels, "train pool")
    labelled.check_labels(test, num_labels, "test file")
    test_rows = len(test)
    if config.test_subsample:
        test = labelled.subset(
            test, labelled.stratified_subsample(test.labels, config.test_subsample)
        )
    pretrained = init_lib.load_encoder(
        config.init,
        model_name=config.model.name if config.init.startswith("random") else "",
        vocab="dnabert",
    )
    arms = [("pretrained" if pretrained.params is not None else "random", pretrained)]
    if config.baseline and pretrained.params is not None:
        arms.append(("random", pretrained.random_baseline()))
    needed = labelled.tokens_needed(pool.sequences + test.sequences, "dnabert")
    max_len = labelled.choose_max_len(config.max_len, needed, pretrained.model_cfg.max_positions)
    truncated = dict(
        pool=labelled.truncated(needed[: len(pool)], max_len),
        test=labelled.truncated(needed[len(pool) :], max_len),
    )
    name = task_name(config)
    task_dir = workdir / name
    task_dir.mkdir(parents=True, exist_ok=True)
    draws_path = task_dir / "draws.jsonl"
    done = _done_draws(draws_path)
    mesh = sharding.make_mesh(config.mesh_data, config.mesh_fsdp)
    records, compiles, stopped = [], {}, None
    with jax.set_mesh(mesh), checkpoint.sigterm_watch() as sigterm:
        for shots in config.shots:
            hyper = hyper_for(config, shots)
            steps = ft.steps_per_epoch(shots * num_labels, hyper.batch_size) * hyper.epochs
            tuner = ft.Finetuner(
                pretrained, num_labels, hyper, max_len, steps, mesh, compute_dtype("auto")
            )
            for arm, encoder in arms:
                for draw in range(config.draws):
                    key = (shots, arm, draw)
                    if key not in done:
                        if sigterm.is_set():
                            stopped = "SIGTERM"
                            break
                        done[key] = _run_draw(
                            tuner, encoder, pool, test, shots, arm, draw, config.seed, num_labels
                        )
                        if jax.process_index() == 0:
                            with open(draws_path, "a", encoding="utf-8") as f:
                                f.write(json.dumps(done[key]) + "\n")
                    records.append(done[key])
            compiles[shots] = tuner.train_step._cache_size()
    seconds = time.perf_counter() - started
    return _report(
        config,
        workdir,
        name,
        records,
        arms,
        dict(
            pool=pool.source,
            pool_rows=len(pool),
            test=str(test_file),
            test_rows=len(test),
            test_rows_in_file=test_rows,
            max_len=max_len,
            truncated=truncated,
            train_step_compiles=compiles,
            seconds=seconds,
            stopped=stopped,
            num_labels=num_labels,
        ),
    )


def _run_draw(
    tuner: ft.Finetuner,
    encoder: init_lib.Encoder,
    pool: tables.LabelledTable,
    test: tables.LabelledTable,
    shots: int,
    arm: str,
    draw: int,
    seed: int,
    num_labels: int,
) -> dict:
    started = time.perf_counter()
    rows = labelled.stratified_draw(pool, shots, [seed, shots, draw], num_labels)
    train = labelled.subset(pool, rows)
    state = tuner.init(draw, encoder.params)
    state, losses = ft.train_run(
        tuner, state, tuner.train_batches(train, seed + draw, tuner.hyper.epochs), tuner.total_steps
    )
    result = ft.evaluate_split(tuner, state, test)
    line = (
        f"few-shot {shots}-shot {arm} draw {draw}: train loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f}, test acc {result['accuracy']:.4f} mcc {result['mcc']:.4f} "
        f"({time.perf_counter() - started:.1f} s)"
    )
    if jax.process_index() == 0:
        print(line, flush=True)
    return dict(
        shots=shots,
        arm=arm,
        draw=draw,
        source=encoder.source,
        losses=losses,
        rows=[int(r) for r in rows],
        seconds=time.perf_counter() - started,
        **result,
    )


def summarize(records: list[dict], task: str) -> list[dict]:
    """Table rows: one per (shots, arm) with mean ± std of the scores over its draws."""
    rows = []
    for shots in sorted({r["shots"] for r in records}):
        for arm in dict.fromkeys(r["arm"] for r in records if r["shots"] == shots):
            group = [r for r in records if r["shots"] == shots and r["arm"] == arm]
            rows.append(
                dict(
                    task=task,
                    shots=shots,
                    init=f"{arm}: {group[0]['source']}",
                    arm=arm,
                    draws=len(group),
                    **{k: scores.mean_std([r[k] for r in group]) for k in scores.SCORES},
                )
            )
    return rows


def _report(
    config, workdir: pathlib.Path, task: str, records: list[dict], arms, info: dict
) -> dict:
    rows = summarize(records, task)
    notes = [
        f"{info['test_rows']} test rows"
        + (
            f" (a fixed stratified subsample, seed 0, of the file's {info['test_rows_in_file']}"
            "; test_subsample=0 scores them all)"
            if info["test_rows"] < info["test_rows_in_file"]
            else ""
        )
        + f" of {info['test']}",
        f"draws from a pool of {info['pool_rows']} rows ({info['pool']}); reference "
        "hyper-parameters (lr 1e-4 / 20 epochs / batch 5 below 500 shots, 5e-5 / 5 / 15 from "
        "500; warmup 10 %)",
        f"{info['max_len']} tokens per row; truncated rows: {info['truncated']['pool']} of the "
        f"pool, {info['truncated']['test']} of the test file",
        f"one compiled train step per setting: {info['train_step_compiles']} compilations "
        f"(shots: count); {info['seconds']:.0f} s in all",
    ]
    if info["stopped"]:
        notes.append(f"stopped by {info['stopped']}: run the same command to finish the draws")
    _plots(workdir, task, records, rows, info["num_labels"])
    text = report.write_report(
        workdir, f"GeneMask few-shot: {task}", rows, COLUMNS, notes=notes, extra=dict(info=info)
    )
    return dict(rows=rows, markdown=text, **info)


def _plots(
    workdir: pathlib.Path, task: str, records: list[dict], rows: list[dict], num_labels: int
) -> None:
    if jax.process_index() != 0 or not records:
        return
    for shots in sorted({r["shots"] for r in records}):
        curves = {
            f"{r['arm']} draw {r['draw']}": (np.arange(1, len(r["losses"]) + 1), r["losses"])
            for r in records
            if r["shots"] == shots
        }
        report.plot_curves(
            workdir / f"curves_{task}_{shots}shot.png",
            curves,
            "training loss",
            f"{task}, {shots} shots per class",
        )
    report.plot_bars(
        workdir / f"mcc_{task}.png",
        [f"{r['shots']}-shot {r['arm']}" for r in rows],
        [r["mcc"][0] for r in rows],
        [r["mcc"][1] for r in rows],
        "test MCC",
        f"{task}: mean ± std over draws",
    )
    if num_labels > 2:
        for row in rows:
            total = sum(
                np.asarray(r["confusion"])
                for r in records
                if r["shots"] == row["shots"] and r["arm"] == row["arm"]
            )
            report.plot_confusion(
                workdir / f"confusion_{task}_{row['shots']}shot_{row['arm']}.png",
                total,
                [str(i) for i in range(num_labels)],
                f"{row['shots']}-shot {row['arm']}, summed over draws",
            )
