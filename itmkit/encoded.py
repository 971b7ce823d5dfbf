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


class EncodedWriter:
    """Fills an :class:`Encoded` of ``n`` items batch by batch, each batch at the rows it belongs to.

    Encoding a split batch by batch and then concatenating (:meth:`Encoded.cat`) and reordering
    (:meth:`Encoded.select`) holds every batch, the concatenation and the reordered copy at once:
    three times the result. The writer allocates the result once (set axes padded to the longest
    item so far, grown if a later batch is longer) and copies each batch into place, so encoding
    holds the result plus one batch. At Flickr30K test size with ``d = 1024`` the padded caption
    set alone is 1.6 GB.

    Args:
        n: items of the result.
        t_max: expected longest set (e.g. the longest caption's token count); a longer batch
            still fits (the buffer grows), a shorter hint only costs a trim at the end.
    """

    def __init__(self, n: int, t_max: int | None = None) -> None:
        self.n, self.t_max = int(n), t_max
        self.feats: Tensor | None = None
        self.lengths: Tensor | None = None
        self.extras: dict[str, Tensor] = {}
        self.written = torch.zeros(self.n, dtype=torch.bool)

    def _buffer(self, current: Tensor | None, part: Tensor, hint: int | None = None) -> Tensor:
        """``current`` (or a new zero buffer) able to hold ``part``'s rows; set axes (dim >= 3) grown."""
        if current is None:
            shape = list(part.shape)
            shape[0] = self.n
            if part.dim() >= 3 and hint is not None:
                shape[1] = max(shape[1], hint)
            return part.new_zeros(shape)
        if part.dim() >= 3 and part.shape[1] > current.shape[1]:
            grown = current.new_zeros((self.n, part.shape[1], *current.shape[2:]))
            grown[:, : current.shape[1]] = current
            return grown
        return current

    @staticmethod
    def _put(buffer: Tensor, rows: Tensor, part: Tensor) -> None:
        if part.dim() >= 3:
            buffer[rows, : part.shape[1]] = part
            if part.shape[1] < buffer.shape[1]:
                buffer[rows, part.shape[1] :] = 0
        else:
            buffer[rows] = part

    def write(self, rows: Tensor | range, part: "Encoded") -> None:
        """Put ``part``'s items at ``rows`` (``[len(part)]`` indices into the result)."""
        rows = torch.as_tensor(list(rows) if isinstance(rows, range) else rows, dtype=torch.long)
        if rows.shape != (len(part),):
            raise ValueError(f"EncodedWriter.write: {len(part)} items for {tuple(rows.shape)} rows")
        part = part.to("cpu")
        self.feats = self._buffer(self.feats, part.feats, self.t_max)
        self._put(self.feats, rows, part.feats)
        if part.lengths is not None:
            self.lengths = self._buffer(self.lengths, part.lengths)
            self._put(self.lengths, rows, part.lengths)
        for key, value in part.extras.items():
            self.extras[key] = self._buffer(self.extras.get(key), value)
            self._put(self.extras[key], rows, value)
        self.written[rows] = True

    def result(self) -> "Encoded":
        """The filled :class:`Encoded`, trimmed to its longest item; every row must have been written."""
        if self.feats is None or not bool(self.written.all()):
            missing = int((~self.written).sum())
            raise ValueError(f"EncodedWriter.result: {missing} of {self.n} items were never written")
        return Encoded(self.feats, self.lengths, self.extras).trim()
