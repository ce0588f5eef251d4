"""Barcode evaluation: the split, 1-NN, exact lookup, k-mer vectors, scores against scikit-learn,
BIN clustering, the sets and their errors, and the protocol end to end."""

import collections
import gzip
import hashlib
import itertools
import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_mutual_info_score, balanced_accuracy_score
from sklearn.neighbors import KNeighborsClassifier

from gemsjax.data import samples, tables
from gemsjax.errors import UserError
from gemsjax.eval import barcode_split, barcodes, cluster, kmer_features, knn

BOLD = ("bold_insect_coi_barcodes", "insect_coi_barcodes.tsv.gz")


@pytest.fixture(scope="module")
def bold_split(shared_data, tmp_path_factory):
    """The split of the real BOLD file, written once for the module."""
    out = tmp_path_factory.mktemp("bold_split")
    summary = barcode_split.write_split(shared_data.joinpath(*BOLD), out)
    return out / summary["output"], summary


def test_split_is_species_disjoint_and_documented(bold_split):
    path, summary = bold_split
    read = tables.read_barcode_tsv(path, ("species_name", "genus_name"))
    species, genus = read["species_name"].labels, read["genus_name"].labels
    split = np.asarray(read["species_name"].extra["split"])
    assert sorted(set(split)) == sorted(barcode_split.SPLITS)
    assert len(split) == sum(summary["rows"].values()) == 40_055  # unique sequences of 82,341
    unseen = set(species[split == "test_unseen"])
    seen = set(species[split != "test_unseen"])
    assert unseen and not unseen & seen  # whole species held out, none in pretraining
    assert len(unseen) == summary["species"]["test_unseen"] == 187
    for g in set(genus[split == "test_unseen"]):  # from genera with >= 3 species, >= 2 kept
        members = set(species[genus == g])
        assert len(members) >= 3 and len(members - unseen) >= 2
    assert set(species[split == "test"]) <= set(species[split == "train"])
    assert len(set(read["species_name"].sequences)) == len(split)  # deduplicated


def test_split_is_deterministic(bold_split, shared_data, tmp_path):
    path, summary = bold_split
    again = barcode_split.write_split(shared_data.joinpath(*BOLD), tmp_path)
    assert again == summary
    assert (tmp_path / again["output"]).read_bytes() == path.read_bytes()
    with gzip.open(path, "rt") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    digest = hashlib.sha256("".join(f"{r[0]}\t{r[-1]}\n" for r in rows[1:]).encode())
    assert digest.hexdigest() == summary["assignment_sha256"]
    species = np.repeat(np.arange(40), 5)
    a = barcode_split.assign_splits(species, species // 4, seed=3)
    b = barcode_split.assign_splits(species, species // 4, seed=3)
    c = barcode_split.assign_splits(species, species // 4, seed=4)
    assert (a == b).all() and (a != c).any()


def test_split_refuses_a_table_that_has_one(tmp_path):
    with pytest.raises(UserError, match="line 1: the table already has a 'split' column"):
        barcode_split.write_split(samples.sample_path(samples.BARCODES), tmp_path)


def test_one_nn_returns_the_genus_of_an_identical_key():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(50, 16)).astype(np.float32)
    labels = rng.integers(0, 7, 50)
    assert (knn.nearest_labels(keys, labels, keys) == labels).all()
    assert (knn.nearest_labels(keys, labels, 3.0 * keys[[4, 9]]) == labels[[4, 9]]).all()


def test_one_nn_matches_scikit_learn_cosine():
    rng = np.random.default_rng(1)
    keys, queries = rng.normal(size=(300, 24)), rng.normal(size=(2500, 24))
    labels = rng.integers(0, 11, 300)
    sk = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(keys, labels).predict(queries)
    assert (knn.nearest_labels(keys, labels, queries) == sk).all()


def test_scores_match_scikit_learn():
    rng = np.random.default_rng(2)
    train = rng.normal(size=(40, 8))
    unseen = rng.normal(size=(60, 8))
    genus = rng.integers(0, 5, 40)
    truth = rng.integers(0, 5, 60)
    empty = np.zeros(0, np.int32)
    part = lambda g: barcodes.BarcodeSet([], g, g, g, [])
    sets = barcodes.BarcodeSets(part(genus), part(empty), part(truth), (), tuple("abcde"), "x", "")
    got = barcodes.genus_knn(train, unseen, sets)
    pred = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(train, genus).predict(unseen)
    assert got["genus 1-NN acc"] == pytest.approx(np.mean(pred == truth))
    assert got["genus 1-NN bal. acc"] == pytest.approx(balanced_accuracy_score(truth, pred))
    from scipy.stats import hmean

    assert barcodes.harmonic_mean([0.9, 0.5, 0.7]) == pytest.approx(hmean([0.9, 0.5, 0.7]))
    assert barcodes.harmonic_mean([0.9, 0.0]) == 0.0


def test_exact_lookup_matches_contained_sequences_only():
    keys = ["ACGTACGTAA", "TTTTGGGGCC", "ACGTACGTAA"]
    labels = np.array([3, 5, 9])
    got = knn.exact_lookup(keys, labels, ["ACGTACGTAA", "GGGGC", "ACGTT", "AA|TT", ""])
    assert got.tolist() == [3, 5, -1, -1, -1]


def test_exact_lookup_index_equals_plain_search_on_real_barcodes():
    sets = barcodes.load_barcode_sets(samples.sample_path(samples.BARCODES))
    keys = sets.train.sequences
    queries = (
        sets.test.sequences[:150]
        + [k[17:400] for k in keys[:40:3]]
        + [k[:25] for k in keys[:5]]
        + ["N".join(k[i : i + 30] for i in (0, 31, 62)) for k in keys[:3]]
    )
    labels = np.arange(len(keys))
    want = [next((j for j, key in enumerate(keys) if q in key), -1) for q in queries]
    got = knn.exact_lookup(keys, labels, queries)
    assert got.tolist() == want and (got >= 0).sum() > 20


def test_kmer_frequencies_count_real_barcodes():
    seqs = tables.read_barcode_tsv(samples.sample_path(samples.BARCODES))["species_name"]
    seqs = seqs.sequences[:30] + ["ACGTNACGTACGTT", "AC", "ACGTAC-GTACGT"]
    got = kmer_features.kmer_frequencies(seqs)
    index = {"".join(p): i for i, p in enumerate(itertools.product("ACGT", repeat=6))}
    for row, seq in zip(got, seqs, strict=True):
        seq = seq.replace("-", "")
        counts = collections.Counter(seq[i : i + 6] for i in range(len(seq) - 5))
        want = np.zeros(4096)
        for kmer, n in counts.items():
            if kmer in index:
                want[index[kmer]] = n
        want /= max(want.sum(), 1)
        np.testing.assert_allclose(row, want, rtol=1e-6, atol=1e-7)
    assert got[-2].sum() == 0 and got[-1].sum() == pytest.approx(1.0)


def _blobs(seed=0, groups=6, per=15, dim=12):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, dim)) * 10
    x = np.repeat(centres, per, axis=0) + rng.normal(size=(groups * per, dim)) * 0.05
    return x, np.repeat(np.arange(groups), per)


def test_ward_ami_is_one_on_separable_groups_and_matches_scikit_learn():
    x, bins = _blobs()
    assert cluster.cluster_ami(x, bins) == pytest.approx(1.0)
    shuffled = np.random.default_rng(0).permutation(bins)
    from sklearn.cluster import AgglomerativeClustering

    clusters = AgglomerativeClustering(n_clusters=6, linkage="ward").fit_predict(x)
    assert cluster.cluster_ami(x, shuffled) == pytest.approx(
        adjusted_mutual_info_score(shuffled, clusters)
    )
    assert abs(cluster.cluster_ami(x, shuffled)) < 0.2


@pytest.mark.slow  # umap-learn's numba kernels compile on first use (~30 s on 2 loaded cores)
def test_bin_reconstruction_ami_is_one_on_separable_barcodes_through_umap():
    x, bins = _blobs(groups=5, per=20)
    assert cluster.bin_reconstruction_ami(x, bins, components=8) == pytest.approx(1.0)


def test_sample_sets_hold_out_whole_species():
    sets = barcodes.load_barcode_sets(samples.sample_path(samples.BARCODES))
    unseen = set(sets.unseen.species)
    assert len(unseen) == 14 and not unseen & (set(sets.train.species) | set(sets.test.species))
    assert set(sets.unseen.genus) <= set(sets.train.genus)
    assert set(sets.test.species) <= set(sets.train.species)
    assert len(sets.train) > 500 and len(sets.test) > 200 and len(sets.unseen) > 100


def test_cut_queries_keeps_the_keys_and_each_class_share():
    from gemsjax.eval import config as eval_config

    sets = barcodes.load_barcode_sets(samples.sample_path(samples.BARCODES))
    cut = barcodes.cut_queries(sets, 40)
    assert cut.train is sets.train and (len(cut.test), len(cut.unseen)) == (40, 40)
    assert set(cut.test.sequences) <= set(sets.test.sequences)
    assert set(cut.unseen.sequences) <= set(sets.unseen.sequences)
    for part, whole, labels in (
        (cut.test, sets.test, "species"),
        (cut.unseen, sets.unseen, "genus"),
    ):
        counts = collections.Counter(getattr(whole, labels).tolist())
        kept = collections.Counter(getattr(part, labels).tolist())
        for label, n in counts.items():  # largest remainders: within one row of the share
            assert abs(kept[label] - n * 40 / len(whole)) < 1
    again = barcodes.cut_queries(sets, 40)
    assert again.test.sequences == cut.test.sequences  # fixed: seed 0
    with pytest.raises(UserError, match=r"max_query_rows=-5 must be >= 0 \(0: every query\)"):
        eval_config.load("barcodes:smoke", {"max_query_rows": "-5"}, "evaluate")
    whole = barcodes.cut_queries(sets, 10_000)  # a set no larger than the cut stays whole
    assert (whole.test.sequences, whole.unseen.sequences) == (
        sets.test.sequences,
        sets.unseen.sequences,
    )


@pytest.mark.slow  # UMAP compile for the picture
def test_evaluate_without_baselines_scores_only_the_encoder_on_the_cut(tmp_path):
    from gemsjax.eval import config as eval_config

    overrides = {"baseline": "False", "probe": "False", "cluster": "False", "max_query_rows": "40"}
    config = eval_config.load("barcodes:smoke", overrides, "evaluate")
    barcodes.evaluate(config, tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    assert [row["method"] for row in record["rows"]] == ["random (test_mae)"]
    assert record["sets"] == {"train": 580, "test": 40, "unseen": 40}
    assert (
        "test and unseen cut to fixed stratified subsamples of 40 (of 284, 158"
        in (tmp_path / "results.md").read_text()
    )


def test_bad_barcode_tables_are_user_errors(tmp_path, bold_split):
    no_genus = tmp_path / "no_genus.tsv"
    no_genus.write_text(
        "processid\tspecies_name\tbin_uri\tnucleotides\tsplit\n"
        "A1\tAus bus\tBOLD:AAA0001\tACGTACGTACGT\ttrain\n"
    )
    with pytest.raises(
        UserError,
        match=r"no_genus.tsv, line 1: .*needs species, genus and BIN "
        r"columns, missing \['genus_name'\]",
    ):
        barcodes.load_barcode_sets(no_genus)
    with pytest.raises(UserError, match="no 'split' column; write a split once with"):
        barcodes.load_barcode_sets(_without_split(tmp_path))
    only_train = tmp_path / "only_train.tsv"
    with gzip.open(bold_split[0], "rt") as f:
        lines = [next(f)] + [
            line for line in itertools.islice(f, 3000) if line.rstrip("\n").endswith("\ttrain")
        ]
    only_train.write_text("".join(lines))
    with pytest.raises(UserError, match="only_train.tsv: the test set is empty"):
        barcodes.load_barcode_sets(only_train)


def _without_split(tmp_path):
    path = tmp_path / "bold_no_split.tsv"
    with gzip.open(samples.sample_path(samples.BARCODES), "rt") as f:
        lines = [line.rsplit("\t", 1)[0] + "\n" for line in itertools.islice(f, 50)]
    path.write_text("".join(lines))
    return path


@pytest.mark.slow  # UMAP compile, a probe on 4096-dim k-mer vectors, one fine-tuning epoch
def test_evaluate_smoke_writes_the_table_and_picture(tmp_path):
    from gemsjax.eval import config as eval_config

    config = eval_config.load("barcodes:smoke,finetune", {"finetune.epochs": "1"}, "evaluate")
    summary = barcodes.evaluate(config, tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    methods = [row["method"] for row in record["rows"]]
    assert methods == ["random (test_mae)", "6-mer frequencies", "exact-sequence lookup"]
    kmer = record["rows"][1]
    assert kmer["genus 1-NN acc"] > 0.5 and kmer["BIN AMI"] > 0.6
    assert kmer["harmonic mean"] == pytest.approx(
        barcodes.harmonic_mean(
            [kmer["species acc (probe)"], kmer["genus 1-NN acc"], kmer["BIN AMI"]]
        )
    )
    assert 0.0 <= record["rows"][0]["species acc (fine-tuned)"] <= 1.0  # 1 epoch of full FT
    assert (tmp_path / "finetune_0" / "metrics.jsonl").is_file()
    assert (tmp_path / "umap.png").stat().st_size > 10_000
    assert "| 6-mer frequencies |" in (tmp_path / "results.md").read_text()
    assert summary["rows"] == record["rows"]
