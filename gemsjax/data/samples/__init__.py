"""Small real data shipped with the package, so that the default configs run without ../shared.

``samples/README.md`` gives each file's source, licence and how it was cut.
"""

from __future__ import annotations

import importlib.resources
import pathlib

GENOME = "chr22_20-21Mb.fa.gz"
"""Human chr22:20,000,001-21,000,000 FASTA (1 Mbp, 10 % N)."""
PROM_CORE_TRAIN = "prom_core_10shot_train.tsv.gz"
"""GeneMask Prom-core 10-shot train set (20 rows, quoted 6-mer TSV)."""
PROM_CORE_TEST = "prom_core_test_500.tsv.gz"
"""500 rows of the GeneMask Prom-core test set (unquoted 6-mer TSV)."""
BARCODES = "bold_coi_sample.tsv.gz"
"""4,000 BOLD insect COI-5P barcodes (100 species x 40) with a BIOSCAN-style ``split`` column."""

GENEMASK_RANKS = "genemask_pmi_ranking.csv.gz"
"""The published GeneMask 6-mer PMI ranking (4096 rows; ``norm_pmi_rank_rel``), GRCh38 chr1-3."""

NAMES = (GENOME, PROM_CORE_TRAIN, PROM_CORE_TEST, BARCODES, GENEMASK_RANKS)


def sample_path(name: str) -> pathlib.Path:
    """The path of the shipped sample file ``name`` (one of :data:`NAMES`).

    The package must be installed as a directory (a normal or editable install), which is what
    lets the memmap and gzip readers open the files in place.
    """
    if name not in NAMES:
        raise KeyError(f"unknown sample {name!r}; shipped samples: {NAMES}")
    path = pathlib.Path(str(importlib.resources.files(__name__) / name))
    if not path.is_file():
        raise FileNotFoundError(
            f"sample {name!r} is missing at {path}; reinstall gemsjax from a "
            "source tree that has gemsjax/data/samples/"
        )
    return path
