"""The command line: config errors and the ``data`` / ``pmi`` modes."""

import re
import subprocess
import sys

import cli_runs
import numpy as np

from gemsjax import pmi
from gemsjax.data import pipelines
from gemsjax.vocab import get_vocab


def test_unknown_config_key_exits_naming_it_and_the_valid_keys(tmp_path):
    for args in (["--config=configs/cm_gems.py:smoke", "--config.train.stepz=5"],
                 ["--config=configs/cm_gems.py:smoke,train.stepz=5"]):
        done = subprocess.run([sys.executable, "-m", "gemsjax.main", *args,
                               f"--workdir={tmp_path}"], cwd=cli_runs.ROOT, capture_output=True,
                              text=True, timeout=cli_runs.TIMEOUT)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr, done.stderr
        assert "train.stepz" in done.stderr and "valid keys" in done.stderr
        assert "train.steps" in done.stderr and "optimizer.learning_rate" in done.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_data_mode_prints_the_first_batch(tmp_path, shared_data, jax_cache):
    prepared = tmp_path / "genome"
    done = cli_runs.run([sys.executable, "-m", "gemsjax.main", "--mode=data",
                         "--config=configs/genemask.py:smoke", "--config.data.max_len=64",
                         f"--config.data.fasta={shared_data / cli_runs.CHR22}",
                         f"--config.data.prepared_dir={prepared}"], cli_runs.env(jax_cache))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = cli_runs.summary(done.stdout)
    config = cli_runs.config("genemask", "data.max_len=64",
                             f"data.fasta={shared_data / cli_runs.CHR22}",
                             f"data.prepared_dir={prepared}")
    batch = next(pipelines.make_pretraining_iterator(config, "train", 0, 1))
    assert summary["shape"] == [8, 64] and summary["dtype"] == "int32"
    assert summary["tokens_per_row"] == float(batch["attention"].sum(axis=1).mean())
    assert summary["distinct_ids"] == np.unique(batch["ids"]).size > 100
    assert summary["unk_fraction"] == float((batch["ids"] == 1).sum() / batch["attention"].sum())
    assert re.fullmatch(r"[ACGT]{60}\.\.\.", summary["first_sequence"])


def test_pmi_mode_writes_a_rank_table(tmp_path, shared_data, jax_cache):
    fasta = shared_data / cli_runs.LAMBDA
    done = cli_runs.run([sys.executable, "-m", "gemsjax.main", "--mode=pmi",
                         "--config=configs/pmi.py", f"--config.fasta_paths={fasta}",
                         "--config.min_count=5", f"--workdir={tmp_path}"], cli_runs.env(jax_cache))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = cli_runs.summary(done.stdout)
    table, vocab, meta = pmi.load_rank_table(tmp_path / "pmi_rank_table.tsv")
    assert summary["rank_table"] == str(tmp_path / "pmi_rank_table.tsv")
    assert vocab == get_vocab("dnabert", 6)
    assert meta["sources"] == [str(fasta)] and meta["min_count"] == 5
    expected = pmi.rank_table(pmi.count_kmers([fasta], 6), 6, 5, vocab)
    np.testing.assert_array_equal(table, expected)
    scored = int((table[vocab.num_specials:] < 4**6).sum())
    assert summary["scored_kmers"] == scored and 1000 < scored < 4096
