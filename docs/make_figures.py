"""Draw the README's pictures from the shipped samples: ``python docs/make_figures.py``."""

import pathlib

from gemsjax import curriculum, pmi, viz
from gemsjax.data import samples
from gemsjax.data.fasta import iter_fasta

HERE = pathlib.Path(__file__).parent


def main() -> None:
    ranks = pmi.load_genemask_ranks(samples.sample_path(samples.GENEMASK_RANKS))
    chunk = next(iter_fasta(samples.sample_path(samples.GENOME), chunk_bases=1 << 20))
    seq = chunk.seq.tobytes().decode().replace("N", "")[200_000:200_517]  # 512 tokens, no N
    viz.plot_masks(seq, ranks, path=HERE / "masks.png")
    cm_gems_ppl = [900, 420, 260, 200, 172, 160, 155, 154.5, 154.2, 154.0]  # a plateau at eval 8
    viz.plot_curriculum(
        curriculum.cm_gems(1.0),
        10_000,
        val_metrics=cm_gems_ppl,
        eval_every=500,
        path=HERE / "curriculum_cm_gems.png",
    )
    viz.plot_curriculum(curriculum.cm_step(10_000), 10_000, path=HERE / "curriculum_cm_step.png")


if __name__ == "__main__":
    main()
