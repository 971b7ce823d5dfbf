"""Similarity graphs of one (image, caption) pair: similarity vectors, the edges of graph
reasoning, attention filtration (sgraf.md §3.3 d-e).

Drawing only: the numbers come from a method's :class:`~itmkit.models.base.Explanation`
(:meth:`itmkit.methods.sgraf.SGRAF.explain`; get one with
:func:`itmkit.evaluate.explain.explain_pair`). Node 0 of every similarity graph is the global
alignment, nodes ``1..n_words`` the words (``<start>``/``<end>`` included). Images are uint8
``[H, W, 3]``, boxes ``[R, 4]`` ``x1, y1, x2, y2`` in pixels. Every function returns a
matplotlib ``Figure``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from itmkit.figures.alignment import draw_region_weights, word_weights
from itmkit.evaluate.explain import GLOBAL_NODE
from itmkit.models.base import Explanation

FILTRATION_COLOUR = "#4daf4a"


def node_labels(words: Sequence[str]) -> list[str]:
    """Labels of the ``n_words + 1`` graph nodes: the global node, then the words."""
    return [GLOBAL_NODE, *words]


def _part(explanation: Explanation, key: str, words: Sequence[str], figure: str) -> np.ndarray:
    if key not in explanation:
        found = sorted(explanation.parts)
        raise ValueError(f"{figure}: expected a {key!r} part (an SGR / SAF explanation), found {found}")
    if len(words) != explanation.n_words:
        raise ValueError(
            f"{figure} words: expected {explanation.n_words} words (one per valid token), found {len(words)}"
        )
    return np.asarray(explanation[key], dtype=np.float64)


def filtration_figure(image, boxes, words: Sequence[str], explanation: Explanation, top: int = 3,
                      title: str | None = None):  # fmt: skip
    """SAF for one pair: the filtration weight of every similarity node (bars), and, for the
    ``top`` most-kept words, where that word attends in the image (boxes shaded by attention).
    Needs ``filtration_weights`` and ``word_region_weights``."""
    import matplotlib.pyplot as plt

    weights = _part(explanation, "filtration_weights", words, "filtration_figure")
    attention = word_weights(explanation)  # [n_words, n_regions]
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
        draw_region_weights(sub, image, boxes, attention[t], top=2,
                            title=f"'{words[t]}' attends (weight {weights[t + 1]:.2f})")  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def graph_edges_figure(explanation: Explanation, words: Sequence[str], title: str | None = None):
    """SGR for one pair: the edge matrix of every reasoning step (``graph_edges [steps, n_words + 1,
    n_words + 1]``; row = receiving node, column = sending node; rows sum to 1)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    edges = _part(explanation, "graph_edges", words, "graph_edges_figure")
    labels = node_labels(words)
    steps = len(edges)
    fig, axes = plt.subplots(1, steps, figsize=(3.6 * steps, 3.6), squeeze=False)
    # one colour scale for all steps, up to the largest edge (uniform rows would be 1/(L+1))
    top = float(edges.max())
    for i, ax in enumerate(axes[0]):
        sns.heatmap(edges[i], ax=ax, vmin=0, vmax=top, cmap="viridis", square=True, cbar=i == steps - 1,
                    xticklabels=labels, yticklabels=labels if i == 0 else False)  # fmt: skip
        ax.set_title(f"step {i + 1} edges", fontsize=9)
        ax.set_xlabel("sending node")
        if i == 0:
            ax.set_ylabel("receiving node")
        ax.tick_params(labelsize=7)
    fig.suptitle(title or "SGR: message passing between similarity nodes (node 0 is read out)", fontsize=10)
    fig.tight_layout()
    return fig


def similarity_vectors_figure(explanation: Explanation, words: Sequence[str], title: str | None = None):
    """The ``n_words + 1`` similarity vectors of one pair (``similarity_vectors``; rows, unit length
    each) and their cosine to the global node: what SGR / SAF reason over."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    nodes = _part(explanation, "similarity_vectors", words, "similarity_vectors_figure")
    labels = node_labels(words)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.32 * len(labels) + 1.8),
                                      gridspec_kw={"width_ratios": [3, 1]})  # fmt: skip
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


BLOCK_COLOURS = {"i2i": "#1f77b4", "t2t": "#ff7f0e", "i2t": "#2ca02c", "t2i": "#9467bd"}


def batch_graph_matrix_figure(connect, relevance, n_images: int, title: str | None = None):
    """A batch's instance graph as two ``[2B, 2B]`` matrices (hrem.md §3.4): which edges the
    connectivity rule keeps (left) and the relevance of the kept ones (right; dropped ones blank).
    Rows and columns ``0..B-1`` are the images, ``B..2B-1`` the captions; lines mark the blocks."""
    import matplotlib.pyplot as plt

    connect = np.asarray(connect, dtype=bool)
    relevance = np.asarray(relevance, dtype=np.float64)
    n = connect.shape[0]
    if connect.shape != (n, n) or relevance.shape != (n, n) or n != 2 * n_images:
        raise ValueError(f"batch_graph_matrix_figure: expected [2B, 2B] = [{2 * n_images}, {2 * n_images}] matrices, "
                         f"found {connect.shape} and {relevance.shape}")  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.6))
    axes[0].imshow(connect, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title(f"kept edges ({int(connect.sum())} of {n * n})")
    shown = np.where(connect, relevance, np.nan)
    image = axes[1].imshow(shown, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=axes[1], fraction=0.046, pad=0.04, label="relevance")
    axes[1].set_title("relevance of the kept edges")
    for ax in axes:
        ax.axhline(n_images - 0.5, color="red", linewidth=1)
        ax.axvline(n_images - 0.5, color="red", linewidth=1)
        ax.set(xlabel="target node (images | captions)", ylabel="source node (images | captions)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def batch_graph_figure(nodes, edges, max_edges: int = 400, title: str | None = None):
    """A batch's instance graph drawn as nodes and edges: images on the left, captions on the right
    (each at its batch position), every kept edge a line coloured by block (``i2i``, ``t2t``,
    ``i2t``, ``t2i``) with its opacity from the relevance; edges between a pair's own image and
    caption are drawn solid. ``nodes`` / ``edges``: :class:`~itmkit.methods.hrem.BatchGraphTables`
    tables. At most ``max_edges`` edges are drawn (the most relevant)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    required = {"source", "target", "block", "relevance", "same_image"}
    if not required <= set(edges.columns):
        raise ValueError(f"batch_graph_figure edges: expected columns {sorted(required)}, found {sorted(edges.columns)}")
    x = np.where(nodes["modality"].to_numpy() == "image", 0.0, 1.0)
    y = -nodes["position"].to_numpy(dtype=np.float64)
    shown = edges.sort_values("relevance", ascending=False).head(max_edges)
    rel = shown["relevance"].to_numpy(dtype=np.float64)
    span = rel.max() - rel.min() if len(rel) else 0.0
    alpha = 0.15 + 0.75 * ((rel - rel.min()) / span if span > 0 else np.ones_like(rel))
    fig, ax = plt.subplots(figsize=(6.5, max(4.0, 0.22 * len(nodes) / 2)))
    for (_, edge), a in zip(shown.iterrows(), alpha):
        s, t = int(edge["source"]), int(edge["target"])
        bend = 0.25 if x[s] == x[t] else 0.0  # same-side edges bow outwards so they stay visible
        xs = [x[s], x[s] + (bend if x[s] else -bend), x[t]] if bend else [x[s], x[t]]
        ys = [y[s], (y[s] + y[t]) / 2, y[t]] if bend else [y[s], y[t]]
        ax.plot(xs, ys, color=BLOCK_COLOURS[edge["block"]], alpha=float(a), linewidth=2.0 if edge["same_image"] else 0.7,
                linestyle="-" if edge["same_image"] else ":")  # fmt: skip
    ax.scatter(x, y, c=np.where(x == 0, "#333333", "#d62728"), s=28, zorder=3)
    ax.set_xticks([0, 1], labels=["images", "captions"])
    ax.set_yticks([])
    ax.set_xlim(-0.6, 1.6)
    handles = [Line2D([0], [0], color=c, label=k) for k, c in BLOCK_COLOURS.items()]
    handles.append(Line2D([0], [0], color="black", linewidth=2, label="same image (solid)"))
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3)
    ax.set_title(title or f"{len(shown)} of {len(edges)} kept edges")
    fig.tight_layout()
    return fig


def layer_parts(explanation: Explanation, prefix: str) -> dict[str, np.ndarray]:
    """The explanation's per-layer parts ``<prefix>/layer1, layer2, ...`` in layer order (LHSC's
    ``region_graph`` and ``word_attention``), keyed ``"layer k"``."""
    keys = [k for k in explanation.parts if k.startswith(prefix + "/layer")]
    if not keys:
        raise ValueError(f"{explanation.method} explanation: expected parts {prefix}/layer1.., found {sorted(explanation.parts)}")
    keys.sort(key=lambda k: int(k.rsplit("layer", 1)[1]))
    return {f"layer {k.rsplit('layer', 1)[1]}": np.asarray(explanation[k], dtype=np.float64) for k in keys}


def listening_weights(explanation: Explanation, region: int) -> dict[str, np.ndarray]:
    """Which regions region ``region`` listens to in each of LHSC's region-graph layers: its row of
    each layer's affinity ``[r, r]`` with negative entries cut to 0 and the rest scaled to sum 1 (the
    learned affinity is un-normalised and may be negative, lhsc.md §3.1), for drawing on the boxes."""
    rows = {}
    for name, graph in layer_parts(explanation, "region_graph").items():
        if not 0 <= region < graph.shape[0]:
            raise IndexError(f"listening_weights: region {region}: expected an index in [0, {graph.shape[0]})")
        row = np.clip(graph[region], 0.0, None)
        rows[name] = row / row.sum() if row.sum() > 0 else np.full_like(row, 1.0 / len(row))
    return rows


def word_attention_figure(explanation: Explanation, words: Sequence[str], title: str | None = None):
    """LHSC's word self-attention, one heatmap per layer (row = the word being updated, column =
    the word it reads), ``word_attention/layer{k} [n, n]``."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    layers = layer_parts(explanation, "word_attention")
    n = len(words)
    for name, values in layers.items():
        if values.shape != (n, n):
            raise ValueError(f"word_attention_figure {name}: expected [{n}, {n}] for {n} words, found {values.shape}")
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 3.6), squeeze=False)
    for ax, (name, values) in zip(axes[0], layers.items()):
        sns.heatmap(values, ax=ax, cmap="magma", xticklabels=list(words), yticklabels=list(words), cbar=False, square=True)
        ax.set_title(name)
        ax.tick_params(labelsize=6)
    fig.suptitle(title or f"{explanation.method}: word self-attention (row attends to column)")
    fig.tight_layout()
    return fig
