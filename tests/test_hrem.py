"""HREM (hrem.md): the encoders against a per-item reference, test-time independence from the batch,
the training loss (warm-up, parts, gradients), the notebook's batch-graph tables, presets, the
trainer running it, and the released-checkpoint converter on the §7 key names and shapes."""

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itmkit.checkpoints import CheckpointMismatchError
from itmkit.config import RunConfig, TextConfig, replace_nested
from itmkit.data.loaders import Batch
from itmkit.encoded import Encoded
from itmkit.losses import argmax_negatives, distance_weighted_triplet_loss, same_image_mask
from itmkit.methods import hrem
from itmkit.methods.hrem import HREM, METHOD, HREMConfig, batch_graph, convert_checkpoint, load_reference_checkpoint
from itmkit.methods.registry import get_method
from itmkit.models.instance_graph import relevance_regulariser

BIGRU = TextConfig(kind="bigru", word_dim=8)


def small_model(seed=0, **options):
    torch.manual_seed(seed)
    cfg = HREMConfig(**{"embed_size": 16, "img_dim": 12, "nhead": 4, "topk": 3, "warmup_steps": 5, **options})
    return HREM(cfg, BIGRU, vocab_size=30)


def small_batch(seed=1, batch=6, regions=5, words=7):
    generator = torch.Generator().manual_seed(seed)
    img_lengths = torch.randint(2, regions + 1, (batch,), generator=generator)
    img_lengths[0] = regions
    cap_lengths = torch.randint(3, words + 1, (batch,), generator=generator)
    cap_lengths[0] = words
    images = torch.randn(batch, regions, 12, generator=generator)
    tokens = torch.randint(1, 30, (batch, words), generator=generator)
    for b in range(batch):
        images[b, img_lengths[b]:] = 0
        tokens[b, cap_lengths[b]:] = 0
    image_index = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6][:batch])  # pairs 0 and 1 share an image
    return Batch(images, img_lengths, tokens, cap_lengths, image_index, torch.arange(batch))


# ----------------------------------------------------------------------------- encoders


def test_image_embedding_against_a_per_item_reference():
    model = small_model().eval()
    batch = small_batch()
    with torch.no_grad():
        got = model.encode_images(batch.images, batch.img_lengths).feats
        for b in range(len(batch)):
            x = batch.images[b, : batch.img_lengths[b]]
            mlp = model.image.mlp
            hidden = F.relu(mlp.bns[0](mlp.layers[0](x)))  # eval BatchNorm: running statistics
            fragments = model.image.fc(x) + mlp.layers[1](hidden)
            r = fragments.sort(dim=0, descending=True).values[:2].mean(0)
            z = model.image_pool.transformer(fragments[:, None]).squeeze(1).mean(0)  # no padding at all
            e = 0.8 * r + 0.2 * z
            assert torch.allclose(got[b], e / (e.norm() + 1e-8), atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(len(batch)), atol=1e-5)


def test_test_time_embeddings_do_not_depend_on_the_batch():
    model = small_model().eval()
    batch = small_batch(batch=6)
    with torch.no_grad():
        images = model.encode_images(batch.images, batch.img_lengths).feats
        captions = model.encode_captions(batch.tokens, batch.cap_lengths).feats
        for b in range(len(batch)):
            n, m = int(batch.img_lengths[b]), int(batch.cap_lengths[b])
            alone_image = model.encode_images(batch.images[b : b + 1, :n], batch.img_lengths[b : b + 1]).feats
            alone_caption = model.encode_captions(batch.tokens[b : b + 1, :m], batch.cap_lengths[b : b + 1]).feats
            assert torch.allclose(alone_image[0], images[b], atol=1e-5)
            assert torch.allclose(alone_caption[0], captions[b], atol=1e-5)
        # garbage in every padded region / token slot changes nothing
        noisy_images = batch.images.clone()
        noisy_tokens = batch.tokens.clone()
        for b in range(len(batch)):
            noisy_images[b, batch.img_lengths[b]:] = 100.0
            noisy_tokens[b, batch.cap_lengths[b]:] = 17
        assert torch.allclose(model.encode_images(noisy_images, batch.img_lengths).feats, images, atol=1e-5)
        assert torch.allclose(model.encode_captions(noisy_tokens, batch.cap_lengths).feats, captions, atol=1e-5)


def test_bert_text_path_keeps_padded_states_and_embeds_independently():
    torch.manual_seed(0)
    model = HREM(HREMConfig(embed_size=16, img_dim=12, nhead=4), TextConfig(kind="hf"), None).eval()
    tokens = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0]])
    lengths = torch.tensor([6, 3])
    with torch.no_grad():
        fragments = model.caption_fragments(tokens, lengths)
        assert fragments.features[1, 3:].abs().sum() > 0  # projected [PAD] states kept (§3.3, §8.4)
        alone = model.encode_captions(tokens[1:, :3], lengths[1:]).feats
        assert torch.allclose(alone[0], fragments.embedding[1], atol=1e-5)
    assert [g["name"] for g in model.param_groups(1e-3)] == ["main", "backbone"]


def test_training_extras_only_in_training_mode_and_the_loss_needs_them():
    model = small_model()
    batch = small_batch()
    model.train()
    encoded = model.encode_images(batch.images, batch.img_lengths)
    assert set(encoded.extras) == {"fragments", "fragment_lengths", "pooled"}
    assert encoded.extras["fragments"].shape == (6, 5, 16)
    # padded region slots keep fc(0) + mlp(0) (non-zero), as the relation matching reads them
    short = int(torch.argmin(batch.img_lengths))
    assert encoded.extras["fragments"][short, batch.img_lengths[short]:].abs().sum() > 0
    model.eval()
    plain = model.encode_images(batch.images, batch.img_lengths)
    assert plain.extras == {}
    with pytest.raises(ValueError, match="training mode"):
        model.training_loss(plain, plain, batch, step=0)


# ----------------------------------------------------------------------------- training loss


def encode(model, batch):
    return model.encode_images(batch.images, batch.img_lengths), model.encode_captions(batch.tokens, batch.cap_lengths)


def test_loss_before_and_after_the_warmup():
    model = small_model(dropout=0.0)
    model.sampler = argmax_negatives
    batch = small_batch()
    model.train()
    images, captions = encode(model, batch)
    positives = same_image_mask(batch.image_index)

    before = model.training_loss(images, captions, batch, step=4)
    expected_base, _ = distance_weighted_triplet_loss(images.feats @ captions.feats.t(), positives, sampler=argmax_negatives)
    assert before.item() == pytest.approx(expected_base.item(), abs=1e-5)
    assert not model.last_loss.graph_active and model.last_loss.gnn == 0 and model.last_loss.reg == 0
    before.backward(retain_graph=True)
    assert all(p.grad is None for p in model.relations.parameters())  # the graph has not started

    model.zero_grad()
    after = model.training_loss(images, captions, batch, step=5)
    parts = model.last_loss
    assert parts.graph_active
    # independent composition: the enhanced embeddings from the relation module, the three
    # cross losses and the KL term computed here, then 1 x base + 1 x gnn + 10 x reg
    fragments_i, fragments_t = model._from_encoded(images, "images"), model._from_encoded(captions, "captions")
    graph, v_hat, t_hat = model.relations.enhance(fragments_i, fragments_t)
    v, t = images.feats, captions.feats
    gnn = sum(distance_weighted_triplet_loss(a @ b.t(), positives, sampler=argmax_negatives)[0]
              for a, b in ((v, t_hat), (v_hat, t), (v_hat, t_hat)))  # fmt: skip
    reg = relevance_regulariser(v, t, graph)
    assert parts.gnn.item() == pytest.approx(gnn.item(), abs=1e-4)
    assert parts.reg.item() == pytest.approx(reg.item(), abs=1e-6)
    assert after.item() == pytest.approx(expected_base.item() + gnn.item() + 10 * reg.item(), abs=1e-4)
    after.backward()
    assert model.relations.graph.layers[0].self_attn.in_proj_weight.grad.abs().sum() > 0
    assert model.relations.inter.mlp_t2i[3].bias.grad is not None  # through the mask and the KL target


def test_vse_base_loss_is_the_hinge_with_same_image_positives():
    from itmkit.losses import hinge_triplet_loss

    model = small_model(base_loss="vse", instance_relations=False)
    batch = small_batch()
    model.train()
    images, captions = encode(model, batch)
    loss = model.training_loss(images, captions, batch, step=0, margin=0.3, max_violation=True)
    scores = images.feats @ captions.feats.t()
    expected = hinge_triplet_loss(scores, 0.3, True, positives=same_image_mask(batch.image_index))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert not model.last_loss.graph_active  # no relation modules: base loss only, at any step


def test_graph_lr_factor_puts_the_relations_in_their_own_group():
    model = small_model(graph_lr_factor=0.5)
    groups = model.param_groups(1e-3)
    named = {g["name"]: g for g in groups}
    assert named["relations"]["lr"] == pytest.approx(5e-4)
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups)) == sum(1 for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- batch graph tables


def test_batch_graph_tables_are_deterministic_and_consistent():
    model = small_model()
    model.train()
    batch = small_batch()
    tables = batch_graph(model, batch)
    assert model.training  # mode restored
    again = batch_graph(model, batch)
    assert np.array_equal(tables.connect, again.connect) and np.allclose(tables.relevance, again.relevance)
    b = len(batch)
    assert list(tables.nodes["modality"]) == ["image"] * b + ["caption"] * b
    assert len(tables.edges) == int(tables.connect.sum())
    edge = tables.edges.iloc[len(tables.edges) // 2]
    assert tables.relevance[edge["source"], edge["target"]] == pytest.approx(edge["relevance"])
    blocks = {("i2i"): (0, 0), "i2t": (0, 1), "t2i": (1, 0), "t2t": (1, 1)}
    for _, row in tables.edges.iterrows():
        assert blocks[row["block"]] == (int(row["source"] >= b), int(row["target"] >= b))
    # attention runs over kept edges only and sums to 1 per attending node
    sums = tables.edges.groupby("source")["attention"].sum()
    assert np.allclose(sums.to_numpy(), 1.0, atol=1e-5)
    # pairs 0 and 1 share image 0: their image nodes are flagged as the same image
    pair = tables.edges[(tables.edges["source"] == 0) & (tables.edges["target"] == 1)]
    assert pair.empty or bool(pair["same_image"].iloc[0])
    assert tables.embeddings.shape == tables.enhanced.shape == (2 * b, 16)
    assert np.allclose(np.linalg.norm(tables.enhanced, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="instance_relations"):
        batch_graph(small_model(instance_relations=False), batch)


# ----------------------------------------------------------------------------- presets, trainer


def test_presets_and_variants():
    course = METHOD.preset("course")
    assert course.model.embed_size == 128 and course.text.kind == "bigru" and course.data.embedded_preset == "course"
    assert course.model.warmup_steps < course.train.epochs * 47
    paper = METHOD.preset("paper")
    assert paper.text.kind == "hf" and paper.model.embed_size == 1024 and paper.train.lr_decay_epochs == (15, 25)
    assert paper.model.warmup_steps == 8000 and paper.train.weight_decay == 1e-4
    coco = METHOD.preset("paper-coco-bert")
    assert coco.model.triplet_cutoff == 1.9 and coco.model.mask_weight == 1.5 and coco.train.batch_size == 256
    hardest = replace_nested(course, METHOD.variants["hardest"])
    assert hardest.model.base_loss == hardest.model.gnn_loss == "vse" and hardest.train.sum_warmup_epochs == 0
    assert get_method("hrem") is METHOD
    with pytest.raises(ValueError, match="base_loss"):
        HREMConfig(base_loss="nope")


def test_smoke_preset_trains_with_the_graph(tmp_path):
    from itmkit.train.trainer import train

    cfg = replace_nested(METHOD.preset("smoke"), {"train.epochs": 1, "train.device": "cpu"})
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.finished
    assert result.model.last_loss is not None and result.model.last_loss.graph_active  # warm-up 4 < 8 steps
    assert np.isfinite(result.log["loss"]).all()
    assert result.test_metrics is not None


# ----------------------------------------------------------------------------- converter (§7)

D, IMG = 32, 24


def reference_image_state(d=D, img_dim=IMG):
    """``img_enc.state_dict()`` key names and shapes of hrem.md §7, written out by hand."""
    g = torch.Generator().manual_seed(3)
    shapes = {
        "fc.fc.weight": (d, img_dim), "fc.fc.bias": (d,),
        "fc.mlp.layers.0.weight": (d // 2, img_dim), "fc.mlp.layers.0.bias": (d // 2,),
        "fc.mlp.layers.1.weight": (d, d // 2), "fc.mlp.layers.1.bias": (d,),
    }  # fmt: skip
    for i, n in ((0, d // 2), (1, d)):
        shapes.update({f"fc.mlp.bns.{i}.weight": (n,), f"fc.mlp.bns.{i}.bias": (n,),
                       f"fc.mlp.bns.{i}.running_mean": (n,), f"fc.mlp.bns.{i}.running_var": (n,)})  # fmt: skip
    state = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    for i in (0, 1):
        state[f"fc.mlp.bns.{i}.running_var"] = state[f"fc.mlp.bns.{i}.running_var"].abs() + 0.5
        state[f"fc.mlp.bns.{i}.num_batches_tracked"] = torch.tensor(7)
    state.update(reference_aggr(d, g))
    return state


def reference_aggr(d, g):
    shapes = {
        "aggr.layers.0.self_attn.in_proj_weight": (3 * d, d), "aggr.layers.0.self_attn.in_proj_bias": (3 * d,),
        "aggr.layers.0.self_attn.out_proj.weight": (d, d), "aggr.layers.0.self_attn.out_proj.bias": (d,),
        "aggr.layers.0.linear1.weight": (d, d), "aggr.layers.0.linear1.bias": (d,),
        "aggr.layers.0.linear2.weight": (d, d), "aggr.layers.0.linear2.bias": (d,),
        "aggr.layers.0.norm1.weight": (d,), "aggr.layers.0.norm1.bias": (d,),
        "aggr.layers.0.norm2.weight": (d,), "aggr.layers.0.norm2.bias": (d,),
    }  # fmt: skip
    return {k: 0.1 * torch.randn(*s, generator=g) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def bert_state():
    from transformers import AutoModel

    from itmkit.models.text_encoders import default_hf_path

    backbone = AutoModel.from_pretrained(default_hf_path(), local_files_only=True)
    return {f"bert.{k}": v.clone() for k, v in backbone.state_dict().items()}


def reference_checkpoint(bert_state, prefix="", **opt):
    g = torch.Generator().manual_seed(4)
    hidden = bert_state["bert.embeddings.word_embeddings.weight"].shape[1]
    text = dict(bert_state)
    text["linear.weight"], text["linear.bias"] = torch.randn(D, hidden, generator=g), torch.randn(D, generator=g)
    text.update(reference_aggr(D, g))
    image = reference_image_state()
    namespace = argparse.Namespace(dataset="coco", nhead=4, residual_weight=0.7, learning_rate=5e-4, num_epochs=30,
                                   batch_size=256, lr_schedules=[15, 25], warmup=8000, mask_weight=1.5, **opt)  # fmt: skip
    return {"model": [{prefix + k: v for k, v in image.items()}, {prefix + k: v for k, v in text.items()}],
            "opt": namespace, "epoch": 30, "best_rsum": 540.0, "Eiters": 66000}  # fmt: skip


def test_image_encoder_parameter_count_matches_the_released_one():
    model = HREM(HREMConfig(instance_relations=False), BIGRU, vocab_size=10)
    count = sum(p.numel() for p in model.image.parameters()) + sum(p.numel() for p in model.image_pool.parameters())
    assert count == 9_977_344  # hrem.md §7, img_enc at d = 1024


def test_converter_loads_the_released_layout_strictly(bert_state):
    checkpoint = reference_checkpoint(bert_state, prefix="module.")  # DataParallel prefix stripped
    run_cfg, state = convert_checkpoint(checkpoint)
    assert run_cfg.model.embed_size == D and run_cfg.model.img_dim == IMG and run_cfg.model.nhead == 4
    assert run_cfg.model.residual_weight == 0.7 and run_cfg.model.mask_weight == 1.5
    assert run_cfg.model.triplet_cutoff == 1.9 and not run_cfg.model.instance_relations
    assert run_cfg.train.batch_size == 256 and run_cfg.train.lr_decay_epochs == (15, 25)
    assert run_cfg.data.test_split == "testall"
    model, _ = load_reference_checkpoint(checkpoint)
    source_image = checkpoint["model"][0]
    assert torch.equal(model.image.fc.weight, source_image["module.fc.fc.weight"])
    assert torch.equal(model.image.mlp.bns[1].running_var, source_image["module.fc.mlp.bns.1.running_var"])
    assert torch.equal(model.image_pool.transformer.layers[0].self_attn.in_proj_weight,
                       source_image["module.aggr.layers.0.self_attn.in_proj_weight"])  # fmt: skip
    assert torch.equal(model.text_pool.transformer.layers[0].linear2.weight,
                       checkpoint["model"][1]["module.aggr.layers.0.linear2.weight"])  # fmt: skip
    assert not model.training
    with torch.no_grad():  # it embeds: unit vectors
        emb = model.encode_images(torch.randn(2, 4, IMG), torch.tensor([4, 3])).feats
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)


def test_converter_names_bad_input(bert_state):
    checkpoint = reference_checkpoint(bert_state)
    checkpoint["model"][0]["fc.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match="image.fc.extra.weight"):
        load_reference_checkpoint(checkpoint)
    del checkpoint["model"][0]["fc.extra.weight"]
    del checkpoint["model"][1]["aggr.layers.0.norm2.bias"]
    with pytest.raises(CheckpointMismatchError, match="text_pool.transformer.layers.0.norm2.bias"):
        load_reference_checkpoint(checkpoint)
    with pytest.raises(hrem.CheckpointFormatError, match="model"):
        convert_checkpoint({"model": [checkpoint["model"][0]]})
    with pytest.raises(hrem.CheckpointFormatError, match="img_enc"):
        convert_checkpoint({"model": [{"fc.weight": torch.zeros(2, 2)}, checkpoint["model"][1]]})


def test_encoded_roundtrip_types():
    assert isinstance(small_model().eval().encode_captions(torch.tensor([[1, 2, 3]]), torch.tensor([3])), Encoded)
    assert isinstance(METHOD.preset("smoke"), RunConfig)
