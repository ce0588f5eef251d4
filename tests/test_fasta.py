"""Streamed FASTA reading on the real genomes in ../shared/data, and each kind of bad input."""

import gzip
import shutil
import tracemalloc

import numpy as np
import pytest

from gemsjax.data.fasta import FastaFormatError, iter_fasta, read_fasta

LAMBDA = "phage_lambda/lambda_virus.fa.gz"
VCHOLERAE = "bacterial_genomes/Vibrio_cholerae_O1_N16961.fasta.gz"
PFALCIPARUM = "plasmodium_falciparum/Pfalciparum_genome_1.fa.gz"
CHRX = "human_grch37_chrX_0-70Mb/hs37chrXtrunc.fa.gz"


def record_lengths(path, **kwargs) -> dict[str, int]:
    lengths: dict[str, int] = {}
    for chunk in iter_fasta(path, **kwargs):
        lengths[chunk.name] = lengths.get(chunk.name, 0) + len(chunk.seq)
    return lengths


@pytest.mark.parametrize(
    "rel, n_records, total",
    [
        (LAMBDA, 1, 48_502),
        (VCHOLERAE, 2, 4_033_464),
        (PFALCIPARUM, 14, 23_264_425),
        ("bacterial_genomes/Escherichia_coli_K-12_MG1655.fasta.gz", 1, 4_639_675),
        ("human_chr22_20-21Mb/22_20-21M.fa.gz", 1, 1_000_000),
    ],
)
def test_real_genomes_match_readme_table(shared_data, rel, n_records, total):
    lengths = record_lengths(shared_data / rel)
    assert len(lengths) == n_records
    assert sum(lengths.values()) == total


def test_multi_record_names_and_lengths(shared_data):
    chunks = list(iter_fasta(shared_data / VCHOLERAE))
    assert [c.record for c in chunks] == sorted(c.record for c in chunks)
    assert record_lengths(shared_data / VCHOLERAE) == {
        "gi|12057212|gb|AE003852.1|": 2_961_149,
        "gi|12057213|gb|AE003853.1|": 1_072_315,
    }
    assert chunks[0].description.startswith("gi|12057212|gb|AE003852.1| Vibrio cholerae O1")
    assert chunks[-1].description.endswith("chromosome II, complete sequence")
    names = list(record_lengths(shared_data / PFALCIPARUM))
    assert names == [f"MAL{i}" for i in range(1, 15)]


def test_soft_masked_genome_is_upper_cased(shared_data):
    lower = read_fasta(shared_data / PFALCIPARUM, upper=False)
    upper = read_fasta(shared_data / PFALCIPARUM)
    assert [n for n, _ in lower] == [n for n, _ in upper]
    assert all(s.islower() for _, s in lower)  # the README: all lower case
    assert [s.upper() for _, s in lower] == [s for _, s in upper]
    at = sum(s.count("A") + s.count("T") for _, s in upper) / 23_264_425
    assert round(at * 100, 1) == 80.6


def test_small_chunks_concatenate_to_each_record(shared_data):
    path = shared_data / VCHOLERAE
    expected = dict(read_fasta(path))
    size = 99_991
    chunks = list(iter_fasta(path, chunk_bases=size, block_bytes=4093))
    for name, seq in expected.items():
        mine = [c for c in chunks if c.name == name]
        assert [c.start for c in mine] == [i * size for i in range(len(mine))]
        assert all(len(c.seq) == size for c in mine[:-1])
        assert 0 < len(mine[-1].seq) <= size
        assert b"".join(c.seq.tobytes() for c in mine).decode() == seq
    assert len({c.record for c in chunks}) == 2
    assert all(c.seq.dtype == np.uint8 for c in chunks)


def test_line_endings_blank_lines_and_any_block_size(shared_data, tmp_path):
    """CRLF, blank lines, lower case and a missing final newline, for block sizes down to 1 byte."""
    ((_, lam),) = read_fasta(shared_data / LAMBDA)
    parts = {
        "first part one": lam[:1000],
        "second": lam[1000:1700].lower(),
        "third": lam[1700:1703],
    }
    lines = []
    for header, seq in parts.items():
        lines.append(">" + header)
        lines += [seq[i : i + 61] for i in range(0, len(seq), 61)] + [""]
    path = tmp_path / "crlf.fa"
    path.write_bytes("\r\n".join(lines).rstrip().encode())
    for block_bytes in (1, 2, 3, 7, 64, 1 << 20):
        chunks = list(iter_fasta(path, chunk_bases=256, block_bytes=block_bytes))
        got: dict[str, str] = {}
        for c in chunks:
            got[c.description] = got.get(c.description, "") + c.seq.tobytes().decode()
        assert got == {h: s.upper() for h, s in parts.items()}, block_bytes
        assert [c.name for c in chunks if c.start == 0] == ["first", "second", "third"]


def test_gzip_is_detected_by_magic_bytes_not_suffix(shared_data, tmp_path):
    gz_named_plain = tmp_path / "lambda.fa"
    shutil.copy(shared_data / LAMBDA, gz_named_plain)
    plain_named_gz = tmp_path / "lambda.fa.gz"
    plain_named_gz.write_bytes(gzip.decompress((shared_data / LAMBDA).read_bytes()))
    expected = read_fasta(shared_data / LAMBDA)
    assert read_fasta(gz_named_plain) == expected
    assert read_fasta(plain_named_gz) == expected
    assert expected[0][0] == "gi|9626243|ref|NC_001416.1|"
    assert expected[0][1].startswith("GGGCGGCGACCTCGCGGGTTTTCGCTATTTATGAAAATTTTCCGG")


def test_chrx_streams_in_flat_memory(shared_data):
    tracemalloc.start()
    try:
        total = n_count = 0
        for chunk in iter_fasta(shared_data / CHRX, chunk_bases=1 << 20):
            assert len(chunk.seq) <= 1 << 20
            total += len(chunk.seq)
            n_count += int(np.count_nonzero(chunk.seq == ord("N")))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 69_999_930
    assert round(100 * n_count / total, 1) == 5.4
    assert peak < 50e6, f"peak {peak / 1e6:.1f} MB while streaming a 70 Mb genome"


def assert_error(path, line: int, *fragments: str, **kwargs):
    with pytest.raises(FastaFormatError) as info:
        list(iter_fasta(path, **kwargs))
    message = str(info.value)
    assert path.name in message and f"line {line}:" in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.fa"
    path.write_bytes(content)
    assert_error(path, 1, "empty")


@pytest.mark.parametrize(
    "content, line", [(b"ACGT\nACGT\n>x\nAC\n", 1), (b"\n\nhello\n>x\nAC\n", 3)]
)
def test_missing_header(tmp_path, content, line):
    path = tmp_path / "noheader.fa"
    path.write_bytes(content)
    assert_error(path, line, "before the first '>' header", "add a header line")


@pytest.mark.parametrize("block_bytes", [64, 1 << 20])
def test_invalid_character_reports_its_line(shared_data, tmp_path, block_bytes):
    ((_, lam),) = read_fasta(shared_data / LAMBDA)
    lines = [">lambda"] + [lam[i : i + 70] for i in range(0, len(lam), 70)]
    lines[500] = lines[500][:33] + "7" + lines[500][34:]
    path = tmp_path / "digit.fa"
    path.write_text("\n".join(lines) + "\n")
    assert_error(path, 501, "invalid character '7'", "'lambda'", "IUPAC", block_bytes=block_bytes)


@pytest.mark.parametrize("block_bytes", [3, 1 << 20])  # 3: a block starts at that '>'
def test_header_marker_in_the_middle_of_a_line(tmp_path, block_bytes):
    path = tmp_path / "midline.fa"
    path.write_bytes(b">a\nACGT\nACGT>b\nACGT\n")
    assert_error(path, 3, "invalid character '>'", "must start with '>'", block_bytes=block_bytes)


def test_utf8_byte_order_mark_is_skipped(shared_data, tmp_path):
    ((_, lam),) = read_fasta(shared_data / LAMBDA)
    path = tmp_path / "bom.fa"
    path.write_bytes(b"\xef\xbb\xbf>lambda\n" + lam.encode() + b"\n")
    assert read_fasta(path) == [("lambda", lam)]
    for block_bytes in (2, 3, 5):  # the mark split over blocks is still only skipped at the start
        assert record_lengths(path, block_bytes=block_bytes) == {"lambda": len(lam)}


def test_record_without_sequence(tmp_path):
    path = tmp_path / "emptyrec.fa"
    path.write_bytes(b">a\nACGT\n>b desc\n>c\nAC\n>d\n")
    assert_error(path, 3, "record 'b'", "allow_empty_records=True")
    got = read_fasta(path, allow_empty_records=True)
    assert got == [("a", "ACGT"), ("b", ""), ("c", "AC"), ("d", "")]


def test_truncated_gzip(shared_data, tmp_path):
    data = (shared_data / LAMBDA).read_bytes()
    path = tmp_path / "truncated.fa.gz"
    path.write_bytes(data[: len(data) // 2])
    assert_error(path, 1, "truncated", "download the file again")


def test_corrupt_gzip(shared_data, tmp_path):
    data = bytearray((shared_data / LAMBDA).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path = tmp_path / "corrupt.fa.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(FastaFormatError, match=r"corrupt.fa.gz, line \d+: .*truncated or corrupt"):
        list(iter_fasta(path))


def test_chunk_bases_must_be_positive(shared_data):
    with pytest.raises(ValueError, match="chunk_bases"):
        next(iter_fasta(shared_data / LAMBDA, chunk_bases=0))
