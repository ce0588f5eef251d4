"""TFDS builders (array_record, manual_dir, no TensorFlow) read through tfds.data_source + grain."""

import csv
import gzip
import io
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from gemsjax.data import pipelines, tables
from gemsjax.data import tfds_builders as tb

SYNC = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _assert_split_matches(data_dir, name, split, table):
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    assert len(source) == len(table)
    rows = [source[i] for i in range(len(source))]
    assert [r["row"] for r in rows] == list(range(len(table)))
    assert [r["sequence"].decode() for r in rows] == table.sequences
    np.testing.assert_array_equal([r["label"] for r in rows], table.labels)
    return source


def test_gue_task_builds_every_split_without_tensorflow(shared_data, tmp_path):
    builder = tb.prepare("gue/prom_core_tata", shared_data / "gue", tmp_path)
    assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
        "train": 4904,
        "dev": 613,
        "test": 613,
    }
    folder = shared_data / "gue/prom/prom_core_tata"
    for split in ("train", "dev", "test"):
        table = tables.read_gue_csv(folder / f"{split}.csv.gz")
        source = _assert_split_matches(tmp_path, "gue/prom_core_tata", split, table)
    batches = list(
        pipelines.labelled_pipeline(
            source, vocab="dnabert", batch_size=100, max_len=80, training=False, read_options=SYNC
        )
    )
    assert len(batches) == 7  # 613 rows padded to 700
    valid = np.concatenate([b["valid"] for b in batches]) == 1
    np.testing.assert_array_equal(
        np.concatenate([b["labels"] for b in batches])[valid], table.labels
    )
    ids, _ = pipelines.dnabert_tokenizer().encode(table.sequences, 80)
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in batches])[valid], ids)
    assert "tensorflow" not in sys.modules


def test_gue_tf0_and_a_task_without_train(shared_data, tmp_path):
    tf0 = tb.prepare("gue/tf_0", shared_data / "gue", tmp_path)
    assert tf0.info.splits["train"].num_examples == 32378
    _assert_split_matches(
        tmp_path, "gue/tf_0", "test", tables.read_gue_csv(shared_data / "gue/tf/0/test.csv.gz")
    )
    source = tfds.data_source("gue/tf_0", split="train", data_dir=tmp_path)
    batch = next(
        iter(
            pipelines.labelled_pipeline(
                source, vocab="dnabert", batch_size=32, max_len=110, training=True, seed=0
            )
        )
    )
    assert batch["ids"].shape == (32, 110) and set(batch["labels"].tolist()) <= {0, 1}
    emp = tb.prepare("gue/emp_h3", shared_data / "gue", tmp_path)
    assert set(emp.info.splits) == {"dev", "test"}
    assert emp.info.splits["dev"].num_examples == 1497


def test_genemask_prom_core_10_shot(shared_data, tmp_path):
    builder = tb.prepare(
        "genemask_fewshot/prom_core_10", shared_data / "genemask_fewshot", tmp_path
    )
    assert set(builder.info.splits) == {"train", "test"}
    folder = shared_data / "genemask_fewshot/Prom-core"
    train = tables.read_genemask_tsv(folder / "10/train.tsv.gz")
    _assert_split_matches(tmp_path, "genemask_fewshot/prom_core_10", "train", train)
    test = tables.read_genemask_tsv(folder / "test.tsv.gz")
    _assert_split_matches(tmp_path, "genemask_fewshot/prom_core_10", "test", test)
    assert len(train) == 20 and len(test) == 5920


def test_genemask_splice_40_has_dev_and_named_train_file(shared_data, tmp_path):
    builder = tb.prepare(
        "genemask_fewshot/splice_40_10", shared_data / "genemask_fewshot", tmp_path
    )
    assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
        "train": 300,
        "dev": 2700,
        "test": 3000,
    }


def _bioscan_style_tsv(shared_data, path, n_rows=600):
    """Real BOLD rows renamed to BIOSCAN-5M columns, with a cycling ``split`` column."""
    bold = shared_data / "bold_insect_coi_barcodes/insect_coi_barcodes.tsv.gz"
    with io.TextIOWrapper(gzip.open(bold), encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = [next(reader) for _ in range(n_rows)]
    splits = ["pretrain", "pretrain", "train", "val", "test", "test_unseen"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(
            ["processid", "order", "genus", "species", "dna_bin", "dna_barcode", "split"]
        )
        for i, row in enumerate(rows):
            writer.writerow(
                [
                    row["processid"],
                    row["order_name"],
                    row["genus_name"],
                    row["species_name"],
                    row["bin_uri"],
                    row["nucleotides"],
                    splits[i % len(splits)],
                ]
            )


@pytest.mark.parametrize("level", ["species", "dna_bin"])
def test_bioscan_splits_from_the_split_column(shared_data, tmp_path, level):
    manual = tmp_path / "manual"
    manual.mkdir()
    tsv = manual / tb.BIOSCAN_METADATA
    _bioscan_style_tsv(shared_data, tsv)
    builder = tb.prepare(f"bioscan5m/{level}", manual, tmp_path / "data")
    assert set(builder.info.splits) == {"pretrain", "train", "val", "test", "test_unseen"}
    full = tables.read_barcode_tsv(tsv, (level,), extra_columns=("processid",), deduplicate=True)[
        level
    ]
    total = 0
    for split in builder.info.splits:
        source = tfds.data_source(f"bioscan5m/{level}", split=split, data_dir=tmp_path / "data")
        expected = tables.read_barcode_tsv(
            tsv, (level,), splits=[split], extra_columns=("processid",), deduplicate=True
        )[level]
        assert len(source) == len(expected) > 0
        rows = [source[i] for i in range(len(source))]
        assert [r["sequence"].decode() for r in rows] == expected.sequences
        np.testing.assert_array_equal([r["label"] for r in rows], expected.labels)
        assert [r["processid"].decode() for r in rows] == expected.extra["processid"]
        for r in rows:
            name = r["label_name"].decode()
            assert name == (full.label_names[r["label"]] if r["label"] >= 0 else "")
            assert full.extra["processid"][r["row"]] == r["processid"].decode()
        total += len(source)
    assert total == len(full) < 600  # duplicate barcodes dropped over the whole file


def test_builder_errors_name_the_fix(shared_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="manual_dir"):
        tb.prepare("gue/tf_1", tmp_path / "missing", tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no train/dev/test.csv"):
        tb.prepare("gue/virus_covid", shared_data / "gue", tmp_path / "b")
    (tmp_path / "two").mkdir()
    for name in ("a.tsv", "b.tsv"):
        (tmp_path / "two" / name).write_text("processid\n")
    with pytest.raises(FileNotFoundError, match="exactly one .tsv"):
        tb.prepare("bioscan5m/genus", tmp_path / "two", tmp_path / "c")
    bad = tmp_path / "gue/prom/prom_core_tata"
    bad.mkdir(parents=True)
    (bad / "dev.csv").write_text("sequence,label\nACGTACGT,1\nACGTTTTT,2\n")
    with pytest.raises(ValueError, match="dev.csv: data row 2 has label 2, outside 0..1"):
        tb.prepare("gue/prom_core_tata", tmp_path / "gue", tmp_path / "e")
    with pytest.raises(ValueError, match="unknown builder"):
        tb.prepare("glue/cola", tmp_path, tmp_path / "d")
