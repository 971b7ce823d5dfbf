"""GPO, VSE∞'s Generalised Pooling Operator (baselines.md §B.1).

GPO pools a padded set ``[B, K, d]`` into ``[B, d]`` with a learned weighting of the *sorted*
features: every dimension is sorted descending over the set, and position ``k`` of the sorted
list gets weight ``w_n[k]``. The weights come from a small bidirectional GRU that reads only
sinusoidal positional encodings, so they depend on the set size ``n`` alone. Max pooling
(``w = [1, 0, ...]``) and mean pooling (``w = 1/n``) are two points of this family.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmkit.models.functional import check_lengths, length_mask

# Score given to padded positions before the softmax (the reference's value). After the division
# by the temperature it is -1e5, whose exp underflows to exactly 0 in float32.
PADDING_SCORE = -10000.0
# Softmax temperature of the reference (``softmax(score / 0.1)``).
TEMPERATURE = 0.1


def positional_encoding(length: int, d_pe: int) -> Tensor:
    """Sinusoidal encodings ``[length, d_pe]`` (float32), §B.1 step 1.

    ``pe[p, i] = sin(p * w_i)``, ``pe[p, i + 1] = cos(p * w_i)`` with
    ``w_i = exp(-i * ln(10000) / d_pe)`` for even ``i``. Computed in float32 in the same order as
    the reference so checkpoint weights see identical inputs. Row ``p`` does not depend on
    ``length``, so a longer table's prefix is the shorter table.
    """
    if d_pe % 2:
        raise ValueError(f"GPO d_pe: expected an even number, found {d_pe}")
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, d_pe, 2, dtype=torch.float32) * -(math.log(10000.0) / d_pe))
    pe = torch.zeros(length, d_pe)
    pe[:, 0::2] = torch.sin(position * frequency)
    pe[:, 1::2] = torch.cos(position * frequency)
    return pe


def sorted_weighted_sum(features: Tensor, lengths: Tensor, weights: Tensor) -> Tensor:
    """§B.1 steps 4-5: sort each dimension descending over the valid positions, weight, sum.

    Args:
        features: ``[B, K, d]``; positions ``>= lengths[b]`` are ignored whatever they hold.
        lengths: ``[B]`` long, ``1 <= n_b <= K``.
        weights: ``[B, K]`` weight of the ``k``-th largest value; zero beyond ``n_b``.

    Returns:
        ``[B, d]``: ``sum_k weights[b, k] * sort_desc(features[b, :n_b, j])[k]``.
    """
    mask = length_mask(lengths.to(features.device), features.shape[1])[:, :, None]
    # -inf (the reference uses -10000) keeps padding last even for features below -10000.
    ordered = features.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True).values
    ordered = ordered.masked_fill(~mask, 0.0)
    return (ordered * weights[:, :, None].to(ordered.dtype)).sum(dim=1)


class GPO(nn.Module):
    """Generalised Pooling Operator ``GPO(d_pe=32, d_hidden=32)`` (baselines.md §B.1).

    Parameters (names match the reference state dict under ``gpool.``): ``gru`` (1-layer
    bidirectional GRU ``d_pe -> d_hidden``) and ``linear`` (``Linear(d_hidden -> 1, bias=False)``).

    ``forward(features [B, K, d], lengths [B]) -> (pooled [B, d], weights [B, K_max])`` where
    ``K_max = lengths.max()``.

    The weights depend only on the set size, so they are computed for the distinct sizes up to
    ``K_max`` rather than per item (one short GRU pass over at most ``K_max`` sequences). When no
    gradient is needed they are cached per size; the cache is keyed on the parameters' in-place
    version counters, so an optimiser step or ``load_state_dict`` invalidates it.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32) -> None:
        super().__init__()
        self.d_pe = d_pe
        self.d_hidden = d_hidden
        self.gru = nn.GRU(d_pe, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)
        self._cache_key: tuple | None = None
        self._cache: Tensor | None = None  # [n_max + 1, n_max] weights table, row n = size n

    def weight_table(self, max_len: int) -> Tensor:
        """``[max_len + 1, max_len]``: row ``n`` holds the weights of a set of size ``n``.

        Row 0 is unused (zeros). Entries ``k >= n`` of row ``n`` are exactly 0.
        """
        if max_len < 1:
            raise ValueError(f"GPO max_len: expected >= 1, found {max_len}")
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if needs_grad:
            return self._compute_table(max_len)
        key = self._parameter_key()
        if self._cache is None or self._cache_key != key or self._cache.shape[1] < max_len:
            self._cache = self._compute_table(max_len).detach()
            self._cache_key = key
        return self._cache[: max_len + 1, :max_len]

    def _parameter_key(self) -> tuple:
        params = tuple(self.parameters())
        # A table computed under CUDA autocast is half precision: never reuse it outside.
        autocast = torch.is_autocast_enabled(params[0].device.type)
        return (autocast, *((p.data_ptr(), p._version, p.dtype, p.device) for p in params))

    def _compute_table(self, max_len: int) -> Tensor:
        weight = self.linear.weight
        sizes = torch.arange(1, max_len + 1)  # pack_padded_sequence wants CPU lengths
        pe = positional_encoding(max_len, self.d_pe).to(device=weight.device, dtype=weight.dtype)
        valid = length_mask(sizes, max_len).to(weight.device)  # [max_len, max_len]
        pes = pe[None].expand(max_len, -1, -1).masked_fill(~valid[:, :, None], 0.0)
        packed = pack_padded_sequence(pes, sizes, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)
        # The two directions are averaged, not concatenated (reference).
        hidden = (out[:, :, : self.d_hidden] + out[:, :, self.d_hidden :]) / 2
        scores = self.linear(hidden).squeeze(-1).masked_fill(~valid, PADDING_SCORE)
        weights = torch.softmax(scores / TEMPERATURE, dim=1)
        return torch.cat([weights.new_zeros(1, max_len), weights], dim=0)

    def pool_weights(self, lengths: Tensor) -> Tensor:
        """``lengths [B]`` -> ``[B, lengths.max()]`` pooling weights (sum 1, zero on padding)."""
        max_len = int(lengths.max())
        table = self.weight_table(max_len)
        return table[lengths.to(table.device)]

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Pool ``features [B, K, d]`` over ``lengths [B]`` -> ``(pooled [B, d], weights [B, K_max])``."""
        if features.dim() != 3:
            raise ValueError(f"GPO features: expected [B, K, d], found shape {tuple(features.shape)}")
        check_lengths(lengths, features.shape[0], features.shape[1], "GPO lengths")
        lengths = lengths.long()
        weights = self.pool_weights(lengths)
        features = features[:, : weights.shape[1]]
        pooled = sorted_weighted_sum(features, lengths, weights.to(features.dtype))
        return pooled, weights


def gpo_weight_table(pools: "dict[str, GPO]", sizes: "dict[str, list[int]]"):
    """The weights learned GPO pools give each *sorted* position, per set size (baselines.md §B.1).

    ``pools``: named pools (``{"regions": model.image_pool, "words": model.text_pool}``);
    ``sizes``: the set sizes to show per name. Returns a DataFrame with one row per (part, set
    size, sorted position): ``part``, ``set size n``, ``sorted position`` (1 = the largest value),
    ``weight``; the weights of one set sum to 1.
    """
    import pandas as pd

    rows = []
    for part, pool in pools.items():
        if part not in sizes:
            raise KeyError(f"gpo_weight_table: no set sizes given for {part!r}; given for {sorted(sizes)}")
        device = next(pool.parameters()).device
        with torch.no_grad():
            for n in sizes[part]:
                weights = pool.pool_weights(torch.tensor([int(n)], device=device))[0].cpu().numpy()
                rows += [{"part": part, "set size n": int(n), "sorted position": k + 1, "weight": float(w)}
                         for k, w in enumerate(weights)]  # fmt: skip
    return pd.DataFrame(rows)
