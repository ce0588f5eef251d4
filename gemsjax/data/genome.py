"""The CM-GEMS / GeneMask pretraining corpus: random non-overlapping chunks of a genome.

Two steps:

1. :func:`prepare_genome` (once): stream FASTA file(s), read RNA's ``U`` as ``T``, delete every
   other base outside ``ACGT`` (``N`` gaps, IUPAC ambiguity codes, ``-``) so that each record is
   concatenated across its gaps, and write a memory-mappable copy. Layout of a prepared directory:

   - ``genome.u8``: the bases of all records back to back, one upper-case ASCII byte per base
     (only ``A``, ``C``, ``G``, ``T`` occur), so a chunk is a plain byte slice that the tokenizers
     read directly; 1 byte per kept base (3.1 GB for a human genome).
   - ``manifest.json``: format name and version, the inputs (path, size, sha256), one entry per
     FASTA record (``name``, ``source``, ``offset`` and ``length`` in ``genome.u8``, ``removed`` =
     characters deleted, of which ``removed_n`` were ``N``; ``u_as_t`` = ``U`` read as ``T``),
     ``total_length`` and ``bases_sha256`` (the digest of ``genome.u8``).

   Each use checks ``genome.u8`` against the manifest (:func:`verify_prepared`: size and sha256)
   and rebuilds a copy that does not match (truncated, edited, of an older format), so a damaged
   cache never feeds empty or wrong chunks. ``U`` and removed characters other than ``N`` are
   reported as a warning (:func:`report`; removed characters above
   :data:`AMBIGUOUS_WARN_FRACTION` of the input), and the counts are in the run summary.

2. :func:`genome_chunks` / :func:`split_chunks` (at start-up, in memory, deterministic given a
   seed): the chunking recipe of GeneMask's ``Code-A`` notebook, run per record (chromosome):
   start at a random offset in ``[0, 1000)``; with probability 0.5 take 511 bases, otherwise a
   uniform 6..510 (the notebook's ``numpy.random.randint(5, 510) + 1``); advance by the chunk and
   repeat. Chunks are contiguous and never overlap. The last, incomplete chunk of a record is
   dropped (the notebook kept a truncated one and never used the record's final base). Chunks are
   then split into train / validation by Bernoulli(0.9).

Differences from the notebook, on purpose: every non-ACGT character is deleted after upper-casing
(the notebook deleted only upper-case ``N``, keeping soft-masked lower case as distinct letters
and IUPAC codes); chunks are not de-duplicated (exact duplicates were 0.12 % of the notebook's
random genomic chunks, mostly low-complexity repeats, which do not matter for pretraining).

:class:`GenomeChunkSource` serves the chunks of a split as a grain random-access data source.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import mmap
import os
import pathlib
import shutil
import socket
import uuid
from collections.abc import Iterable, Sequence

import numpy as np

from gemsjax.data.fasta import iter_fasta, resolve_paths
from gemsjax.errors import UserError
from gemsjax.vocab import INVALID_BASE, base_codes

FORMAT = "gemsjax-genome"
FORMAT_VERSION = 2
BASES_FILE = "genome.u8"
MANIFEST_FILE = "manifest.json"

MAX_START_OFFSET = 1000
"""The first chunk of a record starts at a uniform offset in ``[0, MAX_START_OFFSET)``."""
FULL_PROB = 0.5
"""Probability that a chunk has the full :data:`MAX_CHUNK_BASES` bases."""
MAX_CHUNK_BASES = 511
MIN_CHUNK_BASES = 6
TRAIN_FRACTION = 0.9
SPLITS = ("train", "validation")

AMBIGUOUS_WARN_FRACTION = 0.001
"""Warn when characters other than ACGTU and N (IUPAC ambiguity codes, gaps) exceed this
fraction of a genome's characters: they are deleted, which joins their neighbours."""

_MEAN_CHUNK_BASES = (
    FULL_PROB * MAX_CHUNK_BASES + (1 - FULL_PROB) * (MIN_CHUNK_BASES + MAX_CHUNK_BASES - 1) / 2
)
_CHUNK_STREAM, _SPLIT_STREAM = 0, 1
_ACGT = np.frombuffer(b"ACGT", np.uint8)  # base code -> ASCII byte
_log = logging.getLogger(__name__)


def chunk_index(total_length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Chunk one contiguous sequence with the GeneMask recipe.

    Lengths are drawn in bulk (blocks of the expected chunk count) and turned into starts with a
    cumulative sum, so a human chromosome takes milliseconds.

    Args:
      total_length: number of bases in the sequence.
      rng: the draws' generator; the same generator state gives the same chunks.

    Returns:
      ``(starts int64[N], lengths int32[N])``: chunk ``i`` is ``seq[starts[i]:starts[i] +
      lengths[i]]``; ``lengths`` in 6..511; ``starts[i + 1] == starts[i] + lengths[i]``; every
      chunk ends at or before ``total_length``.
    """
    if total_length < 0:
        raise ValueError(f"total_length must be >= 0, got {total_length}")
    pos = int(rng.integers(0, MAX_START_OFFSET))
    start_blocks, length_blocks = [], []
    while total_length - pos >= MIN_CHUNK_BASES:
        n = int((total_length - pos) / _MEAN_CHUNK_BASES * 1.05) + 16
        full = rng.random(n) < FULL_PROB
        lengths = np.where(full, MAX_CHUNK_BASES, rng.integers(MIN_CHUNK_BASES, MAX_CHUNK_BASES, n))
        ends = pos + np.cumsum(lengths)
        keep = int(np.searchsorted(ends, total_length, side="right"))
        start_blocks.append(ends[:keep] - lengths[:keep])
        length_blocks.append(lengths[:keep])
        if keep < n:  # the next chunk would cross the end: the record is done
            break
        pos = int(ends[-1])
    if not start_blocks:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    return (
        np.concatenate(start_blocks).astype(np.int64),
        np.concatenate(length_blocks).astype(np.int32),
    )


def genome_chunks(record_lengths: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk every record of a prepared genome independently (chunks never span two records).

    Args:
      record_lengths: bases per record, in ``genome.u8`` order (records are stored back to back).
      seed: any int.

    Returns:
      ``(starts int64[N], lengths int32[N])`` with starts as offsets into ``genome.u8``.
    """
    starts, lengths = [], []
    offset = 0
    for record, length in enumerate(record_lengths):
        rng = np.random.default_rng([seed, _CHUNK_STREAM, record])
        s, n = chunk_index(int(length), rng)
        starts.append(s + offset)
        lengths.append(n)
        offset += int(length)
    if not starts:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    return np.concatenate(starts), np.concatenate(lengths)


def split_chunks(num_chunks: int, seed: int, train_fraction: float = TRAIN_FRACTION) -> np.ndarray:
    """The recipe's train / validation split: one Bernoulli(``train_fraction``) draw per chunk.

    Returns:
      ``bool[num_chunks]``, True for train; a deterministic function of ``(num_chunks, seed)``.
    """
    if not 0.0 <= train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in [0, 1], got {train_fraction}")
    return np.random.default_rng([seed, _SPLIT_STREAM]).random(num_chunks) < train_fraction


class PreparedGenomeError(UserError):
    """A prepared-genome folder that cannot be used as asked; the message says what to do."""


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    """Content digest of a file, memoized within a process on (path, size, mtime, ctime, inode):
    the train and validation pipelines of one run hash a genome once; any write changes ctime."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def describe_sources(paths: Sequence[pathlib.Path]) -> list[dict]:
    """``[{"path", "bytes", "sha256"}]`` of input files: what a prepared genome is keyed on."""
    out = []
    for p in paths:
        stat = p.stat()
        digest = _sha256(
            str(p.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino
        )
        out.append({"path": str(p.resolve()), "bytes": stat.st_size, "sha256": digest})
    return out


def _same_inputs(a: list[dict], b: list[dict]) -> bool:
    key = lambda sources: [(s["bytes"], s["sha256"]) for s in sources]
    return key(a) == key(b)


def _read_manifest(prepared_dir: pathlib.Path) -> dict | None:
    try:
        manifest = json.loads((prepared_dir / MANIFEST_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def load_manifest(prepared_dir: str | os.PathLike) -> dict:
    """The manifest of a prepared genome directory; clear errors if it is missing or foreign."""
    path = pathlib.Path(prepared_dir) / MANIFEST_FILE
    if not path.is_file():
        raise PreparedGenomeError(
            f"{path} not found: {prepared_dir} is not a prepared genome; "
            "create it with gemsjax.data.genome.prepare_genome(fasta, "
            "out_dir)"
        )
    manifest = _read_manifest(path.parent)
    if (
        manifest is None
        or manifest.get("format") != FORMAT
        or manifest.get("version") != FORMAT_VERSION
    ):
        found = manifest and (manifest.get("format"), manifest.get("version"))
        raise PreparedGenomeError(
            f"{path}: format {found!r} is not {FORMAT!r} version "
            f"{FORMAT_VERSION}; prepare the genome again with "
            "overwrite=True"
        )
    return manifest


def verify_prepared(prepared_dir: str | os.PathLike) -> str | None:
    """What is wrong with a prepared genome, or None when ``genome.u8`` matches its manifest
    (format, size and sha256; hashing reads the whole file, ~1 s per GB)."""
    prepared_dir = pathlib.Path(prepared_dir)
    manifest = _read_manifest(prepared_dir)
    if manifest is None:
        return f"{MANIFEST_FILE} is missing or unreadable"
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        return f"format {manifest.get('format')!r} version {manifest.get('version')!r} is outdated"
    bases = prepared_dir / BASES_FILE
    size = bases.stat().st_size if bases.is_file() else None
    if size != manifest["total_length"]:
        return f"{BASES_FILE} has {size} bytes, the manifest says {manifest['total_length']}"
    with open(bases, "rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() != manifest["bases_sha256"]:
            return f"{BASES_FILE} differs from the sha256 in the manifest"
    return None


def report(manifest: dict) -> dict[str, int]:
    """Base counts of a prepared genome: ``bases`` kept, ``u_as_t``, ``removed_n`` and
    ``removed_other`` (IUPAC ambiguity codes, gaps); logs a warning for ``U`` read as ``T`` and
    for ``removed_other`` above :data:`AMBIGUOUS_WARN_FRACTION` of the input."""
    records = manifest["records"]
    removed_n = sum(r["removed_n"] for r in records)
    out = {
        "bases": manifest["total_length"],
        "u_as_t": sum(r["u_as_t"] for r in records),
        "removed_n": removed_n,
        "removed_other": sum(r["removed"] for r in records) - removed_n,
    }
    sources = ", ".join(s["path"] for s in manifest["sources"])
    if out["u_as_t"]:
        _log.warning("%s: read %d U (RNA) bases as T", sources, out["u_as_t"])
    total = out["bases"] + out["removed_n"] + out["removed_other"]
    if out["removed_other"] > AMBIGUOUS_WARN_FRACTION * total:
        _log.warning(
            "%s: deleted %d characters other than A/C/G/T/U/N (%.2f %%: IUPAC ambiguity "
            "codes or gaps), joining their neighbours; clean the FASTA if that is wrong",
            sources,
            out["removed_other"],
            100 * out["removed_other"] / total,
        )
    return out


def _write_bases(
    paths: list[pathlib.Path], sources: list[dict], out: pathlib.Path, chunk_bases: int
) -> tuple[list[dict], str]:
    """Stream the FASTA files into ``out`` (ACGT only, U as T); returns the record entries and
    the sha256 of what was written."""
    records: list[dict] = []
    offset = 0
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for path, source in zip(paths, sources, strict=True):
            current = None
            for chunk in iter_fasta(path, chunk_bases=chunk_bases, upper=True):
                if current is None or chunk.record != current:
                    current = chunk.record
                    records.append(
                        {
                            "name": chunk.name,
                            "source": source["path"],
                            "offset": offset,
                            "length": 0,
                            "removed": 0,
                            "removed_n": 0,
                            "u_as_t": 0,
                        }
                    )
                codes = base_codes(chunk.seq)  # U reads as T (vocab.base_codes)
                kept = _ACGT[codes[codes != INVALID_BASE]]
                f.write(kept.tobytes())
                digest.update(kept.tobytes())
                entry = records[-1]
                entry["length"] += int(kept.size)
                entry["removed"] += int(chunk.seq.size - kept.size)
                entry["removed_n"] += int(np.count_nonzero(chunk.seq == ord("N")))
                entry["u_as_t"] += int(np.count_nonzero(chunk.seq == ord("U")))
                offset += int(kept.size)
    return records, digest.hexdigest()


def temp_dir_name(out_dir: pathlib.Path) -> str:
    """The temporary sibling a copy is written to: ``.<name>.tmp-<host>-<pid>-<random>``, so a
    later start can tell an orphan (its process is gone) from a copy being written."""
    return f".{out_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def prepare_genome(
    fasta_paths: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    chunk_bases: int = 1 << 22,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write the ACGT-only, memory-mappable copy of FASTA file(s) described in the module doc.

    Streams ``chunk_bases`` bases at a time, so memory stays flat for a human genome. The copy is
    written to a temporary sibling directory (:func:`temp_dir_name`) and renamed into place, so a
    crash or a concurrent run on another host never leaves a half-written ``out_dir``.

    Args:
      fasta_paths: one FASTA path or several (plain or gzip); records are kept in order.
      out_dir: the prepared directory to create.
      chunk_bases: bases read per step.
      overwrite: replace an ``out_dir`` prepared from different inputs (or rebuild it).

    Returns:
      ``out_dir`` as a path. If it already holds a genome prepared from the same inputs (same
      sizes and sha256, in order) that passes :func:`verify_prepared`, nothing is written; one
      that fails it is rebuilt, with a warning. The inputs are hashed once per process (a few
      seconds for a human genome).

    Raises:
      PreparedGenomeError: ``out_dir`` exists with other inputs or without a manifest, and not
        ``overwrite``.
      UserError: the FASTA files hold no A/C/G/T base.
    """
    paths = resolve_paths(fasta_paths)
    out_dir = pathlib.Path(out_dir)
    sources = describe_sources(paths)
    if out_dir.exists() and not overwrite:
        existing = _read_manifest(out_dir)
        if existing is None:
            raise PreparedGenomeError(
                f"{out_dir} exists but is not a prepared genome (no "
                f"readable {MANIFEST_FILE}); choose another prepared_dir "
                "or delete it"
            )
        if not _same_inputs(existing.get("sources", []), sources):
            raise PreparedGenomeError(
                f"{out_dir} was prepared from other inputs "
                f"({[s['path'] for s in existing['sources']]}, not {[str(p) for p in paths]}); "
                "choose another prepared_dir, or pass overwrite=True"
            )
        problem = verify_prepared(out_dir)
        if problem is None:
            return out_dir
        _log.warning("%s does not match its manifest (%s); rebuilding it", out_dir, problem)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / temp_dir_name(out_dir)
    tmp.mkdir()
    try:
        records, digest = _write_bases(paths, sources, tmp / BASES_FILE, chunk_bases)
        total = sum(r["length"] for r in records)
        if total == 0:
            raise UserError(f"no A/C/G/T bases in {[str(p) for p in paths]}; is this DNA?")
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "encoding": "ascii-ACGT",
            "sources": sources,
            "records": records,
            "total_length": total,
            "bases_sha256": digest,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process finished first: keep its copy if it has our inputs
            if not _same_inputs(load_manifest(out_dir)["sources"], sources):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


class GenomeChunkSource:
    """Grain random-access source over the chunks of one split of a prepared genome.

    ``source[i]`` is chunk ``i`` of the split as a ``str`` of 6..511 upper-case bases, in genome
    order; shuffle it with grain. Picklable: the memory map and the chunk index are rebuilt in
    each process (grain workers) from ``(prepared_dir, split, seed, train_fraction)``.

    Args:
      prepared_dir: a directory written by :func:`prepare_genome`.
      split: ``"train"``, ``"validation"`` or ``"all"``.
      seed: seeds the chunking and the split (the same seed must be used for both splits).
      train_fraction: Bernoulli probability of a chunk going to train.
    """

    def __init__(
        self,
        prepared_dir: str | os.PathLike,
        split: str = "train",
        seed: int = 0,
        train_fraction: float = TRAIN_FRACTION,
    ):
        if split not in (*SPLITS, "all"):
            raise ValueError(f"unknown split {split!r}; valid: {(*SPLITS, 'all')}")
        self.prepared_dir = pathlib.Path(prepared_dir)
        self.split = split
        self.seed = int(seed)
        self.train_fraction = float(train_fraction)
        self.manifest = load_manifest(self.prepared_dir)
        self._map: mmap.mmap | None = None
        self._starts, self._lengths = self._index()

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        starts, lengths = genome_chunks([r["length"] for r in self.manifest["records"]], self.seed)
        if self.split != "all":
            is_train = split_chunks(starts.size, self.seed, self.train_fraction)
            keep = is_train if self.split == "train" else ~is_train
            starts, lengths = starts[keep], lengths[keep]
        return starts, lengths

    def __len__(self) -> int:
        return int(self._starts.size)

    @property
    def starts(self) -> np.ndarray:
        """``int64[len(self)]``: chunk starts in ``genome.u8``."""
        return self._starts

    @property
    def lengths(self) -> np.ndarray:
        """``int32[len(self)]``: chunk lengths in bases."""
        return self._lengths

    def _memory_map(self) -> mmap.mmap:
        if self._map is None:
            with open(self.prepared_dir / BASES_FILE, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def bases(self) -> np.ndarray:
        """The whole prepared genome: a read-only ``uint8[total_length]`` view of the memory map."""
        return np.frombuffer(self._memory_map(), dtype=np.uint8)

    def __getitem__(self, index: int) -> str:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"chunk {index} out of range for {self!r}")
        start = int(self._starts[index])
        return self._memory_map()[start : start + int(self._lengths[index])].decode("ascii")

    def __getstate__(self) -> dict:
        return {
            "prepared_dir": self.prepared_dir,
            "split": self.split,
            "seed": self.seed,
            "train_fraction": self.train_fraction,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return (
            f"GenomeChunkSource({str(self.prepared_dir)!r}, split={self.split!r}, "
            f"seed={self.seed}, chunks={len(self)})"
        )
