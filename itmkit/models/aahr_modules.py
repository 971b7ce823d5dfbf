"""AAHR's building blocks on top of HREM's (aahr.md §3.2, §3.5-3.7).

- :class:`GlobalProjection`: the frozen global (CLIP) feature -> ``d`` (``fc_clip``: two parallel
  Linear layers summed).
- :class:`GuidedAttentionPooling`: the global vector guides an attention pooling over the
  contextualised fragments (``mha_pool``: independent full-width heads, mean over heads).
- :class:`GatedFusion`: ``f = g ⊙ ê + (1 − g) ⊙ ĉ``, ``g = σ(W [ê; ĉ] + b)`` (``gated_fusion``).
- :func:`sinkhorn`, :func:`swapped_prediction`, :class:`Prototypes`: SwAV-style clustering
  prototypes with Sinkhorn soft assignments (§3.5).
- :class:`GCNLayer`: ``LeakyReLU(A · (Dropout(x) Θ) + b)`` over the batch graph (§3.6).
- :class:`MomentumQueue`, :func:`momentum_update`, :func:`info_nce`: MoCo keys and negatives (§3.7, §5.1).

Everything here is a function of its inputs only; the method file wires them together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itmkit.models.functional import l2norm, length_mask


def _xavier(linear: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class GlobalProjection(nn.Module):
    """``c⁰ [B, g] -> c [B, d]`` = ``fc(c⁰) + extra(c⁰)`` (§3.2 step 3: the reference's
    ``FC_MLP(512, d, d, num_layers=1, bn=False)`` is two parallel Linear layers summed, no
    nonlinearity; Xavier weights, zero biases). Equal to one Linear with summed weights."""

    def __init__(self, global_dim: int, d: int) -> None:
        super().__init__()
        self.fc = _xavier(nn.Linear(global_dim, d))
        self.extra = _xavier(nn.Linear(global_dim, d))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + self.extra(x)


class GuidedAttentionPooling(nn.Module):
    """Global-guided pooling of fragments (§3.2 step 5, the figure's "GGLP").

    Per head ``h`` (independent full-width ``Linear(d, d)`` query/key/value, PyTorch default init):
    ``q = normalize(W_q c)``, ``k_n = normalize(W_k H_n)``, ``v_n = W_v H_n``,
    ``α = softmax_n(k_n · q)`` (temperature 1), ``zʰ = Σ_n α_n v_n``; ``z = mean_h zʰ``.

    ``mask_padding=False`` is the reference (§8.3): the softmax runs over all ``T`` positions,
    padded ones included, so the result depends on how much padding the batch adds.
    ``True`` (itmkit) excludes them: the result depends on the item alone.
    """

    def __init__(self, d: int, heads: int = 8, mask_padding: bool = False) -> None:
        super().__init__()
        self.mask_padding = mask_padding
        self.query = nn.ModuleList([nn.Linear(d, d) for _ in range(heads)])
        self.key = nn.ModuleList([nn.Linear(d, d) for _ in range(heads)])
        self.value = nn.ModuleList([nn.Linear(d, d) for _ in range(heads)])

    def weights(self, guide: Tensor, states: Tensor, lengths: Tensor) -> Tensor:
        """``[B, heads, T]`` attention weights of ``guide [B, d]`` over ``states [B, T, d]``."""
        out = []
        for wq, wk in zip(self.query, self.key):
            q = F.normalize(wq(guide), dim=-1)
            k = F.normalize(wk(states), dim=-1)
            logits = torch.einsum("btd,bd->bt", k, q)
            if self.mask_padding:
                valid = length_mask(lengths.to(states.device).long(), states.shape[1])
                logits = logits.masked_fill(~valid, float("-inf"))
            out.append(logits.softmax(dim=-1))
        return torch.stack(out, dim=1)

    def forward(self, guide: Tensor, states: Tensor, lengths: Tensor) -> Tensor:
        """``guide [B, d]``, ``states [B, T, d]``, ``lengths [B]`` -> ``z [B, d]``."""
        alpha = self.weights(guide, states, lengths)
        pooled = [torch.einsum("bt,btd->bd", alpha[:, h], wv(states)) for h, wv in enumerate(self.value)]
        return torch.stack(pooled, dim=0).mean(dim=0)


class GatedFusion(nn.Module):
    """``(e [B, d], c [B, d]) -> (f, g)``: ``ê = l2n(e)``, ``ĉ = l2n(c)``, ``g = σ(W [ê; ĉ] + b)``,
    ``f = g ⊙ ê + (1 − g) ⊙ ĉ`` (§3.2 step 7; not re-normalised, so ``‖f‖ ≤ 1``).
    ``normalise=False`` skips both l2 norms (the reference's ``no_imgnorm``)."""

    def __init__(self, d: int, normalise: bool = True) -> None:
        super().__init__()
        self.normalise = normalise
        self.fc_gate = nn.Linear(2 * d, d)

    def forward(self, e: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        if self.normalise:
            e, c = l2norm(e, dim=-1), l2norm(c, dim=-1)
        gate = torch.sigmoid(self.fc_gate(torch.cat([e, c], dim=-1)))
        return gate * e + (1.0 - gate) * c, gate


# ----------------------------------------------------------------------------- prototypes (§3.5)


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.1, iterations: int = 3) -> Tensor:
    """Soft assignments of ``B`` samples to ``K`` prototypes: ``scores [B, K]`` -> ``Q [B, K]``.

    The reference's ``distributed_sinkhorn`` on one device: ``Q = exp(scores/ε)ᵀ / Σ``, then
    ``iterations`` times: rows (prototypes) to ``1/K``, columns (samples) to ``1/B``; finally
    ``× B`` so every sample's row sums to 1. Equal-sized clusters on average (each prototype's
    column of the result sums to ``≈ B/K``). The max score is subtracted first (itmkit: the same
    ``Q`` after normalisation, no overflow for small ``ε``).
    """
    batch, k = scores.shape
    q = torch.exp((scores.double() - scores.max().double()) / epsilon).t()  # [K, B]
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / batch
    return (q * batch).t().to(scores.dtype)


def swapped_prediction(scores_a: Tensor, scores_b: Tensor, q_a: Tensor, q_b: Tensor, temperature: float = 0.1) -> Tensor:
    """``−mean_b Σ_k q_b log softmax(scores_a/τ) − mean_b Σ_k q_a log softmax(scores_b/τ)``: each
    modality predicts the other's assignment (§3.5)."""
    return -(q_b * F.log_softmax(scores_a / temperature, dim=1)).sum(1).mean() - (
        q_a * F.log_softmax(scores_b / temperature, dim=1)
    ).sum(1).mean()


class Prototypes(nn.Module):
    """``K`` learnable prototypes ``[K, d]`` (init ``randn``) and the swapped-prediction loss (§3.5).

    Each call first re-normalises the prototypes in place (the reference's ``.data`` update, no
    gradient through it), then scores both modalities' embeddings against them.
    """

    def __init__(self, n_prototypes: int, d: int, epsilon: float = 0.1, iterations: int = 3,
                 temperature: float = 0.1) -> None:  # fmt: skip
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(n_prototypes, d))
        self.epsilon, self.iterations, self.temperature = epsilon, iterations, temperature

    @torch.no_grad()
    def renormalise(self) -> None:
        self.prototypes.data.copy_(F.normalize(self.prototypes.data, dim=1))

    def scores(self, x: Tensor) -> Tensor:
        """``x [B, d] -> [B, K]`` dot products with the prototypes."""
        return x @ self.prototypes.t()

    def forward(self, images: Tensor, captions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, q_img [B, K], q_txt [B, K])`` for ``images, captions [B, d]`` (fused embeddings)."""
        self.renormalise()
        s_img, s_txt = self.scores(images), self.scores(captions)
        q_img = sinkhorn(s_img.detach(), self.epsilon, self.iterations)
        q_txt = sinkhorn(s_txt.detach(), self.epsilon, self.iterations)
        return swapped_prediction(s_img, s_txt, q_img, q_txt, self.temperature), q_img, q_txt


# ----------------------------------------------------------------------------- graph (§3.6)


class GCNLayer(nn.Module):
    """``GCN(x, A) = LeakyReLU_0.2(A · (Dropout_0.6(x) Θ) + b)`` (§3.6; ``Θ [d, d]`` Xavier, ``b`` zeros).
    ``A`` is used as given (no degree normalisation), gradient flowing into it."""

    def __init__(self, d: int, dropout: float = 0.6, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d, d))
        self.bias = nn.Parameter(torch.zeros(d))
        nn.init.xavier_uniform_(self.weight)
        self.dropout, self.negative_slope = dropout, negative_slope

    def forward(self, x: Tensor, adjacency: Tensor) -> Tensor:
        support = F.dropout(x, self.dropout, self.training) @ self.weight
        return F.leaky_relu(adjacency @ support + self.bias, self.negative_slope)


# ----------------------------------------------------------------------------- momentum (§3.7)


class MomentumQueue(nn.Module):
    """A FIFO of ``K`` keys ``[d, K]`` (buffers, so checkpoints resume it): ``queue`` init
    ``U[0, 1)`` column-normalised, ``pointer`` (next column), ``filled`` (keys written so far,
    capped at ``K``). :meth:`enqueue` writes a batch at the pointer and wraps around ``K``
    (the reference asserts ``K % B == 0``; itmkit wraps, so a short last batch is fine)."""

    def __init__(self, d: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("queue", F.normalize(torch.rand(d, size), dim=0))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def full(self) -> bool:
        """Every slot holds a real key (the reference starts its loss then, §5.1)."""
        return int(self.filled) >= self.size

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys [B, d]`` (the oldest ``B`` columns are replaced)."""
        keys = keys.detach()[-self.size :]
        columns = (int(self.pointer) + torch.arange(keys.shape[0], device=self.queue.device)) % self.size
        self.queue[:, columns] = keys.t().to(self.queue.dtype)
        self.pointer.fill_((int(self.pointer) + keys.shape[0]) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + keys.shape[0]))

    def negatives(self) -> Tensor:
        """``[d, K]`` the queue, each column l2-normalised (as the reference reads it)."""
        return F.normalize(self.queue, dim=0)


@torch.no_grad()
def momentum_update(key: nn.Module, query: nn.Module, momentum: float) -> None:
    """``θ_k ← m θ_k + (1 − m) θ_q`` over the zipped parameters (buffers untouched, §5.2 step 3)."""
    key_params, query_params = list(key.parameters()), list(query.parameters())
    if len(key_params) != len(query_params):
        raise ValueError(f"momentum_update: {len(key_params)} key parameters but {len(query_params)} query parameters")
    for pk, pq in zip(key_params, query_params):
        pk.mul_(momentum).add_(pq.detach(), alpha=1.0 - momentum)


def info_nce(queries: Tensor, keys: Tensor, negatives: Tensor, temperature: float = 0.07) -> Tensor:
    """MoCo's InfoNCE: ``queries [B, d]``, positive ``keys [B, d]`` (both l2-normalised here),
    ``negatives [d, K]`` -> ``CE([q·k⁺ | q·N] / T, 0)`` averaged over the batch (§5.1)."""
    q, k = F.normalize(queries, dim=1), F.normalize(keys, dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, q @ negatives.to(q.dtype)], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
