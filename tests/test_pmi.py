"""Tests for gemsjax.pmi: n-gram counting, GeneMask scores and ranks, rank table files."""

import collections
import csv
import gzip
import importlib.util
import itertools
import pathlib

import genemask_formats
import numpy as np
import pytest

from gemsjax import pmi
from gemsjax.data import samples
from gemsjax.data.fasta import read_fasta
from gemsjax.errors import UserError
from gemsjax.vocab import get_vocab

REPO = pathlib.Path(__file__).resolve().parents[1]
PUBLISHED = samples.sample_path(samples.GENEMASK_RANKS)  # the published GeneMask table
LAMBDA = "phage_lambda/lambda_virus.fa.gz"
CHR22 = samples.sample_path(samples.GENOME)  # = ../shared/data/human_chr22_20-21Mb
ECOLI = "bacterial_genomes/Escherichia_coli_K-12_MG1655.fasta.gz"
CHR22_N_RUN = (509_431, 609_431)  # the one N run of the chr22 segment


def brute_counts(records, max_n):
    """Reference counter: every substring of length 1..max_n made only of A/C/G/T, per record."""
    counts = collections.Counter()
    for seq in records:
        seq = seq.upper()
        for n in range(1, max_n + 1):
            for i in range(len(seq) - n + 1):
                gram = seq[i : i + n]
                if not gram.strip("ACGT"):
                    counts[gram] += 1
    return counts


def assert_counts_equal(counts: pmi.NgramCounts, expected: collections.Counter, max_n: int):
    assert counts.max_n == max_n
    for n in range(1, max_n + 1):
        grams = [g for g in expected if len(g) == n]
        np.testing.assert_array_equal(counts.lookup(grams), [expected[g] for g in grams])
        assert counts.counts[n].sum() == sum(expected[g] for g in grams), f"extra {n}-grams"
    assert counts.n_bases == counts.counts[1].sum()


@pytest.fixture(scope="module")
def lambda_seq(shared_data):
    ((_, seq),) = read_fasta(shared_data / LAMBDA)
    return seq


@pytest.fixture(scope="module")
def chr22_seq():
    ((_, seq),) = read_fasta(CHR22)
    return seq


@pytest.fixture(scope="module")
def barcodes(shared_data):
    """40 real BOLD COI barcodes with gaps '-' and IUPAC codes: many short runs of valid bases."""
    with gzip.open(shared_data / "bold_insect_coi_barcodes/insect_coi_barcodes.tsv.gz", "rt") as f:
        rows = csv.DictReader(f, delimiter="\t")
        return [row["nucleotides"] for row in itertools.islice(rows, 40)]


@pytest.fixture(scope="module")
def mixed_records(chr22_seq, lambda_seq, barcodes):
    """Real records with N runs at both ends, a record shorter than 6, and gapped barcodes."""
    start, end = CHR22_N_RUN
    return [
        chr22_seq[start - 20_000 : start + 300],
        lambda_seq[:3],
        lambda_seq[3:20_000],
        chr22_seq[end - 500 : end + 20_000],
        *barcodes[25:40],
    ]


def write_fasta(path: pathlib.Path, records, width=60) -> pathlib.Path:
    with open(path, "w") as f:
        for i, seq in enumerate(records):
            lines = [seq[j : j + width] for j in range(0, len(seq), width)]
            f.write(f">rec{i} test record\n" + "\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------- counting


def test_counts_match_brute_force_on_lambda(shared_data, lambda_seq):
    counts = pmi.count_kmers(shared_data / LAMBDA, max_n=6)
    assert_counts_equal(counts, brute_counts([lambda_seq], 6), 6)
    assert counts.n_bases == len(lambda_seq) == 48_502


def test_counts_skip_invalid_bases_and_record_boundaries(tmp_path, mixed_records):
    expected = brute_counts(mixed_records, 6)
    fasta = write_fasta(tmp_path / "mixed.fa", mixed_records)
    from_file = pmi.count_kmers(fasta, 6)
    assert_counts_equal(from_file, expected, 6)
    from_strings = pmi.count_kmers(mixed_records, 6)
    for n in range(1, 7):
        np.testing.assert_array_equal(from_strings.counts[n], from_file.counts[n])
    # the same bases as one record would add n-grams across the boundaries
    joined = pmi.count_kmers("".join(mixed_records), 6)
    assert (joined.counts[6] >= from_file.counts[6]).all()
    assert joined.counts[6].sum() > from_file.counts[6].sum()


def test_small_example_by_hand():
    counts = pmi.count_kmers(["ACGT", "ttnac"], max_n=2)
    assert counts.n_bases == 8
    # "TT" only inside "ttnac": never across the record boundary "ACGT|TT"
    grams = ["A", "C", "G", "T", "AC", "CG", "GT", "TT", "TA", "CA"]
    assert [counts[g] for g in grams] == [2, 2, 1, 3, 2, 1, 1, 1, 0, 0]
    assert counts.counts[2].sum() == 5


def test_chunk_boundaries_do_not_change_counts(tmp_path, mixed_records, chr22_seq):
    start, _ = CHR22_N_RUN
    records = [*mixed_records[:2], chr22_seq[start - 3_000 : start + 40]]
    fasta = write_fasta(tmp_path / "small.fa", records)
    reference = pmi.count_kmers(fasta, 6, chunk_bases=1 << 22)
    for chunk_bases in (1, 5, 1000):
        counts = pmi.count_kmers(fasta, 6, chunk_bases=chunk_bases)
        for n in range(1, 7):
            np.testing.assert_array_equal(counts.counts[n], reference.counts[n], f"n={n}")
    big = write_fasta(tmp_path / "big.fa", mixed_records)
    a, b = (pmi.count_kmers(big, 6, chunk_bases=c) for c in (1000, 1 << 22))
    for n in range(1, 7):
        np.testing.assert_array_equal(a.counts[n], b.counts[n])


@pytest.mark.parametrize("max_n", [1, 3, 10])
def test_other_max_n(lambda_seq, barcodes, max_n):
    records = [lambda_seq[:4000], *barcodes[28:34]]
    counts = pmi.count_kmers(records, max_n, chunk_bases=1500)
    assert_counts_equal(counts, brute_counts(records, max_n), max_n)


def test_lower_case_and_bytes_inputs(lambda_seq):
    upper = pmi.count_kmers(lambda_seq[:5000], 4)
    for seq in (lambda_seq[:5000].lower(), lambda_seq[:5000].encode()):
        other = pmi.count_kmers(seq, 4)
        np.testing.assert_array_equal(other.counts[4], upper.counts[4])


def test_counting_errors(shared_data):
    for max_n in (0, 11, 6.0):
        with pytest.raises(ValueError, match="max_n must be an integer in 1..10"):
            pmi.count_kmers("ACGT", max_n)
    with pytest.raises(ValueError, match="chunk_bases"):
        pmi.count_kmers("ACGT", 2, chunk_bases=0)
    with pytest.raises(TypeError, match=r"pass pathlib.Path"):
        pmi.count_kmers(str(shared_data / LAMBDA), 2)
    with pytest.raises(TypeError, match="got int"):
        pmi.count_kmers([1234], 2)
    counts = pmi.count_kmers("ACGT", 2)
    with pytest.raises(ValueError, match="one length in 1..2"):
        counts.lookup(["ACG"])
    with pytest.raises(ValueError, match="only A, C, G, T"):
        counts["AN"]


# ------------------------------------------------------------------------------------- scores


def reference_scores(counts: pmi.NgramCounts, kmer: str, total, min_count: int):
    """Scores of one k-mer by enumerating every split and every 1/2-mer segmentation.

    ``total(n)`` is the denominator of p for n-grams of length n.
    """

    def log_p(s):
        return np.log(counts[s]) - np.log(total(len(s)))

    def segmentations(s):
        if not s:
            yield []
        for size in (1, 2)[: len(s)]:
            for rest in segmentations(s[size:]):
                yield [s[:size], *rest]

    k = len(kmer)
    naive = log_p(kmer) - sum(log_p(b) for b in kmer)
    true = min(log_p(kmer) - log_p(kmer[:i]) - log_p(kmer[i:]) for i in range(1, k - 1))
    dp = min(log_p(kmer) - sum(log_p(p) for p in seg) for seg in segmentations(kmer))
    f = counts[kmer]
    return naive, true, dp, dp * np.log(f) / (np.log(f) + np.log(min_count))


def test_scores_match_enumeration_on_ecoli(shared_data):
    counts = pmi.count_kmers(shared_data / ECOLI, 6)
    kmers = ["".join(p) for p in itertools.product("ACGT", repeat=6)]
    totals = {
        "genemask": lambda n: 2 * counts.n_bases,
        "per_length": lambda n: counts.counts[n].sum(),
    }
    rng = np.random.default_rng(0)
    picks = rng.choice(4096, 60, replace=False)
    for denominator, total in totals.items():
        scores = pmi.pmi_scores(counts, 6, min_count=200, denominator=denominator)
        for i in picks:
            got = [scores[name][i] for name in pmi.GENEMASK_COLUMNS]
            if counts[kmers[i]] < 200:
                assert np.isnan(got).all()
            else:
                expected = reference_scores(counts, kmers[i], total, 200)
                np.testing.assert_allclose(got, expected, atol=1e-12, err_msg=kmers[i])
    assert np.mean(counts.lookup([kmers[i] for i in picks]) >= 200) > 0.8


def test_score_and_rank_errors():
    counts = pmi.count_kmers("ACGTTGCA" * 10, 4)
    with pytest.raises(ValueError, match=r"k must be an integer in 3..4"):
        pmi.pmi_scores(counts, 5)
    with pytest.raises(ValueError, match=r"k must be an integer in 3..4"):
        pmi.pmi_scores(counts, 2)
    with pytest.raises(ValueError, match="min_count"):
        pmi.pmi_scores(counts, 4, min_count=1)
    with pytest.raises(ValueError, match="denominator must be one of"):
        pmi.pmi_scores(counts, 4, denominator="per_kmer")
    with pytest.raises(ValueError, match="true_splits must be one of"):
        pmi.pmi_scores(counts, 4, true_splits="some")
    with pytest.raises(ValueError, match="has k = 6, but k = 4"):
        pmi.rank_table(counts, 4, vocab=get_vocab("dnabert", 6))


def test_rank_table_from_ecoli(shared_data):
    counts = pmi.count_kmers(shared_data / ECOLI, 6)
    vocab = get_vocab("dnabert", 6)
    table = pmi.rank_table(counts, 6)
    assert table.dtype == np.int32 and table.shape == (vocab.size,)
    assert (table[: vocab.num_specials] == 4096).all()
    kmer_counts = counts.lookup(vocab.kmer_strings())
    scored = kmer_counts >= 101
    unscored = np.array(vocab.kmer_strings())[~scored]
    assert 0 < unscored.size < 100
    assert np.mean(["CTAG" in s for s in unscored]) > 0.9  # CTAG is rare in E. coli
    ranks = table[vocab.num_specials :]
    assert sorted(ranks[scored]) == list(range(1, scored.sum() + 1))
    assert (ranks[~scored] == 4096).all()
    # ranks follow the normalized score, looked up by string through both index orders
    norm = pmi.pmi_scores(counts, 6)["norm_dp_true_pmi"]
    kmers_acgt = ["".join(p) for p in itertools.product("ACGT", repeat=6)]
    by_string = dict(zip(kmers_acgt, norm, strict=True))
    order = np.argsort(ranks[scored])
    scores_in_rank_order = np.array([by_string[s] for s in np.array(vocab.kmer_strings())[scored]])
    assert (np.diff(scores_in_rank_order[order]) <= 0).all()
    # with min_count 2 every 6-mer is scored: the ranks are a permutation of 1..4096
    full = pmi.rank_table(counts, 6, min_count=2)[vocab.num_specials :]
    assert sorted(full) == list(range(1, 4097))
    # the barcodebert layout (ACGT order) holds the same ranks, per k-mer string
    bb = get_vocab("barcodebert", 6)
    bb_table = pmi.rank_table(counts, 6, min_count=2, vocab=bb)
    assert dict(zip(bb.kmer_strings(), bb_table[2:], strict=True)) == dict(
        zip(vocab.kmer_strings(), full, strict=True)
    )


def test_ranks_from_scores_ties_and_nan():
    scores = np.array([0.5, np.nan, 2.0, 0.5, -1.0, 2.0, np.nan, 0.0])
    np.testing.assert_array_equal(pmi.ranks_from_scores(scores), [3, 8, 1, 4, 6, 2, 8, 5])


# ------------------------------------------------------------------- parity with GeneMask


@pytest.fixture(scope="module")
def published():
    columns = [*pmi.GENEMASK_COLUMNS.values(), "norm_pmi_rank_rel"]
    return pmi.load_genemask_columns(PUBLISHED, columns)


@pytest.fixture(scope="module")
def recovered():
    return genemask_formats.recover_genemask_counts(PUBLISHED)


def test_recovered_counts(recovered):
    assert recovered["TCGCGA"] == 2947  # printed in the GeneMask notebook
    assert recovered["CCTCCC"] == 446_610
    total = recovered.counts[6].sum()
    # the 6-mers of GRCh38 chr1-3 miss only the last 5 bases of each run of non-N bases
    assert 0 < genemask_formats.GENEMASK_N_BASES - total < 2000
    assert all(recovered.counts[n].sum() == total for n in range(1, 7))
    assert recovered.counts[6].min() >= 101


@pytest.mark.parametrize("n_bases", ["published", "sum"])
def test_scores_reproduce_published_columns(recovered, published, n_bases):
    if n_bases == "sum":
        recovered = pmi.NgramCounts(recovered.counts, int(recovered.counts[6].sum()))
    scores = pmi.pmi_scores(recovered, 6)
    for name, column in pmi.GENEMASK_COLUMNS.items():
        err = np.abs(scores[name] - published[column])
        assert err.max() < 0.005, (name, err.max())
    # the quirks matter: all splits fit only ~81% of true.pmi; a per-length p breaks naive.pmi
    all_splits = pmi.pmi_scores(recovered, 6, true_splits="all")["true_pmi"]
    assert 0.7 < np.mean(np.abs(all_splits - published["true.pmi"]) < 0.005) < 0.9
    per_length = pmi.pmi_scores(recovered, 6, denominator="per_length")["naive_pmi"]
    assert np.abs(per_length - published["naive.pmi"]).min() > 1


def test_ranks_reproduce_published_order(recovered, published):
    published_rank = published["norm_pmi_rank_rel"].astype(np.int32)
    # ranking the published scores gives the published ranks exactly
    np.testing.assert_array_equal(
        pmi.ranks_from_scores(published["norm_dp_true_pmi"]), published_rank
    )
    norm = pmi.pmi_scores(recovered, 6)["norm_dp_true_pmi"]
    ours = pmi.ranks_from_scores(norm)
    kmer = {s: i for i, s in enumerate("".join(p) for p in itertools.product("ACGT", repeat=6))}
    assert ours[kmer["CCTCCC"]] == 1 and ours[kmer["TCGCGA"]] == 4096
    # recomputed scores differ from the published ones by < 0.0025, so neighbours closer than
    # twice that may swap; every swapped pair must be such a near-tie, and shifts stay small
    err = np.abs(norm - published["norm_dp_true_pmi"]).max()
    assert err < 0.0025
    assert np.abs(ours - published_rank).max() <= 4  # so only pairs <= 8 ranks apart can swap
    order = np.argsort(published_rank)
    ours_in_order, norm_in_order = ours[order], published["norm_dp_true_pmi"][order]
    n_swaps = 0
    for d in range(1, 9):
        swapped = ours_in_order[:-d] > ours_in_order[d:]
        gap = norm_in_order[:-d] - norm_in_order[d:]
        assert (gap[swapped] <= 2 * err).all(), d
        n_swaps += swapped.sum()
    assert 0 < n_swaps < 1000
    table = pmi.rank_table(recovered, 6)
    loaded = pmi.load_genemask_ranks(PUBLISHED)
    assert np.abs(table - loaded).max() <= 4 and (table[:5] == loaded[:5]).all()


# ------------------------------------------------------------------------ files and config


@pytest.mark.parametrize("name", ["ranks.tsv", "ranks.tsv.gz"])
def test_save_load_round_trip(tmp_path, name):
    vocab = get_vocab("dnabert", 6)
    table = pmi.load_genemask_ranks(PUBLISHED)
    meta = {"source": str(PUBLISHED), "k": 6}
    pmi.save_rank_table(tmp_path / name, table, vocab, meta)
    loaded, loaded_vocab, loaded_meta = pmi.load_rank_table(tmp_path / name)
    np.testing.assert_array_equal(loaded, table)
    assert loaded.dtype == np.int32 and loaded_vocab == vocab and loaded_meta == meta


def test_load_rank_table_errors(tmp_path):
    vocab = get_vocab("dnabert", 6)
    path = tmp_path / "ranks.tsv"
    pmi.save_rank_table(path, pmi.load_genemask_ranks(PUBLISHED), vocab)
    lines = path.read_text().splitlines()
    lines[10] = lines[10].replace("\t5\t", "\t6\t")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"ranks.tsv:11: expected"):
        pmi.load_rank_table(path)
    path.write_text("token\tid\trank\n")
    with pytest.raises(UserError, match=r"ranks.tsv:1: expected a '# key: value'"):
        pmi.load_rank_table(path)
    for line_no, bad, message in (
        (3, "# k: six", r"ranks.tsv:3: vocab 'dnabert' with k 'six'"),
        (4, "# meta: {oops", r"ranks.tsv:4: the meta header is not JSON"),
        (
            6,
            "[PAD]\t0\t99999999999",
            r"ranks.tsv:6: expected .*rank "
            r"1..4096",
        ),
    ):
        edited = list(lines)
        edited[line_no - 1] = bad
        path.write_text("\n".join(edited) + "\n")
        with pytest.raises(UserError, match=message):
            pmi.load_rank_table(path)
    with pytest.raises(ValueError, match="must have shape"):
        pmi.save_rank_table(path, np.zeros(10, np.int32), vocab)


def test_rank_table_from_fasta_and_config(tmp_path, shared_data):
    spec = importlib.util.spec_from_file_location("pmi_config", REPO / "configs" / "pmi.py")
    pmi_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pmi_config)
    config = pmi_config.get_config()
    assert config.fasta_paths == () and config.k == 6 and config.min_count == 101
    assert pathlib.Path(pmi_config.get_config("chrX").fasta_paths[0]).is_file()
    with pytest.raises(ValueError, match="unknown preset"):
        pmi_config.get_config("chr1")

    out = tmp_path / "ecoli_ranks.tsv"
    paths = [str(shared_data / ECOLI)]
    table = pmi.rank_table_from_fasta(
        paths,
        out,
        k=config.k,
        max_n=config.max_n,
        min_count=config.min_count,
        denominator=config.denominator,
    )
    counts = pmi.count_kmers(pathlib.Path(paths[0]), 6)
    np.testing.assert_array_equal(table, pmi.rank_table(counts, 6))
    loaded, _, meta = pmi.load_rank_table(out)
    np.testing.assert_array_equal(loaded, table)
    assert meta["sources"] == paths and meta["min_count"] == 101
    assert meta["n_bases"] == counts.n_bases == counts.counts[1].sum()
    with pytest.raises(UserError, match="FASTA file not found"):
        pmi.rank_table_from_fasta([tmp_path / "missing.fa"], out)
    with pytest.raises(ValueError, match="max_n must be an integer in 6..10"):
        pmi.rank_table_from_fasta(paths, out, k=6, max_n=5)
    with pytest.raises(ValueError, match="no FASTA paths"):
        pmi.rank_table_from_fasta([], out)
