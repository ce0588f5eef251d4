"""The issue-11 study: pretrain every arm of a family at one budget, evaluate it, fill RESULTS.md.

    python reproduce/study.py cmgems  [--scale=cpu|paper] [--data=../shared/data] [--out=runs/study]
    python reproduce/study.py barcode [--scale=cpu|paper] ...
    python reproduce/study.py tables  [--out=runs/study]      # RESULTS.md tables from what exists
    python reproduce/study.py cmgems --dry-run                 # print the commands only
    python reproduce/study.py cmgems --arms=genemask,cm_gems   # some arms only

Each arm runs its commands in order (pretrain, then each evaluation); a command whose output exists
is skipped (``train.done`` after a finished pretraining, ``results.json`` after an evaluation), and
a pretraining that was stopped resumes from its newest checkpoint, so the study can be stopped and
rerun arm by arm (``reproduce/run_all.sh`` runs both families under nohup). After every finished
command the tables between the markers in RESULTS.md are rewritten from the ``results.json``
files; an arm without results reads "not run yet"; every command's wall seconds go to
``<out>/<scale>/times.jsonl`` and a wall-time table beside them. Seeds are the configs'
(``seed=0``); every arm of a family has the same model size, batch, sequence length and steps.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "RESULTS.md"
CMGEMS_ARMS = ("dnabert_random", "genemask", "global_pmi", "cm_gems", "cm_step", "untrained")
BARCODE_ARMS = ("barcode_mae", "barcode_bert", "barcode_bert_5m")
FEWSHOT_TASKS = ("Prom-core", "Splice-40")  # Prom-300 has no test file in the GeneMask release

# Per scale: pretraining overrides (same for every arm of a family) and evaluation settings.
SCALES = {
    "smoke": dict(  # seconds per command: proves the commands, measures nothing
        cmgems_train=dict(preset="smoke"),
        fewshot=dict(
            shots={"Prom-core": "(10,)", "Splice-40": "(10,)"}, draws=2, test_subsample=60
        ),
        gue=dict(tasks='("prom/prom_core_tata",)', max_train_rows=64, max_eval_rows=64),
        barcode_train=dict(preset="smoke"),
        eval_presets=":smoke",
        barcode_eval_presets=":smoke",
    ),
    "cpu": dict(
        cmgems_train=dict(
            **{
                "train.steps": 400,
                "data.batch_size": 8,
                "data.max_len": 512,
                "model.name": "logo",
                "train.eval_every": 50,
                "downstream.eval": False,  # the study evaluates every arm itself
            }
        ),
        fewshot=dict(
            shots={"Prom-core": "(10,50)", "Splice-40": "(10,)"}, draws=2, test_subsample=500
        ),
        gue=dict(tasks='("prom/prom_core_all","tf/0")', max_train_rows=1000, max_eval_rows=500),
        barcode_train=dict(**{"train.steps": 200, "data.batch_size": 16, "downstream.eval": False}),
        eval_presets="",
        barcode_eval_presets=":max_query_rows=2000",
    ),
    "paper": dict(
        cmgems_train=dict(preset="paper"),
        fewshot=dict(
            shots={"Prom-core": "(10,50)", "Splice-40": "(10,50)"}, draws=10, test_subsample=0
        ),
        gue=dict(tasks="()", max_train_rows=0, max_eval_rows=0),
        barcode_train=dict(preset="paper"),
        eval_presets="",
        barcode_eval_presets=":finetune",
    ),
}
GENOME = "human_grch37_chrX_0-70Mb"
BOLD = "bold_insect_coi_barcodes/insect_coi_barcodes.tsv.gz"


def _main_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gemsjax.main", *args]


def _overrides(values: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in values.items() if k != "preset"]


def _recipe(recipe: str, train: dict) -> str:
    return f"configs/{recipe}.py" + (f":{train['preset']}" if "preset" in train else "")


def cmgems_commands(arm: str, scale: dict, data: pathlib.Path, out: pathlib.Path):
    """``[(done marker, command), ...]`` of one CM-GEMS-family arm."""
    arm_dir, train = out / "cmgems" / arm, scale["cmgems_train"]
    fasta = sorted(str(p) for p in (data / GENOME).glob("*.fa*"))
    steps = []
    if arm == "untrained":
        size = train.get("model.name", "test" if train.get("preset") == "smoke" else "logo")
        init = ["--config.init=random", f"--config.model.name={size}"]
    else:
        steps.append(
            (
                arm_dir / "train" / "train.done",
                _main_cmd(
                    f"--config={_recipe(arm, train)}",
                    f"--workdir={arm_dir / 'train'}",
                    f"--config.data.fasta={tuple(fasta)!r}",
                    *_overrides(train),
                ),
            )
        )
        init = [f"--config.init={arm_dir / 'train'}"]
    few = scale["fewshot"]
    for task in FEWSHOT_TASKS:
        work = arm_dir / f"fewshot_{task}"
        steps.append(
            (
                work / "results.json",
                _main_cmd(
                    "--mode=evaluate",
                    f"--config=configs/eval/fewshot.py{scale['eval_presets']}",
                    f"--workdir={work}",
                    f"--config.task.dir={data / 'genemask_fewshot' / task}",
                    f"--config.task.name={task}",
                    f"--config.shots={few['shots'][task]}",
                    f"--config.draws={few['draws']}",
                    f"--config.test_subsample={few['test_subsample']}",
                    "--config.baseline=False",
                    *init,
                ),
            )
        )
    gue, work = scale["gue"], arm_dir / "gue"
    steps.append(
        (
            work / "results.json",
            _main_cmd(
                "--mode=evaluate",
                f"--config=configs/eval/gue.py{scale['eval_presets']}",
                f"--workdir={work}",
                f"--config.gue_dir={data / 'gue'}",
                f"--config.tasks={gue['tasks']}",
                f"--config.max_train_rows={gue['max_train_rows']}",
                f"--config.max_eval_rows={gue['max_eval_rows']}",
                "--config.baseline=False",
                *init,
            ),
        )
    )
    return steps


def barcode_commands(arm: str, scale: dict, data: pathlib.Path, out: pathlib.Path):
    """``[(done marker, command), ...]`` of one BarcodeMAE-family arm (the split comes first)."""
    split_dir = out / "bold_split"
    split = split_dir / "insect_coi_barcodes.split.tsv.gz"
    arm_dir, train = out / "barcode" / arm, scale["barcode_train"]
    return [
        (
            split,
            [sys.executable, "-m", "gemsjax.eval.barcode_split", str(data / BOLD), str(split_dir)],
        ),
        # validation on the species-labelled train split, as the reference's pretraining does
        (
            arm_dir / "train" / "train.done",
            _main_cmd(
                f"--config={_recipe(arm, train)}",
                f"--workdir={arm_dir / 'train'}",
                f"--config.data.tsv={split}",
                "--config.data.train_splits=('pretrain',)",
                "--config.data.validation_splits=('train',)",
                *_overrides(train),
            ),
        ),
        # the first arm also reports the protocol's baselines: the untrained twin, 6-mer
        # frequencies and exact-match lookup
        (
            arm_dir / "eval" / "results.json",
            _main_cmd(
                "--mode=evaluate",
                f"--config=configs/eval/barcodes.py{scale['barcode_eval_presets']}",
                f"--workdir={arm_dir / 'eval'}",
                f"--config.init={arm_dir / 'train'}",
                f"--config.tsv={split}",
                f"--config.baseline={arm == BARCODE_ARMS[0]}",
            ),
        ),
    ]


def run_family(
    family: str,
    scale_name: str,
    data: pathlib.Path,
    out: pathlib.Path,
    dry_run: bool,
    only: tuple[str, ...] = (),
) -> None:
    scale = SCALES[scale_name]
    arms, build = (
        (CMGEMS_ARMS, cmgems_commands) if family == "cmgems" else (BARCODE_ARMS, barcode_commands)
    )
    unknown = set(only) - set(arms)
    if unknown:
        sys.exit(f"--arms: unknown {sorted(unknown)} for {family}; valid: {', '.join(arms)}")
    arms = [a for a in arms if not only or a in only]
    # one persistent XLA cache for the scale: the arms' evaluations compile the same programs
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(out / scale_name / "jax_cache")}
    times = out / scale_name / "times.jsonl"
    if not dry_run:
        times.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    for arm in arms:
        for done, cmd in build(arm, scale, data, out / scale_name):
            if done.exists():
                print(f"[study] {family}/{arm}: {done} exists, skipped", flush=True)
                continue
            print(f"[study] {family}/{arm}: {' '.join(cmd)}", flush=True)
            if dry_run:
                continue
            started = time.time()
            code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
            record = dict(family=family, arm=arm, command=_command_name(done), exit=code)
            with open(times, "a", encoding="utf-8") as f:
                f.write(json.dumps(dict(record, seconds=round(time.time() - started, 1))) + "\n")
            if code:  # the other arms still run; a rerun retries this one
                print(
                    f"[study] {family}/{arm}: exit code {code}; rest of the arm skipped", flush=True
                )
                failed.append(arm)
                break
            if done.name == "train.done":
                done.write_text("finished\n")
            write_tables(out)
    if failed:
        sys.exit(f"[study] {family}: failed arms {failed}; rerun to retry them")


def _command_name(done: pathlib.Path) -> str:
    """A command's column in the wall-time table, from its done marker."""
    if done.name == "train.done":
        return "pretraining"
    return done.parent.name if done.name == "results.json" else "split"


def _times_table(path: pathlib.Path) -> str:
    """Wall seconds of every command the study ran at one scale (``times.jsonl``; a resumed or
    retried command's runs are added up), per arm and in all."""
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if not records:
        return "#### Wall time\n\nnot run yet\n"
    seconds: dict[tuple[str, str], dict[str, float]] = {}
    for r in records:
        cell = seconds.setdefault((r["family"], r["arm"]), {})
        cell[r["command"]] = cell.get(r["command"], 0.0) + r["seconds"]
    columns = list(dict.fromkeys(r["command"] for r in records))
    lines = [
        "#### Wall time (seconds per command, from `times.jsonl`)",
        "",
        "| family | arm | " + " | ".join(columns) + " | arm |",
        "|---|---|" + "---|" * (len(columns) + 1),
    ]
    for (family, arm), cell in seconds.items():
        row = [f"{cell[c]:,.0f}" if c in cell else "" for c in columns]
        lines.append(f"| {family} | {arm} | " + " | ".join(row) + f" | {sum(cell.values()):,.0f} |")
    total = sum(r["seconds"] for r in records)
    failed = sum(r["exit"] != 0 for r in records)
    lines += ["", f"In all: {total:,.0f} s ({total / 3600:.2f} h); failed commands: {failed}."]
    return "\n".join(lines) + "\n"


def _rows(path: pathlib.Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _cell(value, root: pathlib.Path) -> str:
    """A table cell; paths under ``root`` (the folder holding ``runs/study``) are relative."""
    if isinstance(value, list) and len(value) == 2:
        return f"{value[0]:.4f} ± {value[1]:.4f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value).replace(f"{root}/", "")


def _table(
    title: str, runs: dict[str, pathlib.Path], root: pathlib.Path, drop: tuple[str, ...] = ()
) -> str:
    """One markdown table: a row per arm per result row; "not run yet" for arms without one."""
    lines = [f"#### {title}", ""]
    # a result row's own "arm" (pretrained / random) is the encoder; ``drop``: columns the
    # title already says
    found = {
        arm: [
            {("encoder" if k == "arm" else k): v for k, v in r.items() if k not in drop}
            for r in rows
        ]
        for arm, rows in ((arm, _rows(path)) for arm, path in runs.items())
    }
    columns = []
    for rows in found.values():
        for row in rows:
            columns += [c for c in row if c not in columns]
    columns = columns or ["result"]
    lines += ["| arm | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for arm, rows in found.items():
        if not rows:
            lines.append(f"| {arm} | not run yet |" + " |" * (len(columns) - 1))
        for row in rows:
            lines.append(
                f"| {arm} | " + " | ".join(_cell(row.get(c, ""), root) for c in columns) + " |"
            )
    return "\n".join(lines) + "\n"


def write_tables(out: pathlib.Path) -> None:
    """Rewrite the text between ``<!-- tables:<scale> -->`` and ``<!-- /tables:<scale> -->``."""
    text = RESULTS.read_text()
    for scale in SCALES:
        start, end = f"<!-- tables:{scale} -->", f"<!-- /tables:{scale} -->"
        if start not in text:
            continue
        base, root = out / scale, out.parent.parent  # out: <root>/runs/study
        parts = [
            _table(
                f"Few-shot {task} (macro-F1 / MCC, mean ± std over draws)",
                {
                    arm: base / "cmgems" / arm / f"fewshot_{task}" / "results.json"
                    for arm in CMGEMS_ARMS
                },
                root,
                drop=("task",),
            )
            for task in FEWSHOT_TASKS
        ]
        parts.append(
            _table(
                "GUE (MCC)",
                {arm: base / "cmgems" / arm / "gue" / "results.json" for arm in CMGEMS_ARMS},
                root,
            )
        )
        parts.append(
            _table(
                "Barcode protocol",
                {arm: base / "barcode" / arm / "eval" / "results.json" for arm in BARCODE_ARMS},
                root,
            )
        )
        parts.append(_times_table(base / "times.jsonl"))
        head, rest = text.split(start, 1)
        text = head + start + "\n" + "\n".join(parts) + end + rest.split(end, 1)[1]
    RESULTS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("family", choices=("cmgems", "barcode", "tables"))
    parser.add_argument("--scale", choices=tuple(SCALES), default="cpu")
    parser.add_argument("--data", type=pathlib.Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "runs" / "study")
    parser.add_argument("--arms", default="", help="comma-separated arms (default: all)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.family == "tables":
        write_tables(args.out)
    else:
        run_family(
            args.family,
            args.scale,
            args.data.resolve(),
            args.out.resolve(),
            args.dry_run,
            tuple(a for a in args.arms.split(",") if a),
        )


if __name__ == "__main__":
    main()
