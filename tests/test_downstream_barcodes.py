"""End to end: a barcode pretraining run ends with its downstream table, and the embed command
reads that run folder (or refuses a tokenizer it was not trained with) in subprocesses."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUMMARY = "gemsjax summary: "


def _main(*args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    return subprocess.run(
        [sys.executable, "-m", "gemsjax.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _summary(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith(SUMMARY)]
    assert len(lines) == 1, stdout
    return json.loads(lines[0][len(SUMMARY) :])


@pytest.fixture(scope="module")
def barcode_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("barcode_mae")
    done = _main(
        "--config=configs/barcode_mae.py:smoke,downstream.eval=True", f"--workdir={workdir}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done.stdout


@pytest.mark.slow
def test_barcode_run_prints_genus_table_next_to_kmer_baseline(barcode_run):
    workdir, stdout = barcode_run
    assert "## Downstream: genus of unseen species (1-NN)" in stdout
    assert "| 6-mer frequencies |" in stdout
    record = json.loads((workdir / "downstream" / "results.json").read_text())
    methods = [row["method"] for row in record["rows"]]
    assert methods[0] == f"{workdir}@step=6" and methods[-1] == "6-mer frequencies"
    accuracy = _summary(stdout)["downstream"]["genus_1nn_unseen"]
    assert accuracy["6-mer frequencies"] == record["rows"][-1]["genus 1-NN acc"] > 0.5


@pytest.mark.slow
def test_embed_command_reads_a_run_folder_and_refuses_the_wrong_tokenizer(barcode_run, tmp_path):
    workdir, _ = barcode_run
    out = tmp_path / "emb"
    sample = ROOT / "gemsjax" / "data" / "samples" / "bold_coi_sample.tsv.gz"
    done = _main(
        "--mode=embed",
        "--config=configs/eval/embed.py",
        f"--config.init={workdir}",
        f"--config.input={sample}",
        f"--workdir={out}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _summary(done.stdout)
    assert summary["shape"] == [4000, 64] and summary["encoder"] == f"{workdir}@step=6"
    vectors = np.load(out / "embeddings.npy")
    assert vectors.shape == (4000, 64) and np.isfinite(vectors).all()
    index = (out / "index.tsv").read_text().splitlines()
    assert len(index) == 4001 and index[0].startswith("row\tid\tline\t")
    wrong = _main(
        "--mode=embed",
        "--config=configs/eval/embed.py",
        f"--config.init={workdir}",
        f"--config.input={sample}",
        "--config.vocab=dnabert",
        f"--workdir={out}",
    )
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert "is a barcodebert model, but this task is tokenized for dnabert" in wrong.stderr


def test_embed_command_smoke(tmp_path):
    done = _main("--mode=embed", "--config=configs/eval/embed.py:smoke", f"--workdir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _summary(done.stdout)
    assert summary["shape"] == [4000, 64] and summary["encoder"] == "random (test_mae)"
    assert summary["truncated"] == sum(
        int(line.rsplit("\t", 1)[1])
        for line in (tmp_path / "index.tsv").read_text().splitlines()[1:]
    )
    assert np.load(tmp_path / "embeddings.npy").shape == (4000, 64)
