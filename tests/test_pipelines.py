"""grain pipelines: shapes, content, determinism, resume, per-process slices, sharding."""

import itertools
import pickle

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gemsjax import config as config_lib
from gemsjax.data import genome, pipelines, samples, tables
from gemsjax.train import sharding

CHR22 = samples.sample_path(samples.GENOME)  # = ../shared/data/human_chr22_20-21Mb
SYNC = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@pytest.fixture(scope="module")
def chr22_dir(tmp_path_factory):
    return genome.prepare_genome(CHR22, tmp_path_factory.mktemp("g") / "chr22")


@pytest.fixture(scope="module")
def barcodes():
    path = samples.sample_path(samples.BARCODES)
    return tables.read_barcode_tsv(path, ("species_name",), deduplicate=True)["species_name"]


def _take(ds_or_it, n):
    it = iter(ds_or_it) if isinstance(ds_or_it, grain.IterDataset) else ds_or_it
    return list(itertools.islice(it, n))


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_batch_plan_training_epochs_are_permutations_split_into_process_slices():
    """Global batch b is the same rows for any number of processes; process i holds its
    i-th slice of it. Each epoch is a new permutation; the remainder is dropped."""
    plans = [
        pipelines.BatchPlan(
            103, 10, training=True, seed=4, num_epochs=3, process_index=i, process_count=2
        )
        for i in (0, 1)
    ]
    single = pipelines.BatchPlan(103, 20, training=True, seed=4, num_epochs=3)
    assert plans[1].batches_per_epoch == 5 and len(plans[1]) == 15  # 103 // 20; 3 dropped
    for b in range(15):
        np.testing.assert_array_equal(np.concatenate([plans[0](b), plans[1](b)]), single(b))
    epochs = [np.concatenate([single(b) for b in range(e * 5, e * 5 + 5)]) for e in range(3)]
    for rows in epochs:
        assert len(set(rows.tolist())) == 100 and set(rows.tolist()) <= set(range(103))
    assert not np.array_equal(epochs[0], epochs[1])
    again = pipelines.BatchPlan(
        103, 10, training=True, seed=4, num_epochs=3, process_index=1, process_count=2
    )
    np.testing.assert_array_equal(again(7), plans[1](7))
    assert not np.array_equal(
        pipelines.BatchPlan(103, 10, True, seed=5)(0), pipelines.BatchPlan(103, 10, True, seed=4)(0)
    )
    assert len(pipelines.BatchPlan(103, 10, training=True)) > 10**15  # endless
    with pytest.raises(IndexError):
        plans[0](15)
    with pytest.raises(ValueError, match="no whole global batch of 120 .10 for each of 12"):
        pipelines.BatchPlan(103, 10, True, process_index=0, process_count=12)


def test_batch_plan_evaluation_pads_or_cuts_to_global_batches():
    padded = [
        pipelines.BatchPlan(23, 4, training=False, process_index=i, process_count=2, pad=True)
        for i in (0, 1)
    ]
    assert [len(p) for p in padded] == [3, 3]  # 23 rows -> 24 = 3 global batches of 8
    np.testing.assert_array_equal(
        np.concatenate([padded[1](b) for b in range(3)]),
        [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, -1],
    )
    cut = pipelines.BatchPlan(23, 4, training=False, process_index=0, process_count=2)
    assert len(cut) == 2
    np.testing.assert_array_equal(np.concatenate([cut(0), cut(1)]), [0, 1, 2, 3, 8, 9, 10, 11])


def test_genome_batches_are_fixed_shape_chunks_of_the_train_split(chr22_dir):
    ds = pipelines.genome_pipeline(chr22_dir, batch_size=16, seed=0, read_options=SYNC)
    batch = _take(ds, 1)[0]
    assert set(batch) == {"ids", "attention"}
    for x in batch.values():
        assert x.shape == (16, 512) and x.dtype == np.int32
    train = genome.GenomeChunkSource(chr22_dir, "train")
    chunks = {train[i] for i in range(len(train))}
    decoded = pipelines.dnabert_tokenizer().decode(batch["ids"])
    assert set(decoded) <= chunks and len(set(decoded)) == 16
    lengths = np.array([len(s) for s in decoded])
    np.testing.assert_array_equal(batch["attention"].sum(1), lengths - 5 + 2)  # k-mers + CLS/SEP
    assert np.all(batch["ids"][:, 0] == 2)


def test_genome_validation_is_one_ordered_pass_of_whole_batches(chr22_dir):
    val = genome.GenomeChunkSource(chr22_dir, "validation")
    batches = list(
        pipelines.genome_pipeline(chr22_dir, batch_size=32, split="validation", read_options=SYNC)
    )
    assert len(batches) == len(val) // 32
    decoded = [s for b in batches for s in pipelines.dnabert_tokenizer().decode(b["ids"])]
    assert decoded == [val[i] for i in range(len(batches) * 32)]


def test_same_seed_same_batches_other_seed_other_batches(chr22_dir):
    def first(seed):
        return _take(pipelines.genome_pipeline(chr22_dir, batch_size=8, seed=seed), 3)

    _assert_batches_equal(first(1), first(1))
    assert not np.array_equal(first(1)[0]["ids"], first(2)[0]["ids"])


def test_training_reshuffles_each_epoch_and_covers_the_data(barcodes):
    seqs = barcodes.sequences[:96]
    ds = pipelines.barcode_pipeline(seqs, batch_size=32, training=False, read_options=SYNC)
    plain = np.concatenate([b["ids"] for b in ds])
    tok = pipelines.barcode_tokenizer()
    np.testing.assert_array_equal(plain, tok.encode(seqs, 110)[0])
    train = _take(pipelines.barcode_pipeline(seqs, batch_size=32, training=True, seed=0), 6)
    epochs = [np.concatenate([b["ids"] for b in train[i : i + 3]]) for i in (0, 3)]
    assert not np.array_equal(epochs[0], epochs[1])
    # each epoch holds every sequence once: per row, the best-matching sequence differs only by
    # the reading-frame offset, i.e. the ids agree with one of the 6 shifted tokenizations
    shifted = [tok.encode([s[o:] for s in seqs], 110)[0] for o in range(6)]
    for ids in epochs:
        matches = [
            {(j, o) for o in range(6) for j in range(96) if np.array_equal(row, shifted[o][j])}
            for row in ids
        ]
        assert all(matches)
        assert sorted({j for m in matches for j, _ in m}) == list(range(96))
        assert len({o for m in matches for _, o in m}) > 1  # offsets are drawn, not all 0


def test_barcode_batches_shape_and_tokens(barcodes):
    ds = pipelines.barcode_pipeline(barcodes.sequences, batch_size=128, training=True)
    batch = _take(ds, 1)[0]
    assert batch["ids"].shape == (128, 110) and batch["ids"].dtype == np.int32
    assert batch["attention"].shape == (128, 110) and batch["attention"].dtype == np.int32
    assert batch["ids"].max() < 4098 and batch["ids"].min() >= 1  # no [MASK] from the pipeline
    assert np.all(batch["ids"][batch["attention"] == 0] == 1)  # padding is [UNK]


def test_batch_transform_pickles_for_grain_workers(chr22_dir):
    source = genome.GenomeChunkSource(chr22_dir, "train")
    plan = pipelines.BatchPlan(len(source), 8, training=True, seed=2)
    fetch = pipelines.FetchBatch(
        source, plan, pipelines.EncodeSequences(pipelines.dnabert_tokenizer(), 512)
    )
    clone = pickle.loads(pickle.dumps(fetch))
    _assert_batches_equal([clone(3)], [fetch(3)])


def test_resume_from_iterator_state_mid_epoch(chr22_dir):
    ds = pipelines.genome_pipeline(chr22_dir, batch_size=8, seed=3)
    it = iter(ds)
    _take(it, 5)
    state = it.get_state()
    expected = _take(it, 4)
    fresh = iter(ds)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 4), expected)


def test_resume_with_random_offsets_after_every_state(barcodes):
    ds = pipelines.barcode_pipeline(
        barcodes.sequences[:120],
        batch_size=16,
        training=True,
        seed=5,
        num_epochs=2,
        read_options=SYNC,
    )
    grain.experimental.assert_equal_output_after_checkpoint(ds)


def test_resume_through_orbax(chr22_dir, tmp_path):
    ds = pipelines.genome_pipeline(chr22_dir, batch_size=4, seed=9)
    it = iter(ds)
    _take(it, 7)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path, item_names=("data_iter",), options=options) as mngr:
        mngr.save(7, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    expected = _take(it, 3)
    fresh = iter(ds)
    with ocp.CheckpointManager(tmp_path, item_names=("data_iter",), options=options) as mngr:
        mngr.restore(
            7, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh))
        )
    _assert_batches_equal(_take(fresh, 3), expected)


def test_two_processes_see_disjoint_complete_data(chr22_dir):
    val = genome.GenomeChunkSource(chr22_dir, "validation")
    seen = []
    for index in (0, 1):
        ds = pipelines.genome_pipeline(
            chr22_dir,
            batch_size=16,
            split="validation",
            process_index=index,
            process_count=2,
            read_options=SYNC,
        )
        seen.append([s for b in ds for s in pipelines.dnabert_tokenizer().decode(b["ids"])])
    assert len(seen[0]) == len(seen[1]) == len(val) // 32 * 16
    halves = [(i // 16) % 2 for i in range(len(val) // 32 * 32)]  # rows 0-15 -> 0, 16-31 -> 1
    for p in (0, 1):
        assert seen[p] == [val[i] for i, half in enumerate(halves) if half == p]
    train = [
        _take(
            pipelines.genome_pipeline(
                chr22_dir, batch_size=8, process_index=i, process_count=2, num_epochs=1
            ),
            1000,
        )
        for i in (0, 1)
    ]
    decoded = [
        {s for b in t for s in pipelines.dnabert_tokenizer().decode(b["ids"])} for t in train
    ]
    assert not decoded[0] & decoded[1]
    n_train = len(genome.GenomeChunkSource(chr22_dir, "train"))
    assert len(decoded[0]) + len(decoded[1]) > n_train - 16  # only the partial batches dropped


def _labelled_eval(table, vocab, max_len, batch_size, **kwargs):
    return list(
        pipelines.labelled_pipeline(
            table,
            vocab=vocab,
            batch_size=batch_size,
            max_len=max_len,
            training=False,
            read_options=SYNC,
            **kwargs,
        )
    )


@pytest.mark.parametrize(
    "reader,path,vocab,max_len",
    [
        ("gue", "gue/prom/prom_core_tata/dev.csv.gz", "dnabert", 80),
        ("genemask", "genemask_fewshot/Prom-core/10/train.tsv.gz", "dnabert", 80),
        ("genemask", "genemask_fewshot/Splice-40/full-dataset/dev.tsv.gz", "dnabert", 40),
    ],
)
def test_labelled_eval_pads_the_last_batch(shared_data, reader, path, vocab, max_len):
    table = pipelines.read_labelled(shared_data / path, reader)
    batches = _labelled_eval(table, vocab, max_len, batch_size=64)
    assert len(batches) == -(-len(table) // 64)
    valid = np.concatenate([b["valid"] for b in batches]).astype(bool)
    labels = np.concatenate([b["labels"] for b in batches])
    assert valid.sum() == len(table) and np.all(valid[: len(table)])
    np.testing.assert_array_equal(labels[valid], table.labels)
    assert np.all(labels[~valid] == -1)
    n = min(64, len(table))
    ids, attention = pipelines.dnabert_tokenizer().encode(table.sequences[:n], max_len)
    np.testing.assert_array_equal(batches[0]["ids"][:n], ids)
    np.testing.assert_array_equal(batches[0]["attention"][:n], attention)
    for b in batches:
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
            "ids": ((64, max_len), np.int32),
            "attention": ((64, max_len), np.int32),
            "labels": ((64,), np.int32),
            "valid": ((64,), np.int32),
        }


def test_labelled_barcodes_by_split_and_two_processes():
    path = samples.sample_path(samples.BARCODES)
    test = pipelines.read_labelled(path, "barcode", label_column="genus_name", splits=["test"])
    train = pipelines.read_labelled(path, "barcode", label_column="genus_name", splits=["train"])
    assert train.label_names == test.label_names  # indices shared over the file's splits
    per_process = [
        _labelled_eval(test, "barcodebert", 110, 16, process_index=i, process_count=2)
        for i in (0, 1)
    ]
    assert len(per_process[0]) == len(per_process[1])
    rows = [np.concatenate([b["labels"][b["valid"] == 1] for b in p]) for p in per_process]
    merged = np.concatenate(  # global batch b = process 0's 16 rows, then process 1's
        [np.concatenate([a["labels"], b["labels"]]) for a, b in zip(*per_process, strict=True)]
    )
    valid = np.concatenate(
        [np.concatenate([a["valid"], b["valid"]]) for a, b in zip(*per_process, strict=True)]
    )
    assert sum(map(len, rows)) == len(test) == valid.sum() and valid[: len(test)].all()
    np.testing.assert_array_equal(merged[: len(test)], test.labels)
    batch = _take(
        pipelines.labelled_pipeline(
            train, vocab="barcodebert", batch_size=32, max_len=110, training=True, seed=0
        ),
        1,
    )[0]
    assert batch["ids"].shape == (32, 110) and np.all(batch["valid"] == 1)
    assert set(batch["labels"].tolist()) <= set(train.labels.tolist())


def test_labelled_pipeline_rejects_unlabelled_rows():
    path = samples.sample_path(samples.BARCODES)
    table = tables.read_barcode_tsv(path, ("subspecies_name",))["subspecies_name"]
    with pytest.raises(ValueError, match="no label.*drop_empty_labels"):
        pipelines.labelled_pipeline(
            table, vocab="barcodebert", batch_size=8, max_len=110, training=True
        )


def test_errors_name_the_problem(chr22_dir, barcodes):
    with pytest.raises(ValueError, match="process_index=2"):
        pipelines.genome_pipeline(chr22_dir, batch_size=8, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="50 examples make no whole global batch of 100"):
        pipelines.barcode_pipeline(barcodes.sequences[:50], batch_size=100, training=True)
    with pytest.raises(ValueError, match="150 examples make no whole global batch of 200"):
        pipelines.barcode_pipeline(
            barcodes.sequences[:150], batch_size=100, training=False, process_count=2
        )
    with pytest.raises(ValueError, match="pad=True needs labelled rows"):
        pipelines.make_batches(
            barcodes.sequences,
            pipelines.EncodeSequences(pipelines.barcode_tokenizer(), 110),
            batch_size=8,
            training=False,
            pad=True,
        )
    with pytest.raises(ValueError, match="unknown labelled format"):
        pipelines.read_labelled("x.csv", "fasta")


def test_make_pretraining_iterator_from_config(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMSJAX_CACHE", str(tmp_path / "cache"))
    config = config_lib.load("genemask:data.batch_size=16")  # the shipped chr22 sample
    it = pipelines.make_pretraining_iterator(config, "train", process_index=1, process_count=2)
    batch = next(it)
    assert batch["ids"].shape == (8, 512)
    prepared = list((tmp_path / "cache").iterdir())
    assert len(prepared) == 1 and prepared[0].name.startswith("genome-chr22_20-21Mb-")
    val = pipelines.make_pretraining_iterator(config, "validation", 0, 1)
    n_val = len(genome.GenomeChunkSource(prepared[0], "validation"))
    assert len(list(val)) == n_val // 16
    barcode = config_lib.load("barcode_mae:data.batch_size=64")
    batch = next(pipelines.make_pretraining_iterator(barcode, "train", 0, 1))
    assert batch["ids"].shape == (64, 110)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        pipelines.make_pretraining_iterator(barcode, "train", 0, 3)


def test_embedded_defaults_need_no_shared_data(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMSJAX_CACHE", str(tmp_path))
    it = pipelines.make_pretraining_iterator(
        config_lib.load("genemask:data.batch_size=4"), "train", 0, 1
    )
    assert next(it)["ids"].shape == (4, 512)
    assert genome.load_manifest(next(tmp_path.iterdir()))["total_length"] == 900_000
    train = tables.read_genemask_tsv(samples.sample_path(samples.PROM_CORE_TRAIN))
    test = tables.read_genemask_tsv(samples.sample_path(samples.PROM_CORE_TEST))
    assert len(train) == 20 and len(test) == 500
    assert np.bincount(train.labels).tolist() == [10, 10]


def test_sharded_batch_on_eight_devices(chr22_dir):
    mesh = sharding.make_mesh(data=4, fsdp=2)
    host = _take(pipelines.genome_pipeline(chr22_dir, batch_size=16, read_options=SYNC), 1)[0]
    batch = sharding.shard_batch(host, mesh)
    for key, x in batch.items():
        assert isinstance(x, jax.Array) and x.shape == (16, 512) and x.dtype == np.int32
        assert x.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
        assert {s.data.shape for s in x.addressable_shards} == {(2, 512)}
        np.testing.assert_array_equal(np.asarray(x), host[key])
