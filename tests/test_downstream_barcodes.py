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


@pytest.mark.slow
def test_an_8mer_run_is_embedded_and_evaluated_in_8mers(tmp_path):
    """BarcodeBERT-5M's k = 8 reaches every evaluation path: the run's own downstream table, the
    loaded encoder, its embeddings (equal to pooling the model over 8-mer ids of 82 tokens) and
    the barcode protocol command."""
    import jax.numpy as jnp
    from flax import nnx

    from gemsjax.data import samples, tables
    from gemsjax.eval import barcodes, embed, init
    from gemsjax.eval.config import barcodes_base as barcodes_config
    from gemsjax.tokenizers import KmerTokenizer

    run = tmp_path / "run"
    done = _main(
        "--config=configs/barcode_bert_5m.py:smoke,downstream.eval=True", f"--workdir={run}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "## Downstream: genus of unseen species (1-NN)" in done.stdout
    encoder = init.load_encoder(str(run))
    assert (encoder.vocab, encoder.k, encoder.model_cfg.vocab_size) == ("barcodebert", 8, 65538)
    assert barcodes.tokens_per_row(encoder, barcodes_config()) == 82
    model = init.build_encoder(encoder, nnx.Rngs(0))
    seqs = tables.read_barcode_tsv(
        samples.sample_path(samples.BARCODES), ("species_name",), splits=("val",)
    )["species_name"].sequences[:12]
    got = embed.embed_sequences(model, seqs, vocab="barcodebert", k=8, max_len=82, batch_size=8)
    ids, attention = KmerTokenizer(8, stride=8, vocab="barcodebert", strip_gaps=True).encode(
        seqs, 82
    )
    assert attention.sum(axis=1).max() == 82  # whole 660-bp rows fill the 82 8-mer slots
    hidden = model(jnp.asarray(ids), jnp.asarray(attention))
    weights = jnp.asarray(attention, jnp.float32)[..., None]
    want = (hidden * weights).sum(axis=1) / weights.sum(axis=1)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-5)
    evaluated = _main(
        "--mode=evaluate",
        "--config=configs/eval/barcodes.py:smoke",
        f"--config.init={run}",
        f"--workdir={tmp_path / 'eval'}",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert rows[0]["method"] == f"{run}@step=6" and 0.0 <= rows[0]["genus 1-NN acc"] <= 1.0
