"""PMI rank table from genome FASTA files (``--mode=pmi``): GeneMask's normalized dp-PMI ranks
of every 6-mer, the table a genome recipe masks with (``masking.rank_table=<the file>``).

Presets:

- "" (default): the 1 Mb chr22 sample shipped in the package; set ``--config.fasta_paths`` to
  your FASTA file(s) (gzip allowed; several as a tuple, ``'("a.fa.gz", "b.fa.gz")'``).
- ``smoke``: the shipped sample with ``min_count=5``, so most 6-mers are ranked (seconds).
- ``chrX``: the first 70 Mb of human chrX (GRCh37) from the shared data beside the repo.
- key=value, as for the training configs (see gemsjax/config.py).

GeneMask itself counted GRCh38 chr1-3; point ``fasta_paths`` at those files to redo its table.
"""

import pathlib

import ml_collections

from gemsjax import config as base

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHRX_FASTA = SHARED_DATA / "human_grch37_chrX_0-70Mb" / "hs37chrXtrunc.fa.gz"


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.recipe = base.PMI_RECIPE
    c.fasta_paths = ()  # FASTA files whose n-grams are counted; empty: shipped sample
    c.out = "pmi_rank_table.tsv"  # the rank table file, in the workdir
    c.k = 6  # k-mer length of the ranked tokens
    c.max_n = 6  # longest n-gram counted (k..10)
    c.min_count = 101  # k-mers seen fewer times get the worst rank (GeneMask: 101)
    c.denominator = "genemask"  # "genemask": p = count / (2 N); "per_length": per n
    return base.apply_presets(c, arg, PRESETS, sizes=False)


def chrx(c):
    """The first 70 Mb of human chrX (GRCh37)."""
    c.fasta_paths, c.out = (str(CHRX_FASTA),), "pmi_rank_table_chrX.tsv"


def smoke(c):
    """The shipped sample, k-mers seen 5 times ranked."""
    c.min_count = 5


PRESETS = {"smoke": smoke, "chrX": chrx}
