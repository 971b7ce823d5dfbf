"""The pairwise similarity engine (itmkit.similarity.engine): tiling under a memory budget,
order restoration, memmap output, gradients, and exactness against a one-pair-at-a-time SCAN
reference written here (scan.md §3.3-§3.5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from itmkit.config import TextConfig
from itmkit.encoded import Encoded
from itmkit.methods.scan import SCAN, SCANConfig
from itmkit.models.base import MatchingModel
from itmkit.similarity.engine import block_sizes, default_memory_budget, pairwise_similarity, plan_blocks


class MaxAlignModel(MatchingModel):
    """Toy pairwise method: sum over real words of the best dot product with a real region.
    Records every block it scores and the workspace it claimed."""

    pairwise = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int, int]] = []

    def score_block(self, images: Encoded, captions: Encoded) -> torch.Tensor:
        dots = torch.einsum("ird,cld->icrl", images.feats, captions.feats)
        dots = dots.masked_fill(~images.mask[:, None, :, None], float("-inf"))
        best = dots.amax(2).masked_fill(~captions.mask[None], 0.0)
        self.calls.append((len(images), len(captions), self.pair_workspace_bytes(images, captions)))
        return best.sum(-1)

    def pair_workspace_bytes(self, images: Encoded, captions: Encoded) -> int:
        return 3 * images.feats.shape[1] * captions.feats.shape[1] * captions.feats.element_size()


def padded_sets(lengths, t_max, d, generator):
    lengths = torch.as_tensor(lengths)
    x = torch.randn(len(lengths), t_max, d, generator=generator)
    x = x / x.norm(dim=-1, keepdim=True)
    mask = torch.arange(t_max)[None] < lengths[:, None]
    return Encoded(x * mask[..., None], lengths)


def toy_reference(images: Encoded, captions: Encoded) -> torch.Tensor:
    out = torch.zeros(len(images), len(captions))
    for i in range(len(images)):
        v = images.feats[i, : images.lengths[i]]
        for c in range(len(captions)):
            w = captions.feats[c, : captions.lengths[c]]
            out[i, c] = (w @ v.t()).amax(1).sum()
    return out


@pytest.fixture
def toy_data():
    g = torch.Generator().manual_seed(0)
    images = padded_sets([5, 3, 5, 1, 4, 5, 2], 5, 8, g)
    cap_lengths = torch.randint(2, 12, (23,), generator=g)
    captions = padded_sets(cap_lengths, 14, 8, g)  # padded past the longest caption on purpose
    return images, captions


def test_block_sizes_respect_budget():
    for n_img, n_cap, per_pair, budget in [(1000, 5000, 4096, 1 << 28), (7, 3, 100, 10**6), (50, 50, 10**9, 1)]:
        bi, bc = block_sizes(n_img, n_cap, per_pair, budget)
        assert 1 <= bi <= n_img and 1 <= bc <= n_cap
        assert bi * bc * per_pair <= budget or (bi, bc) == (1, 1)


def test_block_sizes_align_gemm_operands_where_the_budget_allows():
    from itmkit.similarity.engine import GEMM_ALIGN, aligned_count

    # 36 regions: an even image count gives 8-aligned rows; 15 words: 8 captions at a time
    for n_img, n_cap, per_pair, budget in [(1000, 5000, 4320, 16 << 20), (1000, 5000, 9000, 3 << 20), (999, 77, 500, 1 << 22)]:
        bi, bc = block_sizes(n_img, n_cap, per_pair, budget, image_length=36, caption_length=15)
        assert bi * bc * per_pair <= budget
        assert bi == n_img or (bi * 36) % GEMM_ALIGN == 0, bi
        assert bc == n_cap or (bc * 15) % GEMM_ALIGN == 0, bc
        plain = block_sizes(n_img, n_cap, per_pair, budget)
        assert bi >= plain[0] - GEMM_ALIGN and bc >= plain[1] - GEMM_ALIGN  # rounding costs little
    assert aligned_count(5, 15, 100) == 5  # fewer than one aligned step: kept
    assert aligned_count(37, 15, 37) == 37  # reaches the end: the last block is what is left
    assert aligned_count(37, 15, 100) == 32 and aligned_count(37, 12, 100) == 36 and aligned_count(37, 8, 100) == 37


def test_plan_aligns_caption_blocks_to_their_own_length():
    from itmkit.similarity.engine import GEMM_ALIGN

    g = torch.Generator().manual_seed(1)
    images = padded_sets([36] * 40, 36, 8, g)
    lengths = torch.randint(5, 30, (400,), generator=g)
    captions = padded_sets(lengths, 30, 8, g)
    ordered = torch.sort(lengths, descending=True).values
    blocks = plan_blocks(MaxAlignModel(), images, captions, 4_000_000, None, ordered)
    covered = np.zeros((40, 400), dtype=int)
    for b in blocks:
        covered[b.img_start : b.img_stop, b.cap_start : b.cap_stop] += 1
        if b.cap_stop < 400:  # every block but the last is sized to a multiple of 8 GEMM columns
            assert ((b.cap_stop - b.cap_start) * int(ordered[b.cap_start])) % GEMM_ALIGN == 0
    assert (covered == 1).all()


@pytest.mark.parametrize("budget", [1, 2000, 9000, 1 << 30])
def test_engine_matches_reference_and_respects_budget(toy_data, budget):
    images, captions = toy_data
    model = MaxAlignModel()
    got = pairwise_similarity(model, images, captions, memory_budget=budget)
    torch.testing.assert_close(got, toy_reference(images, captions), rtol=1e-6, atol=1e-6)
    for bi, bc, per_pair in model.calls:
        assert bi * bc * per_pair <= budget or bi * bc == 1, (bi, bc, per_pair, budget)
    assert sum(bi * bc for bi, bc, _ in model.calls) == len(images) * len(captions)


def test_plan_covers_every_pair_once_and_grows_for_short_captions(toy_data):
    images, captions = toy_data
    model = MaxAlignModel()
    lengths = torch.sort(captions.lengths, descending=True).values
    blocks = plan_blocks(model, images, captions, 3000, None, lengths)
    covered = np.zeros((len(images), len(captions)), dtype=int)
    for b in blocks:
        covered[b.img_start : b.img_stop, b.cap_start : b.cap_stop] += 1
        assert b.workspace_bytes <= 3000
    assert (covered == 1).all()
    # caption blocks are sized for their own longest caption: the short ones come in wider blocks
    widths = {b.cap_start: b.cap_stop - b.cap_start for b in blocks}
    assert max(widths.values()) > widths[0]


def test_memmap_and_preallocated_outputs(toy_data, tmp_path):
    images, captions = toy_data
    want = toy_reference(images, captions).numpy()
    path = tmp_path / "sims" / "S.npy"
    result = pairwise_similarity(MaxAlignModel(), images, captions, memory_budget=2000, out=path)
    assert isinstance(result, np.memmap)
    np.testing.assert_allclose(np.load(path), want, rtol=1e-6, atol=1e-6)
    buffer = np.full(want.shape, np.nan, dtype=np.float32)
    assert pairwise_similarity(MaxAlignModel(), images, captions, memory_budget=2000, out=buffer) is buffer
    np.testing.assert_allclose(buffer, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"out: expected shape \(7, 23\), found \(7, 22\)"):
        pairwise_similarity(MaxAlignModel(), images, captions, out=torch.zeros(7, 22))


def test_gradients_flow_through_multi_block_assembly(toy_data):
    images, captions = toy_data
    feats = images.feats.clone().requires_grad_(True)
    grads = []
    for budget in (1 << 30, 1500):  # one block, then many
        feats.grad = None
        sims = pairwise_similarity(MaxAlignModel(), Encoded(feats, images.lengths), captions, memory_budget=budget)
        assert sims.requires_grad
        (sims * torch.arange(sims.numel()).view_as(sims)).sum().backward()
        grads.append(feats.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_reduced_precision_is_a_cuda_option(toy_data):
    images, captions = toy_data
    with pytest.raises(ValueError, match="compute_dtype.*CUDA"):
        pairwise_similarity(MaxAlignModel(), images, captions, compute_dtype=torch.bfloat16, device="cpu")
    assert default_memory_budget(torch.device("cpu")) > 0


def test_cpu_budget_follows_the_cache_and_training_keeps_big_blocks(monkeypatch):
    import itmkit.similarity.engine as engine

    low, high = engine.CPU_BUDGET_RANGE
    for cache, expected in [(32 << 20, 16 << 20), (1 << 20, low), (1 << 30, high), (None, engine.DEFAULT_CPU_BUDGET)]:
        monkeypatch.setattr(engine, "last_level_cache_bytes", lambda cache=cache: cache)
        monkeypatch.setattr(engine.os, "sysconf", lambda name: 1 << 40 if name == "SC_AVPHYS_PAGES" else 1)
        assert engine.default_memory_budget(torch.device("cpu")) == expected
        assert engine.default_memory_budget(torch.device("cpu"), training=True) == engine.DEFAULT_CPU_TRAIN_BUDGET
    # a small machine: a quarter of the free RAM caps both
    monkeypatch.setattr(engine.os, "sysconf", lambda name: 4 << 20 if name == "SC_AVPHYS_PAGES" else 1)
    assert engine.default_memory_budget(torch.device("cpu"), training=True) == 1 << 20


def test_last_level_cache_parses_sysfs_sizes(monkeypatch, tmp_path):
    import itmkit.similarity.engine as engine

    for index, size in enumerate(["32K", "512K", "32768K", "junk"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    real_path = engine.Path
    monkeypatch.setattr(engine, "Path", lambda p: real_path(str(p).replace("/sys/devices/system/cpu/cpu0/cache", str(tmp_path))))
    engine.last_level_cache_bytes.cache_clear()  # read once per process: forget the real machine's
    try:
        assert engine.last_level_cache_bytes() == 32 << 20
    finally:
        engine.last_level_cache_bytes.cache_clear()


# --------------------------------------------------------------------------- SCAN vs per-pair loop
def scan_one_pair(regions, words, cfg: SCANConfig) -> float:
    """One (image, caption) pair, real items only, written from scan.md §3.3-§3.5 step by step."""
    if cfg.cross_attn == "t2i":
        query, context = words, regions
    else:
        query, context = regions, words
    raw = context @ query.t()  # [Lc, Lq]
    if cfg.raw_feature_norm.startswith("clipped"):
        raw = torch.where(raw > 0, raw, 0.1 * raw)
    if cfg.raw_feature_norm == "softmax":
        raw = torch.exp(raw) / torch.exp(raw).sum(1, keepdim=True)
    elif cfg.raw_feature_norm.endswith("l2norm"):
        raw = raw / (raw.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
    elif cfg.raw_feature_norm.endswith("l1norm"):
        raw = raw / (raw.abs().sum(1, keepdim=True) + 1e-8)
    weights = torch.exp(cfg.lambda_softmax * raw)
    weights = weights / weights.sum(0, keepdim=True)  # over the context
    attended = weights.t() @ context  # [Lq, d]
    rel = (query * attended).sum(1) / torch.clamp(query.norm(dim=1) * attended.norm(dim=1), min=1e-8)
    if cfg.agg_func == "LogSumExp":
        return float(torch.log(torch.exp(cfg.lambda_lse * rel).sum()) / cfg.lambda_lse)
    return float({"Mean": rel.mean, "Max": rel.max, "Sum": rel.sum}[cfg.agg_func]())


@pytest.mark.parametrize(
    "options",
    [
        dict(cross_attn="t2i", agg_func="LogSumExp", lambda_softmax=9.0, lambda_lse=6.0),
        dict(cross_attn="t2i", agg_func="Mean", lambda_softmax=9.0, raw_feature_norm="softmax"),
        dict(cross_attn="t2i", agg_func="Max", lambda_softmax=4.0, raw_feature_norm="clipped_l1norm"),
        dict(cross_attn="i2t", agg_func="LogSumExp", lambda_softmax=4.0, lambda_lse=20.0),
        dict(cross_attn="i2t", agg_func="Mean", lambda_softmax=4.0, raw_feature_norm="l2norm"),
        dict(cross_attn="i2t", agg_func="Sum", lambda_softmax=9.0, raw_feature_norm="no_norm"),
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_engine_equals_one_pair_at_a_time_scan(options):
    torch.manual_seed(0)
    cfg = SCANConfig(img_dim=24, embed_size=32, **options)
    model = SCAN(cfg, TextConfig(kind="bigru", word_dim=8), vocab_size=40).eval()
    g = torch.Generator().manual_seed(1)
    img_lengths = torch.tensor([6, 6, 4, 6, 1, 5, 6, 3, 6])
    feats = torch.randn(9, 6, 24, generator=g) * (torch.arange(6)[None] < img_lengths[:, None])[..., None]
    cap_lengths = torch.randint(2, 13, (17,), generator=g)
    tokens = torch.randint(4, 40, (17, 12), generator=g) * (torch.arange(12)[None] < cap_lengths[:, None])
    with torch.no_grad():
        images = model.encode_images(feats, img_lengths)
        captions = model.encode_captions(tokens, cap_lengths)
        got = model.similarity(images, captions, memory_budget=40_000)  # many blocks
    want = torch.tensor(
        [
            [
                scan_one_pair(images.feats[i, : img_lengths[i]], captions.feats[c, : cap_lengths[c]], cfg)
                for c in range(17)
            ]
            for i in range(9)
        ]
    )
    assert got.shape == (9, 17) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_engine_scores_do_not_depend_on_padding():
    torch.manual_seed(0)
    model = SCAN(SCANConfig(img_dim=16, embed_size=16, cross_attn="i2t", lambda_softmax=4.0), TextConfig(word_dim=8), 30)
    g = torch.Generator().manual_seed(2)
    images = padded_sets([4, 2, 4], 4, 16, g)
    captions = padded_sets([3, 7, 5, 2], 7, 16, g)
    with torch.no_grad():
        base = model.similarity(images, captions)
        more = Encoded(torch.cat([images.feats, torch.zeros(3, 5, 16)], 1), images.lengths)
        longer = Encoded(torch.cat([captions.feats, torch.zeros(4, 6, 16)], 1), captions.lengths)
        padded = model.similarity(more, longer, memory_budget=5000)
    assert math.isclose(float((padded - base).abs().max()), 0.0, abs_tol=1e-6)


def test_a_float64_out_takes_the_scores_with_caption_sorting_on(toy_data):
    # the references store scores in float64 arrays; a float64 tensor as out raised
    # "Index put requires the source and destination dtypes match" with sorted captions
    images, captions = toy_data
    want = toy_reference(images, captions)
    for out in (torch.full((7, 23), float("nan"), dtype=torch.float64), np.full((7, 23), np.nan)):
        got = pairwise_similarity(MaxAlignModel(), images, captions, memory_budget=2000, out=out, sort_captions=True)
        assert got is out and got.dtype in (torch.float64, np.float64)
        # float32 scores stored exactly in float64
        float32_run = pairwise_similarity(MaxAlignModel(), images, captions, memory_budget=2000)
        np.testing.assert_array_equal(np.asarray(got), float32_run.numpy().astype(np.float64))
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6, atol=1e-6)
