"""BIN reconstruction (zero-shot clustering) and 2-D maps of embeddings.

BarcodeBERT's ``ZSC_Taxa.ipynb`` protocol, which BarcodeMAE reports: UMAP of the embeddings
(cosine metric, 10 neighbours, ``random_state=42``; 64 components, fewer when there are few
points), then Ward agglomerative clustering with as many clusters as there are distinct BINs,
scored against the BINs by adjusted mutual information. umap-learn and scikit-learn do the work
(``pip install ".[eval]"``); umap-learn compiles its kernels with numba on first use (about
10-20 s once per process).
"""

from __future__ import annotations

import warnings

import numpy as np

UMAP_NEIGHBOURS = 10
UMAP_SEED = 42


def umap_reduce(x: np.ndarray, components: int) -> np.ndarray:
    """``float32[N, components]``: cosine UMAP of ``x: float[N, D]`` (components capped at
    ``N - 2``, spectral init needs that many)."""
    import umap

    components = max(1, min(components, len(x) - 2))
    reducer = umap.UMAP(
        n_components=components,
        n_neighbors=min(UMAP_NEIGHBOURS, len(x) - 1),
        metric="cosine",
        random_state=UMAP_SEED,
        n_jobs=1,
    )
    with warnings.catch_warnings():  # "n_jobs overridden by random_state": seeded on purpose
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        return np.asarray(reducer.fit_transform(np.asarray(x, np.float32)), np.float32)


def cluster_ami(reduced: np.ndarray, labels: np.ndarray) -> float:
    """AMI of Ward clusters of ``reduced: float[N, C]`` (as many as distinct ``labels: int[N]``)
    against ``labels``."""
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import adjusted_mutual_info_score

    clusters = AgglomerativeClustering(
        n_clusters=len(np.unique(labels)), linkage="ward"
    ).fit_predict(reduced)
    return float(adjusted_mutual_info_score(labels, clusters))


def bin_reconstruction_ami(x: np.ndarray, bins: np.ndarray, components: int = 64) -> float:
    """UMAP (cosine) of ``x: float[N, D]`` then Ward clustering into as many clusters as
    distinct ``bins: int[N]``, scored by adjusted mutual information with the BINs."""
    if len(x) < 4 or len(np.unique(bins)) < 2:
        raise ValueError(
            f"BIN reconstruction needs >= 4 barcodes in >= 2 BINs, got {len(x)} in "
            f"{len(np.unique(bins))}"
        )
    return cluster_ami(umap_reduce(x, components), bins)


def plot_map(path, xy: np.ndarray, groups: list[str], title: str, max_legend: int = 12) -> None:
    """A scatter of ``xy: float[N, 2]`` coloured by ``groups`` (N names; the ``max_legend``
    largest groups get a colour and a legend entry, the rest are grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, counts = np.unique(groups, return_counts=True)
    shown = names[np.argsort(-counts, kind="stable")][:max_legend]
    groups = np.asarray(groups)
    fig, ax = plt.subplots(figsize=(7, 6))
    rest = ~np.isin(groups, shown)
    ax.scatter(xy[rest, 0], xy[rest, 1], s=3, c="lightgrey", label="other" if rest.any() else None)
    colours = plt.get_cmap("tab20" if len(shown) > 10 else "tab10")
    for i, name in enumerate(shown):
        at = groups == name
        ax.scatter(xy[at, 0], xy[at, 1], s=4, color=colours(i), label=f"{name} ({at.sum()})")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
