"""Evaluation reports: ``results.json``, ``results.md`` and plots in a workdir, table printed.

A report is a list of rows (dicts) shown as a markdown table over chosen columns. A cell holding
a ``(mean, std)`` pair prints as ``mean ± std``; floats print with 4 decimals. ``results.json``
holds the same rows unformatted (pairs as ``[mean, std]``) plus any ``extra`` entries.
Plots are PNGs drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np


def format_cell(value) -> str:
    """A table cell: ``mean ± std`` for pairs, 4 decimals for floats, ``str`` otherwise."""
    if (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, float | int) for v in value)
    ):
        return f"{value[0]:.4f} ± {value[1]:.4f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` over ``columns`` (missing cells are empty)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    workdir: str | pathlib.Path,
    title: str,
    rows: Sequence[Mapping],
    columns: Sequence[str],
    *,
    notes: Sequence[str] = (),
    extra: Mapping | None = None,
    echo: bool = True,
) -> str:
    """Write ``results.json`` and ``results.md`` into ``workdir``; print the table (``echo``).

    Returns the markdown text (title, table, notes as a bullet list)."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    text = f"## {title}\n\n{markdown_table(rows, columns)}\n"
    if notes:
        text += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    record = dict(
        title=title,
        columns=list(columns),
        rows=[dict(r) for r in rows],
        notes=list(notes),
        **(extra or {}),
    )
    (workdir / "results.json").write_text(json.dumps(record, indent=1, default=_json_default))
    (workdir / "results.md").write_text(text)
    if echo:
        print("\n" + text, flush=True)
    return text


def _json_default(value):
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return str(value)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    path: str | pathlib.Path,
    curves: Mapping[str, tuple[Sequence, Sequence]],
    ylabel: str,
    title: str = "",
) -> None:
    """Line plot of ``{name: (steps, values)}`` (e.g. training loss per draw)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (steps, values) in curves.items():
        ax.plot(steps, values, label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if 1 < len(curves) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(
    path: str | pathlib.Path,
    labels: Sequence[str],
    means: Sequence[float],
    stds: Sequence[float],
    ylabel: str,
    title: str = "",
) -> None:
    """Bars of ``means`` with ``stds`` as error bars (the spread over draws)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(labels) + 2), 3.5))
    ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(
    path: str | pathlib.Path, matrix: np.ndarray, class_names: Sequence[str], title: str = ""
) -> None:
    """A confusion matrix (rows true class, columns predicted) with counts in the cells."""
    plt = _pyplot()
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(3 + 0.4 * len(class_names), 2.5 + 0.4 * len(class_names)))
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names)
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
