"""gemsjax.viz: mask and curriculum figures on a real chr22 window, written as PNGs."""

import pathlib

import jax
import masking_reference as ref
import numpy as np
import pytest
from matplotlib.figure import Figure

from gemsjax import curriculum, masking, viz
from gemsjax.pmi import load_genemask_ranks

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: pathlib.Path, min_bytes: int):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > min_bytes


def test_plot_masks_over_a_chr22_window(tmp_path):
    ranks = load_genemask_ranks(ref.RANKS)
    seq = ref.read_fasta(ref.CHR22).replace("N", "")[:517]  # 512 6-mers
    ids, special = viz.tokenize(seq)
    assert ids.shape == (1, 512) and (~special).sum() == 510  # truncated to CLS + 510 + SEP
    fig = viz.plot_masks(seq, ranks, path=tmp_path / "figs" / "masks.png")
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    _assert_png(tmp_path / "figs" / "masks.png", 20_000)
    profile = fig.axes[0].lines[0].get_ydata()
    np.testing.assert_array_equal(profile, ranks[ids[0][~special[0]]])
    shown = fig.axes[2].images[0].get_array()[0]
    expected = masking.genemask(jax.random.key(0), ids, special, ranks)
    np.testing.assert_array_equal(np.asarray(shown, bool), np.asarray(expected)[0])


def test_curriculum_weights_and_plots(tmp_path):
    cm_gems = curriculum.cm_gems(threshold=1.0)
    perplexities = [300.0, 120.0, 60.0, 40.0, 30.0, 25.0, 22.0, 21.5, 21.0]  # |Δ| < 1 at eval 8
    steps = np.array([0, 3_999, 4_000, 4_499, 4_500, 9_000])
    weights = viz.curriculum_weights(cm_gems, steps, perplexities, eval_every=500)
    genemask, global_pmi = (masking.strategy_index(s) for s in ("genemask", "global_pmi"))
    np.testing.assert_array_equal(weights[:, global_pmi], [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(weights[:, genemask], [1, 1, 0, 0, 0, 0])
    fig = viz.plot_curriculum(
        cm_gems, 10_000, val_metrics=perplexities, path=tmp_path / "cm_gems.png"
    )
    assert fig.axes[0].get_legend_handles_labels()[1] == ["genemask", "global_pmi"]
    _assert_png(tmp_path / "cm_gems.png", 5_000)
    cm_step = curriculum.cm_step(10_000)
    weights = viz.curriculum_weights(cm_step, np.array([0, 2_550, 10_000]))
    assert weights[:, masking.strategy_index("global_pmi")] == pytest.approx([0.0, 0.25, 1.0])
    viz.plot_curriculum(cm_step, 10_000, path=tmp_path / "cm_step.png")
    _assert_png(tmp_path / "cm_step.png", 5_000)
