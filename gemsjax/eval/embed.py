"""Sequence embeddings from a pretrained encoder: one jitted, sharded forward per batch shape.

:func:`embed_sequences` turns DNA strings into ``float32[N, H]`` vectors: tokenize a batch
(DNABERT overlapping or BarcodeBERT non-overlapping 6-mers), run the encoder up to ``layer``,
pool over the valid tokens (``pooling="mean"``: :func:`gemsjax.models.bert.masked_mean` over
positions with attention 1 -- CLS, k-mers and SEP for DNABERT, the k-mers for barcodes, as
BarcodeMAE's ``representations_from_df``; ``"cls"``: the hidden state at position 0, DNABERT
vocab only). Every batch has the same shape (the last one is filled with empty rows that are
dropped), so the step compiles once; batches are split over the ``("data", "fsdp")`` mesh and
parameters follow their FSDP annotations, as in training.

:func:`embed_file` reads FASTA / CSV / TSV and writes ``embeddings.npy`` and ``index.tsv``;
:func:`run` is ``python -m gemsjax.main --mode=embed --config=configs/eval/embed.py``.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gemsjax.data import fasta, tables
from gemsjax.errors import UserError
from gemsjax.eval import labelled
from gemsjax.models import backend
from gemsjax.models.bert import POOLINGS, BertModel, masked_mean
from gemsjax.tokenizers import KmerTokenizer, data_tokenizer, kmer_text_to_sequence
from gemsjax.train import sharding

FORMATS = ("auto", "fasta", "csv", "tsv")
SEQUENCE_COLUMNS = ("sequence", "nucleotides", "dna_barcode")
"""Accepted names of the sequence column of a CSV / TSV (GUE and GeneMask; BOLD; BIOSCAN-5M)."""
ID_COLUMNS = ("processid", "id", "name")


def tokenizer_for(vocab: str, k: int = 6) -> KmerTokenizer:
    """The k-mer tokenizer of ``vocab`` (``"dnabert"``: overlapping 6-mers; ``"barcodebert"``:
    blocks of ``k`` with gaps stripped, no reading-frame offset: embeddings are for evaluation)."""
    if vocab == "dnabert":
        return data_tokenizer("genome")
    if vocab == "barcodebert":
        return data_tokenizer("barcode", k, strip_gaps=True)
    raise UserError(f"embedding vocab {vocab!r}; expected 'dnabert' or 'barcodebert'")


def default_max_len(vocab: str, k: int = 6) -> int:
    """Tokens per row when the config leaves ``max_len`` at 0: DNABERT's 512, or a 660-bp COI
    barcode's whole k-mers (110 6-mers, 82 8-mers)."""
    return 512 if vocab == "dnabert" else 660 // k


def encoder_of(model: nnx.Module) -> BertModel:
    """The :class:`BertModel` inside ``model`` (itself, or ``.encoder`` of BarcodeMAE,
    BertForMaskedLM and BertClassifier)."""
    encoder = model if isinstance(model, BertModel) else getattr(model, "encoder", None)
    if not isinstance(encoder, BertModel):
        raise TypeError(f"{type(model).__name__} has no BERT encoder to embed with")
    return encoder


def hidden_states(
    encoder: BertModel, ids: jax.Array, attention: jax.Array, layer: int = -1
) -> jax.Array:
    """Hidden states ``float[B, L, H]`` after ``layer`` blocks (0: the embedding layer's output;
    -1 or the number of blocks: the last layer, what ``encoder(ids, attention)`` returns).

    ``ids, attention: int32[B, L]``. Runs in eval mode (no dropout)."""
    blocks = encoder.stack.blocks
    if layer in (-1, len(blocks)):
        return encoder(ids, attention)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    x = encoder.embeddings(encoder.word_embeddings(ids), positions, jnp.zeros_like(ids))
    for block in blocks[:layer]:
        x = block(x, attention != 0)
    return x


def pool(hidden: jax.Array, attention: jax.Array, pooling: str) -> jax.Array:
    """``hidden: float[B, L, H]``, ``attention: int[B, L]`` -> ``float32[B, H]``."""
    if pooling == "mean":
        return masked_mean(hidden, attention)
    return hidden[:, 0].astype(jnp.float32)


def check_options(encoder: BertModel, vocab: str, layer: int, pooling: str, k: int = 6) -> None:
    """Raise :class:`UserError` for a layer the encoder lacks, an unknown pooling, CLS pooling
    without a CLS token, or a vocab larger than the model's table."""
    n_layers = len(encoder.stack.blocks)
    if not -1 <= layer <= n_layers:
        raise UserError(
            f"embedding layer={layer}, but the encoder has {n_layers} blocks; use -1 "
            f"(last), 0 (embedding layer) .. {n_layers}"
        )
    if pooling not in POOLINGS:
        raise UserError(f"embedding pooling={pooling!r}; valid: {POOLINGS}")
    if pooling == "cls" and vocab != "dnabert":
        raise UserError(
            "pooling='cls' needs a [CLS] token; the barcodebert vocab has none: use pooling='mean'"
        )
    size = tokenizer_for(vocab, k).vocab_size
    table = encoder.word_embeddings.embedding.shape[0]
    if table < size:
        raise UserError(
            f"the model's word-embedding table has {table} rows, fewer than the "
            f"{size} ids of the {vocab} vocab: this checkpoint is for another "
            "tokenizer (barcode models take barcodebert, genome models dnabert)"
        )


def make_embed_step(graphdef, layer: int, pooling: str):
    """``step(params, ids, attention) -> float32[B, H]``, to be jitted."""

    def step(params, ids, attention):
        encoder = nnx.merge(graphdef, params)
        return pool(hidden_states(encoder, ids, attention, layer), attention, pooling)

    return step


def embed_sequences(
    model: nnx.Module,
    sequences: Sequence[str],
    *,
    vocab: str,
    max_len: int,
    k: int = 6,
    batch_size: int = 64,
    layer: int = -1,
    pooling: str = "mean",
    mesh: jax.sharding.Mesh | None = None,
) -> np.ndarray:
    """Embeddings ``float32[N, H]`` of ``sequences`` (N DNA strings, any case, N / IUPAC / gaps
    allowed; longer ones are truncated to ``max_len`` tokens).

    Args:
      model: a :class:`BertModel` or a model holding one as ``.encoder`` (BarcodeMAE: its
        pretrained encoder, :meth:`~gemsjax.models.mae.BarcodeMAE.encode`'s path).
      vocab: ``"dnabert"`` or ``"barcodebert"``.
      max_len: tokens per row (DNABERT: including CLS and SEP; barcodes: 110 for 660 bp).
      k: the barcode k-mer length the encoder was trained on (6; 8 for BarcodeBERT-5M).
      batch_size: rows per step (rounded up to a multiple of the number of devices).
      layer, pooling: see :func:`hidden_states`, :func:`pool`.
      mesh: a ``("data", "fsdp")`` mesh; default: all devices on the data axis.
    """
    encoder = encoder_of(model)
    check_options(encoder, vocab, layer, pooling, k)
    tokenizer = tokenizer_for(vocab, k)
    mesh = mesh or sharding.make_mesh()
    n_shards = mesh.devices.size
    batch_size = -(-batch_size // n_shards) * n_shards
    processes, index = jax.process_count(), jax.process_index()
    local = batch_size // processes
    graphdef, params = nnx.split(encoder)
    with jax.set_mesh(mesh):
        param_sh = sharding.state_shardings(params, mesh)
        params = jax.device_put(params, param_sh)
        step = jax.jit(
            make_embed_step(graphdef, layer, pooling),
            in_shardings=(param_sh, sharding.batch_sharding(mesh), sharding.batch_sharding(mesh)),
            out_shardings=sharding.replicated(mesh),
            compiler_options=backend.inference_compiler_options(),
        )
        pending, out = None, []
        for start in range(0, len(sequences), batch_size):
            rows = list(sequences[start + index * local : start + (index + 1) * local])
            ids, attention = tokenizer.encode(rows + [""] * (local - len(rows)), max_len)
            batch = sharding.shard_batch((ids, attention), mesh)
            result = step(params, *batch)  # dispatched; the previous batch is fetched meanwhile
            if pending is not None:
                out.append(np.asarray(pending))
            pending = result
        if pending is not None:
            out.append(np.asarray(pending))
    hidden = encoder.word_embeddings.embedding.shape[1]
    stacked = np.concatenate(out) if out else np.zeros((0, hidden), np.float32)
    return stacked[: len(sequences)]


def read_sequences(path: str | os.PathLike, fmt: str = "auto") -> tuple[list[str], dict]:
    """Sequences of a FASTA, CSV or TSV file and an index ``{column: list}`` (one entry per
    sequence: ``id`` and ``line``, and every other column of a table, e.g. labels).

    ``fmt="auto"`` picks by the name (``.fa``, ``.fasta``, ``.fna`` [``.gz``] -> FASTA, ``.csv``,
    ``.tsv``). A table needs a sequence column (:data:`SEQUENCE_COLUMNS`); a field written as
    space-separated k-mers (GeneMask / DNABERT TSV) is read back as the sequence."""
    path = pathlib.Path(path)
    if fmt == "auto":
        fmt = _format_from_name(path)
    if fmt not in FORMATS[1:]:
        raise UserError(f"embed input format {fmt!r}; valid: {FORMATS}")
    if not path.is_file():
        raise UserError(f"{path}: no such file; check config.input")
    if fmt == "fasta":
        records = fasta.read_fasta(path)
        return [seq for _, seq in records], {
            "id": [name for name, _ in records],
            "record": list(range(1, len(records) + 1)),
        }
    sequences, columns = [], {}
    with tables.DelimitedReader(path, "," if fmt == "csv" else "\t") as reader:
        seq_col = reader.column(*SEQUENCE_COLUMNS)
        id_col = next((reader.header.index(c) for c in ID_COLUMNS if c in reader.header), None)
        others = [(i, name) for i, name in enumerate(reader.header) if i not in (seq_col, id_col)]
        columns = {"id": [], "line": []} | {name: [] for _, name in others}
        for line, fields in reader.rows():
            text = fields[seq_col].strip()
            try:
                sequences.append(kmer_text_to_sequence(text) if " " in text else text)
            except ValueError as err:
                raise reader.error(
                    line,
                    f"bad k-mer sequence field ({err})",
                    "write the sequence plainly or as overlapping k-mers",
                ) from err
            columns["id"].append(fields[id_col] if id_col is not None else str(line))
            columns["line"].append(line)
            for i, name in others:
                columns[name].append(fields[i])
    if not sequences:
        raise UserError(f"{path}: no sequences (only a header line); nothing to embed")
    return sequences, columns


def _format_from_name(path: pathlib.Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for suffix, fmt in (
        (".fa", "fasta"),
        (".fasta", "fasta"),
        (".fna", "fasta"),
        (".csv", "csv"),
        (".tsv", "tsv"),
    ):
        if name.endswith(suffix):
            return fmt
    raise UserError(
        f"{path}: cannot tell the format from the name; set config.format to one of {FORMATS[1:]}"
    )


def token_counts(sequences: Sequence[str], vocab: str, k: int = 6) -> np.ndarray:
    """``int64[N]``: tokens each sequence needs untruncated (DNABERT: k-mers + CLS + SEP;
    barcodes: whole k-mer blocks after removing gaps and trailing N)."""
    if vocab != "dnabert":
        sequences = [s.replace("-", "").rstrip("Nn") for s in sequences]
    return labelled.tokens_needed(list(sequences), vocab, k)


def write_embeddings(
    out_dir: str | os.PathLike, embeddings: np.ndarray, index: dict, truncated: np.ndarray
) -> tuple[pathlib.Path, pathlib.Path]:
    """``embeddings.npy`` (``float32[N, H]``) and ``index.tsv`` (row, the index columns,
    ``truncated``) in ``out_dir``; returns their paths."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    npy, tsv = out_dir / "embeddings.npy", out_dir / "index.tsv"
    np.save(npy, embeddings.astype(np.float32))
    with open(tsv, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["row", *index, "truncated"])
        for row, values in enumerate(zip(*index.values(), truncated, strict=True)):
            writer.writerow([row, *values[:-1], int(values[-1])])
    return npy, tsv


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """``--mode=embed``: embed ``config.input`` with the encoder ``config.init`` names (a
    pretraining run folder, ``random``, ...: :func:`gemsjax.eval.init.load_encoder`) and write
    ``embeddings.npy`` + ``index.tsv`` into ``workdir``; returns a summary."""
    from gemsjax.eval import init
    from gemsjax.eval.config import validate

    validate(config)
    random = config.init == "random"
    spec = init.load_encoder(
        config.init, model_name=config.model.name if random else "", vocab=config.vocab
    )
    model = init.build_encoder(spec, nnx.Rngs(config.seed))
    sequences, index = read_sequences(config.input, config.format)
    max_len = config.max_len or default_max_len(spec.vocab, spec.k)
    started = time.perf_counter()
    embeddings = embed_sequences(
        model,
        sequences,
        vocab=spec.vocab,
        max_len=max_len,
        k=spec.k,
        batch_size=config.batch_size,
        layer=config.layer,
        pooling=config.pooling,
    )
    seconds = time.perf_counter() - started
    truncated = token_counts(sequences, spec.vocab, spec.k) > max_len
    npy, tsv = write_embeddings(workdir, embeddings, index, truncated)
    summary = dict(
        embeddings=str(npy),
        index=str(tsv),
        shape=list(embeddings.shape),
        encoder=spec.source,
        layer=config.layer,
        pooling=config.pooling,
        max_len=max_len,
        truncated=int(truncated.sum()),
        seconds=round(seconds, 2),
        sequences_per_second=round(len(sequences) / max(seconds, 1e-9), 1),
    )
    (pathlib.Path(workdir) / "embed.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
