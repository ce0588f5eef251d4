"""The CM-GEMS pretraining corpus: chunking recipe, split, prepare_genome, chunk source."""

import gzip
import json
import pickle
import tracemalloc

import grain
import numpy as np
import pytest

from gemsjax.data import genome, samples
from gemsjax.data.fasta import read_fasta

CHR22 = samples.sample_path(samples.GENOME)  # = ../shared/data/human_chr22_20-21Mb
LAMBDA = "phage_lambda/lambda_virus.fa.gz"
VIBRIO = "bacterial_genomes/Vibrio_cholerae_O1_N16961.fasta.gz"
CHRX = "human_grch37_chrX_0-70Mb/hs37chrXtrunc.fa.gz"


def _acgt_only(fasta_gz) -> bytes:
    """The FASTA's bases with header lines, newlines and every non-ACGT byte removed (upper)."""
    lines = gzip.open(fasta_gz, "rb").read().upper().split(b"\n")
    seq = b"".join(line for line in lines if not line.startswith(b">"))
    return seq.translate(None, bytes(c for c in range(256) if c not in b"ACGT"))


@pytest.fixture(scope="module")
def chr22_dir(tmp_path_factory):
    return genome.prepare_genome(CHR22, tmp_path_factory.mktemp("g") / "chr22")


def test_chunk_lengths_follow_the_recipe():
    starts, lengths = genome.chunk_index(60_000_000, np.random.default_rng(3))
    assert starts.dtype == np.int64 and lengths.dtype == np.int32
    n = lengths.size
    assert 150_000 < n < 160_000  # 60e6 / mean length 384.75 = 155,945
    full = lengths == genome.MAX_CHUNK_BASES
    assert abs(full.mean() - 0.5) < 0.005  # sd 0.0013
    rest = lengths[~full]
    assert rest.min() == genome.MIN_CHUNK_BASES and rest.max() == genome.MAX_CHUNK_BASES - 1
    counts = np.bincount(rest - genome.MIN_CHUNK_BASES, minlength=505)
    assert counts.size == 505  # lengths 6..510
    expected = rest.size / 505
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 504 + 6 * np.sqrt(2 * 504)  # uniform: chi2 ~ 504 +- 32


def test_chunks_are_contiguous_non_overlapping_and_inside_the_sequence():
    total = 2_345_678
    starts, lengths = genome.chunk_index(total, np.random.default_rng(11))
    ends = starts + lengths
    assert 0 <= starts[0] < genome.MAX_START_OFFSET
    np.testing.assert_array_equal(starts[1:], ends[:-1])
    assert ends[-1] <= total
    assert total - ends[-1] < genome.MAX_CHUNK_BASES  # only an incomplete last chunk is dropped


def test_chunk_index_is_deterministic_per_seed():
    a = genome.chunk_index(1_000_000, np.random.default_rng(5))
    b = genome.chunk_index(1_000_000, np.random.default_rng(5))
    c = genome.chunk_index(1_000_000, np.random.default_rng(6))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].size != c[0].size or not np.array_equal(a[0], c[0])
    offsets = {int(genome.chunk_index(10_000, np.random.default_rng(s))[0][0]) for s in range(200)}
    assert len(offsets) > 150 and max(offsets) < genome.MAX_START_OFFSET


@pytest.mark.parametrize("total", [0, 5, 800, 1005])
def test_chunk_index_of_short_sequences(total):
    starts, lengths = genome.chunk_index(total, np.random.default_rng(0))
    assert np.all(starts + lengths <= total)
    assert np.all(lengths >= genome.MIN_CHUNK_BASES)
    if total < genome.MIN_CHUNK_BASES:
        assert starts.size == 0


def test_genome_chunks_never_span_records():
    record_lengths = [100_000, 3_000, 250_000, 4]
    starts, lengths = genome.genome_chunks(record_lengths, seed=2)
    bounds = np.cumsum([0, *record_lengths])
    record_of_start = np.searchsorted(bounds, starts, side="right") - 1
    record_of_last = np.searchsorted(bounds, starts + lengths - 1, side="right") - 1
    np.testing.assert_array_equal(record_of_start, record_of_last)
    assert set(record_of_start.tolist()) == {0, 1, 2}  # the 4-base record has no chunk
    assert np.all(np.diff(starts) > 0)


def test_split_fraction_and_determinism():
    is_train = genome.split_chunks(200_000, seed=1)
    assert is_train.dtype == bool
    assert abs(is_train.mean() - 0.9) < 0.004  # sd 0.00067
    np.testing.assert_array_equal(is_train, genome.split_chunks(200_000, seed=1))
    assert not np.array_equal(is_train, genome.split_chunks(200_000, seed=2))
    assert genome.split_chunks(1000, seed=0, train_fraction=0.0).sum() == 0
    with pytest.raises(ValueError, match="train_fraction"):
        genome.split_chunks(10, seed=0, train_fraction=1.5)


def test_prepare_genome_removes_n_and_matches_the_fasta(chr22_dir):
    expected = _acgt_only(CHR22)
    manifest = json.loads((chr22_dir / genome.MANIFEST_FILE).read_text())
    assert len(expected) == 900_000  # 1,000,000 bp with 100,000 N
    assert manifest["total_length"] == len(expected)
    assert manifest["records"] == [
        {
            "name": "22:20000001-21000000",
            "source": str((CHR22).resolve()),
            "offset": 0,
            "length": 900_000,
            "removed": 100_000,
            "removed_n": 100_000,
            "u_as_t": 0,
        }
    ]
    source = manifest["sources"][0]
    assert source["bytes"] == (CHR22).stat().st_size and len(source["sha256"]) == 64
    assert (chr22_dir / genome.BASES_FILE).read_bytes() == expected


def test_prepare_genome_streams_small_chunks_identically(chr22_dir, tmp_path):
    out = genome.prepare_genome(CHR22, tmp_path / "small", chunk_bases=4099)
    assert (out / genome.BASES_FILE).read_bytes() == (chr22_dir / genome.BASES_FILE).read_bytes()


def test_prepare_genome_several_files_and_records(shared_data, tmp_path):
    paths = [shared_data / LAMBDA, shared_data / VIBRIO]
    out = genome.prepare_genome(paths, tmp_path / "two")
    manifest = genome.load_manifest(out)
    records = [(name, seq) for p in paths for name, seq in read_fasta(p)]
    assert [r["name"] for r in manifest["records"]] == [name for name, _ in records]
    data = (out / genome.BASES_FILE).read_bytes()
    for entry, (_, seq) in zip(manifest["records"], records, strict=True):
        clean = seq.encode().translate(None, bytes(c for c in range(256) if c not in b"ACGT"))
        assert data[entry["offset"] : entry["offset"] + entry["length"]] == clean
        assert entry["removed"] == len(seq) - len(clean)
    assert manifest["total_length"] == len(data)


def test_prepare_genome_memory_stays_flat(shared_data, tmp_path):
    tracemalloc.start()
    out = genome.prepare_genome(shared_data / CHRX, tmp_path / "x", chunk_bases=1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    manifest = genome.load_manifest(out)
    assert manifest["total_length"] == 66_239_930  # 69,999,930 bp, 5.4 % N
    assert manifest["records"][0]["removed"] == 69_999_930 - 66_239_930
    assert peak < 16 * 2**20  # a few 1 MiB blocks and chunks, not the 66 MB genome


def test_prepare_genome_rerun_is_a_noop_and_other_inputs_fail(shared_data, chr22_dir, tmp_path):
    bases = chr22_dir / genome.BASES_FILE
    before = bases.stat().st_mtime_ns
    assert genome.prepare_genome(CHR22, chr22_dir) == chr22_dir
    assert bases.stat().st_mtime_ns == before
    with pytest.raises(genome.PreparedGenomeError, match="other inputs.*overwrite=True"):
        genome.prepare_genome(shared_data / LAMBDA, chr22_dir)
    other = genome.prepare_genome(CHR22, tmp_path / "o")
    genome.prepare_genome(shared_data / LAMBDA, other, overwrite=True)
    assert genome.load_manifest(other)["total_length"] == len(_acgt_only(shared_data / LAMBDA))
    (tmp_path / "junk").mkdir()
    with pytest.raises(genome.PreparedGenomeError, match="not a prepared genome"):
        genome.prepare_genome(shared_data / LAMBDA, tmp_path / "junk")
    with pytest.raises(genome.PreparedGenomeError, match="prepare_genome"):
        genome.GenomeChunkSource(tmp_path / "junk")
    (tmp_path / "gaps.fa").write_text(">gap\nNNNNNNNN\nnnnn\n")
    with pytest.raises(ValueError, match="no A/C/G/T bases"):
        genome.prepare_genome(tmp_path / "gaps.fa", tmp_path / "gaps")
    assert not (tmp_path / "gaps").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_chunk_source_serves_the_split(chr22_dir):
    train = genome.GenomeChunkSource(chr22_dir, "train", seed=4)
    val = genome.GenomeChunkSource(chr22_dir, "validation", seed=4)
    every = genome.GenomeChunkSource(chr22_dir, "all", seed=4)
    starts, lengths = genome.genome_chunks([900_000], seed=4)
    assert len(every) == starts.size and len(train) + len(val) == len(every)
    assert abs(len(train) / len(every) - 0.9) < 0.05
    assert not set(train.starts.tolist()) & set(val.starts.tolist())
    data = (chr22_dir / genome.BASES_FILE).read_bytes().decode()
    for i in (0, 7, len(train) - 1):
        start, length = int(train.starts[i]), int(train.lengths[i])
        assert train[i] == data[start : start + length]
        assert genome.MIN_CHUNK_BASES <= len(train[i]) <= genome.MAX_CHUNK_BASES
    end = every.starts[-1] + every.lengths[-1]
    assert "".join(every[i] for i in range(len(every))) == data[every.starts[0] : end]
    with pytest.raises(IndexError):
        train[len(train)]
    with pytest.raises(ValueError, match="unknown split"):
        genome.GenomeChunkSource(chr22_dir, "dev")


def test_chunk_source_pickles_and_feeds_grain(chr22_dir):
    source = genome.GenomeChunkSource(chr22_dir, "validation", seed=0)
    clone = pickle.loads(pickle.dumps(source))
    assert len(clone) == len(source) and clone[3] == source[3]
    ds = grain.MapDataset.source(source).seed(1).shuffle()
    shuffled = [ds[i] for i in range(len(ds))]
    assert sorted(shuffled) == sorted(source[i] for i in range(len(source)))
    assert shuffled != [source[i] for i in range(len(source))]
