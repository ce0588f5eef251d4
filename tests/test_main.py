"""The front door: usage errors as one line, ``--help``, the ``data`` and ``pmi`` modes, and the
files a training run leaves in its folder. Only the shipped samples are read."""

import json
import re
import struct
import subprocess
import sys

import cli_runs
import numpy as np
import pytest

from gemsjax import config as config_lib
from gemsjax import main, pmi, tokenizers
from gemsjax.data import pipelines, samples
from gemsjax.train import run_files
from gemsjax.vocab import get_vocab


def _gemsjax(*args: str, env=None, cwd=cli_runs.ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gemsjax.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=cli_runs.TIMEOUT,
        env=env,
    )


USAGE_ERRORS = [  # (arguments, what the one line must say)
    (
        (),
        "--config is required, e.g. --config=configs/cm_gems.py; recipes: "
        "configs/barcode_bert.py, configs/barcode_bert_5m.py, configs/barcode_mae.py",
    ),
    (
        ("--config=configs/cm_gems.py", "--mode=trian"),
        "unknown --mode=trian; valid: train, data, pmi",
    ),
    (
        ("--config=configs/cm_gems.py:papr",),
        "unknown preset 'papr'; valid: paper, smoke, a model size (dnabert6",
    ),
    (
        ("--config=configs/cm_gemz.py",),
        "config file 'configs/cm_gemz.py' not found; recipes in configs/: barcode_bert",
    ),
    (
        ("--config=configs/pmi.py",),
        "configs/pmi.py is the PMI config: run it with --mode=pmi; "
        "--mode=train needs a training recipe: configs/barcode_bert.py",
    ),
    (
        ("--config=configs/genemask.py", "--mode=pmi"),
        "--mode=pmi needs the PMI config (--config=configs/pmi.py); configs/genemask",
    ),
    (
        ("--config=configs/cm_gems.py:train.steps=abc",),
        "configs/cm_gems.py:train.steps=abc: train.steps='abc' must be an integer >= 1",
    ),
    (
        ("--config=configs/cm_gems.py", "--config.train.eval_every=0"),
        "train.eval_every=0 must be an integer >= 1",
    ),
    (
        ("--config=configs/cm_gems.py", "--config.masking.genemask_prob=1.5"),
        "masking.genemask_prob=1.5 must be a number in [0.0, 1.0]",
    ),
    (
        ("--config=configs/cm_gems.py:smoke", "--config.train.stepz=5"),
        "unknown config key(s) ['train.stepz']; valid keys: compile.topology, data.batch_size",
    ),
    (
        ("--config=configs/cm_gems.py:smoke,train.stepz=5",),
        "unknown config key(s) ['train.stepz']; valid keys: compile.topology, data.batch_size",
    ),
    (
        ("--config=configs/cm_gems.py", "--config.train.steps"),
        "--config.train.steps: write config overrides as --config.<key>=<value>",
    ),
    (("--config=configs/cm_gems.py", "--stepz=5"), "Unknown command line flag 'stepz'"),
    (("--config=configs/cm_gems.py", "train"), "unexpected argument(s) ['train']"),
]


@pytest.mark.parametrize("args, message", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line_with_the_choices(tmp_path, args, message):
    done = _gemsjax(*args, f"--workdir={tmp_path / 'run'}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("gemsjax: "), done.stderr
    assert message in done.stderr, done.stderr
    assert done.stdout == "" and not (tmp_path / "run").exists()


def test_traceback_flag_shows_where_a_usage_error_came_from():
    done = _gemsjax("--config=configs/cm_gems.py:train.steps=0", "--traceback")
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "gemsjax.errors.UserError: " in done.stderr
    assert "train.steps=0 must be an integer >= 1" in done.stderr


def test_help_lists_modes_recipes_downstream_configs_presets_and_how_to_resume():
    done = _gemsjax("--help")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for mode in main.MODES:
        assert re.search(rf"^  {mode} ", text, re.M), mode
    for name in config_lib.recipes():
        assert re.search(rf"^  {name} ", text, re.M), name
    assert text.count("presets: paper, smoke") == len(config_lib.recipes()) - 1
    assert "presets: smoke, chrX" in text
    for name, mode in [
        ("barcodes", "evaluate"),
        ("embed", "embed"),
        ("fewshot", "evaluate"),
        ("finetune", "finetune"),
        ("gue", "evaluate"),
    ]:  # every downstream config with the mode that runs it
        assert re.search(rf"^  {name} \(--mode={mode}\) ", text, re.M), name
    assert "presets: smoke, genemask" in text and "presets: smoke, finetune" in text
    assert "--workdir=runs/cm_gems-<date>-<time>" in text and "resume" in text
    assert "--[no]traceback" in text and "--config.<key>=<value>" in text and "``" not in text


def test_data_mode_prints_the_first_batch(tmp_path):
    prepared = tmp_path / "genome"
    done = _gemsjax(
        "--mode=data",
        "--config=configs/genemask.py:smoke",
        "--config.data.max_len=64",
        f"--config.data.prepared_dir={prepared}",
        env=cli_runs.env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = cli_runs.summary(done.stdout)
    config = cli_runs.config("genemask", "data.max_len=64", f"data.prepared_dir={prepared}")
    batch = next(pipelines.make_pretraining_iterator(config, "train", 0, 1))
    assert summary["shape"] == [8, 64] and summary["dtype"] == "int32"
    assert summary["tokens_per_row"] == float(batch["attention"].sum(axis=1).mean())
    assert summary["distinct_ids"] == np.unique(batch["ids"]).size > 100
    assert summary["unk_fraction"] == float((batch["ids"] == 1).sum() / batch["attention"].sum())
    assert re.fullmatch(r"[ACGT]{60}\.\.\.", summary["first_sequence"])


def test_data_mode_counts_barcode_unk_without_padding():
    """Barcodes pad with [UNK]: the share counts [UNK] among the real tokens only."""
    config = config_lib.load("barcode_mae")
    summary = main.run_data(config)
    batch = next(pipelines.make_pretraining_iterator(config, "train"))
    ids, real = batch["ids"], batch["attention"] > 0
    assert (~real).sum() > 200 and (ids[~real] == 1).all()  # padding is [UNK]
    unk = int(((ids == 1) & real).sum())
    assert summary["unk_fraction"] == unk / real.sum() < (ids == 1).sum() / real.sum()


def test_data_mode_decodes_8mer_barcodes_with_their_own_vocabulary():
    """BarcodeBERT-5M's 8-mer ids (up to 65,537) are decoded with the run's vocabulary (the
    data mode used to assume 6-mers and failed on them)."""
    config = config_lib.load("barcode_bert_5m")
    summary = main.run_data(config)
    batch = next(pipelines.make_pretraining_iterator(config, "train"))
    assert summary["shape"] == [32, 82] and batch["ids"].max() > 4097
    first = tokenizers.data_tokenizer("barcode", 8).decode(batch["ids"][:1])[0]
    assert summary["first_sequence"] == first[:60] + "..."
    assert re.fullmatch(r"[ACGTN]{60}\.\.\.", summary["first_sequence"])


def test_pmi_mode_writes_a_rank_table(tmp_path):
    done = _gemsjax("--mode=pmi", "--config=configs/pmi.py:smoke", f"--workdir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = cli_runs.summary(done.stdout)
    table, vocab, meta = pmi.load_rank_table(tmp_path / "pmi_rank_table.tsv")
    fasta = samples.sample_path(samples.GENOME)
    assert summary["rank_table"] == str(tmp_path / "pmi_rank_table.tsv")
    assert vocab == get_vocab("dnabert", 6)
    assert meta["sources"] == [str(fasta)] and meta["min_count"] == 5
    expected = pmi.rank_table(pmi.count_kmers([fasta], 6), 6, 5, vocab)
    np.testing.assert_array_equal(table, expected)
    # Rank 4096 is the worst scored rank and the "unscored" rank: count scored k-mers from meta.
    assert summary["scored_kmers"] == meta["n_scored"] == 4096 and "note" not in summary


def test_run_log_copies_stdout_and_the_traceback(tmp_path, capsys):
    with pytest.raises(ZeroDivisionError), run_files.tee_log(tmp_path):
        print("step 1/2 | loss 8.0")
        1 / 0  # noqa: B018
    log = (tmp_path / run_files.LOG_FILE).read_text()
    assert log.startswith("step 1/2 | loss 8.0\n") and "ZeroDivisionError" in log
    assert capsys.readouterr().out == "step 1/2 | loss 8.0\n"
    with run_files.tee_log(tmp_path, enabled=False):
        print("not logged")
    assert "not logged" not in (tmp_path / run_files.LOG_FILE).read_text()


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_a_run_folder_describes_itself(tmp_path, genome):
    """A CM-GEMS smoke run that switches (absolute threshold 1e9: at the 2nd validation, step 6)
    leaves config.json, train.log, metrics.jsonl numbered like its checkpoints and time-stamped,
    TensorBoard config text, and curves.png; console and summary name the switch step."""
    presets = ("train.steps=9", "masking.threshold_mode=absolute", "masking.threshold=1e9", *genome)
    done = cli_runs.run(cli_runs.cli("cm_gems", tmp_path, *presets), cli_runs.env())
    assert done.returncode == 0, done.stderr[-3000:]
    summary = cli_runs.summary(done.stdout)
    assert (summary["switched"], summary["switch_step"]) == (True, 6)
    assert (
        "gemsjax: curriculum switched after the validation at step 6 (perplexity plateau); "
        "Global-PMI masking from step 7"
    ) in done.stdout
    config = json.loads((tmp_path / "config.json").read_text())
    want = cli_runs.config("cm_gems", *presets)
    assert config["train"]["steps"] == 9 and config["masking"]["threshold"] == 1e9
    assert config == json.loads(want.to_json())
    log = (tmp_path / run_files.LOG_FILE).read_text()
    assert log == done.stdout  # everything the run printed, summary included

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 10))
    assert [r["step"] for r in val] == cli_runs.committed_steps(tmp_path) == [3, 6, 9]
    assert [r["mix/global_pmi"] for r in train] == [0.0] * 6 + [1.0] * 3
    times = [r["time"] for r in records]
    assert times == sorted(times) and times[-1] - times[0] < cli_runs.TIMEOUT

    events = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    recorded = b"".join(path.read_bytes() for path in events)
    assert b'"threshold_mode": "absolute"' in recorded and b"masking.threshold_mode" in recorded
    assert summary["curves"] == str(tmp_path / run_files.CURVES_FILE)
    assert _png_size(tmp_path / run_files.CURVES_FILE) == (960, 840)
