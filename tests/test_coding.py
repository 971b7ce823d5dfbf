"""CHAN's codings and poolings (chan.md §3.3, §10) against hand-computed values and per-pair
plain-loop references written straight from the spec's equations."""

import math

import pytest
import torch

from itmkit.models import coding as C

from coding_reference import ref_matrix


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def random_block(seed=0, n_img=3, k=5, n_cap=4, length=6, d=8, dtype=torch.float64):
    """Unit-norm sets with varied lengths and garbage (large random values) in the padding."""
    g = torch.Generator().manual_seed(seed)
    images = unit(torch.randn(n_img, k, d, generator=g, dtype=dtype))
    captions = unit(torch.randn(n_cap, length, d, generator=g, dtype=dtype))
    img_len = torch.randint(1, k + 1, (n_img,), generator=g)
    img_len[0] = k
    cap_len = torch.randint(1, length + 1, (n_cap,), generator=g)
    cap_len[0] = length
    img_mask = torch.arange(k)[None] < img_len[:, None]
    cap_mask = torch.arange(length)[None] < cap_len[:, None]
    images = torch.where(img_mask[..., None], images, 50 * torch.randn(images.shape, generator=g, dtype=dtype))
    captions = torch.where(cap_mask[..., None], captions, 50 * torch.randn(captions.shape, generator=g, dtype=dtype))
    return images, img_mask, captions, cap_mask, img_len, cap_len


# ------------------------------------------------------------------------- hand-computed cases
def test_vha_hand_example_two_regions_two_words():
    # regions e1, e2; words e1, (e1+e2)/sqrt2 and a padded third word
    images = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    r = 1 / math.sqrt(2)
    captions = torch.tensor([[[1.0, 0.0], [r, r], [9.0, 9.0]]])
    img_mask = torch.tensor([[True, True]])
    cap_mask = torch.tensor([[True, True, False]])
    coded = C.visual_hard_assignment(images, img_mask, captions, cap_mask)
    assert torch.allclose(coded.values, torch.tensor([[[1.0, r, -1.0]]]))
    assert coded.valid.tolist() == [[[True, True, False]]]
    assert C.hard_assignment_regions(images, img_mask, captions, cap_mask)[0, 0, 0] == 0
    # mean (1 + r)/2, sum 1 + r, max 1, LSE log(e^10 + e^(10 r))
    assert torch.allclose(C.mean_pooling(coded), torch.tensor([[(1 + r) / 2]]))
    assert torch.allclose(C.sum_pooling(coded), torch.tensor([[1 + r]]))
    assert torch.allclose(C.max_pooling(coded), torch.tensor([[1.0]]))
    expected = math.log(math.exp(10) + math.exp(10 * r))
    assert torch.allclose(C.lse_pooling(coded, 0.1), torch.tensor([[expected]]))
    w1, w2 = math.exp(10), math.exp(10 * r)
    soft = (w1 * 1 + w2 * r) / (w1 + w2)
    assert torch.allclose(C.softmax_pooling(coded, 0.1), torch.tensor([[soft]]))


def test_padded_region_never_wins_even_with_all_negative_cosines():
    images = torch.tensor([[[-1.0, 0.0], [0.0, 0.0]]])  # second region is padding (zeros -> cosine 0)
    captions = torch.tensor([[[1.0, 0.0]]])
    coded = C.visual_hard_assignment(images, torch.tensor([[True, False]]), captions, torch.tensor([[True]]))
    assert coded.values.item() == pytest.approx(-1.0)  # the real region, not the padding's 0


def test_tha_and_region_word_table_hand_example():
    images = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    captions = torch.tensor([[[0.6, 0.8], [1.0, 0.0]]])
    img_mask = torch.tensor([[True, True, False]])
    cap_mask = torch.tensor([[True, True]])
    table = C.region_word_cosines(images, img_mask, captions, cap_mask)
    assert torch.allclose(table[0, 0], torch.tensor([[0.6, 1.0], [0.8, 0.0], [-1.0, -1.0]]))
    coded = C.textual_hard_assignment(images, img_mask, captions, cap_mask)
    assert torch.allclose(coded.values, torch.tensor([[[1.0, 0.8, -1.0]]]))
    assert torch.allclose(C.mean_pooling(coded), torch.tensor([[0.9]]))


# ------------------------------------------------------------------- against the plain loops
@pytest.mark.parametrize("coding", ["vha", "tha", "vsa", "t2i"])
@pytest.mark.parametrize("pooling", ["max", "mean", "sum", "lse", "softmax"])
def test_every_coding_and_pooling_matches_the_per_pair_loop(coding, pooling):
    images, img_mask, captions, cap_mask, img_len, cap_len = random_block(seed=sum(map(ord, coding + pooling)))
    got = C.coded_similarity(images, img_mask, captions, cap_mask, coding, pooling, belta=0.1, alpha=0.1)
    want = ref_matrix(images, img_len, captions, cap_len, coding, pooling)
    assert got.shape == (3, 4)
    assert torch.allclose(got, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("coding", ["vha", "tha", "vsa", "t2i"])
def test_padding_invariance_extra_padded_words_and_regions(coding):
    images, img_mask, captions, cap_mask, *_ = random_block(seed=3)
    base = C.coded_similarity(images, img_mask, captions, cap_mask, coding, "lse")
    g = torch.Generator().manual_seed(9)
    more_images = torch.cat([images, torch.randn(3, 4, 8, generator=g, dtype=images.dtype)], 1)
    more_captions = torch.cat([captions, torch.randn(4, 3, 8, generator=g, dtype=captions.dtype)], 1)
    more_img_mask = torch.cat([img_mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
    more_cap_mask = torch.cat([cap_mask, torch.zeros(4, 3, dtype=torch.bool)], 1)
    padded = C.coded_similarity(more_images, more_img_mask, more_captions, more_cap_mask, coding, "lse")
    assert torch.allclose(base, padded, atol=1e-12)
    # and NaN in a padded slot changes nothing either
    more_images[1, -1] = float("nan")
    more_captions[2, -1] = float("nan")
    assert torch.allclose(C.coded_similarity(more_images, more_img_mask, more_captions, more_cap_mask, coding, "lse"), base)


def test_t2i_reference_quirk_attends_over_padded_regions():
    images, img_mask, captions, cap_mask, *_ = random_block(seed=4)
    # the reference's padded regions hold one fixed vector (the normalised fc.bias)
    bias = unit(torch.ones(8, dtype=images.dtype))
    images = torch.where(img_mask[..., None], images, bias)
    masked = C.coded_similarity(images, img_mask, captions, cap_mask, "t2i", "mean")
    quirk = C.coded_similarity(images, img_mask, captions, cap_mask, "t2i", "mean", mask_regions=False)
    has_padding = ~img_mask.all(1)
    assert torch.allclose(masked[~has_padding], quirk[~has_padding])
    assert not torch.allclose(masked[has_padding], quirk[has_padding])
    # the quirk is the plain loop run over every region slot
    full = torch.full_like(img_mask[:, 0], img_mask.shape[1], dtype=torch.long)
    cap_len = cap_mask.sum(1)
    assert torch.allclose(quirk, ref_matrix(images, full, captions, cap_len, "t2i", "mean"), atol=1e-9)
    weights = C.t2i_attention_weights(images, img_mask, captions, cap_mask)
    assert torch.allclose(weights.sum(2), torch.ones(weights.shape[:2] + weights.shape[3:], dtype=weights.dtype))
    assert (weights.permute(0, 2, 1, 3)[~img_mask] == 0).all()


# --------------------------------------------------------------------- identities of §10
def test_spec_identities_vha_tha_max_and_sum_mean():
    images, img_mask, captions, cap_mask, img_len, cap_len = random_block(seed=5)
    vha = C.visual_hard_assignment(images, img_mask, captions, cap_mask)
    tha = C.textual_hard_assignment(images, img_mask, captions, cap_mask)
    assert torch.allclose(C.max_pooling(vha), C.max_pooling(tha))  # both = max over all valid pairs
    assert torch.allclose(C.sum_pooling(vha), cap_len[None].double() * C.mean_pooling(vha))


def test_lse_bounds_and_small_belta_limit():
    images, img_mask, captions, cap_mask, img_len, cap_len = random_block(seed=6)
    vha = C.visual_hard_assignment(images, img_mask, captions, cap_mask)
    best = C.max_pooling(vha)
    for belta in (0.5, 0.1, 0.02):
        lse = C.lse_pooling(vha, belta)
        assert (lse >= best / belta - 1e-9).all()
        assert (lse <= best / belta + torch.log(cap_len.double())[None] + 1e-9).all()
    assert torch.allclose(1e-4 * C.lse_pooling(vha, 1e-4), best, atol=1e-3)


def test_vsa_small_alpha_tends_to_tha():
    images, img_mask, captions, cap_mask, *_ = random_block(seed=7)
    vsa = C.visual_soft_assignment(images, img_mask, captions, cap_mask, alpha=1e-4)
    tha = C.textual_hard_assignment(images, img_mask, captions, cap_mask)
    assert torch.allclose(vsa.values, tha.values, atol=1e-6)


def test_permutation_invariance_of_regions_and_word_order():
    images, img_mask, captions, cap_mask, img_len, cap_len = random_block(seed=8, n_img=1, n_cap=1)
    perm_r = torch.randperm(int(img_len[0]))
    perm_w = torch.randperm(int(cap_len[0]))
    images2, captions2 = images.clone(), captions.clone()
    images2[0, : img_len[0]] = images[0, perm_r]
    captions2[0, : cap_len[0]] = captions[0, perm_w]
    for coding in ("vha", "tha", "vsa", "t2i"):
        a = C.coded_similarity(images, img_mask, captions, cap_mask, coding, "lse")
        b = C.coded_similarity(images2, img_mask, captions2, cap_mask, coding, "lse")
        assert torch.allclose(a, b)


def test_gradients_are_finite_with_padding():
    images, img_mask, captions, cap_mask, *_ = random_block(seed=10, dtype=torch.float32)
    images.requires_grad_(True)
    captions.requires_grad_(True)
    for coding in ("vha", "tha", "vsa", "t2i"):
        for pooling in ("lse", "mean", "softmax", "max"):
            images.grad = captions.grad = None
            C.coded_similarity(images, img_mask, captions, cap_mask, coding, pooling).sum().backward()
            assert torch.isfinite(images.grad).all() and torch.isfinite(captions.grad).all()
            # padded slots receive no gradient
            assert (images.grad[~img_mask] == 0).all() and (captions.grad[~cap_mask] == 0).all()


def test_bad_inputs_raise_clear_errors():
    images = torch.zeros(2, 3, 4)
    captions = torch.zeros(2, 5, 6)
    with pytest.raises(ValueError, match="feature size"):
        C.visual_hard_assignment(images, torch.ones(2, 3, dtype=torch.bool), captions, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="caption_mask"):
        C.visual_hard_assignment(images, torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 5, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown coding"):
        C.code(images, torch.ones(2, 3, dtype=torch.bool), images, torch.ones(2, 3, dtype=torch.bool), "soft")
    with pytest.raises(ValueError, match="unknown pooling"):
        C.pool(C.CodedScores(torch.zeros(1, 1, 1), torch.ones(1, 1, 1, dtype=torch.bool)), "median")


@pytest.mark.parametrize("coding", ["vha", "tha", "vsa", "t2i"])
def test_gradients_match_finite_differences(coding):
    # the in-place masking on the GEMM output and the Gram-matrix norms must give exact gradients
    g = torch.Generator().manual_seed(11)
    images = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    captions = torch.randn(2, 6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    img_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    cap_mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    for pooling in ("lse", "softmax"):  # mean/sum/max are linear or selections of the same codes
        f = lambda a, b: C.coded_similarity(a, img_mask, b, cap_mask, coding, pooling)  # noqa: E731
        assert torch.autograd.gradcheck(f, (images, captions))
