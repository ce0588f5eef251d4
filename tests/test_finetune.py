"""Fine-tuning: a small model learns the real shipped Prom-core sample (training loss falls, the
test file is scored above a constant predictor), the few-shot draws reuse one compiled step,
a batch that does not split over the 8 devices is padded without changing the update, and the
labelled-data checks raise UserError naming file, line or class."""

import gzip

import jax
import numpy as np
import pytest

from gemsjax.data import samples
from gemsjax.errors import UserError
from gemsjax.eval import finetune as ft
from gemsjax.eval import init, labelled
from gemsjax.train import sharding

PROM_CORE_1000 = "genemask_fewshot/Prom-core/1000/train.tsv.gz"


@pytest.fixture(scope="module")
def prom_core():
    train = labelled.read_split(samples.sample_path(samples.PROM_CORE_TRAIN), "genemask")
    test = labelled.read_split(samples.sample_path(samples.PROM_CORE_TEST), "genemask")
    return train, test


def _tuner(epochs=20, lr=5e-4, batch=5, rows=20, seed=0, dropout=0.1):
    encoder = init.load_encoder("random", model_name="test", vocab="dnabert")
    hyper = ft.Hyper(learning_rate=lr, epochs=epochs, batch_size=batch, seed=seed, dropout=dropout)
    mesh = sharding.make_mesh()
    steps = ft.steps_per_epoch(rows, batch) * epochs
    return ft.Finetuner(encoder, 2, hyper, 72, steps, mesh), mesh


def test_small_model_learns_the_shipped_prom_core_sample(prom_core):
    """80 updates (20 epochs of batch 5, as the 10-shot protocol) of the tiny size from random
    init; then two more draws (seeds 1, 2; a random encoder given explicitly, as the baseline
    arm is) reuse the one compiled train step."""
    train, test = prom_core
    tuner, mesh = _tuner()
    with jax.set_mesh(mesh):
        state, losses = ft.train_run(
            tuner, tuner.init(0), tuner.train_batches(train, 0, 20), tuner.total_steps
        )
        result = ft.evaluate_split(tuner, state, test)
        others = [
            ft.train_run(tuner, tuner.init(seed, None), tuner.train_batches(train, seed), 4)[1]
            for seed in (1, 2)
        ]
    assert len(losses) == tuner.total_steps == 80
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.05, losses
    majority = max(np.mean(test.labels == 0), np.mean(test.labels == 1))  # 265 / 500
    assert result["accuracy"] > majority + 0.03, result
    assert result["mcc"] > 0.1, result
    assert np.asarray(result["confusion"]).sum() == len(test) == 500
    assert tuner.train_step._cache_size() == 1
    assert others[0] != others[1] != losses[:4]  # another head init, order, dropout per draw


def test_rows_of_weight_zero_do_not_change_the_update(prom_core):
    """Batch 5 on 8 devices is padded with 3 zero rows of weight 0: the update equals the one
    on 8 real rows of which the last 3 have weight 0."""
    train, _ = prom_core
    tuner, mesh = _tuner(epochs=1, dropout=0.0)
    batch = next(tuner.train_batches(train, 0, 1))
    assert batch["labels"].shape == (5,)
    other = next(tuner.train_batches(train, 1, 1))
    real = {k: np.concatenate([v, other[k][:3]]) for k, v in batch.items()}
    real["valid"][5:] = 0
    with jax.set_mesh(mesh):
        padded, out_padded = tuner.step(tuner.init(0), batch)
        weighted, out_weighted = tuner.step(tuner.init(0), real)
    assert tuner.train_step._cache_size() == 1
    assert float(out_padded["loss"]) == pytest.approx(float(out_weighted["loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(padded.params), jax.tree.leaves(weighted.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_stratified_draws_are_seeded_and_differ(shared_data):
    pool = labelled.read_split(shared_data / PROM_CORE_1000, "genemask")
    draws = [labelled.stratified_draw(pool, 10, [0, 10, d], 2) for d in range(10)]
    for rows in draws:
        assert rows.size == len(set(rows.tolist())) == 20
        assert np.bincount(pool.labels[rows], minlength=2).tolist() == [10, 10]
    np.testing.assert_array_equal(draws[3], labelled.stratified_draw(pool, 10, [0, 10, 3], 2))
    assert len({tuple(sorted(r.tolist())) for r in draws}) == 10


def test_stratified_subsample_keeps_class_shares(shared_data):
    test = labelled.read_split(shared_data / "genemask_fewshot/Prom-core/test.tsv.gz", "genemask")
    rows = labelled.stratified_subsample(test.labels, 600)
    assert rows.size == 600 and np.all(np.diff(rows) > 0)
    share = np.mean(test.labels == 1)
    assert abs(np.mean(test.labels[rows] == 1) - share) < 1 / 600 + 1e-9
    np.testing.assert_array_equal(rows, labelled.stratified_subsample(test.labels, 600))


def test_too_few_examples_of_a_class_names_the_class(prom_core):
    train, _ = prom_core
    with pytest.raises(UserError, match=r"class 0 has 10 rows, fewer than the 11 shots"):
        labelled.stratified_draw(train, 11, 0, 2)


def _write(path, text):
    with gzip.open(path, "wt") as f:
        f.write(text)
    return path


SEQ = "AAACGG AACGGA ACGGAA CGGAAA"


def test_label_errors_name_file_and_line(tmp_path):
    missing = _write(tmp_path / "nolabel.tsv.gz", f"sequence\tclass\n{SEQ}\t0\n")
    with pytest.raises(
        UserError,
        match=r"nolabel.tsv.gz, line 1: missing required column "
        r"'label'",
    ):
        labelled.read_split(missing, "genemask")
    word = _write(tmp_path / "word.tsv.gz", f"sequence\tlabel\n{SEQ}\t0\n{SEQ}\tpositive\n")
    with pytest.raises(
        UserError,
        match=r"word.tsv.gz, line 3: label 'positive' is not a "
        r"non-negative integer",
    ):
        labelled.read_split(word, "genemask")
    big = labelled.read_split(
        _write(tmp_path / "big.tsv.gz", f"sequence\tlabel\n{SEQ}\t0\n\n{SEQ}\t2\n"), "genemask"
    )
    with pytest.raises(UserError, match=r"big.tsv.gz, line 4: label 2 is outside the 2 classes"):
        labelled.check_labels(big, 2, "test file")
    empty = _write(tmp_path / "empty.tsv.gz", "sequence\tlabel\n")
    with pytest.raises(UserError, match=r"empty.tsv.gz: the split is empty"):
        labelled.read_split(empty, "genemask")
    with pytest.raises(UserError, match=r"no such file"):
        labelled.read_split(tmp_path / "absent.tsv", "genemask")


def test_truncation_is_counted(prom_core):
    train, test = prom_core
    needed = labelled.tokens_needed(test.sequences, "dnabert")
    assert set(needed.tolist()) == {67}  # 70 bp: 65 6-mers + CLS + SEP
    assert labelled.choose_max_len(0, needed, 512) == 72
    assert labelled.choose_max_len(0, needed, 64) == 64
    assert labelled.truncated(needed, 64) == 500 and labelled.truncated(needed, 72) == 0


def test_init_specs_refused_with_the_fix(tmp_path):
    with pytest.raises(UserError, match="not a transformers model folder"):
        init.load_encoder(f"hf:{tmp_path}")
    with pytest.raises(UserError, match="not a gemsjax run folder"):
        init.load_encoder(str(tmp_path))
    with pytest.raises(UserError, match="needs config.model.name"):
        init.load_encoder("random")
    assert init.parse_spec("runs/x") == ("run", "runs/x", "latest")
    assert init.parse_spec("runs/x:best") == ("run", "runs/x", "best")
    assert init.parse_spec("hf:models/DNA_bert_6") == ("hf", "models/DNA_bert_6", "")
    assert init.parse_spec("runs/x:step=200") == ("run", "runs/x", "step=200")
    assert init.parse_spec("random:runs/x:best") == ("random", "runs/x:best", "")


def test_fewshot_task_folder_brings_its_own_test_file_and_name(shared_data, tmp_path):
    """A task folder's test file and name are used unless ``task.test`` / ``task.name`` are
    given; without a folder the shipped sample is the default."""
    from gemsjax.eval import config as eval_config
    from gemsjax.eval import fewshot

    folder = shared_data / "genemask_fewshot" / "Prom-core"
    config = eval_config.load("configs/eval/fewshot.py", {"task.dir": str(folder)}, "evaluate")
    pool, test = fewshot.task_files(config)
    assert test == folder / "test.tsv.gz" and fewshot.task_name(config) == "Prom-core"
    assert [p.parent.name for p in pool] == ["10", "50", "100", "500", "1000"]
    mine = tmp_path / "my_test.tsv"
    mine.write_text("sequence\tlabel\n")
    config = eval_config.load(
        "configs/eval/fewshot.py",
        {"task.dir": str(folder), "task.test": str(mine), "task.name": "mine"},
        "evaluate",
    )
    assert fewshot.task_files(config)[1] == mine and fewshot.task_name(config) == "mine"
    config = eval_config.load("configs/eval/fewshot.py", {}, "evaluate")
    pool, test = fewshot.task_files(config)
    assert pool == [samples.sample_path(samples.PROM_CORE_TRAIN)]
    assert test == samples.sample_path(samples.PROM_CORE_TEST)
    assert fewshot.task_name(config) == "prom_core_sample"


def test_sigterm_saves_and_the_same_call_resumes_bit_exactly(prom_core, tmp_path):
    """A real SIGTERM (the fine-tuning command's handler) stops fine-tuning after the current
    update with a checkpoint; running again resumes there (state, data order, dropout keys) and
    ends with exactly the parameters and test scores of an uninterrupted run, and the same
    ``metrics.jsonl`` steps."""
    import os
    import signal

    from gemsjax.interop import hf
    from gemsjax.train import checkpoint, run_files

    train, test = prom_core
    test = labelled.subset(test, np.arange(40))
    tuner, mesh = _tuner(epochs=2)
    with jax.set_mesh(mesh):
        whole = ft.finetune(tuner, train, None, test, tmp_path / "whole")
        with checkpoint.sigterm_watch() as sigterm:
            os.kill(os.getpid(), signal.SIGTERM)
            stopped = ft.finetune(tuner, train, None, test, tmp_path / "cut", sigterm=sigterm)
        assert stopped["stopped"] == "SIGTERM" and stopped["test"] is None
        assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["1"]
        resumed = ft.finetune(tuner, train, None, test, tmp_path / "cut")
    assert resumed["stopped"] is None and len(resumed["train_losses"]) == 7
    assert stopped["train_losses"] + resumed["train_losses"] == whole["train_losses"]
    assert resumed["test"]["accuracy"] == whole["test"]["accuracy"]
    assert resumed["test"]["loss"] == whole["test"]["loss"]
    last = [
        hf.flat_params(checkpoint.read_params(tmp_path / run / "checkpoints" / "8"))
        for run in ("whole", "cut")
    ]
    assert all(np.array_equal(last[0][k], last[1][k]) for k in last[0])
    logged = [
        [r["step"] for r in run_files.read_metrics(tmp_path / run)] for run in ("whole", "cut")
    ]
    assert logged[0] == logged[1] and logged[0][-1] == 8  # the stopped run's records are kept
