"""AAHR (aahr.md): the building blocks against hand loops (Sinkhorn, queue, momentum update, GCN,
guided pooling, fusion), test-time independence from the batch, the loss schedule and step order,
a course-sized model learning, the released-checkpoint converter on the §7 key names and shapes,
and the global-feature files (reader, embedded stand-ins, the CLIP data_prep command's writer)."""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itmkit.checkpoints import CheckpointMismatchError
from itmkit.config import TextConfig
from itmkit.data.errors import DataFormatError
from itmkit.data.loaders import Batch
from itmkit.losses import argmax_negatives
from itmkit.methods import aahr
from itmkit.methods.aahr import AAHR, AAHRConfig, GlobalKeyPipeline, convert_checkpoint, load_reference_checkpoint
from itmkit.methods.registry import get_method
from itmkit.models.aahr_modules import (
    GatedFusion,
    GCNLayer,
    GlobalProjection,
    GuidedAttentionPooling,
    MomentumQueue,
    Prototypes,
    info_nce,
    momentum_update,
    sinkhorn,
)
from itmkit.paths import REPO_ROOT

BIGRU = TextConfig(kind="bigru", word_dim=8)
IMG, GI, GT, D = 12, 6, 5, 16


# ----------------------------------------------------------------------------- building blocks


def test_sinkhorn_against_a_hand_loop():
    scores = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    eps, iters = 0.5, 3
    q = np.exp(scores.numpy().astype(np.float64) / eps).T  # [K, B]
    q /= q.sum()
    K, B = q.shape
    for _ in range(iters):
        for k in range(K):
            q[k] /= q[k].sum() * K
        for b in range(B):
            q[:, b] /= q[:, b].sum() * B
    expected = (q * B).T
    got = sinkhorn(scores, eps, iters)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    assert torch.allclose(got.sum(1), torch.ones(5))
    assert torch.allclose(sinkhorn(scores, 1e4, 3), torch.full((5, 3), 1 / 3), atol=1e-4)  # ε large: uniform


def test_swav_loss_is_the_swapped_cross_entropy():
    torch.manual_seed(0)
    protos = Prototypes(4, 6, epsilon=0.1, iterations=3, temperature=0.1)
    x, y = torch.randn(5, 6), torch.randn(5, 6)
    loss, q_x, q_y = protos(x, y)
    assert torch.allclose(protos.prototypes.norm(dim=1), torch.ones(4))  # re-normalised in place
    p = F.normalize(protos.prototypes.detach(), dim=1)
    sx, sy = x @ p.t(), y @ p.t()
    expected = -(sinkhorn(sy) * F.log_softmax(sx / 0.1, 1)).sum(1).mean() - (sinkhorn(sx) * F.log_softmax(sy / 0.1, 1)).sum(1).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert protos.prototypes.grad is not None and protos.prototypes.grad.abs().sum() > 0


def test_queue_enqueue_wraps_and_counts():
    queue = MomentumQueue(2, 5)
    assert torch.allclose(queue.queue.norm(dim=0), torch.ones(5)) and not queue.full
    first = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    queue.enqueue(first)
    assert int(queue.pointer) == 3 and int(queue.filled) == 3 and not queue.full
    assert torch.equal(queue.queue[:, :3], first.t())
    second = 10 + torch.arange(8, dtype=torch.float32).reshape(4, 2)
    queue.enqueue(second)  # columns 3, 4, then 0, 1 (the oldest are replaced)
    assert int(queue.pointer) == 2 and queue.full
    assert torch.equal(queue.queue[:, 3:], second[:2].t())
    assert torch.equal(queue.queue[:, :2], second[2:].t())
    assert torch.equal(queue.queue[:, 2], first[2])
    assert torch.allclose(queue.negatives().norm(dim=0), torch.ones(5))


def test_momentum_update_by_hand():
    torch.manual_seed(0)
    query, key = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in key.parameters()]
    momentum_update(key, query, 0.9)
    for new, old, q in zip(key.parameters(), before, query.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * q)
    momentum_update(key, query, 0.0)
    assert all(torch.equal(k, q) for k, q in zip(key.parameters(), query.parameters()))


def test_info_nce_against_explicit_logits():
    torch.manual_seed(0)
    q, k, negatives = torch.randn(3, 4), torch.randn(3, 4), F.normalize(torch.randn(4, 6), dim=0)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    expected = 0.0
    for b in range(3):
        logits = torch.cat([(qn[b] @ kn[b])[None], qn[b] @ negatives]) / 0.07
        expected += -F.log_softmax(logits, 0)[0] / 3
    assert torch.allclose(info_nce(q, k, negatives, 0.07), expected, atol=1e-5)


def test_gcn_against_a_per_node_loop():
    torch.manual_seed(0)
    gcn = GCNLayer(4, dropout=0.6).eval()  # no dropout in eval
    with torch.no_grad():
        gcn.bias.normal_()
    x, adjacency = torch.randn(5, 4), torch.rand(5, 5)
    got = gcn(x, adjacency)
    for a in range(5):
        total = sum(adjacency[a, b] * (x[b] @ gcn.weight) for b in range(5)) + gcn.bias
        assert torch.allclose(got[a], F.leaky_relu(total, 0.2), atol=1e-5)


def test_guided_pooling_against_a_per_head_loop_and_its_padding_flag():
    torch.manual_seed(0)
    pool = GuidedAttentionPooling(4, heads=3, mask_padding=False)
    guide, states, lengths = torch.randn(2, 4), torch.randn(2, 5, 4), torch.tensor([5, 3])
    got = pool(guide, states, lengths)
    for b in range(2):
        heads = []
        for h in range(3):
            q = F.normalize(pool.query[h](guide[b]), dim=0)
            k = F.normalize(pool.key[h](states[b]), dim=1)
            heads.append((k @ q).softmax(0) @ pool.value[h](states[b]))  # every position, padding included
        assert torch.allclose(got[b], torch.stack(heads).mean(0), atol=1e-5)
    pool.mask_padding = True
    masked = pool(guide, states, lengths)
    changed = states.clone()
    changed[1, 3:] = 100.0
    assert torch.allclose(pool(guide, changed, lengths), masked, atol=1e-6)
    assert torch.allclose(masked[1], pool(guide[1:], states[1:, :3], lengths[1:])[0], atol=1e-5)


def test_fusion_gate_and_projection():
    torch.manual_seed(0)
    fusion = GatedFusion(4)
    e, c = torch.randn(3, 4) * 5, torch.randn(3, 4)
    f, g = fusion(e, c)
    assert bool(((g > 0) & (g < 1)).all()) and bool((f.norm(dim=1) <= 1 + 1e-6).all())
    en, cn = F.normalize(e, dim=1), F.normalize(c, dim=1)
    assert torch.allclose(f, g * en + (1 - g) * cn)
    proj = GlobalProjection(3, 4)
    x = torch.randn(2, 3)
    single = x @ (proj.fc.weight + proj.extra.weight).t() + proj.fc.bias + proj.extra.bias
    assert torch.allclose(proj(x), single, atol=1e-6)


# ----------------------------------------------------------------------------- the model


def small_model(seed=0, **options):
    torch.manual_seed(seed)
    cfg = AAHRConfig(**{"embed_size": D, "img_dim": IMG, "nhead": 4, "topk": 3, "warmup_steps": 2, "global_img_dim": GI,
                        "global_txt_dim": GT, "mha_heads": 2, "pool_mask_padding": True, "n_prototypes": 4,
                        "freeze_prototypes_steps": 1, "moco_queue": 12, "moco_momentum": 0.5, **options})  # fmt: skip
    model = AAHR(cfg, BIGRU, vocab_size=30)
    model._caption_globals = torch.randn(40, GT, generator=torch.Generator().manual_seed(9))  # keys 0..39
    return model


def small_batch(seed=1, batch=6, regions=5, words=7, key_offset=0):
    """A prepared batch: regions + the image's global vector, key + ids."""
    g = torch.Generator().manual_seed(seed)
    img_lengths = torch.randint(2, regions + 1, (batch,), generator=g)
    img_lengths[0] = regions
    cap_lengths = torch.randint(3, words + 1, (batch,), generator=g)
    cap_lengths[0] = words
    images = torch.randn(batch, regions, IMG, generator=g)
    globals_ = torch.randn(batch, GI, generator=g)
    tokens = torch.randint(1, 30, (batch, words), generator=g)
    for b in range(batch):
        images[b, img_lengths[b] :] = 0
        tokens[b, cap_lengths[b] :] = 0
    images = torch.cat([images, globals_[:, None].expand(-1, regions, -1)], dim=2)
    keys = key_offset + torch.arange(batch)
    tokens = torch.cat([keys[:, None], tokens], dim=1)
    image_index = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6][:batch])
    return Batch(images, img_lengths, tokens, cap_lengths + 1, image_index, torch.arange(batch))


def test_test_time_embeddings_do_not_depend_on_the_batch():
    model = small_model().eval()
    batch = small_batch()
    with torch.no_grad():
        images = model.encode_images(batch.images, batch.img_lengths).feats
        captions = model.encode_captions(batch.tokens, batch.cap_lengths).feats
        for b in range(len(batch)):
            n, m = int(batch.img_lengths[b]), int(batch.cap_lengths[b])
            alone_img = model.encode_images(batch.images[b : b + 1, :n], batch.img_lengths[b : b + 1]).feats[0]
            alone_cap = model.encode_captions(batch.tokens[b : b + 1, :m], batch.cap_lengths[b : b + 1]).feats[0]
            assert torch.allclose(images[b], alone_img, atol=1e-5)
            assert torch.allclose(captions[b], alone_cap, atol=1e-5)
    assert bool((images.norm(dim=1) <= 1 + 1e-5).all())


def test_reference_pooling_lets_caption_padding_in():
    model = small_model(pool_mask_padding=False).eval()
    assert model.batch_dependent_captions
    batch = small_batch()
    with torch.no_grad():
        together = model.encode_captions(batch.tokens, batch.cap_lengths).feats
        m = int(batch.cap_lengths[1])
        alone = model.encode_captions(batch.tokens[1:2, :m], batch.cap_lengths[1:2]).feats[0]
    assert not torch.allclose(together[1], alone, atol=1e-4)


def test_clip_branch_off_is_hrem_pooling_guided_by_maxk():
    model = small_model(clip_branch="none").eval()
    assert model.image.gate is None and model.image.projection is None
    batch = small_batch()
    images = batch.images[..., :IMG]
    with torch.no_grad():
        side = model.encode_image_side(images, batch.img_lengths)
        assert torch.allclose(side.fused, F.normalize(side.pooled, dim=1), atol=1e-6)
        z = model.image.attention(side.maxk, model.image.pool.contextualise(side.features, side.lengths), side.lengths)
        assert torch.allclose(side.context, z, atol=1e-6)
    with pytest.raises(ValueError, match="global feature"):
        small_model().encode_images(images, batch.img_lengths)


def test_caption_keys_are_checked():
    model = small_model()
    batch = small_batch(key_offset=38)  # keys 38..43, the table has 40 rows
    with pytest.raises(ValueError, match="global-feature key"):
        model.encode_captions(batch.tokens, batch.cap_lengths)


def test_loss_schedule_and_step_order():
    model = small_model().train()
    model.sampler = argmax_negatives
    batch = small_batch()  # 6 pairs; queue 12 -> full after two steps
    key_before = [p.clone() for p in model.key_image.parameters()]

    def step(n):
        images = model.encode_images(batch.images, batch.img_lengths)
        captions = model.encode_captions(batch.tokens, batch.cap_lengths)
        return model.training_loss(images, captions, batch, step=n)

    loss = step(0)
    parts = model.last_loss
    assert not parts.swav_active and not parts.graph_active and not parts.moco_active
    assert torch.allclose(loss, parts.base) and float(parts.swav) > 0  # computed, not added (§3.5)
    # momentum update happened before the keys: θ_k = 0.5 θ_k + 0.5 θ_q
    for new, old, q in zip(model.key_image.parameters(), key_before, model.image.parameters()):
        assert torch.allclose(new, 0.5 * old + 0.5 * q.detach())
    assert int(model.image_queue.filled) == 6 and int(model.text_queue.pointer) == 6
    step(1)
    assert not model.last_loss.moco_active and model.image_queue.full  # filled by this step's keys
    queue_before = model.text_queue.queue.clone()
    loss = step(2)
    parts = model.last_loss
    assert parts.swav_active and parts.graph_active and parts.moco_active
    expected = parts.base + parts.gnn + 0.2 * parts.swav + 10 * parts.reg + parts.moco
    assert torch.allclose(loss.detach(), expected, atol=1e-5)
    assert float(parts.reg.abs()) >= 0 and not torch.equal(model.text_queue.queue, queue_before)
    loss.backward()
    assert model.prototypes.prototypes.grad is not None
    assert model.relations.gcn_joint.weight.grad is not None and model.relations.gcn_joint.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.key_text.parameters())
    assert model.relations.inter.mlp_t2i[0].weight.grad is None  # plain-mean inter relevance (§8.2)


def test_moco_loss_uses_pre_fusion_queries_and_the_other_queue():
    model = small_model(prototypes=False, instance_relations=False).train()
    model.sampler = argmax_negatives
    batch = small_batch()
    for n in range(2):
        images = model.encode_images(batch.images, batch.img_lengths)
        captions = model.encode_captions(batch.tokens, batch.cap_lengths)
        model.training_loss(images, captions, batch, step=n)
    torch.manual_seed(5)
    images = model.encode_images(batch.images, batch.img_lengths)
    captions = model.encode_captions(batch.tokens, batch.cap_lengths)
    text_queue, image_queue = model.text_queue.negatives().clone(), model.image_queue.negatives().clone()
    key_state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("key_")}
    torch.manual_seed(7)
    model.training_loss(images, captions, batch, step=2)
    # recompute the keys with the same updated key encoders and dropout draws
    updated = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("key_")}
    assert any(not torch.equal(updated[k], key_state[k]) for k in updated)
    torch.manual_seed(7)
    k_img, k_txt = model.momentum_keys(batch)
    expected = (info_nce(images.extras["pooled"], k_txt, text_queue, 0.07)
                + info_nce(captions.extras["pooled"], k_img, image_queue, 0.07))  # fmt: skip
    assert torch.allclose(model.last_loss.moco, expected, atol=1e-4)


def test_course_sized_model_learns():
    """Course dimensions (d = 128, 4 heads, 2 pooling heads, 16 prototypes), every loss active:
    30 steps on one batch lower the loss and raise the matched pairs' scores above the others."""
    torch.manual_seed(0)
    cfg = AAHRConfig(embed_size=128, img_dim=IMG, nhead=4, topk=3, warmup_steps=0, global_img_dim=GI, global_txt_dim=GT,
                     mha_heads=2, pool_mask_padding=True, n_prototypes=16, freeze_prototypes_steps=0, moco_queue=16,
                     moco_momentum=0.9)  # fmt: skip
    model = AAHR(cfg, BIGRU, vocab_size=30).train()
    model._caption_globals = torch.randn(40, GT, generator=torch.Generator().manual_seed(9))
    batch = small_batch(batch=8)
    batch.image_index = torch.arange(8)
    optimiser = torch.optim.AdamW([p for g in model.param_groups(2e-3) for p in g["params"]], lr=2e-3)
    losses = []
    for n in range(30):
        images = model.encode_images(batch.images, batch.img_lengths)
        captions = model.encode_captions(batch.tokens, batch.cap_lengths)
        loss = model.training_loss(images, captions, batch, step=n)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert model.last_loss.moco_active and model.last_loss.graph_active and model.last_loss.swav_active
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[2:7])
    model.eval()
    with torch.no_grad():
        scores = model.encode_images(batch.images, batch.img_lengths).feats @ model.encode_captions(batch.tokens, batch.cap_lengths).feats.t()
    assert (scores.argmax(1) == torch.arange(8)).float().mean() >= 0.75


def test_presets_variants_and_registry():
    spec = get_method("aahr")
    assert spec.config_cls is AAHRConfig
    f30k, coco = spec.preset("paper-f30k"), spec.preset("paper-coco")
    assert (f30k.model.n_prototypes, coco.model.n_prototypes) == (384, 768)
    assert (f30k.model.mask_weight, coco.model.mask_weight, coco.model.triplet_cutoff) == (1.0, 1.5, 1.9)
    assert f30k.train.epochs == 40 and coco.train.batch_size == 256 and f30k.model.moco_queue == 2048
    assert not f30k.model.pool_mask_padding and spec.preset("course").model.pool_mask_padding
    assert set(spec.variants) >= {"no-clip", "no-prototypes", "no-momentum"}
    model = small_model(prototypes=False, momentum=False, instance_relations=False)
    assert model.prototypes is None and model.key_image is None and model.relations is None


# ----------------------------------------------------------------------------- checkpoint (§7)


def linear(g, out, inp, prefix):
    return {f"{prefix}weight": 0.1 * torch.randn(out, inp, generator=g), f"{prefix}bias": 0.1 * torch.randn(out, generator=g)}


def side_state(g, d, clip, heads):
    state = {**linear(g, d, clip, "fc_clip.fc."), **linear(g, d, clip, "fc_clip.mlp.layers.0."),
             **linear(g, d, 2 * d, "gated_fusion.fc_gate.")}  # fmt: skip
    for kind in ("query", "key", "value"):
        for h in range(heads):
            state.update(linear(g, d, d, f"mha_pool.{kind}.{h}."))
    state.update({"aggr.layers.0.self_attn.in_proj_weight": torch.randn(3 * d, d, generator=g),
                  "aggr.layers.0.self_attn.in_proj_bias": torch.randn(3 * d, generator=g),
                  **linear(g, d, d, "aggr.layers.0.self_attn.out_proj."), **linear(g, d, d, "aggr.layers.0.linear1."),
                  **linear(g, d, d, "aggr.layers.0.linear2."),
                  "aggr.layers.0.norm1.weight": torch.ones(d), "aggr.layers.0.norm1.bias": torch.zeros(d),
                  "aggr.layers.0.norm2.weight": torch.ones(d), "aggr.layers.0.norm2.bias": torch.zeros(d)})  # fmt: skip
    return state


@pytest.fixture(scope="module")
def bert_state():
    from transformers import AutoModel

    from itmkit.models.text_encoders import default_hf_path

    backbone = AutoModel.from_pretrained(default_hf_path(), local_files_only=True)
    return {f"bert.{k}": v.clone() for k, v in backbone.state_dict().items()}


def reference_checkpoint(bert_state, d=32, img=24, clip=20, heads=3, prefix=""):
    g = torch.Generator().manual_seed(4)
    image = {**linear(g, d, img, "fc.fc."), **linear(g, d // 2, img, "fc.mlp.layers.0."),
             **linear(g, d, d // 2, "fc.mlp.layers.1."), **side_state(g, d, clip, heads)}  # fmt: skip
    for i, n in ((0, d // 2), (1, d)):
        image.update({f"fc.mlp.bns.{i}.weight": torch.rand(n, generator=g), f"fc.mlp.bns.{i}.bias": torch.rand(n, generator=g),
                      f"fc.mlp.bns.{i}.running_mean": torch.rand(n, generator=g),
                      f"fc.mlp.bns.{i}.running_var": torch.rand(n, generator=g) + 0.5,
                      f"fc.mlp.bns.{i}.num_batches_tracked": torch.tensor(7)})  # fmt: skip
    hidden = bert_state["bert.embeddings.word_embeddings.weight"].shape[1]
    text = {**bert_state, **linear(g, d, hidden, "linear."), **side_state(g, d, clip, heads)}
    opt = argparse.Namespace(dataset="coco", nhead=4, residual_weight=0.8, learning_rate=5e-4, num_epochs=40, batch_size=256,
                             lr_schedules=[15, 25], warmup=8000, mask_weight=1.5, nmb_prototypes=768, moco_M=2048)  # fmt: skip
    return {"model": [{prefix + k: v for k, v in image.items()}, {prefix + k: v for k, v in text.items()}],
            "opt": opt, "epoch": 40, "best_rsum": 540.8, "Eiters": 88000}  # fmt: skip


def test_converter_loads_the_released_layout_strictly(bert_state):
    checkpoint = reference_checkpoint(bert_state, prefix="module.")
    run_cfg, _ = convert_checkpoint(checkpoint)
    m = run_cfg.model
    assert (m.embed_size, m.img_dim, m.global_img_dim, m.global_txt_dim, m.mha_heads, m.nhead) == (32, 24, 20, 20, 3, 4)
    assert not (m.instance_relations or m.prototypes or m.momentum) and m.n_prototypes == 768 and m.mask_weight == 1.5
    assert run_cfg.train.batch_size == 256 and run_cfg.data.test_split == "testall"
    model, _ = load_reference_checkpoint(checkpoint)
    img, txt = checkpoint["model"]
    assert torch.equal(model.image.projection.extra.weight, img["module.fc_clip.mlp.layers.0.weight"])
    assert torch.equal(model.text.attention.value[2].bias, txt["module.mha_pool.value.2.bias"])
    assert torch.equal(model.image.gate.fc_gate.weight, img["module.gated_fusion.fc_gate.weight"])
    assert torch.equal(model.image.fragments.mlp.bns[1].running_var, img["module.fc.mlp.bns.1.running_var"])
    assert torch.equal(model.text.pool.transformer.layers[0].linear1.weight, txt["module.aggr.layers.0.linear1.weight"])
    assert not model.training


def test_converter_names_bad_input(bert_state):
    checkpoint = reference_checkpoint(bert_state)
    checkpoint["model"][0]["mha_pool.query.9.weight"] = torch.zeros(32, 32)
    with pytest.raises(CheckpointMismatchError, match="image.attention.query.9.weight"):
        load_reference_checkpoint(checkpoint)
    del checkpoint["model"][0]["mha_pool.query.9.weight"]
    del checkpoint["model"][1]["gated_fusion.fc_gate.bias"]
    with pytest.raises(CheckpointMismatchError, match="text.gate.fc_gate.bias"):
        load_reference_checkpoint(checkpoint)
    with pytest.raises(aahr.CheckpointFormatError, match="img_enc"):
        convert_checkpoint({"model": [{"fc.fc.weight": torch.zeros(2, 2)}, checkpoint["model"][1]]})


# ----------------------------------------------------------------------------- global features


def tiny_precomp(tmp_path, n_images=3):
    root = tmp_path / "precomp"
    root.mkdir()
    rng = np.random.default_rng(0)
    np.save(root / "test_ims.npy", rng.standard_normal((n_images, 4, IMG)).astype(np.float32))
    captions = [f"image {i} caption {k}" for i in range(n_images) for k in range(5)]
    (root / "test_caps.txt").write_text("\n".join(captions) + "\n")
    (root / "test_ids.txt").write_text("\n".join(str(100 + i) for i in range(n_images)) + "\n")
    return root, captions


def test_missing_global_features_list_the_files_to_supply(tmp_path):
    from itmkit.data.precomp import PrecompSplit
    from itmkit.data.text import WordIdPipeline
    from itmkit.data.vocab import Vocabulary

    root, captions = tiny_precomp(tmp_path)
    split = PrecompSplit.open(root, "test")
    model = small_model(global_img_dim=GI, global_txt_dim=GT)
    with pytest.raises(DataFormatError, match=r"test_clip_img\.npy.*test_clip_cap\.npy.*clip_branch='none'"):
        model.prepare_data(split, None)
    from itmkit.data.global_features import write_global_features

    write_global_features(root, "test", np.ones((3, GI)), np.arange(15 * GT, dtype=np.float32).reshape(15, GT))
    vocab = Vocabulary.build(captions, threshold=1)
    prepared, pipeline = model.prepare_data(split.subset(1, 3), WordIdPipeline(vocab))
    assert isinstance(pipeline, GlobalKeyPipeline) and prepared.images[0].shape == (4, IMG + GI)
    ids = pipeline.encode(captions[7])  # caption 2 of the view (file caption 7)
    _, lengths, found = model._caption_inputs(torch.tensor([ids]), torch.tensor([len(ids)]))
    assert torch.equal(found[0], torch.arange(7 * GT, 8 * GT, dtype=torch.float32)) and int(lengths[0]) == len(ids) - 1
    assert model.prepare_data(prepared, pipeline)[1] is pipeline  # idempotent
    np.save(root / "test_clip_cap.npy", np.zeros((14, GT), np.float32))
    with pytest.raises(DataFormatError, match="rows"):
        small_model().prepare_data(split, None)


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"data_prep_{name}", REPO_ROOT / "data_prep" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clip_features_command_writes_arrays_with_given_encoders(tmp_path, capsys):
    root, captions = tiny_precomp(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{100 + i}.jpg").write_bytes(b"x")
    weights = tmp_path / "open_clip_pytorch_model.bin"
    weights.write_bytes(b"x")
    script = load_script("clip_features")
    fake = (lambda paths: np.array([[float(p.stem), 1.0] for p in paths]), lambda texts: np.array([[len(t), 2.0, 3.0] for t in texts]))
    argv = [str(root), "--checkpoint", str(weights), "--images", str(images), "--batch-size", "2"]
    assert script.main(argv, encoders=fake) == 0
    img, cap = np.load(root / "test_clip_img.npy"), np.load(root / "test_clip_cap.npy")
    np.testing.assert_array_equal(img[:, 0], [100, 101, 102])
    np.testing.assert_array_equal(cap[:, 0], [len(c) for c in captions])
    (images / "101.jpg").unlink()
    assert script.main(argv, encoders=fake) == 2
    assert "101.jpg" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args([str(root), "--checkpoint", str(tmp_path / "nothing.bin"), "--images", str(images)])
    assert "nothing.bin" in capsys.readouterr().err


def test_embedded_global_features_use_the_whole_image_box():
    from itmkit.data.embedded import embedded_dataset
    from itmkit.data.global_features import embedded_global_features, whole_image_rows
    from itmkit.data.precomp import PrecompSplit

    split = PrecompSplit.open(embedded_dataset("tiny", progress=False), "test")
    found = embedded_global_features(split)
    rows = whole_image_rows(np.asarray(split.boxes))
    boxes = np.asarray(split.boxes)[np.arange(split.n_images), rows]
    assert np.allclose(boxes[:, :2], 0) and np.allclose(boxes[:, 2], boxes[:, 3])  # [0, 0, size, size]
    np.testing.assert_allclose(found.images[1], split.image_features(1)[rows[1]])
    assert found.captions.shape == (split.n_captions, 384)
    same = [i for i in range(1, split.n_captions) if split.captions[i] == split.captions[0]]
    for i in same:  # a repeated caption gets the same vector
        np.testing.assert_array_equal(found.captions[i], found.captions[0])


# ----------------------------------------------------------------------------- notebook tables


def test_set_views_and_tables_on_the_tiny_set():
    from itmkit.data.embedded import embedded_dataset
    from itmkit.data.precomp import PrecompSplit
    from itmkit.data.text import build_text_pipeline

    run_cfg = get_method("aahr").preset("smoke")
    root = embedded_dataset("tiny", progress=False)
    split = PrecompSplit.open(root, "test")
    pipeline = build_text_pipeline(run_cfg.text, PrecompSplit.open(root, "train").captions, root)
    torch.manual_seed(0)
    model = get_method("aahr").build(run_cfg, pipeline.vocab_size).train()
    views = aahr.set_views(model, split, pipeline)
    assert model.training  # mode restored
    assert views.images.shape == (split.n_images, 32) and views.caption_gate.shape == (split.n_captions, 32)
    np.testing.assert_allclose(views.caption_assign.sum(1), 1, rtol=1e-5)
    with torch.no_grad():
        model.eval()
        from itmkit.evaluate.evaluator import encode_split

        images, captions = encode_split(model, split, pipeline, progress=False)
    np.testing.assert_allclose(views.images, images.feats.numpy(), atol=1e-5)
    np.testing.assert_allclose(views.captions, captions.feats.numpy(), atol=1e-5)
    table = aahr.prototype_table(views, split.captions)
    assert table["images"].sum() == split.n_images and table["captions"].sum() == split.n_captions
    top_img, top_cap = views.image_assign.argmax(1), views.caption_assign.argmax(1)
    p = int(table["prototype"].iloc[0])
    mine = top_cap == p
    assert table["captions_with_own_image"].iloc[0] == pytest.approx((top_img[views.caption_image[mine]] == p).mean())
    soft = aahr.soft_positive_table(views, split.captions, n=3)
    entropy = -(views.caption_assign * np.log(views.caption_assign)).sum(1)
    assert soft["entropy"].iloc[0] == pytest.approx(entropy.max(), rel=1e-5)
    assert (soft["top_weight"] >= soft["second_weight"]).all()
    gates = aahr.gate_table(views)
    assert gates.loc[0, "mean"] == pytest.approx(views.image_gate.mean(), rel=1e-5)
