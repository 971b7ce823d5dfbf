"""The one container that encoders hand to similarity functions.

Every method encodes images and captions into an :class:`Encoded`: a padded set of vectors
(regions or words) with their lengths, or one pooled vector per item, plus optional per-item
extras (a global vector, level features, ...). The evaluator concatenates ``Encoded`` chunks,
the pairwise engine slices them into blocks, and a method's ``score_block`` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Encoded:
    """Encoded items of one modality.

    Attributes:
        feats: ``[n, T, d]`` set features (regions / words, zero beyond ``lengths``) or ``[n, d]``
            pooled embeddings.
        lengths: ``[n]`` long, valid positions along ``T``; ``None`` for pooled ``[n, d]`` feats.
        extras: per-item tensors whose first dimension is ``n`` (e.g. ``"global": [n, d]``).
            Extras with a set axis at dim 1 are padded along it by :meth:`cat` like ``feats``.
    """

    feats: Tensor
    lengths: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.feats.shape[0]
        if self.lengths is not None and self.lengths.shape != (n,):
            raise ValueError(f"Encoded.lengths: expected shape ({n},), found {tuple(self.lengths.shape)}")
        for key, value in self.extras.items():
            if value.shape[0] != n:
                raise ValueError(f"Encoded.extras[{key!r}]: expected first dim {n}, found {value.shape[0]}")

    def __len__(self) -> int:
        return self.feats.shape[0]

    @property
    def mask(self) -> Tensor:
        """``[n, T]`` bool, True at valid positions (all True for pooled feats' single position)."""
        if self.feats.dim() < 3:
            return torch.ones(len(self), 1, dtype=torch.bool, device=self.feats.device)
        steps = torch.arange(self.feats.shape[1], device=self.feats.device)
        if self.lengths is None:
            return torch.ones(self.feats.shape[:2], dtype=torch.bool, device=self.feats.device)
        return steps[None, :] < self.lengths.to(self.feats.device)[:, None]

    def _map(self, fn) -> "Encoded":
        return Encoded(
            fn(self.feats),
            None if self.lengths is None else fn(self.lengths),
            {k: fn(v) for k, v in self.extras.items()},
        )

    def slice(self, start: int, stop: int) -> "Encoded":
        """Items ``start:stop``, trimmed along ``T`` to the longest item kept (views, no copy)."""
        part = self._map(lambda t: t[start:stop])
        return part.trim()

    def select(self, index: Tensor) -> "Encoded":
        return self._map(lambda t: t.index_select(0, index.to(t.device))).trim()

    def trim(self) -> "Encoded":
        """Drop trailing all-padding positions along ``T`` (feats and set-shaped extras)."""
        if self.lengths is None or self.feats.dim() < 3 or len(self) == 0:
            return self
        t_max = int(self.lengths.max())
        if t_max == self.feats.shape[1]:
            return self
        full = self.feats.shape[1]
        extras = {
            k: (v[:, :t_max] if v.dim() >= 3 and v.shape[1] == full else v) for k, v in self.extras.items()
        }
        return Encoded(self.feats[:, :t_max], self.lengths, extras)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Encoded":
        """Move to ``device``; cast floating tensors to ``dtype`` (lengths stay long)."""

        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return self._map(move)

    def detach(self) -> "Encoded":
        return self._map(lambda t: t.detach())

    @staticmethod
    def cat(parts: list["Encoded"]) -> "Encoded":
        """Concatenate chunks along items, zero-padding set axes to the longest chunk."""
        if not parts:
            raise ValueError("Encoded.cat: no parts to concatenate")
        if len(parts) == 1:
            return parts[0]

        def pad_cat(tensors: list[Tensor]) -> Tensor:
            if tensors[0].dim() < 3:
                return torch.cat(tensors, 0)
            t_max = max(t.shape[1] for t in tensors)
            padded = []
            for t in tensors:
                if t.shape[1] < t_max:
                    pad = t.new_zeros((t.shape[0], t_max - t.shape[1], *t.shape[2:]))
                    t = torch.cat([t, pad], 1)
                padded.append(t)
            return torch.cat(padded, 0)

        feats = pad_cat([p.feats for p in parts])
        lengths = None if parts[0].lengths is None else torch.cat([p.lengths for p in parts], 0)
        extras = {k: pad_cat([p.extras[k] for p in parts]) for k in parts[0].extras}
        return Encoded(feats, lengths, extras)
