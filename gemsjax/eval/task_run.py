"""Fine-tune one labelled task for each init arm (pretrained, random baseline) and score it.

What ``--mode=finetune`` runs for its task and the GUE protocol runs for each of its tasks:
checks the splits (labels inside the task's classes), picks the tokens per row (counting the
rows that get truncated), builds one :class:`~gemsjax.eval.finetune.Finetuner` per arm and runs
:func:`~gemsjax.eval.finetune.finetune` in ``<workdir>/<arm>`` (checkpointed, resumable).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax

from gemsjax.data import tables
from gemsjax.eval import finetune as ft
from gemsjax.eval import init as init_lib
from gemsjax.eval import labelled, report
from gemsjax.train.loop import compute_dtype


@dataclasses.dataclass(frozen=True)
class Splits:
    """A task's tables (``dev`` may be None) and its number of classes; ``note`` says how the
    splits were made when they are not the files as given (e.g. train cut from dev)."""

    name: str
    train: tables.LabelledTable
    dev: tables.LabelledTable | None
    test: tables.LabelledTable
    num_labels: int
    note: str = ""


def check_splits(splits: Splits) -> None:
    """Every split's labels inside ``[0, num_labels)`` (UserError naming file and line)."""
    for what, table in (
        ("train split", splits.train),
        ("dev split", splits.dev),
        ("test split", splits.test),
    ):
        if table is not None:
            labelled.check_labels(table, splits.num_labels, what)


def arms(encoder: init_lib.Encoder, baseline: bool) -> list[tuple[str, init_lib.Encoder]]:
    """``[(arm name, encoder)]``: the init itself, and its random twin when ``baseline``."""
    if encoder.params is None:
        return [("random", encoder)]
    return [("pretrained", encoder)] + ([("random", encoder.random_baseline())] if baseline else [])


def run_task(
    splits: Splits,
    encoders: list[tuple[str, init_lib.Encoder]],
    hyper: ft.Hyper,
    max_len: int,
    workdir: pathlib.Path,
    mesh,
    *,
    checkpoint_every: int,
    log_every: int,
    sigterm,
) -> list[dict]:
    """Fine-tune and score ``splits`` once per arm (one :class:`~gemsjax.eval.finetune.Finetuner`:
    the arms share its compiled steps); returns one result dict per arm (test scores, dev
    history, truncation counts)."""
    check_splits(splits)
    present = [t for t in (splits.train, splits.dev, splits.test) if t is not None]
    needed = labelled.tokens_needed([s for t in present for s in t.sequences], encoders[0][1].vocab)
    max_len = labelled.choose_max_len(max_len, needed, encoders[0][1].model_cfg.max_positions)
    cut, offset = {}, 0
    for what, table in (("train", splits.train), ("dev", splits.dev), ("test", splits.test)):
        if table is not None:
            cut[what] = labelled.truncated(needed[offset : offset + len(table)], max_len)
            offset += len(table)
    steps = ft.steps_per_epoch(len(splits.train), hyper.batch_size) * hyper.epochs
    results = []
    tuner = ft.Finetuner(
        encoders[0][1], splits.num_labels, hyper, max_len, steps, mesh, compute_dtype("auto")
    )
    for arm, encoder in encoders:
        out = ft.finetune(
            tuner,
            splits.train,
            splits.dev,
            splits.test,
            workdir / arm,
            encoder_params=encoder.params,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            sigterm=sigterm,
            facts=dict(
                task=splits.name, arm=arm, source=encoder.source, labels=_label_names(splits)
            ),
        )
        results.append(
            dict(
                task=splits.name,
                arm=arm,
                source=encoder.source,
                max_len=max_len,
                truncated=cut,
                note=splits.note,
                **out,
            )
        )
        if jax.process_index() == 0 and out["test"] is not None:
            _plots(workdir, splits, arm, out)
    return results


def _label_names(splits: Splits) -> list[str]:
    """The class names of the training file when it names every class, else ``LABEL_<i>``."""
    names = splits.train.label_names
    if len(names) == splits.num_labels:
        return list(names)
    return [f"LABEL_{i}" for i in range(splits.num_labels)]


def _plots(workdir: pathlib.Path, splits: Splits, arm: str, out: dict) -> None:
    losses = out["train_losses"]
    curves = {"train loss": (range(1, len(losses) + 1), losses)}
    if out["dev_history"]:
        curves["dev loss"] = (
            [h["step"] for h in out["dev_history"]],
            [h["loss"] for h in out["dev_history"]],
        )
    report.plot_curves(workdir / f"curves_{arm}.png", curves, "loss", f"{splits.name} ({arm})")
    if splits.num_labels > 2:
        report.plot_confusion(
            workdir / f"confusion_{arm}.png",
            out["test"]["confusion"],
            [str(i) for i in range(splits.num_labels)],
            f"{splits.name} ({arm}), test",
        )


COLUMNS = ["task", "init", "accuracy", "macro_f1", "mcc", "test_loss", "best_step"]


def run(config, workdir: str | pathlib.Path) -> dict:
    """``--mode=finetune``: fine-tune ``config.task`` from ``config.init`` (and its random
    baseline), write ``results.json`` / ``results.md`` / plots, print the table."""
    from gemsjax.eval.config import validate
    from gemsjax.train import checkpoint, sharding

    validate(config)
    workdir = pathlib.Path(workdir)
    t = config.task
    train = labelled.read_split(t.train, t.format)
    dev = labelled.read_split(t.dev, t.format) if t.dev else None
    test = labelled.read_split(t.test, t.format)
    splits = Splits(
        t.name or pathlib.Path(t.train).stem,
        train,
        dev,
        test,
        t.num_labels or labelled.num_labels_of(train, dev, test),
    )
    vocab = labelled.VOCAB_OF_FORMAT[t.format]
    encoder = init_lib.load_encoder(
        config.init,
        vocab=vocab,
        model_name=config.model.name if config.init.startswith("random") else "",
    )
    hyper = ft.Hyper.from_config(config.finetune)
    mesh = sharding.make_mesh(config.mesh_data, config.mesh_fsdp)
    with jax.set_mesh(mesh), checkpoint.sigterm_watch() as sigterm:
        results = run_task(
            splits,
            arms(encoder, config.baseline),
            hyper,
            config.max_len,
            workdir,
            mesh,
            checkpoint_every=config.checkpoint_every,
            log_every=config.log_every,
            sigterm=sigterm,
        )
    rows = [
        dict(
            task=r["task"],
            init=f"{r['arm']}: {r['source']}",
            test_loss=r["test"]["loss"],
            best_step=r["best_step"],
            **{k: r["test"][k] for k in ("accuracy", "macro_f1", "mcc")},
        )
        for r in results
        if r["test"] is not None
    ]
    first = results[0]
    notes = [
        f"{first['max_len']} tokens per row; truncated rows per split: {first['truncated']}",
        f"lr {hyper.learning_rate}, {hyper.epochs} epochs, batch {hyper.batch_size}"
        + ("; test scored with the best-dev-loss checkpoint" if dev is not None else ""),
    ]
    stopped = [r["arm"] for r in results if r["stopped"]]
    if stopped:
        notes.append(f"stopped by SIGTERM ({stopped}); run the same command to resume")
    text = report.write_report(
        workdir,
        f"Fine-tuning: {splits.name}",
        rows,
        COLUMNS,
        notes=notes,
        extra=dict(runs=[{k: v for k, v in r.items() if k != "train_losses"} for r in results]),
    )
    return dict(rows=rows, markdown=text, stopped=bool(stopped))
