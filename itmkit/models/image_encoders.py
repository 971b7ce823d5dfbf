"""Image encoders for precomputed region features (baselines.md §B.2, scan.md §3.1, esl.md §3.1)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from itmkit.models.functional import check_lengths, l2norm, zero_padding
from itmkit.models.mlp import MLP


class PrecompRegionEncoder(nn.Module):
    """Project precomputed region features into the joint space: ``[B, K, D] -> [B, K, d]``.

    ``f = fc(x)`` (+ ``mlp(x)`` when ``mlp_residual``) (+ per-region l2 norm when ``l2_regions``).

    - VSE∞ ``precomp_enc_type='basic'`` (§B.2): ``mlp_residual=True, l2_regions=False`` (GPO and the
      l2 norm of the pooled vector follow in the method).
    - SCAN / SGRAF ``EncoderImagePrecomp``: ``mlp_residual=False, l2_regions=True``.
    - ESL: ``mlp_residual=True, l2_regions=True``.

    ``fc`` is ``Linear(img_dim -> d)`` with weight ``U(-r, r)``, ``r = sqrt(6 / (img_dim + d))`` and
    bias 0 (every reference). ``mlp`` is ``MLP(img_dim, d // 2, d, 2)`` with PyTorch's default init;
    its BatchNorm sees padded rows too (reference quirk, §B.2 / §F.3).

    ``zero_padding`` (default True) zeroes positions ``>= lengths`` in the output so the result
    honours :class:`~itmkit.encoded.Encoded`'s "zero beyond lengths"; set it False to reproduce a
    reference that lets padded rows (``fc.bias + mlp(0)``) through, e.g. into attention.
    """

    def __init__(
        self,
        img_dim: int,
        embed_size: int,
        mlp_residual: bool = True,
        l2_regions: bool = False,
        zero_padding: bool = True,
    ) -> None:
        super().__init__()
        self.img_dim = img_dim
        self.embed_size = embed_size
        self.l2_regions = l2_regions
        self.zero_padding = zero_padding
        self.fc = nn.Linear(img_dim, embed_size)
        self.mlp = MLP(img_dim, embed_size // 2, embed_size, 2) if mlp_residual else None
        self.reset_fc()

    def reset_fc(self) -> None:
        """Xavier-uniform ``fc`` weight with bound ``sqrt(6 / (in + out))``, zero bias."""
        bound = math.sqrt(6.0) / math.sqrt(self.fc.in_features + self.fc.out_features)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images: Tensor, lengths: Tensor) -> Tensor:
        """``images [B, K, img_dim]`` (zero-padded), ``lengths [B]`` -> region features ``[B, K, d]``."""
        if images.dim() != 3 or images.shape[-1] != self.img_dim:
            raise ValueError(
                f"PrecompRegionEncoder images: expected [B, K, {self.img_dim}] (img_dim of the model "
                f"config), found shape {tuple(images.shape)}"
            )
        check_lengths(lengths, images.shape[0], images.shape[1], "image lengths")
        features = self.fc(images)
        if self.mlp is not None:
            features = features + self.mlp(images)
        if self.l2_regions:
            features = l2norm(features, dim=-1)
        if self.zero_padding:
            features = zero_padding(features, lengths)
        return features
