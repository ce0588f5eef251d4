"""PMI rank table from genome FASTA files (``--mode=pmi``): GeneMask's normalized dp-PMI ranks.

Presets (``--config=configs/pmi.py:<preset>``):

- (none): the genome sample shipped in the package; set ``--config.fasta_paths`` (a tuple,
  or the flag repeated) to your FASTA files (gzip allowed).
- ``chrX``: the first 70 Mb of human chrX (GRCh37) from the shared data beside the repo.

GeneMask itself counted GRCh38 chr1-3; point ``fasta_paths`` at those files to redo its table.
"""

import pathlib

import ml_collections

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHRX_FASTA = SHARED_DATA / "human_grch37_chrX_0-70Mb" / "hs37chrXtrunc.fa.gz"

PRESETS = ("chrX",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The PMI config; ``arg`` names a preset from :data:`PRESETS` (or is empty)."""
    config = ml_collections.ConfigDict()
    config.fasta_paths = ()  # FASTA files whose n-grams are counted (each record separately)
    config.out = "pmi_rank_table.tsv"  # the rank table file (gemsjax.pmi.save_rank_table format)
    config.k = 6  # k-mer length of the ranked tokens
    config.max_n = 6  # longest n-gram counted (k..10)
    config.min_count = 101  # k-mers seen fewer times get the worst rank (GeneMask: 101)
    config.denominator = "genemask"  # "genemask": p = count / (2 N); "per_length": per n
    if arg == "chrX":
        config.fasta_paths = (str(CHRX_FASTA),)
        config.out = "pmi_rank_table_chrX.tsv"
    elif arg:
        raise ValueError(f"unknown preset {arg!r} for configs/pmi.py; valid: {PRESETS}")
    return config
