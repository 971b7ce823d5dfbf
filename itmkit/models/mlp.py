"""VSE∞'s residual MLP on region features (baselines.md §B.2 step 2; ``lib/modules/mlp.py``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """``num_layers`` Linear layers with BatchNorm + ReLU between them.

    ``MLP(2048, 512, 1024, 2)``: ``Linear(2048 -> 512) -> BatchNorm1d(512) -> ReLU -> Linear(512 -> 1024)``.
    Module names ``layers.{i}`` and ``bns.{i}`` match the reference state dict. One BatchNorm is
    created per layer *including the last*, which is never applied: the reference does the same,
    and its checkpoints carry that unused ``bns.{last}`` (kept so they load strictly).

    ``forward(x [..., input_dim]) -> [..., output_dim]``. All leading dimensions are flattened into
    rows before the BatchNorm, so statistics run over every row, padded set positions included
    (the reference's behaviour for ``[B, K, D]`` region sets; train-mode outputs depend on the
    batch, eval mode does not).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int = 2) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP num_layers: expected >= 1, found {num_layers}")
        self.output_dim = output_dim
        hidden = [hidden_dim] * (num_layers - 1)
        sizes_in = [input_dim, *hidden]
        sizes_out = [*hidden, output_dim]
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip(sizes_in, sizes_out))
        self.bns = nn.ModuleList(nn.BatchNorm1d(n_out) for n_out in sizes_out)

    def forward(self, x: Tensor) -> Tensor:
        leading = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        last = len(self.layers) - 1
        for index, (layer, norm) in enumerate(zip(self.layers, self.bns)):
            rows = layer(rows)
            if index < last:
                rows = F.relu(norm(rows))
        return rows.reshape(*leading, self.output_dim)
