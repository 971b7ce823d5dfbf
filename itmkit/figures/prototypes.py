"""Clustering prototypes and fusion gates of an embedding model (AAHR, aahr.md §3.2, §3.5).

Data: the arrays of :class:`itmkit.methods.aahr.SetViews` (soft assignments ``[n, K]``, gates
``[n, d]``) passed as numpy arrays, never a model. Every function returns the
:class:`matplotlib.figure.Figure` and, given ``save=path``, writes it as well.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from itmkit.figures.curves import finish_figure


def _check_assign(name: str, q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] < 1:
        raise ValueError(f"{name}: expected soft assignments [n, K], found shape {q.shape}")
    return q


def prototype_figure(image_assign: np.ndarray, caption_assign: np.ndarray, caption_image: np.ndarray,
                     n_captions: int = 20, title: str | None = None, save: str | Path | None = None) -> Figure:
    """Left: images and captions per prototype (each item counted at its largest assignment).
    Right: the soft assignments ``q`` of the first ``n_captions`` captions (rows, 5 per image)
    over the prototypes, with each caption's own image's prototype marked (x)."""
    q_img, q_cap = _check_assign("image_assign", image_assign), _check_assign("caption_assign", caption_assign)
    if q_img.shape[1] != q_cap.shape[1] or len(caption_image) != len(q_cap):
        raise ValueError(f"prototype_figure: expected K alike and one image per caption, found {q_img.shape}, "
                         f"{q_cap.shape}, {len(caption_image)} caption images")  # fmt: skip
    k = q_img.shape[1]
    img_top, cap_top = q_img.argmax(1), q_cap.argmax(1)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 1.3]})
    x = np.arange(k)
    axes[0].bar(x - 0.2, np.bincount(img_top, minlength=k), width=0.4, label="images")
    axes[0].bar(x + 0.2, np.bincount(cap_top, minlength=k) / 5, width=0.4, label="captions / 5")
    axes[0].set(xlabel="prototype", ylabel="items (largest assignment)", title="who sits in each prototype")
    axes[0].legend(fontsize=8)
    shown = q_cap[:n_captions]
    # colour scale from 0 to the largest shown q: assignments near uniform (1/K) stay readable
    sns.heatmap(shown, ax=axes[1], cmap="rocket_r", vmin=0, vmax=float(shown.max()), yticklabels=5,
                cbar_kws={"label": f"q (soft assignment; uniform = 1/{k} = {1 / k:.3f})"})
    own = img_top[np.asarray(caption_image)[:n_captions]]
    axes[1].scatter(own + 0.5, np.arange(len(shown)) + 0.5, marker="x", color="tab:blue", s=30, label="own image's prototype")
    axes[1].set(xlabel="prototype", ylabel="caption", title="captions' soft assignments (Sinkhorn)")
    axes[1].legend(fontsize=8, loc="lower right")
    return finish_figure(fig, title or "Clustering prototypes: shared clusters and soft positives", save)


def gate_figure(image_gate: np.ndarray, caption_gate: np.ndarray, title: str | None = None,
                save: str | Path | None = None) -> Figure:
    """Histograms of the fusion gate ``g`` (share of the pooled local embedding, per dimension
    and item; ``1 − g`` goes to the global feature) for images and captions, and each item's mean."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, values, what in ((axes[0], None, "every dimension"), (axes[1], "mean", "per-item mean")):
        for gate, label in ((image_gate, "images"), (caption_gate, "captions")):
            gate = np.asarray(gate, dtype=np.float64)
            if gate.ndim != 2:
                raise ValueError(f"gate_figure {label}: expected gates [n, d], found shape {gate.shape}")
            data = gate.mean(1) if values == "mean" else gate.ravel()
            ax.hist(data, bins=40, range=(0, 1), alpha=0.6, label=label, density=True)
        ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel="g  (1 = local embedding only, 0 = global feature only)", ylabel="density", title=what)
        ax.legend(fontsize=8)
    return finish_figure(fig, title or "Fusion gate: how much of the local embedding each item keeps", save)
