"""Figures of SGRAF's inner workings for one (image, caption) pair (sgraf.md §2-§3).

Drawing only: the numbers come from :meth:`itmkit.methods.sgraf.SGRAF.explain`, sliced to one pair
with :func:`pair_details`. Node 0 of every similarity graph is the global alignment, nodes
``1..L`` the words (``<start>``/``<end>`` included). Images are uint8 ``[H, W, 3]``, boxes
``[K, 4]`` ``x1, y1, x2, y2`` in pixels. Every function returns a matplotlib ``Figure``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from itmkit.alignment_figures import draw_region_weights

GLOBAL_NODE = "<global>"
FILTRATION_COLOUR = "#4daf4a"


def pair_details(details: Mapping, image: int, caption: int, n_words: int) -> dict[str, np.ndarray]:
    """One pair's slice of :meth:`SGRAF.explain` output, trimmed to its ``n_words`` valid words:
    ``attention [R, L]``, ``nodes [L+1, s]``, ``filtration_weights [L+1]`` (SAF),
    ``sgr_edges{i} [L+1, L+1]`` (SGR), ``score``."""
    out: dict[str, np.ndarray] = {}
    for key, value in details.items():
        v = value[image, caption].detach().cpu().double().numpy()
        if key == "attention":
            v = v[:, :n_words]
        elif key == "attended":
            v = v[:n_words]
        elif key in ("nodes", "filtration_weights") or key.startswith("sgr_step"):
            v = v[: n_words + 1]
        elif key.startswith("sgr_edges"):
            v = v[: n_words + 1, : n_words + 1]
        out[key if key != "scores" else "score"] = v
    return out


def node_labels(words: Sequence[str]) -> list[str]:
    return [GLOBAL_NODE, *words]


def _check_words(words: Sequence[str], count: int, what: str) -> None:
    if len(words) != count:
        raise ValueError(f"{what}: expected {count} words (one per valid token), found {len(words)}")


def filtration_figure(image, boxes, words: Sequence[str], pair: Mapping[str, np.ndarray], top: int = 3,
                      title: str | None = None):
    """SAF for one pair: the filtration weight of every similarity node (bars), and, for the
    ``top`` most-kept words, where that word attends in the image (boxes shaded by attention).

    ``pair``: :func:`pair_details` of an SAF model (needs ``filtration_weights`` and ``attention``).
    """
    import matplotlib.pyplot as plt

    weights, attention = np.asarray(pair["filtration_weights"]), np.asarray(pair["attention"])
    _check_words(words, attention.shape[1], "filtration_figure words")
    labels = node_labels(words)
    kept = [int(t) for t in np.argsort(-weights[1:])[:top]]  # word indices, most kept first
    fig = plt.figure(figsize=(3.0 * max(top, 2), 5.6))
    grid = fig.add_gridspec(2, top, height_ratios=[1.0, 1.25])
    ax = fig.add_subplot(grid[0, :])
    colours = ["#999999"] + [FILTRATION_COLOUR if t in kept else "#a6d96a" for t in range(len(words))]
    ax.bar(range(len(labels)), weights, color=colours)
    ax.axhline(1.0 / len(labels), color="black", linewidth=0.8, linestyle="--", label="uniform")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("filtration weight")
    ax.set_xlabel("similarity node")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("SAF: which alignments count (weights sum to 1)", fontsize=9)
    for rank, t in enumerate(kept):
        sub = fig.add_subplot(grid[1, rank])
        draw_region_weights(sub, image, boxes, attention[:, t], top=2,
                            title=f"'{words[t]}' attends (weight {weights[t + 1]:.2f})")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def graph_edges_figure(pair: Mapping[str, np.ndarray], words: Sequence[str], title: str | None = None):
    """SGR for one pair: the edge matrix of every reasoning step (row = receiving node,
    column = sending node; rows sum to 1). ``pair``: :func:`pair_details` of an SGR model run
    through :meth:`SGRAF.explain` (all steps)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    steps = sorted((k for k in pair if k.startswith("sgr_edges")), key=lambda k: int(k[len("sgr_edges"):]))
    if not steps:
        raise ValueError("graph_edges_figure pair: expected sgr_edges{i} entries (an SGR model's explain()), found none")
    labels = node_labels(words)
    _check_words(words, pair[steps[0]].shape[0] - 1, "graph_edges_figure words")
    fig, axes = plt.subplots(1, len(steps), figsize=(3.6 * len(steps), 3.6), squeeze=False)
    # one colour scale for all steps, up to the largest edge (uniform rows would be 1/(L+1))
    top = max(float(np.max(pair[key])) for key in steps)
    for i, (ax, key) in enumerate(zip(axes[0], steps)):
        sns.heatmap(pair[key], ax=ax, vmin=0, vmax=top, cmap="viridis", square=True, cbar=i == len(steps) - 1,
                    xticklabels=labels, yticklabels=labels if i == 0 else False)
        ax.set_title(f"step {i + 1} edges", fontsize=9)
        ax.set_xlabel("sending node")
        if i == 0:
            ax.set_ylabel("receiving node")
        ax.tick_params(labelsize=7)
    fig.suptitle(title or "SGR: message passing between similarity nodes (node 0 is read out)", fontsize=10)
    fig.tight_layout()
    return fig


def similarity_vectors_figure(pair: Mapping[str, np.ndarray], words: Sequence[str], title: str | None = None):
    """The ``L+1`` similarity representation vectors of one pair (rows; unit length each) and
    their cosine similarities to the global node: what SGR/SAF reason over."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    nodes = np.asarray(pair["nodes"])
    labels = node_labels(words)
    _check_words(words, nodes.shape[0] - 1, "similarity_vectors_figure words")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.32 * len(labels) + 1.8),
                                      gridspec_kw={"width_ratios": [3, 1]})
    sns.heatmap(nodes, ax=left, cmap="magma", yticklabels=labels, xticklabels=False, cbar_kws={"label": "value"})
    left.set_xlabel(f"similarity dimension (s = {nodes.shape[1]})")
    left.set_ylabel("node")
    left.set_title("similarity vectors l2norm(W (x - y)²)", fontsize=9)
    cosine = nodes @ nodes[0]
    right.barh(range(len(labels)), cosine, color="#377eb8")
    right.set_yticks(range(len(labels)), labels, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("cosine to the global node")
    fig.suptitle(title or "Similarity representations of one image-caption pair", fontsize=10)
    fig.tight_layout()
    return fig
