"""The downstream commands end to end: the README's pretraining run ends with its downstream
table, ``--mode=evaluate`` runs the few-shot protocol from that run folder (truncation counted
in the report), ``--mode=finetune`` fine-tunes and resumes, the GUE protocol scores a real task
and skips one without train.csv, and checkpoints of the wrong kind or size are refused.

Commands run in subprocesses on 1 CPU device sharing a compilation cache (as tests/test_train.py
does); the GUE protocol runs in this process on the 8 fake devices."""

import json
import os
import pathlib
import subprocess
import sys

import cli_runs
import jax
import numpy as np
import pytest

from gemsjax.errors import UserError
from gemsjax.eval import config as eval_config
from gemsjax.eval import gue, init

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUMMARY = "gemsjax summary: "
TIMEOUT = 600


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return cli_runs.env()


def _run(env, *args) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "gemsjax.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _summary(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith(SUMMARY)]
    assert len(lines) == 1, stdout
    return json.loads(lines[0][len(SUMMARY) :])


@pytest.fixture(scope="module")
def pretrained(env, tmp_path_factory):
    """The README's command on the smoke preset with its downstream table switched on, its
    workdir named relative to the current folder as the README's ``runs/<name>`` is (Orbax
    restores only from absolute paths: the downstream table must make it so)."""
    workdir = tmp_path_factory.mktemp("run") / "cm_gems"
    out = _run(
        env,
        "--config=configs/cm_gems.py:smoke,downstream.eval=True,downstream.draws=1",
        f"--workdir={os.path.relpath(workdir, ROOT)}",
    )
    return workdir, out


def test_pretraining_run_ends_with_the_downstream_table(pretrained):
    workdir, out = pretrained
    table = out.stdout[out.stdout.index("## GeneMask few-shot: prom_core_10shot_sample") :]
    assert "| task | shots | init | accuracy | macro_f1 | mcc | draws |" in table
    named = os.path.relpath(workdir, ROOT)
    assert f"| prom_core_10shot_sample | 10 | pretrained: {named}@step=6 |" in table
    assert f"| prom_core_10shot_sample | 10 | random: random ({named}@step=6 size) |" in table
    summary = _summary(out.stdout)
    assert summary["step"] == 6 and summary["downstream"]["test_rows"] == 500
    record = json.loads((workdir / "downstream" / "results.json").read_text())
    assert [row["draws"] for row in record["rows"]] == [1, 1]


def test_evaluate_fewshot_from_the_run_folder(pretrained, env, tmp_path):
    run, _ = pretrained
    out = _run(
        env,
        "--mode=evaluate",
        "--config=configs/eval/fewshot.py:smoke,max_len=40",
        f"--config.init={run}:best",
        f"--workdir={tmp_path}",
    )
    summary = _summary(out.stdout)
    assert summary["truncated"] == {"pool": 20, "test": 500}  # 67 tokens needed, 40 kept
    assert summary["train_step_compiles"] == {"10": 1}
    record = json.loads((tmp_path / "results.json").read_text())
    assert [(r["arm"], r["draws"]) for r in record["rows"]] == [("pretrained", 2), ("random", 2)]
    assert "truncated rows: 20 of the pool, 500 of the test file" in out.stdout
    for name in ("results.md", "curves_prom_core_sample_10shot.png", "mcc_prom_core_sample.png"):
        assert (tmp_path / name).is_file()
    again = _run(
        env,
        "--mode=evaluate",
        "--config=configs/eval/fewshot.py:smoke,max_len=40",
        f"--config.init={run}:best",
        f"--workdir={tmp_path}",
    )
    assert "draw 0" not in again.stdout  # every draw read back (resume)
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == record["rows"]


def test_finetune_command_with_dev_split(pretrained, env, tmp_path):
    run, _ = pretrained
    dev = ROOT / "gemsjax/data/samples/prom_core_10shot_train.tsv.gz"
    args = (
        "--mode=finetune",
        "--config=configs/eval/finetune.py:smoke,baseline=False",
        f"--config.init={run}:step=3",
        f"--config.task.dev={dev}",
        f"--workdir={tmp_path}",
    )
    out = _run(env, *args)
    record = json.loads((tmp_path / "results.json").read_text())
    (row,) = record["rows"]
    assert row["init"] == f"pretrained: {run}@step=3" and row["best_step"] in (4, 8)
    history = (tmp_path / "pretrained" / "dev_history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [1, 2]
    assert "| prom_core_sample | pretrained:" in out.stdout
    again = _run(env, *args)  # resumes at the final step
    assert "step 1/8" not in again.stdout
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == record["rows"]


def test_wrong_checkpoints_are_refused(pretrained):
    run, _ = pretrained
    with pytest.raises(
        UserError, match="is a dnabert model, but this task is tokenized for barcodebert"
    ):
        init.load_encoder(str(run), vocab="barcodebert")
    with pytest.raises(UserError, match="another size than config.model.name='logo'"):
        init.load_encoder(str(run), model_name="logo", vocab="dnabert")
    with pytest.raises(UserError, match=r"no checkpoint at step 4; saved steps: \[3, 6\]"):
        init.load_encoder(f"{run}:step=4")
    assert init.load_encoder(f"{run}:best").step in (3, 6)
    relative = init.load_encoder(f"{os.path.relpath(run)}:step=3").params
    for got, want in zip(
        jax.tree.leaves(relative),
        jax.tree.leaves(init.load_encoder(f"{run}:step=3").params),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


def test_gue_scores_a_task_and_skips_one_without_train(shared_data, tmp_path):
    config = eval_config.load(
        f"gue:smoke,baseline=False,gue_dir={shared_data / 'gue'}",
        {"tasks": "('prom/prom_core_tata', 'EMP/H3')"},
        "evaluate",
    )
    summary = gue.evaluate(config, tmp_path)
    rows = {r["task"]: r for r in summary["rows"]}
    assert rows["EMP/H3"]["note"].startswith("skipped: no train.csv")
    tata = rows["prom/prom_core_tata"]
    assert tata["metric"] == "mcc" and -1 <= tata["random"] <= 1
    assert tata["train rows"] == 64 and "dev/test subsample 64" in tata["note"]
    assert rows["average (1 tasks)"]["random"] == tata["random"]
    assert (tmp_path / "results.md").is_file() and (tmp_path / "gue_scores.png").is_file()
    assert gue.metric_of("virus/covid") == "macro_f1"
    assert gue.reference("prom/prom_core_tata")["epochs"] == 10
    assert gue.reference("prom/prom_core_notata")["epochs"] == 4
