"""Figures for notebooks and the README: masks per strategy, PMI-rank profile, curriculum mix.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot state, no backend
switch), so they render headless through Agg when saved and display inline in notebooks. Every
function returns the Figure and, given ``path``, also writes it as a PNG.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from gemsjax import masking
from gemsjax.curriculum import Curriculum
from gemsjax.tokenizers import KmerTokenizer

COLORS = {
    "random_span": "#4C72B0",
    "genemask": "#DD8452",
    "global_pmi": "#55A868",
    "mae_drop": "#8172B3",
}


def _save(fig: Figure, path: str | pathlib.Path | None, dpi: int) -> Figure:
    if path is not None:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    return fig


def tokenize(seq: str, max_len: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """One DNA sequence as DNABERT 6-mer ids ``int32[1, max_len]`` and specials ``bool[1, max_len]``
    (``[CLS] k-mers [SEP] [PAD]...``; a longer sequence is truncated)."""
    tokenizer = KmerTokenizer(k=6, vocab="dnabert")
    ids, _ = tokenizer.encode([seq], max_len)
    return ids, ids < tokenizer.vocab.num_specials


def plot_masks(
    seq: str,
    rank_table: np.ndarray,
    *,
    key: jax.Array | None = None,
    strategies: Sequence[str] = ("random_span", "genemask", "global_pmi"),
    params: masking.MaskParams | None = None,
    max_len: int = 512,
    path: str | pathlib.Path | None = None,
    dpi: int = 120,
) -> Figure:
    """The PMI-rank profile of a sequence and one mask per strategy drawn over it.

    Args:
      seq: a DNA sequence (e.g. 517 bp of the chr22 segment give a full 512-token window).
      rank_table: ``int32[V]`` indexed by token id (DNABERT layout).
      key: PRNG key for the masks (default ``jax.random.key(0)``); all strategies share it.
      strategies: names from :data:`gemsjax.masking.STRATEGIES`, one row each.
      params: masking probabilities (:class:`gemsjax.masking.MaskParams`; default: its
        defaults).
      max_len: token window length.
      path: optional PNG path.
      dpi: PNG resolution.

    Returns:
      The Figure: top, the rank of each token (log scale, best at the top); below, the masked
      positions of each strategy with the masked fraction of the k-mer tokens.
    """
    ids, special = tokenize(seq, max_len)
    key = jax.random.key(0) if key is None else key
    functions = masking.strategy_functions(params or masking.MaskParams())
    fig = Figure(figsize=(11, 1.6 + 0.8 * len(strategies)), layout="constrained")
    axes = fig.subplots(
        1 + len(strategies), 1, sharex=True, height_ratios=[2.5] + [1] * len(strategies)
    )
    valid = ~special[0]
    positions = np.flatnonzero(valid)
    token_ranks = np.asarray(rank_table)[ids[0]]
    axes[0].plot(positions, token_ranks[valid], lw=0.6, color="0.3")
    axes[0].set_yscale("log")
    axes[0].invert_yaxis()
    axes[0].set_ylabel("PMI rank")
    axes[0].set_title(f"{valid.sum()} 6-mer tokens; masks drawn with one key")
    for ax, name in zip(axes[1:], strategies, strict=True):
        mask = np.asarray(
            functions[masking.strategy_index(name)](
                key, jnp.asarray(ids), jnp.asarray(special), jnp.asarray(rank_table)
            )
        )[0]
        ax.imshow(
            mask[None, :],
            aspect="auto",
            interpolation="nearest",
            cmap=ListedColormap(["#f2f2f2", COLORS[name]]),
            vmin=0,
            vmax=1,
            extent=(-0.5, mask.size - 0.5, 0, 1),
        )
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
        ax.text(1.0, 0.5, f" {mask[valid].mean():.1%}", transform=ax.transAxes, va="center")
    axes[-1].set_xlabel("token position")
    return _save(fig, path, dpi)


def curriculum_weights(
    curriculum: Curriculum,
    steps: np.ndarray,
    val_metrics: Sequence[float] = (),
    eval_every: int = 500,
) -> np.ndarray:
    """Strategy weights ``float32[len(steps), S]`` at each step, given validation metrics.

    ``val_metrics[i]`` is the metric of the validation after step ``(i + 1) * eval_every``; the
    state at a step has recorded every validation up to it.
    """
    states = [curriculum.init()]
    for index, metric in enumerate(val_metrics):
        states.append(curriculum.update(states[-1], metric, (index + 1) * eval_every))
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    steps = jnp.asarray(steps, jnp.int32)
    seen = jnp.minimum(steps // eval_every, len(val_metrics))
    at_step = jax.tree.map(lambda leaf: leaf[seen], stacked)
    return np.asarray(jax.vmap(curriculum.schedule)(steps, at_step))


def plot_curriculum(
    curriculum: Curriculum,
    num_steps: int,
    *,
    val_metrics: Sequence[float] = (),
    eval_every: int = 500,
    points: int = 400,
    path: str | pathlib.Path | None = None,
    dpi: int = 120,
) -> Figure:
    """The curriculum's strategy mix over training (stacked weights per strategy).

    Args:
      curriculum: a :class:`gemsjax.curriculum.Curriculum`.
      num_steps: training steps on the x axis.
      val_metrics: validation metrics (perplexities) fed to ``update`` every ``eval_every`` steps
        (needed to show CM-GEMS's switch).
      eval_every: steps between validations.
      points: steps sampled along the axis.
      path: optional PNG path.
      dpi: PNG resolution.

    Returns:
      The Figure.
    """
    steps = np.unique(np.linspace(0, num_steps, points).astype(np.int64))
    weights = curriculum_weights(curriculum, steps, val_metrics, eval_every)
    shown = [i for i in range(len(masking.STRATEGIES)) if weights[:, i].any()]
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.stackplot(
        steps,
        weights[:, shown].T,
        step="post",
        labels=[masking.STRATEGIES[i] for i in shown],
        colors=[COLORS[masking.STRATEGIES[i]] for i in shown],
    )
    ax.set_xlim(0, num_steps)
    ax.set_ylim(0, 1)
    ax.set_xlabel("training step")
    ax.set_ylabel("strategy weight")
    ax.set_title(f"curriculum: {curriculum.name}")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _save(fig, path, dpi)


def plot_training_curves(
    records: Sequence[dict],
    switch_step: int | None = None,
    *,
    window: int = 5,
    path: str | pathlib.Path | None = None,
    dpi: int = 120,
) -> Figure:
    """A run's curves from its ``metrics.jsonl`` records: training and validation loss,
    validation perplexity, and the masking mix (share of batches per strategy, mean over
    ``window`` steps), over the steps (updates done); ``switch_step`` (the CM-GEMS switch) is
    marked on every panel.

    Args:
      records: ``metrics.jsonl`` lines: train records (``loss``, ``mix/<strategy>``) and
        validation records (``val_loss``, ``val_perplexity``), each with its ``step``.
      switch_step: the step after which the curriculum switched, or None.
      window: steps per point of the masking-mix curve.
      path: optional PNG path.
      dpi: PNG resolution.

    Returns:
      The Figure.
    """
    train = sorted({r["step"]: r for r in records if "loss" in r}.values(), key=lambda r: r["step"])
    val = sorted(
        {r["step"]: r for r in records if "val_loss" in r}.values(), key=lambda r: r["step"]
    )
    fig = Figure(figsize=(8, 7), layout="constrained")
    loss_ax, ppl_ax, mix_ax = fig.subplots(3, 1, sharex=True)
    loss_ax.plot(
        [r["step"] for r in train],
        [r["loss"] for r in train],
        lw=0.8,
        color="#999999",
        label="training loss",
    )
    loss_ax.plot(
        [r["step"] for r in val],
        [r["val_loss"] for r in val],
        "o-",
        ms=3,
        color="#C44E52",
        label="validation loss",
    )
    loss_ax.set_ylabel("masked-LM loss")
    ppl_ax.plot(
        [r["step"] for r in val], [r["val_perplexity"] for r in val], "o-", ms=3, color="#C44E52"
    )
    ppl_ax.set_ylabel("validation perplexity")
    strategies = [s for s in masking.STRATEGIES if any(r.get(f"mix/{s}") for r in train)]
    if train and strategies:
        steps = np.array([r["step"] for r in train])
        mix = np.array([[r.get(f"mix/{s}", 0.0) for s in strategies] for r in train])
        starts = np.arange(0, len(steps), window)
        means = np.add.reduceat(mix, starts) / np.diff(np.append(starts, len(steps)))[:, None]
        edges = np.append(steps[starts] - 1, steps[-1])  # window i covers (edges[i], edges[i+1]]
        mix_ax.stackplot(
            edges,
            np.vstack([means, means[-1:]]).T,
            step="post",
            labels=strategies,
            colors=[COLORS[s] for s in strategies],
        )
        mix_ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    mix_ax.set_ylim(0, 1)
    mix_ax.set_ylabel("masking mix")
    mix_ax.set_xlabel("step (updates done)")
    for ax in (loss_ax, ppl_ax, mix_ax):
        if switch_step is not None:
            ax.axvline(switch_step, color="black", ls="--", lw=1)
    if switch_step is not None:
        loss_ax.text(
            switch_step,
            1.0,
            f" switch at step {switch_step}",
            va="bottom",
            transform=loss_ax.get_xaxis_transform(),
        )
    loss_ax.legend(frameon=False)
    return _save(fig, path, dpi)
