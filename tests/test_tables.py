"""Labelled-table readers on the real GUE, GeneMask and BOLD files, and each kind of bad input."""

import csv
import gzip
import statistics

import genemask_formats
import numpy as np
import pytest

from gemsjax.data.tables import (
    BARCODEMAE_PARTITIONS,
    TableFormatError,
    read_barcode_tsv,
    read_genemask_tsv,
    read_gue_csv,
)

BOLD = "bold_insect_coi_barcodes/insect_coi_barcodes.tsv.gz"
LABELS = ("species_name", "genus_name", "bin_uri", "order_name")


@pytest.fixture(scope="module")
def bold_raw(shared_data):
    """The BOLD file with sequences exactly as published (gaps and trailing N kept)."""
    return read_barcode_tsv(
        shared_data / BOLD,
        LABELS,
        extra_columns=("processid",),
        strip_gaps=False,
        strip_trailing_n=False,
    )


@pytest.mark.parametrize(
    "split, rows, counts",
    [("train", 4904, [2455, 2449]), ("dev", 613, [306, 307]), ("test", 613, [304, 309])],
)
def test_gue_prom_core_tata(shared_data, split, rows, counts):
    table = read_gue_csv(shared_data / f"gue/prom/prom_core_tata/{split}.csv.gz")
    assert len(table) == rows
    assert table.labels.dtype == np.int32 and table.label_names == ("0", "1")
    assert np.bincount(table.labels).tolist() == counts
    assert {len(s) for s in table.sequences} == {70}
    assert set("".join(table.sequences)) <= set("ACGTN")


@pytest.mark.parametrize(
    "rel, rows, counts",
    [
        ("Prom-core/10/train.tsv.gz", 20, [10, 10]),  # quoted fields
        ("Prom-core/test.tsv.gz", 5920, [2926, 2994]),  # unquoted
    ],
)
def test_genemask_prom_core_quoted_and_unquoted(shared_data, rel, rows, counts):
    path = shared_data / "genemask_fewshot" / rel
    table = read_genemask_tsv(path)
    assert len(table) == rows
    assert np.bincount(table.labels).tolist() == counts
    assert {len(s) for s in table.sequences} == {70}
    with gzip.open(path, "rt") as fh:
        raw = [line.split("\t")[0].strip('"') for line in fh.read().splitlines()[1:]]
    assert [genemask_formats.sequence_to_kmer_text(s, 6) for s in table.sequences] == raw


def test_genemask_splice40_three_classes(shared_data):
    folder = shared_data / "genemask_fewshot/Splice-40"
    test = read_genemask_tsv(folder / "full-dataset/test.tsv.gz")
    dev = read_genemask_tsv(folder / "full-dataset/dev.tsv.gz")
    train = read_genemask_tsv(folder / "10/train_splice40_10.tsv.gz")
    assert test.label_names == ("0", "1", "2")
    assert np.bincount(test.labels).tolist() == [1048, 986, 966]
    assert np.bincount(train.labels).tolist() == [100, 100, 100]  # folder "10" = 100 per class
    assert {len(s) for s in test.sequences + dev.sequences + train.sequences} == {40}
    assert len(dev) == 2700
    assert len(set(dev.sequences)) == 2699  # the README's caveat: dev is inside test
    assert set(dev.sequences) <= set(test.sequences)


def test_bold_counts_match_readme(bold_raw):
    species, genus, bins, order = (bold_raw[c] for c in LABELS)
    assert len(species) == 82_341
    assert (len(species.label_names), len(genus.label_names), len(bins.label_names)) == (
        953,
        364,
        1278,
    )
    assert np.all(species.labels >= 0) and np.all(genus.labels >= 0)
    assert 0.021 <= np.mean(bins.labels == -1) < 0.022
    assert species.sequences is bins.sequences and species.extra is bins.extra
    per_order = dict(zip(order.label_names, np.bincount(order.labels).tolist(), strict=True))
    assert per_order == {
        "Coleoptera": 12_178,
        "Diptera": 34_298,
        "Hymenoptera": 7_598,
        "Lepidoptera": 28_267,
    }
    per_species = np.bincount(species.labels)
    assert (per_species.min(), per_species.max(), statistics.median(per_species)) == (1, 3026, 35)
    lengths = [len(s) for s in species.sequences]
    assert (min(lengths), max(lengths), statistics.median(lengths)) == (112, 1555, 658)
    chars = "".join(species.sequences)
    assert round(100 * chars.count("-") / len(chars), 1) == 4.8


def test_bold_gap_and_n_stripping(shared_data, bold_raw):
    table = read_barcode_tsv(shared_data / BOLD, ("species",))["species"]
    raw = bold_raw["species_name"]
    assert table.label_names == raw.label_names  # 'species' found as 'species_name'
    assert np.array_equal(table.labels, raw.labels)
    assert table.sequences == [s.replace("-", "").rstrip("N") for s in raw.sequences]
    assert not any("-" in s or s.endswith("N") for s in table.sequences)
    assert sum(s != r for s, r in zip(table.sequences, raw.sequences, strict=True)) > 1000


def test_bold_drop_empty_bins(shared_data, bold_raw):
    n_empty = int(np.sum(bold_raw["bin_uri"].labels == -1))
    table = read_barcode_tsv(
        shared_data / BOLD,
        ("dna_bin",),
        extra_columns=("processid",),
        strip_gaps=False,
        strip_trailing_n=False,
        drop_empty_labels=True,
    )["dna_bin"]
    assert len(table) == 82_341 - n_empty
    assert table.label_names == bold_raw["bin_uri"].label_names
    kept = bold_raw["bin_uri"].labels >= 0
    assert np.array_equal(table.labels, bold_raw["bin_uri"].labels[kept])
    assert table.extra["processid"] == [
        p for p, k in zip(bold_raw["bin_uri"].extra["processid"], kept, strict=True) if k
    ]


def write_bioscan_tsv(path, bold_raw, n_rows=3000):
    """Real BOLD rows renamed to BIOSCAN-5M columns, with a ``split`` column.

    Species are assigned whole to ``test_unseen`` or split row-wise over train / val / test, so
    some species occur in only one split; the last row repeats the first barcode (with extra
    trailing N) in another split, to test global de-duplication.
    """
    species, bins = bold_raw["species_name"], bold_raw["bin_uri"]
    rows = []
    for i in range(n_rows):
        s, b = species.labels[i], bins.labels[i]
        split = (
            "test_unseen"
            if s % 5 == 0
            else "pretrain"
            if s % 5 == 1
            else ("train", "train", "val", "test")[i % 4]
        )
        rows.append(
            [
                species.extra["processid"][i],
                species.label_names[s],
                "" if b < 0 else bins.label_names[b],
                split,
                species.sequences[i],
            ]
        )
    rows.append(["DUPLICATE", rows[0][1], rows[0][2], "test", rows[0][4] + "NNN"])
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(["processid", "species", "dna_bin", "split", "dna_barcode"])
        writer.writerows(rows)
    return rows


def test_bioscan_splits_share_label_indices(tmp_path, bold_raw):
    path = tmp_path / "bioscan.tsv"
    rows = write_bioscan_tsv(path, bold_raw)
    columns = ("species_name", "bin_uri")
    full = read_barcode_tsv(path, columns, extra_columns=("processid",))
    assert full["species_name"].label_names == tuple(sorted({r[1] for r in rows}))
    by_id = {r[0]: r for r in rows}
    for split_name in ("train", "test", "test_unseen"):
        tables = read_barcode_tsv(path, columns, splits=(split_name,), extra_columns=("processid",))
        for column, field in zip(columns, (1, 2), strict=True):
            table = tables[column]
            assert table.label_names == full[column].label_names
            assert len(table) == sum(r[3] == split_name for r in rows)
            assert table.extra["split"] == [split_name] * len(table)
            names = [table.label_names[i] if i >= 0 else "" for i in table.labels]
            assert names == [by_id[p][field] for p in table.extra["processid"]]
    unseen = read_barcode_tsv(path, splits=("test_unseen",))["species_name"]
    train = read_barcode_tsv(path, splits=("train",))["species_name"]
    assert not set(unseen.labels) & set(train.labels)  # species held out whole


def test_bioscan_global_dedup_and_partitions(tmp_path, bold_raw):
    path = tmp_path / "bioscan.tsv"
    rows = write_bioscan_tsv(path, bold_raw)
    test = read_barcode_tsv(path, splits=("test",), extra_columns=("processid",))
    assert "DUPLICATE" in test["species_name"].extra["processid"]
    deduped = read_barcode_tsv(
        path, splits=("test",), extra_columns=("processid",), deduplicate=True
    )["species_name"]
    assert "DUPLICATE" not in deduped.extra["processid"]  # its first copy is in another split
    assert len(set(deduped.sequences)) == len(deduped)
    pretrain = read_barcode_tsv(path, splits=BARCODEMAE_PARTITIONS["pretrain"])["species_name"]
    assert len(pretrain) == sum(r[3] == "pretrain" for r in rows) > 0


def test_unknown_split_and_missing_split_column(tmp_path, bold_raw):
    path = tmp_path / "bioscan.tsv"
    write_bioscan_tsv(path, bold_raw, n_rows=50)
    with pytest.raises(TableFormatError, match=r"bioscan.tsv: no rows in split\(s\) \['test_seen"):
        read_barcode_tsv(path, splits=("train", "test_seen"))
    with pytest.raises(TableFormatError, match=r"no rows in split\(s\) \['key_unseen'\]"):
        read_barcode_tsv(path, splits=("key_unseen",))
    small = tmp_path / "bold_small.tsv"
    small.write_text("processid\tspecies_name\tnucleotides\nA1\tX y\tACGT\n")
    with pytest.raises(TableFormatError, match=r"bold_small.tsv, line 1: missing .*'split'"):
        read_barcode_tsv(small, splits=("train",))


def assert_error(read, path, line: int, *fragments: str):
    with pytest.raises(TableFormatError) as info:
        read(path)
    message = str(info.value)
    assert f"{path.name}, line {line}:" in message, message
    for fragment in fragments:
        assert fragment in message, message


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_missing_column_lists_found_columns(tmp_path):
    path = write(tmp_path, "gue.csv", "seq,label\nACGT,0\n")
    assert_error(read_gue_csv, path, 1, "missing required column 'sequence'", "['seq', 'label']")
    path = write(tmp_path, "bold.tsv", "processid\tnucleotides\nA1\tACGT\n")
    assert_error(read_barcode_tsv, path, 1, "'species_name' or 'species'")


def test_wrong_number_of_fields(tmp_path):
    path = write(tmp_path, "gue.csv", "sequence,label\nACGT,0\nACGT,1,extra\n")
    assert_error(read_gue_csv, path, 3, "3 fields, but the header has 2")


def test_non_integer_label(tmp_path):
    path = write(tmp_path, "gue.csv", "sequence,label\nACGT,0\n\nACGT,1\nACGT,yes\n")
    assert_error(read_gue_csv, path, 5, "label 'yes'")
    path = write(tmp_path, "gm.tsv", '"sequence"\t"label"\n"ACGTAC CGTACG"\t"1.5"\n')
    assert_error(read_genemask_tsv, path, 2, "label '1.5'")


def test_empty_sequence(tmp_path):
    path = write(tmp_path, "gue.csv", "sequence,label\nACGT,0\n,1\n")
    assert_error(read_gue_csv, path, 3, "empty sequence")
    path = write(tmp_path, "bold.tsv", "species_name\tnucleotides\nA b\tACGT\nA c\t--NN-N\n")
    assert_error(read_barcode_tsv, path, 3, "empty sequence")


def test_invalid_characters(tmp_path):
    path = write(tmp_path, "gue.csv", "sequence,label\nACGT,0\nACGT7A,1\n")
    assert_error(read_gue_csv, path, 3, "invalid character '7' at position 5")
    path = write(
        tmp_path, "bold.tsv", "species_name\tnucleotides\nA b\tACGT\nA c\tAC\nA d\tACGTé\n"
    )
    assert_error(read_barcode_tsv, path, 4, "invalid character 'é' at position 5")


def test_bad_kmer_text(tmp_path):
    path = write(tmp_path, "gm.tsv", "sequence\tlabel\nACGTAC CGTACG\t0\nACGTAC TTTTTT\t1\n")
    assert_error(read_genemask_tsv, path, 3, "does not overlap", "overlapping k-mers")


def test_empty_and_truncated_files(tmp_path, shared_data):
    assert_error(read_gue_csv, write(tmp_path, "empty.csv", ""), 1, "empty")
    data = (shared_data / "gue/prom/prom_core_tata/dev.csv.gz").read_bytes()
    path = tmp_path / "truncated.csv.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TableFormatError, match=r"truncated.csv.gz, line \d+: .*truncated"):
        read_gue_csv(path)


def test_unbalanced_quote_and_long_field_are_reported_where_they_start(tmp_path, shared_data):
    """Real BOLD rows with line 802 broken: an opening quote that is never closed swallows the
    lines after it (until the field limit or the next quote); a 5 Mb barcode is a long field."""
    with gzip.open(shared_data / BOLD, "rt", newline="") as fh:
        lines = fh.read().split("\n")[:1200]
    header = lines[0].split("\t")
    col = header.index("species_name")
    quoted = list(lines)
    fields = quoted[801].split("\t")
    fields[col] = '"' + fields[col]
    quoted[801] = "\t".join(fields)
    path = write(tmp_path, "quote.tsv", "\n".join(quoted) + "\n")
    assert_error(
        read_barcode_tsv, path, 802, "the row runs on to line ", "an unbalanced '\"' on line 802"
    )
    short = write(tmp_path, "quote_short.tsv", "\n".join(quoted[:820]) + "\n")
    assert_error(
        read_barcode_tsv,
        short,
        802,
        "fields, but the header has",
        "the row runs on to line 820: an unbalanced '\"' on line 802",
    )
    long = list(lines)
    fields = long[801].split("\t")
    fields[header.index("nucleotides")] = "ACGT" * 1_250_000
    long[801] = "\t".join(fields)
    path = write(tmp_path, "long.tsv", "\n".join(long) + "\n")
    assert_error(
        read_barcode_tsv, path, 802, "a field is longer than 131,072 characters", "remove the row"
    )


def test_split_emptied_by_deduplication_says_why(tmp_path, bold_raw):
    """Every ``val`` barcode repeats a ``pretrain`` one: de-duplication (BarcodeMAE's rule) empties
    the split, and the error says so instead of "no rows in split"."""
    path = tmp_path / "dups.tsv"
    seqs = bold_raw["species_name"].sequences[:40]
    with open(path, "w") as fh:
        fh.write("processid\tspecies\tsplit\tdna_barcode\n")
        for i, seq in enumerate(seqs):
            fh.write(f"P{i}\tA b\tpretrain\t{seq}\n")
        for i, seq in enumerate(seqs[:10]):
            fh.write(f"V{i}\tA b\tval\t{seq}\n")
    assert len(read_barcode_tsv(path, splits=("val",))["species_name"]) == 10
    with pytest.raises(
        TableFormatError,
        match=r"dups.tsv: every row of split\(s\) \['val'\] was "
        r"dropped \(10 as duplicates of earlier sequences \(deduplicate=True\)\)",
    ):
        read_barcode_tsv(path, splits=("val",), deduplicate=True)
