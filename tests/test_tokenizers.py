"""Tests for gemsjax.tokenizers on real sequences from ../shared/data.

Expected ids are computed independently here: a k-mer's id is its position in the
``itertools.product`` enumeration of the layout's alphabet plus the number of special tokens, and
a plain per-k-mer Python tokenizer (written from the DNABERT / BarcodeBERT descriptions) is the
reference for framing, padding and attention.
"""

import csv
import functools
import gzip
import itertools

import numpy as np
import pytest
from genemask_formats import sequence_to_kmer_text

from gemsjax.tokenizers import KmerTokenizer, kmer_text_to_sequence
from gemsjax.vocab import get_vocab, kmer_codes

DNABERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@functools.cache
def product_ids(alphabet: str, k: int, num_specials: int) -> dict[str, int]:
    return {
        "".join(p): i + num_specials for i, p in enumerate(itertools.product(alphabet, repeat=k))
    }


def reference_dnabert(seq: str, k: int, max_len: int) -> tuple[list[int], list[int]]:
    """[CLS] overlapping k-mers [SEP] [PAD]..., one dict lookup per k-mer."""
    table = product_ids("ATCG", k, 5)
    seq = seq.upper()[: max_len - 2 + k - 1]
    kmers = [table.get(seq[i : i + k], 1) for i in range(len(seq) - k + 1)]
    ids = [2] + kmers + [3]
    return ids + [0] * (max_len - len(ids)), [1] * len(ids) + [0] * (max_len - len(ids))


def reference_barcode(seq: str, k: int, max_len: int) -> tuple[list[int], list[int]]:
    """BarcodeBERT: truncate / right-pad with N to max_len*k, attention 0 from len(seq)//k on."""
    table = product_ids("ACGT", k, 2)
    n_bases = max_len * k
    x = seq.upper()[:n_bases]
    valid = len(x) // k
    x = x.ljust(n_bases, "N")
    ids = [table.get(x[i : i + k], 1) for i in range(0, n_bases, k)]
    return ids, [1] * valid + [0] * (max_len - valid)


def read_fasta(path, max_lines: int | None = None) -> str:
    with gzip.open(path, "rt") as f:
        lines = itertools.islice(f, 1, max_lines)
        return "".join(line.strip() for line in lines if not line.startswith(">"))


def read_table_column(path, column: str, delimiter: str = ",") -> list[str]:
    """One column of a table with long fields (the csv module's limit is raised while reading and
    restored after: it is process-wide, and test_tables checks the default)."""
    default = csv.field_size_limit(1 << 24)
    try:
        with gzip.open(path, "rt", newline="") as f:
            return [row[column] for row in csv.DictReader(f, delimiter=delimiter)]
    finally:
        csv.field_size_limit(default)


def read_kmer_tsv(path) -> list[str]:
    """The raw first field of each data line, quotes kept."""
    with gzip.open(path, "rt") as f:
        next(f)
        return [line.split("\t")[0] for line in f]


@pytest.fixture(scope="module")
def barcodes(shared_data) -> list[str]:
    path = shared_data / "bold_insect_coi_barcodes" / "insect_coi_barcodes.tsv.gz"
    return read_table_column(path, "nucleotides", "\t")


@pytest.fixture(scope="module")
def lambda_segments(shared_data) -> list[str]:
    """Phage lambda cut into consecutive segments of 6..511 bp (the DNABERT chunk lengths)."""
    genome = read_fasta(shared_data / "phage_lambda" / "lambda_virus.fa.gz")
    lengths = np.random.default_rng(0).integers(6, 512, size=300)
    cuts = np.cumsum(lengths)
    cuts = cuts[cuts < len(genome)]
    return [genome[a:b] for a, b in itertools.pairwise(np.concatenate([[0], cuts]))]


@pytest.fixture(scope="module")
def chr22_segments(shared_data) -> list[str]:
    """Human chr22 segments of 510 bp, some with N runs and soft edges around them."""
    genome = read_fasta(shared_data / "human_chr22_20-21Mb" / "22_20-21M.fa.gz", 40_000)
    segments = [genome[i : i + 510] for i in range(0, len(genome) - 510, 997)]
    assert any("N" in s and set(s) != {"N"} for s in segments)
    return segments


# ---- id layouts -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 4, 5, 6])
def test_dnabert_ids_are_atcg_product_positions(k, lambda_segments):
    tok = KmerTokenizer(k)
    table = product_ids("ATCG", k, 5)
    seq = "".join(lambda_segments)[:2000]
    ids, attention = tok.encode([seq], max_len=2000 - k + 3)
    expected = [table[seq[i : i + k]] for i in range(len(seq) - k + 1)]
    assert ids[0, 1:-1].tolist() == expected
    assert attention.all()
    assert len(set(expected)) > min(4**k // 2, 900)  # many distinct k-mers checked
    assert tok.vocab_size == 5 + 4**k
    assert tok.vocab.tokens() == DNABERT_SPECIALS + list(table)


def test_dnabert_6mer_anchor_ids():
    tok = KmerTokenizer(6)
    (ids,), _ = tok.encode(["AAAAAAT"], 4)
    assert ids.tolist() == [2, 5, 6, 3]  # AAAAAA=5, AAAAAT=6
    (ids,), _ = tok.encode(["GGGGGGA"], 4)
    assert ids.tolist() == [2, 4100, 4097, 3]  # GGGGGG last; GGGGGA = 5 + 4^6 - 4
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == 4101


@pytest.mark.parametrize("k", [3, 4, 5, 6])
def test_barcodebert_ids_are_acgt_product_positions(k, barcodes):
    tok = KmerTokenizer(k, vocab="barcodebert")
    table = product_ids("ACGT", k, 2)
    clean = [s for s in barcodes[:3000] if set(s) <= set("ACGT") and len(s) >= 600][:200]
    ids, attention = tok.encode(clean, max_len=600 // k)
    expected = [[table[s[i : i + k]] for i in range(0, 600 // k * k, k)] for s in clean]
    assert ids.tolist() == expected
    assert attention.all()
    assert len(np.unique(ids)) > min(4**k // 2, 1000)
    assert tok.vocab_size == 2 + 4**k
    assert tok.vocab.tokens() == ["[MASK]", "[UNK]"] + list(table)


def test_barcodebert_6mer_anchor_ids():
    tok = KmerTokenizer(6, vocab="barcodebert")
    (ids,), _ = tok.encode(["AAAAAACCCCCCTTTTTT"], 3)
    assert ids.tolist() == [2, 2 + 1365, 4097]  # CCCCCC = 1365 = 0o1111 in base 4
    assert (tok.mask_id, tok.unk_id, tok.pad_id, tok.cls_id, tok.sep_id) == (0, 1, 1, None, None)


@pytest.mark.parametrize("stride", [1, 4, 6])
def test_vocab_kmer_codes_on_rows_with_n(stride, chr22_segments):
    """gemsjax.vocab.kmer_codes (added for the tokenizer): last axis, any stride, -1 for N."""
    rows = [s for s in chr22_segments if "N" in s and set(s) != {"N"}][:6] + [
        s for s in chr22_segments if "N" not in s
    ][:6]
    table = product_ids("ATCG", 6, 0)
    codes = np.stack([get_vocab("dnabert", 6).base_codes(s) for s in rows])
    expected = [[table.get(s[i : i + 6], -1) for i in range(0, 505, stride)] for s in rows]
    assert kmer_codes(codes, 6, stride).tolist() == expected
    assert kmer_codes(codes, 6, stride, dtype=np.int32).dtype == np.int32
    assert (np.asarray(expected) == -1).any() and (np.asarray(expected) >= 0).any()
    assert kmer_codes(codes[:, :5], 6, stride).shape == (len(rows), 0)


# ---- agreement with the per-k-mer reference on real data ------------------------------------


def test_dnabert_matches_reference_on_genome_with_n(chr22_segments, lambda_segments):
    seqs = chr22_segments + lambda_segments
    tok = KmerTokenizer(6)
    for max_len in (512, 100, 3):
        ids, attention = tok.encode(seqs, max_len)
        assert ids.dtype == attention.dtype == np.int32
        assert ids.shape == attention.shape == (len(seqs), max_len)
        ref = [reference_dnabert(s, 6, max_len) for s in seqs]
        assert ids.tolist() == [r[0] for r in ref]
        assert attention.tolist() == [r[1] for r in ref]
    assert (ids == 1).any()  # the chr22 N runs produced [UNK]


def test_barcodebert_matches_reference_on_raw_barcodes(barcodes):
    seqs = barcodes[:3000]  # raw BOLD: gaps, N and IUPAC codes included
    tok = KmerTokenizer(6, vocab="barcodebert")
    ids, attention = tok.encode(seqs, 110)
    ref = [reference_barcode(s, 6, 110) for s in seqs]
    assert ids.tolist() == [r[0] for r in ref]
    assert attention.tolist() == [r[1] for r in ref]


# ---- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 6])
def test_round_trip_gue(k, shared_data):
    seqs = read_table_column(
        shared_data / "gue" / "prom" / "prom_core_all" / "dev.csv.gz", "sequence"
    )
    assert len(seqs) == 5920 and all(len(s) == 70 for s in seqs)
    for tok in (KmerTokenizer(k), KmerTokenizer(k, vocab="barcodebert")):
        ids, _ = tok.encode(seqs, 72 if tok.overlapping else 70 // k)
        n = 70 if tok.overlapping else 70 // k * k
        assert tok.decode(ids) == [s[:n] for s in seqs]


def test_round_trip_genome_segments_and_fewshot(lambda_segments, shared_data):
    fewshot = [
        kmer_text_to_sequence(t)
        for t in read_kmer_tsv(
            shared_data / "genemask_fewshot" / "Splice-40" / "full-dataset" / "dev.tsv.gz"
        )
    ]
    for seqs in (lambda_segments, fewshot):
        tok = KmerTokenizer(6)
        ids, _ = tok.encode(seqs, 512)
        assert tok.decode(ids) == seqs
        bar = KmerTokenizer(6, vocab="barcodebert")
        ids, _ = bar.encode(seqs, 86)
        assert bar.decode(ids) == [s[: len(s) // 6 * 6] for s in seqs]


def test_round_trip_barcodes(barcodes):
    clean = [s for s in barcodes[:5000] if set(s) <= set("ACGT")]
    assert len(clean) > 1000
    tok = KmerTokenizer(6, vocab="barcodebert")
    ids, attention = tok.encode(clean, 110)
    assert tok.decode(ids) == [s[:660][: len(s[:660]) // 6 * 6] for s in clean]
    assert tok.decode(ids[0]) == tok.decode(ids[:1])


def test_decode_skips_specials():
    tok = KmerTokenizer(6)
    (ids,), _ = tok.encode(["ACGTACGT"], 6)
    assert tok.decode(ids) == ["ACGTACGT"]
    assert tok.decode(np.array([[2, 1, 4, 3, 0]])) == [""]
    with pytest.raises(ValueError, match="ids must be in 0..4100"):
        tok.decode(np.array([[2, 4101]]))


# ---- N, IUPAC codes, gaps, case -------------------------------------------------------------


@pytest.mark.parametrize("bad", ["N", "R", "Y", "W", "-", "n"])
def test_non_acgt_base_makes_the_covering_kmers_unk(bad, lambda_segments):
    seq = lambda_segments[0][:60]
    seq = seq[:30] + bad + seq[31:]
    tok = KmerTokenizer(6)
    (ids,), _ = tok.encode([seq], 57)
    kmers = ids[1:-1]
    unk = np.flatnonzero(kmers == tok.unk_id)
    assert unk.tolist() == list(range(25, 31))  # the 6 k-mers covering base 30
    bar = KmerTokenizer(6, vocab="barcodebert")
    (ids,), (att,) = bar.encode([seq], 10)
    assert np.flatnonzero(ids == bar.unk_id).tolist() == [5]  # bases 30..35
    assert att.all()


def test_strip_gaps_on_real_aligned_barcodes(barcodes):
    gapped = [s for s in barcodes[:3000] if "-" in s]
    assert len(gapped) > 50
    plain = KmerTokenizer(6, vocab="barcodebert")
    stripping = KmerTokenizer(6, vocab="barcodebert", strip_gaps=True)
    ungapped = [s.replace("-", "") for s in gapped]
    got, ref = stripping.encode(gapped, 110), plain.encode(ungapped, 110)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    assert not np.array_equal(plain.encode(gapped, 110)[0], ref[0])
    over = KmerTokenizer(6, strip_gaps=True)
    np.testing.assert_array_equal(
        over.encode(gapped, 512)[0], KmerTokenizer(6).encode(ungapped, 512)[0]
    )


def test_lower_case_is_upper_cased(shared_data):
    pf = read_fasta(shared_data / "plasmodium_falciparum" / "Pfalciparum_genome_1.fa.gz", 200)
    assert pf == pf.lower() and "a" in pf  # this genome is all lower case
    seqs = [pf[i : i + 300] for i in range(0, len(pf) - 300, 250)]
    for tok in (KmerTokenizer(6), KmerTokenizer(6, vocab="barcodebert")):
        lower, upper = tok.encode(seqs, 60), tok.encode([s.upper() for s in seqs], 60)
        np.testing.assert_array_equal(lower[0], upper[0])
        np.testing.assert_array_equal(lower[1], upper[1])
        assert (lower[0][:, 1:5] != tok.unk_id).all()


# ---- framing, padding, truncation, attention -------------------------------------------------


def test_dnabert_framing_padding_and_truncation(lambda_segments):
    seq = lambda_segments[3]
    tok = KmerTokenizer(6)
    ids, attention = tok.encode([seq[:13], seq[:5], "", seq[:400]], 12)
    n = [8, 0, 0, 10]  # k-mers kept: 13-5, none for < 6 bp, truncated to 12-2
    for row, m in enumerate(n):
        assert ids[row, 0] == 2 and ids[row, m + 1] == 3
        assert (ids[row, 1 : m + 1] >= 5).all()
        assert (ids[row, m + 2 :] == 0).all()
        assert attention[row].tolist() == [1] * (m + 2) + [0] * (12 - m - 2)
    assert tok.decode(ids)[3] == seq[:15]


def test_barcode_attention_masks_partial_kmer(barcodes):
    clean = next(s for s in barcodes if set(s) <= set("ACGT") and len(s) >= 661)
    tok = KmerTokenizer(6, vocab="barcodebert")
    lengths = [661, 660, 659, 655, 654, 600, 5, 0]
    ids, attention = tok.encode([clean[:n] for n in lengths], 110)
    assert attention.sum(axis=1).tolist() == [110, 110, 109, 109, 109, 100, 0, 0]
    assert ids[2, 109] == tok.unk_id  # 5 real bases + N: attention 0 and [UNK]
    assert ids[2, 108] != tok.unk_id
    assert (ids[5, 100:] == tok.unk_id).all()
    np.testing.assert_array_equal(ids[0], ids[1])


def test_strip_trailing_n(barcodes):
    trailing = [s for s in barcodes if s.endswith("N")][:200]
    assert len(trailing) == 200
    plain = KmerTokenizer(6, vocab="barcodebert")
    stripping = KmerTokenizer(6, vocab="barcodebert", strip_trailing_n=True)
    stripped = [s.rstrip("N") for s in trailing]
    got = stripping.encode(trailing, 110)
    ref = plain.encode(stripped, 110)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    assert stripping.encode(["NNNNNN", "ACGTACGTnnN"], 3)[1].sum(axis=1).tolist() == [0, 1]


def test_random_offsets_are_deterministic_and_cover_all_frames(barcodes):
    seqs = [s for s in barcodes[:2000] if set(s) <= set("ACGT")][:600]
    tok = KmerTokenizer(6, vocab="barcodebert", randomize_offset=True)
    plain = KmerTokenizer(6, vocab="barcodebert")
    ids, attention = tok.encode(seqs, 110, rng=7)
    again, _ = tok.encode(seqs, 110, rng=np.random.default_rng(7))
    other, _ = tok.encode(seqs, 110, rng=8)
    np.testing.assert_array_equal(ids, again)
    assert not np.array_equal(ids, other)
    shifted = [plain.encode([s[o:] for s in seqs], 110) for o in range(6)]
    offsets = []
    for row in range(len(seqs)):
        match = [
            o
            for o in range(6)
            if np.array_equal(shifted[o][0][row], ids[row])
            and np.array_equal(shifted[o][1][row], attention[row])
        ]
        assert len(match) == 1
        offsets.append(match[0])
    counts = np.bincount(offsets, minlength=6)
    assert counts.min() > 60  # ~100 each of 600 rows
    for seed in range(20):  # sequences shorter than the offset, last in the buffer
        ids, attention = tok.encode(["ACGTACGTAC", "AC", ""], 2, rng=seed)
        assert attention[1:].sum() == 0 and (ids[1:] == tok.unk_id).all()


def test_k1_barcodebert_is_not_framed(lambda_segments):
    tok = KmerTokenizer(1, vocab="barcodebert")
    assert (tok.stride, tok.pad_id, tok.cls_id) == (1, 1, None)
    seq = lambda_segments[0][:50]
    ids, attention = tok.encode([seq], 60)
    assert ids[0, :50].tolist() == ["ACGT".index(b) + 2 for b in seq]
    assert attention.sum() == 50 and tok.decode(ids) == [seq]


# ---- DNABERT / GeneMask k-mer text ------------------------------------------------------------


@pytest.mark.parametrize(
    "relpath,length,quoted",
    [
        ("Prom-300/10/train.tsv.gz", 300, True),
        ("Prom-core/test.tsv.gz", 70, False),
        ("Splice-40/10/train_splice40_10.tsv.gz", 40, None),
    ],
)
def test_kmer_text_reader_on_genemask_files(relpath, length, quoted, shared_data):
    texts = read_kmer_tsv(shared_data / "genemask_fewshot" / relpath)
    if quoted is not None:
        assert all(t.startswith('"') == quoted for t in texts)
    seqs = [kmer_text_to_sequence(t) for t in texts]
    assert all(len(s) == length for s in seqs)
    assert [sequence_to_kmer_text(s) for s in seqs] == [t.strip('"') for t in texts]
    tok = KmerTokenizer(6)
    ids, _ = tok.encode(seqs, length - 3)
    lookup = {token: i for i, token in enumerate(tok.vocab.tokens())}
    expected = [[2] + [lookup.get(t, 1) for t in text.strip('"').split()] + [3] for text in texts]
    assert ids.tolist() == expected


def test_kmer_text_errors():
    assert kmer_text_to_sequence("ACGTAC") == "ACGTAC"
    assert sequence_to_kmer_text("ACGTACG") == "ACGTAC CGTACG"
    with pytest.raises(ValueError, match="k-mer 1 'GGTACG' does not overlap k-mer 0"):
        kmer_text_to_sequence("ACGTAC GGTACG")
    with pytest.raises(ValueError, match="k-mer 2 'GTACGTA' has length 7"):
        kmer_text_to_sequence("ACGTAC CGTACG GTACGTA")
    with pytest.raises(ValueError, match="no k-mers"):
        kmer_text_to_sequence(' "" ')
    with pytest.raises(ValueError, match="shorter than k=6"):
        sequence_to_kmer_text("ACGTA")


# ---- vocab.txt and errors --------------------------------------------------------------------


def test_write_vocab_txt(tmp_path):
    path = tmp_path / "vocab.txt"
    KmerTokenizer(6).write_vocab_txt(path)
    lines = path.read_text().splitlines()
    assert len(lines) == 4101
    assert lines[:7] == DNABERT_SPECIALS + ["AAAAAA", "AAAAAT"]
    assert lines[4100] == "GGGGGG"


def test_clear_errors():
    with pytest.raises(ValueError, match="needs stride=1"):
        KmerTokenizer(6, stride=6)
    with pytest.raises(ValueError, match="needs stride=6"):
        KmerTokenizer(6, stride=1, vocab="barcodebert")
    with pytest.raises(ValueError, match="unknown vocab"):
        KmerTokenizer(6, vocab="bpe")
    with pytest.raises(ValueError, match="k must be in 1..12"):
        KmerTokenizer(13)
    with pytest.raises(ValueError, match="use it with vocab='barcodebert'"):
        KmerTokenizer(6, randomize_offset=True)
    tok = KmerTokenizer(6)
    with pytest.raises(ValueError, match="max_len must be an int >= 3"):
        tok.encode(["ACGTACGT"], 2)
    with pytest.raises(TypeError, match="single str"):
        tok.encode("ACGTACGT", 10)
    with pytest.raises(TypeError, match="sequence 1 is a bytes"):
        tok.encode(["ACGTACGT", b"ACGT"], 10)
    with pytest.raises(ValueError, match="pass rng"):
        KmerTokenizer(6, vocab="barcodebert", randomize_offset=True).encode(["ACGTAC"], 2)
    ids, attention = tok.encode([], 8)
    assert ids.shape == attention.shape == (0, 8)
