"""The BarcodeMAE evaluation protocol on any BOLD / BIOSCAN-5M barcode table with a split.

Sets (:func:`load_barcode_sets`): keys / training set = seen species' ``train`` rows, seen test =
their ``test`` rows (of species that have train rows), unseen = ``test_unseen`` rows (whole
species absent from the keys). A table
without ``test_unseen`` rows (the shipped sample) gets its unseen species from
:func:`gemsjax.eval.barcode_split.held_out_species` with ``min_genus_species=2``, counting the
species that have (deduplicated) ``train`` rows: their non-``pretrain`` rows are the queries,
and they leave the keys and the seen test set. (Their ``pretrain`` rows were seen, unlabelled,
in pretraining; BIOSCAN-5M's pretraining split likewise holds barcodes not named to species.)

Scores per representation (:func:`score_representation`):

- closed-world species accuracy on the seen test set: linear probe on frozen vectors
  (:mod:`gemsjax.eval.probe`), and full fine-tuning of the encoder (:mod:`gemsjax.eval.finetune`,
  when ``config.full_finetune``);
- open-world genus: cosine 1-NN from the unseen queries to the keys (:mod:`gemsjax.eval.knn`),
  accuracy and balanced accuracy;
- BIN reconstruction on seen test + unseen rows that have a BIN: UMAP, Ward, AMI
  (:mod:`gemsjax.eval.cluster`);
- the harmonic mean of species accuracy (linear probe), genus 1-NN accuracy and BIN AMI (which
  three the paper combines is not verified: these are the three every row has).

Rows: the pretrained encoder and, with ``config.baseline``, the same size from random
initialization, 6-mer frequency vectors (:mod:`gemsjax.eval.kmer_features`) and exact-sequence
lookup (:func:`gemsjax.eval.knn.exact_lookup`; a query with no exact match counts as wrong).
``config.max_query_rows`` scores a fixed stratified subsample of the queries
(:func:`cut_queries`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time

import ml_collections
import numpy as np
from flax import nnx

from gemsjax.data import tables
from gemsjax.errors import UserError
from gemsjax.eval import (
    barcode_split,
    cluster,
    embed,
    kmer_features,
    knn,
    labelled,
    report,
    scores,
)

REQUIRED = ("species_name", "genus_name", "bin_uri")
"""Label columns the protocol needs (BOLD names; BIOSCAN-5M ``species``, ``genus``, ``dna_bin``
are accepted too)."""
COLUMNS = (
    "method",
    "species acc (probe)",
    "species acc (fine-tuned)",
    "genus 1-NN acc",
    "genus 1-NN bal. acc",
    "BIN AMI",
    "harmonic mean",
    "coverage",
)
NOTES = (
    "species: seen species, closed world (linear probe on frozen vectors; the lookup row: exact "
    "match); genus: unseen species against seen-species keys, cosine 1-NN; BIN AMI: UMAP "
    "(cosine) + Ward with as many clusters as BINs on seen test + unseen rows with a BIN",
    "harmonic mean of species acc (probe), genus 1-NN acc and BIN AMI",
    "coverage: share of unseen queries contained exactly in some key (exact lookup only)",
)


@dataclasses.dataclass(frozen=True)
class BarcodeSet:
    """Rows of one role: ``sequences`` (N strings) and label indices ``species``, ``genus``,
    ``bins`` (``int32[N]``, ``-1`` = no BIN) and ``order`` names (N strings, may be empty)."""

    sequences: list[str]
    species: np.ndarray
    genus: np.ndarray
    bins: np.ndarray
    order: list[str]

    def __len__(self) -> int:
        return len(self.sequences)

    def take(self, rows: np.ndarray) -> BarcodeSet:
        return BarcodeSet(
            [self.sequences[i] for i in rows],
            self.species[rows],
            self.genus[rows],
            self.bins[rows],
            [self.order[i] for i in rows],
        )


@dataclasses.dataclass(frozen=True)
class BarcodeSets:
    """``train`` (keys), ``test`` (seen species), ``unseen``; label names; how unseen was made;
    ``unscored_test``: test rows left out because deduplication took all their species' keys."""

    train: BarcodeSet
    test: BarcodeSet
    unseen: BarcodeSet
    species_names: tuple[str, ...]
    genus_names: tuple[str, ...]
    source: str
    unseen_from: str
    unscored_test: int = 0


def load_barcode_sets(tsv: str | os.PathLike) -> BarcodeSets:
    """The protocol's sets from a barcode TSV with a ``split`` column (BIOSCAN-5M names).

    Raises:
      UserError: no species / genus / BIN column, no ``split`` column, or an empty set (the
        message names the file and the fix).
    """
    path = os.fspath(tsv)
    with tables.DelimitedReader(path, "\t") as reader:
        header = reader.header
    found = {c: reader_has(header, c) for c in (*REQUIRED, "order_name", "split")}
    missing = [c for c in REQUIRED if not found[c]]
    if missing:
        raise UserError(
            f"{path}, line 1: the barcode evaluation needs species, genus and BIN "
            f"columns, missing {missing} (found {header}); use a BOLD TSV "
            "(species_name, genus_name, bin_uri) or BIOSCAN-5M metadata (species, "
            "genus, dna_bin)"
        )
    if not found["split"]:
        raise UserError(
            f"{path}, line 1: no 'split' column; write a split once with "
            f"`python -m gemsjax.eval.barcode_split {path} <out_dir>` and evaluate "
            "<out_dir>/<name>.split.tsv.gz"
        )
    labels = REQUIRED + (("order_name",) if found["order_name"] else ())
    read = tables.read_barcode_tsv(path, labels, deduplicate=True)
    species, genus, bins = (read[c].labels for c in REQUIRED)
    order = (
        [read["order_name"].label_names[i] if i >= 0 else "" for i in read["order_name"].labels]
        if found["order_name"]
        else [""] * len(species)
    )
    split = np.asarray(read["species_name"].extra["split"])
    everything = BarcodeSet(read["species_name"].sequences, species, genus, bins, order)
    labelled = (species >= 0) & (genus >= 0)
    if (split == "test_unseen").any():
        unseen_rows = labelled & (split == "test_unseen")
        held, unseen_from = np.zeros(len(split), bool), "the table's test_unseen split"
    else:
        # Counted on the deduplicated train rows, so every held-out genus keeps a key.
        train = labelled & (split == "train")
        held_species = barcode_split.held_out_species(
            species[train], genus[train], min_genus_species=2
        )
        held = np.isin(species, held_species)
        unseen_rows = labelled & held & (split != "pretrain")
        unseen_from = (
            f"{len(held_species)} species held out of genera with >= 2 species "
            "in the train split (barcode_split.held_out_species, seed 0), their "
            "non-pretrain rows"
        )
    keys = labelled & ~held & (split == "train")
    test = labelled & ~held & (split == "test")
    closed = test & np.isin(species, species[keys])  # closed world: species with keys only
    roles = {"train": keys, "test": closed, "unseen": unseen_rows}
    for role, rows in roles.items():
        if not rows.any():
            raise UserError(
                f"{path}: the {role} set is empty (split column values: "
                f"{sorted(set(split.tolist()))}); the table needs labelled rows with "
                "split train, test and test_unseen (or species to hold out)"
            )
    sets = {role: everything.take(np.flatnonzero(rows)) for role, rows in roles.items()}
    return BarcodeSets(
        **sets,
        species_names=read["species_name"].label_names,
        genus_names=read["genus_name"].label_names,
        source=path,
        unseen_from=unseen_from,
        unscored_test=int((test & ~closed).sum()),
    )


def cut_queries(sets: BarcodeSets, size: int) -> BarcodeSets:
    """``sets`` with the seen test rows cut to a stratified subsample of ``size`` by species and
    the unseen rows to one by genus (:func:`gemsjax.eval.labelled.stratified_subsample`, seed 0;
    a set of at most ``size`` rows stays whole); the keys are untouched."""
    test = sets.test.take(labelled.stratified_subsample(sets.test.species, size))
    unseen = sets.unseen.take(labelled.stratified_subsample(sets.unseen.genus, size))
    return dataclasses.replace(sets, test=test, unseen=unseen)


def reader_has(header: list[str], column: str) -> bool:
    """Whether ``header`` holds ``column`` under its BOLD or BIOSCAN-5M name."""
    return any(name in header for name in tables._aliases(column))


def genus_knn(train_x: np.ndarray, unseen_x: np.ndarray, sets: BarcodeSets) -> dict:
    """Cosine 1-NN genus of the unseen queries from the keys: accuracy, balanced accuracy."""
    pred = knn.nearest_labels(train_x, sets.train.genus, unseen_x)
    got = scores.classification_scores(sets.unseen.genus, pred, len(sets.genus_names))
    return {"genus 1-NN acc": got["accuracy"], "genus 1-NN bal. acc": got["balanced_accuracy"]}


def score_representation(
    name: str,
    vectors: dict[str, np.ndarray],
    sets: BarcodeSets,
    *,
    probe: bool = True,
    cluster_bins: bool = True,
    probe_max_iter: int = 300,
    umap_components: int = 64,
) -> dict:
    """One table row for vectors ``{"train", "test", "unseen"}: float[N_role, D]``."""
    row = {"method": name} | genus_knn(vectors["train"], vectors["unseen"], sets)
    if probe:
        from gemsjax.eval.probe import linear_probe

        pred = linear_probe(
            vectors["train"], sets.train.species, vectors["test"], max_iter=probe_max_iter
        )
        row["species acc (probe)"] = float(np.mean(pred == sets.test.species))
    if cluster_bins:
        x, bins = bin_rows(vectors, sets)
        row["BIN AMI"] = cluster.bin_reconstruction_ami(x, bins, umap_components)
    parts = [row.get(c) for c in ("species acc (probe)", "genus 1-NN acc", "BIN AMI")]
    if all(p is not None for p in parts):
        row["harmonic mean"] = harmonic_mean(parts)
    return row


def bin_rows(vectors: dict[str, np.ndarray], sets: BarcodeSets) -> tuple[np.ndarray, np.ndarray]:
    """Seen-test and unseen rows that have a BIN: ``(float[M, D], int[M])``."""
    x = np.concatenate([vectors["test"], vectors["unseen"]])
    bins = np.concatenate([sets.test.bins, sets.unseen.bins])
    return x[bins >= 0], bins[bins >= 0]


def harmonic_mean(values) -> float:
    """Harmonic mean of non-negative scores (0 if any is 0)."""
    values = np.asarray(values, np.float64)
    return 0.0 if (values <= 0).any() else float(len(values) / np.sum(1.0 / values))


def exact_lookup_row(sets: BarcodeSets) -> dict:
    """The exact-sequence lookup row: species of the seen test rows and genus of the unseen rows
    from the first key containing the query exactly; a query without a match counts as wrong.
    ``coverage``: share of unseen queries with a match."""
    species = knn.exact_lookup(sets.train.sequences, sets.train.species, sets.test.sequences)
    genus = knn.exact_lookup(sets.train.sequences, sets.train.genus, sets.unseen.sequences)
    none = len(sets.genus_names)  # an extra class that is never a true label
    got = scores.classification_scores(
        sets.unseen.genus, np.where(genus >= 0, genus, none), none + 1
    )
    return {
        "method": "exact-sequence lookup",
        "species acc (probe)": float(np.mean(species == sets.test.species)),
        "genus 1-NN acc": got["accuracy"],
        "genus 1-NN bal. acc": got["balanced_accuracy"],
        "coverage": float(np.mean(genus >= 0)),
    }


def tokens_per_row(encoder, config) -> int:
    """``config.max_len``, or when 0 the whole k-mers of a 660-bp barcode for the encoder's k."""
    return config.max_len or embed.default_max_len("barcodebert", encoder.k)


def embed_sets(model, encoder, sets: BarcodeSets, config) -> dict[str, np.ndarray]:
    """Embeddings of the three sets with one compiled step (``encoder``: the
    :class:`~gemsjax.eval.init.Encoder` ``model`` was built from; its k-mer length)."""
    kw = dict(
        vocab="barcodebert",
        k=encoder.k,
        max_len=tokens_per_row(encoder, config),
        batch_size=config.batch_size,
        layer=config.layer,
        pooling=config.pooling,
    )
    return {
        role: embed.embed_sequences(model, getattr(sets, role).sequences, **kw)
        for role in ("train", "test", "unseen")
    }


def _finetuned_accuracy(encoder, sets: BarcodeSets, config, workdir: pathlib.Path) -> float:
    """Species accuracy on the seen test set after fine-tuning the whole encoder on the keys."""
    import jax

    from gemsjax.eval import finetune
    from gemsjax.train import sharding

    def table(part: BarcodeSet) -> tables.LabelledTable:
        return tables.LabelledTable(part.sequences, part.species, sets.species_names, sets.source)

    hyper = finetune.Hyper(**config.finetune.to_dict())
    steps = finetune.steps_per_epoch(len(sets.train), hyper.batch_size) * hyper.epochs
    mesh = sharding.make_mesh()
    with jax.set_mesh(mesh):
        tuner = finetune.Finetuner(
            encoder, len(sets.species_names), hyper, tokens_per_row(encoder, config), steps, mesh
        )
        out = finetune.finetune(
            tuner, table(sets.train), None, table(sets.test), workdir, log_every=max(steps // 4, 1)
        )
    return float(out["test"]["accuracy"])


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """``--mode=evaluate`` with ``config.protocol="barcodes"`` (``configs/eval/barcodes.py``): every
    score for the encoder ``config.init`` and (``config.baseline``) its random-init twin, 6-mer
    frequencies and exact lookup; writes ``results.json``, ``results.md`` and ``umap.png`` into
    ``workdir``."""
    from gemsjax.eval import init
    from gemsjax.eval.config import validate

    validate(config)
    workdir = pathlib.Path(workdir)
    started = time.perf_counter()
    sets = load_barcode_sets(_table_path(config.tsv))
    whole = {role: len(getattr(sets, role)) for role in ("test", "unseen")}
    if config.max_query_rows:
        sets = cut_queries(sets, config.max_query_rows)
    pretrained = init.load_encoder(
        config.init, model_name=_random_size(config), vocab="barcodebert"
    )
    encoders = [pretrained] + (
        [pretrained.random_baseline()] if config.baseline and pretrained.params is not None else []
    )
    kw = dict(
        probe=config.probe,
        cluster_bins=config.cluster,
        probe_max_iter=config.probe_max_iter,
        umap_components=config.umap_components,
    )
    rows, picture = [], None
    for i, encoder in enumerate(encoders):
        model = init.build_encoder(encoder, nnx.Rngs(config.seed))
        vectors = embed_sets(model, encoder, sets, config)
        row = score_representation(encoder.source, vectors, sets, **kw)
        if config.full_finetune:
            row["species acc (fine-tuned)"] = _finetuned_accuracy(
                encoder, sets, config, workdir / f"finetune_{i}"
            )
        rows.append(row)
        if picture is None:
            picture = _umap_picture(workdir / "umap.png", vectors, sets, encoder.source)
    if config.baseline:
        kmers = {
            role: kmer_features.kmer_frequencies(getattr(sets, role).sequences)
            for role in ("train", "test", "unseen")
        }
        rows.append(score_representation("6-mer frequencies", kmers, sets, **kw))
        rows.append(exact_lookup_row(sets))
    counts = {role: len(getattr(sets, role)) for role in ("train", "test", "unseen")}
    notes = [
        *NOTES,
        f"{sets.source}: keys {counts['train']}, seen test {counts['test']}, "
        f"unseen {counts['unseen']} barcodes; unseen from {sets.unseen_from}; "
        f"{sets.unscored_test} seen-test rows not scored (deduplication left their species "
        "no train rows)",
    ]
    cut = [role for role in whole if counts[role] < whole[role]]
    if cut:
        notes.append(
            f"{' and '.join(cut)} cut to fixed stratified subsamples of {config.max_query_rows} "
            f"(of {', '.join(str(whole[r]) for r in cut)}; max_query_rows, seed 0)"
        )
    report.write_report(
        workdir,
        "Barcodes: closed- and open-world evaluation",
        rows,
        COLUMNS,
        notes=notes,
        extra=dict(sets=counts, picture=picture),
    )
    return dict(
        results=str(workdir / "results.json"),
        rows=rows,
        seconds=round(time.perf_counter() - started, 1),
    )


def _random_size(config) -> str:
    """``model.name`` for ``init=random``; a run folder brings its own size."""
    return config.model.name if config.init.startswith("random") and ":" not in config.init else ""


def _table_path(tsv: str) -> pathlib.Path:
    """``config.tsv``, or the shipped BOLD sample when empty."""
    from gemsjax.data import samples

    return pathlib.Path(tsv) if tsv else samples.sample_path(samples.BARCODES)


def _umap_picture(path: pathlib.Path, vectors: dict, sets: BarcodeSets, name: str) -> str:
    """2-D cosine UMAP of the seen-test + unseen embeddings coloured by order (genus when the
    table has no order column); returns the file name."""
    x = np.concatenate([vectors["test"], vectors["unseen"]])
    order = sets.test.order + sets.unseen.order
    if any(order):
        groups, by = order, "order"
    else:
        genus = np.concatenate([sets.test.genus, sets.unseen.genus])
        groups, by = [sets.genus_names[g] for g in genus], "genus"
    path.parent.mkdir(parents=True, exist_ok=True)
    cluster.plot_map(
        path,
        cluster.umap_reduce(x, 2),
        groups,
        f"{name}: seen test + unseen barcodes by {by} (cosine UMAP)",
    )
    return path.name


def after_pretraining(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """The downstream table a barcode pretraining run ends with: cosine 1-NN genus of unseen
    species from the run's latest encoder, its random-init twin and 6-mer frequencies, on the
    run's table (``config.data.tsv``, default the shipped sample); written to
    ``<workdir>/downstream/results.{json,md}`` and printed."""
    from gemsjax.eval import init

    workdir = pathlib.Path(workdir)
    sets = load_barcode_sets(_table_path(config.data.tsv))
    pretrained = init.load_encoder(str(workdir), vocab="barcodebert")
    rows = []
    for encoder in (pretrained, pretrained.random_baseline()):
        model = init.build_encoder(encoder, nnx.Rngs(config.seed))
        kw = dict(vocab="barcodebert", k=encoder.k, max_len=config.data.max_len)
        train_x = embed.embed_sequences(model, sets.train.sequences, **kw)
        unseen_x = embed.embed_sequences(model, sets.unseen.sequences, **kw)
        rows.append({"method": encoder.source} | genus_knn(train_x, unseen_x, sets))
    kmers = [kmer_features.kmer_frequencies(s.sequences) for s in (sets.train, sets.unseen)]
    rows.append({"method": "6-mer frequencies"} | genus_knn(*kmers, sets))
    note = (
        f"{len(sets.unseen)} unseen-species barcodes ({sets.unseen_from}) against "
        f"{len(sets.train)} seen-species keys, cosine 1-NN"
    )
    report.write_report(
        workdir / "downstream",
        "Downstream: genus of unseen species (1-NN)",
        rows,
        ("method", "genus 1-NN acc", "genus 1-NN bal. acc"),
        notes=(note,),
    )
    return {
        "genus_1nn_unseen": {row["method"]: row["genus 1-NN acc"] for row in rows},
        "results": str(workdir / "downstream" / "results.json"),
    }
