"""tensorflow-datasets builders for the labelled benchmarks, from local files only (no download).

Three builders, each reading a directory the user already has (TFDS ``manual_dir``) through the
readers of :mod:`gemsjax.data.tables`, and writing ``array_record`` files so that
``tfds.data_source(...)`` serves them to the grain pipelines without TensorFlow (TFDS 4.9.10 builds
and reads ``array_record`` datasets with TensorFlow absent):

- ``gue/<task>``: the GUE benchmark (DNABERT-2); ``manual_dir`` is the ``GUE`` folder holding
  ``EMP/``, ``prom/``, ``splice/``, ``tf/``, ``mouse/``, ``virus/``. Splits ``train``, ``dev``,
  ``test``, each only where ``<split>.csv`` (or ``.csv.gz``) exists.
- ``genemask_fewshot/<dataset>_<shots>``: GeneMask few-shot sets; ``manual_dir`` is
  ``Data-B_fewshot-task-datasets``. Split ``train`` (the shot file), plus ``test`` (and ``dev``
  for Splice-40) where the folder has them.
- ``bioscan5m/<level>``: BIOSCAN-5M barcodes labelled at ``species``, ``genus`` or ``dna_bin``
  level; ``manual_dir`` holds the metadata TSV. One TFDS split per value of its ``split`` column
  (``pretrain``, ``train``, ``val``, ``test``, ``key_unseen``, ...). Preprocessing is BarcodeMAE's
  (:func:`~gemsjax.data.tables.read_barcode_tsv`: gaps and trailing N removed, duplicate barcodes
  dropped over the whole file, label indices over the whole file, ``-1`` = no label). The whole
  table is held in memory while building (about 5 GB for the full BIOSCAN-5M).

Examples are ``{"sequence": text, "label": int64, "row": int64}`` (``row``: 0-based data row of
the source table after preprocessing), in source order (shuffling is disabled). The ``bioscan5m``
rows also carry ``processid`` and ``label_name``. Use :func:`prepare` to build one, then::

    source = tfds.data_source("gue/prom_core_tata", split="train", data_dir=data_dir)
    pipelines.labelled_pipeline(source, vocab="dnabert", ...)
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from gemsjax.data import tables

VERSION = tfds.core.Version("1.0.0")

GUE_TASKS = {
    **{
        f"emp_{m.lower()}": (f"EMP/{m}", 2)
        for m in (
            "H3",
            "H3K14ac",
            "H3K36me3",
            "H3K4me1",
            "H3K4me2",
            "H3K4me3",
            "H3K79me3",
            "H3K9ac",
            "H4",
            "H4ac",
        )
    },
    **{
        name: (f"prom/prom_{name.removeprefix('prom_')}", 2)
        for name in (
            "prom_300_all",
            "prom_300_notata",
            "prom_300_tata",
            "prom_core_all",
            "prom_core_notata",
            "prom_core_tata",
        )
    },
    "splice_reconstructed": ("splice/reconstructed", 3),
    **{f"tf_{i}": (f"tf/{i}", 2) for i in range(5)},
    **{f"mouse_{i}": (f"mouse/{i}", 2) for i in range(5)},
    "virus_covid": ("virus/covid", 9),
}
"""config name → (task folder under the GUE directory, number of classes)."""

GENEMASK_SETS = {
    "prom_core": ("Prom-core", 2, (10, 50, 100, 500, 1000)),
    "prom_300": ("Prom-300", 2, (10, 50, 100, 500, 1000)),
    "splice_40": ("Splice-40", 3, (10, 50, 100, 500)),
    "cohn_enh": ("Cohn-enh", 2, (10, 50, 100, 500)),
}
"""dataset → (folder, number of classes, shot settings)."""

BIOSCAN_LEVELS = ("species", "genus", "dna_bin")
BIOSCAN_METADATA = "BIOSCAN_5M_Insect_Dataset_metadata.tsv"


@dataclasses.dataclass(eq=False)
class LabelledConfig(tfds.core.BuilderConfig):
    """A config naming its data in ``manual_dir`` and its number of classes (0 = open-ended)."""

    folder: str = ""
    num_classes: int = 0
    shots: int = 0


def _existing(path: pathlib.Path) -> pathlib.Path | None:
    """``path`` or ``path.gz``, whichever exists."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _labelled_examples(
    table: tables.LabelledTable, rows: np.ndarray | None = None, num_classes: int = 0
):
    """``(key, example)`` pairs of a table (optionally only ``rows``), labels range-checked."""
    rows = np.arange(len(table)) if rows is None else rows
    if num_classes:
        bad = np.flatnonzero((table.labels < 0) | (table.labels >= num_classes))
        if bad.size:
            raise ValueError(
                f"{table.source}: data row {bad[0] + 1} has label "
                f"{table.labels[bad[0]]}, outside 0..{num_classes - 1} for this "
                "config; check the file"
            )
    for row in rows:
        row = int(row)
        yield row, {"sequence": table.sequences[row], "label": int(table.labels[row]), "row": row}


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared by the builders: ``array_record`` by default, data from ``manual_dir`` only."""

    VERSION = VERSION

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. TFDS 4.9.10's own lookup imports the ``importlib_resources`` backport, which
        it declares only for Python < 3.9, and fails without it."""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=self._features(),
            supervised_keys=("sequence", "label"),
            disable_shuffling=True,
        )

    def _features(self) -> tfds.features.FeaturesDict:
        """Labels are plain int64 (not ClassLabel) so that -1 can mean "no label"."""
        return tfds.features.FeaturesDict(
            {"sequence": tfds.features.Text(), "label": np.int64, "row": np.int64}
        )


class Gue(_LocalBuilder):
    """GUE (DNABERT-2 benchmark) tasks from a local ``GUE`` folder: CSV ``sequence,label``."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download GUE (DNABERT-2 README, or Hugging Face leannmlindsey/GUE) and pass the GUE "
        "folder, the one holding EMP/, prom/, splice/, tf/, mouse/ and virus/, as manual_dir."
    )

    BUILDER_CONFIGS = [
        LabelledConfig(name=name, folder=folder, num_classes=n, description=f"GUE task {folder}")
        for name, (folder, n) in GUE_TASKS.items()
    ]

    def _split_generators(self, dl_manager):
        folder = pathlib.Path(dl_manager.manual_dir) / self.builder_config.folder
        files = {split: _existing(folder / f"{split}.csv") for split in ("train", "dev", "test")}
        files = {split: path for split, path in files.items() if path is not None}
        if not files:
            raise FileNotFoundError(
                f"gue/{self.builder_config.name}: no train/dev/test.csv(.gz) "
                f"in {folder}; manual_dir must be the GUE folder"
            )
        return {split: self._generate_examples(path) for split, path in files.items()}

    def _generate_examples(self, path):
        return _labelled_examples(
            tables.read_gue_csv(path), num_classes=self.builder_config.num_classes
        )


def _genemask_configs() -> list[LabelledConfig]:
    return [
        LabelledConfig(
            name=f"{name}_{shots}",
            folder=folder,
            num_classes=n,
            shots=shots,
            description=f"GeneMask {folder}, {shots}-shot train set",
        )
        for name, (folder, n, all_shots) in GENEMASK_SETS.items()
        for shots in all_shots
    ]


class GenemaskFewshot(_LocalBuilder):
    """GeneMask few-shot sets from ``Data-B_fewshot-task-datasets`` (quoted 6-mer TSVs)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Clone github roysoumya/GeneMask and pass its Data-B_fewshot-task-datasets folder "
        "(Prom-core/, Prom-300/, Splice-40/, Cohn-enh/) as manual_dir."
    )

    BUILDER_CONFIGS = _genemask_configs()

    def _split_generators(self, dl_manager):
        config = self.builder_config
        folder = pathlib.Path(dl_manager.manual_dir) / config.folder
        shot_dir = folder / str(config.shots)
        train = _existing(shot_dir / "train.tsv") or _existing(
            shot_dir / f"train_{config.folder.replace('-', '').lower()}_{config.shots}.tsv"
        )
        if train is None:
            raise FileNotFoundError(
                f"genemask_fewshot/{config.name}: no train TSV in {shot_dir}; "
                "manual_dir must be Data-B_fewshot-task-datasets"
            )
        files = {"train": train}
        for split in ("dev", "test"):
            found = _existing(folder / f"{split}.tsv") or _existing(
                folder / "full-dataset" / f"{split}.tsv"
            )
            if found is not None:
                files[split] = found
        return {split: self._generate_examples(path) for split, path in files.items()}

    def _generate_examples(self, path):
        return _labelled_examples(
            tables.read_genemask_tsv(path), num_classes=self.builder_config.num_classes
        )


class Bioscan5m(_LocalBuilder):
    """BIOSCAN-5M DNA barcodes from its metadata TSV, one TFDS split per ``split`` value."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download {BIOSCAN_METADATA} (Zenodo record 11973457, or Hugging Face "
        "bioscan-ml/BIOSCAN-5M) into manual_dir."
    )

    BUILDER_CONFIGS = [
        LabelledConfig(name=level, description=f"BIOSCAN-5M, labels = {level}")
        for level in BIOSCAN_LEVELS
    ]

    def _features(self) -> tfds.features.FeaturesDict:
        features = dict(super()._features())
        features.update(label_name=tfds.features.Text(), processid=tfds.features.Text())
        return tfds.features.FeaturesDict(features)

    def _split_generators(self, dl_manager):
        path = _bioscan_metadata(pathlib.Path(dl_manager.manual_dir))
        level = self.builder_config.name
        table = tables.read_barcode_tsv(
            path, (level,), extra_columns=("processid",), deduplicate=True
        )[level]
        if "split" not in table.extra:
            raise tables.TableFormatError(
                f"{path}: no 'split' column; BIOSCAN-5M metadata has "
                "one (pretrain, train, val, test, ...)"
            )
        split_of = np.asarray(table.extra["split"])
        return {
            split: self._generate_examples((table, np.flatnonzero(split_of == split)))
            for split in sorted(set(split_of.tolist()))
        }

    def _generate_examples(self, table_and_rows):
        table, rows = table_and_rows
        for key, example in _labelled_examples(table, rows):
            label = example["label"]
            yield (
                key,
                {
                    **example,
                    "processid": table.extra["processid"][key],
                    "label_name": table.label_names[label] if label >= 0 else "",
                },
            )


def _bioscan_metadata(manual: pathlib.Path) -> pathlib.Path:
    """The metadata TSV in ``manual``: the official file name, else the only ``*.tsv(.gz)``."""
    official = _existing(manual / BIOSCAN_METADATA)
    if official is not None:
        return official
    found = sorted([*manual.glob("*.tsv"), *manual.glob("*.tsv.gz")])
    if len(found) != 1:
        raise FileNotFoundError(
            f"bioscan5m: expected {BIOSCAN_METADATA} (or exactly one .tsv) in "
            f"{manual}, found {[p.name for p in found]}"
        )
    return found[0]


BUILDERS = {"gue": Gue, "genemask_fewshot": GenemaskFewshot, "bioscan5m": Bioscan5m}


def prepare(
    name: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike
) -> tfds.core.DatasetBuilder:
    """Build ``name`` (``"gue/prom_core_tata"``, ``"genemask_fewshot/prom_core_10"``,
    ``"bioscan5m/species"``) from ``manual_dir`` into ``data_dir`` (no download, array_record).

    A dataset already built in ``data_dir`` is reused. Returns the builder; read it with
    ``tfds.data_source(name, split=..., data_dir=data_dir)`` or ``builder.as_data_source()``.
    """
    builder_name, _, config = name.partition("/")
    if builder_name not in BUILDERS:
        raise ValueError(f"unknown builder {builder_name!r}; valid: {sorted(BUILDERS)}")
    builder = BUILDERS[builder_name](config=config or None, data_dir=os.fspath(data_dir))
    if not pathlib.Path(manual_dir).is_dir():
        raise FileNotFoundError(
            f"{name}: manual_dir {manual_dir} is not a directory. "
            f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(manual_dir), try_download_gcs=False
        )
    )
    return builder
