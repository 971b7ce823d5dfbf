"""Evaluator: encode once, similarity (embedding and pairwise paths), saved results (§C)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import itmkit.evaluate.evaluator as evaluator
from itmkit.data.precomp import PrecompSplit
from itmkit.data.text import WordIdPipeline
from itmkit.data.vocab import Vocabulary
from itmkit.encoded import Encoded
from itmkit.evaluate.evaluator import encode_split, evaluate_model, similarity_matrix
from itmkit.evaluate.metrics import recall_metrics
from itmkit.evaluate.protocols import Protocol
from itmkit.evaluate.synthetic_precomp import write_synthetic_precomp
from itmkit.models.base import MatchingModel


class MeanModel(MatchingModel):
    """Embedding model: mean of projected regions / embedded words, normalised."""

    pairwise = False

    def __init__(self, img_dim=8, vocab_size=40, d=6):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(img_dim, d)
        self.embed = nn.Embedding(vocab_size, d)

    @staticmethod
    def mean(x, lengths):
        mask = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).to(x.dtype)
        return (x * mask[..., None]).sum(1) / lengths[:, None]

    def sets(self, images, lengths):
        return Encoded(self.image(images), lengths)

    def encode_images(self, images, lengths):
        return Encoded(nn.functional.normalize(self.mean(self.image(images), lengths), dim=-1))

    def encode_captions(self, tokens, lengths):
        return Encoded(nn.functional.normalize(self.mean(self.embed(tokens), lengths), dim=-1))


class PairwiseMeanModel(MeanModel):
    """The same scores computed pairwise from sets: exercises the engine path."""

    pairwise = True

    def encode_images(self, images, lengths):
        return Encoded(self.image(images), lengths)

    def encode_captions(self, tokens, lengths):
        return Encoded(self.embed(tokens), lengths)

    def score_block(self, images, captions):
        a = nn.functional.normalize(self.mean(images.feats, images.lengths), dim=-1)
        b = nn.functional.normalize(self.mean(captions.feats, captions.lengths), dim=-1)
        return a @ b.t()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_synthetic_precomp(tmp_path_factory.mktemp("precomp"), {"dev": 12, "test": 10})
    split = PrecompSplit.open(root, "test")
    pipeline = WordIdPipeline(Vocabulary.build(split.captions, threshold=1))
    return root, split, pipeline


def test_encode_split_once_in_eval_mode(data):
    root, split, pipeline = data
    model = MeanModel(vocab_size=pipeline.vocab_size).train()
    imgs, caps = encode_split(model, split, pipeline, batch_size=4, progress=False)
    assert imgs.feats.shape == (10, 6) and caps.feats.shape == (50, 6)
    assert model.training, "train mode restored"
    assert not imgs.feats.requires_grad
    # batch size does not change the encoding
    imgs2, caps2 = encode_split(model, split, pipeline, batch_size=64, progress=False)
    torch.testing.assert_close(imgs.feats, imgs2.feats)
    torch.testing.assert_close(caps.feats, caps2.feats)
    # the same as encoding by hand
    by_hand = model.encode_images(torch.from_numpy(np.array(split.images)), torch.full((10,), 4))
    torch.testing.assert_close(imgs.feats, by_hand.feats)
    # captions are encoded grouped by length but come back in file order
    for c in (0, 17, 49):
        ids = torch.tensor([pipeline.encode(split.captions[c])])
        own = model.encode_captions(ids, torch.tensor([ids.shape[1]])).feats[0]
        torch.testing.assert_close(caps.feats[c], own)


def test_embedding_similarity_in_shards_and_memmap(data, tmp_path, monkeypatch):
    root, split, pipeline = data
    model = MeanModel(vocab_size=pipeline.vocab_size)
    imgs, caps = encode_split(model, split, pipeline, progress=False)
    expected = (imgs.feats @ caps.feats.t()).numpy()
    monkeypatch.setattr(evaluator, "_CAPTION_SHARD", 7)  # shards that do not divide 50
    np.testing.assert_allclose(similarity_matrix(model, imgs, caps, progress=False), expected, rtol=1e-5, atol=1e-6)
    on_disk = similarity_matrix(model, imgs, caps, out=tmp_path / "s.npy", progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), expected, rtol=1e-5, atol=1e-6)
    assert isinstance(on_disk, np.memmap)


def test_pairwise_path_matches_embedding_path(data):
    root, split, pipeline = data
    emb, pair = MeanModel(vocab_size=pipeline.vocab_size), PairwiseMeanModel(vocab_size=pipeline.vocab_size)
    pair.load_state_dict(emb.state_dict())
    s_emb = similarity_matrix(emb, *encode_split(emb, split, pipeline, progress=False), progress=False)
    s_pair = similarity_matrix(pair, *encode_split(pair, split, pipeline, batch_size=3, progress=False),
                               progress=False, memory_budget=4096)
    np.testing.assert_allclose(s_pair, s_emb, rtol=1e-5, atol=1e-6)


def test_evaluate_model_saves_results(data, tmp_path):
    root, split, pipeline = data
    model = MeanModel(vocab_size=pipeline.vocab_size)
    result = evaluate_model(model, root, "test", pipeline, out_dir=tmp_path / "ev", progress=False)
    assert set(p.name for p in (tmp_path / "ev").iterdir()) == {"metrics.csv", "metrics.json", "sims.npy"}
    sims = np.load(tmp_path / "ev" / "sims.npy")
    assert sims.shape == (10, 50) and sims.dtype == np.float32
    assert result.metric("rsum") == pytest.approx(recall_metrics(sims)["rsum"])
    table = pd.read_csv(tmp_path / "ev" / "metrics.csv")
    assert table["rsum"].iloc[0] == pytest.approx(result.metric("rsum"))
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["info"]["n_images"] == 10


def test_dev_max_captions_and_protocols(data):
    root, split, pipeline = data
    model = MeanModel(vocab_size=pipeline.vocab_size)
    dev = evaluate_model(model, root, "dev", pipeline, max_captions=50, progress=False)
    assert dev.sims.shape == (10, 50)  # first 50 captions = first 10 of the 12 images
    full = evaluate_model(model, root, "dev", pipeline, progress=False)
    assert full.sims.shape == (12, 60)
    np.testing.assert_allclose(full.sims[:10, :50], dev.sims, rtol=1e-5, atol=1e-6)
    five_fold = Protocol("5-fold", n_folds=5)  # coco-5fold-1k's slicing without its 5,000-image size
    both = evaluate_model(model, root, "dev", pipeline, protocol=["test", five_fold], max_captions=50,
                          progress=False)
    assert both.summary["protocol"].tolist() == ["test", "5-fold"]
    assert both.metrics["fold"].tolist() == ["all", "0", "1", "2", "3", "4", "mean"]
    with pytest.raises(ValueError, match="text pipeline"):
        evaluate_model(model, root, "dev", None)


def test_sized_protocol_and_batch_size_refused_before_encoding(data, monkeypatch):
    root, split, pipeline = data
    model = MeanModel(vocab_size=pipeline.vocab_size)

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded before the settings were checked")

    monkeypatch.setattr(model, "encode_images", no_encoding)
    with pytest.raises(ValueError, match=r"protocol 'coco-5k'.*found 12 images x 60 captions"):
        evaluate_model(model, root, "dev", pipeline, protocol="coco-5k", progress=False)
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1, found 0"):
        evaluate_model(model, root, "dev", pipeline, batch_size=0, progress=False)


def test_repeated_images_release_is_encoded_once(data, tmp_path):
    root, split, pipeline = data
    rep = tmp_path / "repeated"
    rep.mkdir()
    np.save(rep / "test_ims.npy", np.repeat(np.array(split.images), 5, axis=0))  # im_div = 1 layout
    (rep / "test_caps.txt").write_text("\n".join(split.captions), encoding="utf-8")
    model = MeanModel(vocab_size=pipeline.vocab_size)
    a = evaluate_model(model, root, "test", pipeline, progress=False)
    b = evaluate_model(model, rep, "test", pipeline, progress=False)
    assert b.sims.shape == (10, 50)
    np.testing.assert_allclose(a.sims, b.sims, rtol=1e-5, atol=1e-6)


def _independent_coco_rows(sims):
    """The two COCO settings of §C.2 computed by slicing by hand: 5 diagonal fold blocks of
    ``n/5`` images x ``n`` captions averaged, and the whole matrix."""
    n = sims.shape[0] // 5
    folds = [recall_metrics(sims[f * n:(f + 1) * n, f * 5 * n:(f + 1) * 5 * n]) for f in range(5)]
    mean = {k: float(np.mean([fold[k] for fold in folds])) for k in folds[0]}
    return folds, mean, recall_metrics(sims)


def test_testall_defaults_to_coco_5fold_1k_and_5k(tmp_path, coco_sized_as):
    root = write_synthetic_precomp(tmp_path / "coco", {"testall": 20, "test": 10})
    coco_sized_as(20)  # COCO testall stands in at 20 images
    pipeline = WordIdPipeline(Vocabulary.build(PrecompSplit.open(root, "testall").captions, threshold=1))
    model = MeanModel(vocab_size=pipeline.vocab_size)
    result = evaluate_model(model, root, "testall", pipeline, out_dir=tmp_path / "ev", progress=False)  # no protocol
    table = result.metrics
    assert table["protocol"].tolist() == ["coco-5fold-1k"] * 6 + ["coco-5k"]
    assert table["fold"].tolist() == ["0", "1", "2", "3", "4", "mean", "all"]
    assert table["n_images"].tolist() == [4] * 6 + [20]
    folds, mean, whole = _independent_coco_rows(np.load(tmp_path / "ev" / "sims.npy"))
    assert mean["rsum"] != pytest.approx(whole["rsum"])  # the two settings differ on this matrix
    for row, expected in zip(table.itertuples(), [*folds, mean, whole]):
        assert {k: getattr(row, k) for k in expected} == pytest.approx(expected), (row.protocol, row.fold)
    assert pd.read_csv(tmp_path / "ev" / "metrics.csv", dtype={"fold": str})["protocol"].tolist() == table["protocol"].tolist()
    # any other split: the whole matrix once
    assert evaluate_model(model, root, "test", pipeline, progress=False).metrics["protocol"].tolist() == ["test"]


def test_float64_scores_reproduce_float64_dot_products(data, tmp_path):
    root, split, pipeline = data
    model = MeanModel(vocab_size=pipeline.vocab_size)
    imgs, caps = encode_split(model, split, pipeline, batch_size=4, progress=False)
    want = imgs.feats.double().numpy() @ caps.feats.double().numpy().T  # the references' encode_data + np.dot
    got = similarity_matrix(model, imgs, caps, progress=False, score_dtype="float64")
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    assert similarity_matrix(model, imgs, caps, progress=False).dtype == np.float32
    # pairwise methods score in float32; float64 stores those scores unchanged (memmap out too)
    pair = PairwiseMeanModel(vocab_size=pipeline.vocab_size)
    pimgs, pcaps = encode_split(pair, split, pipeline, batch_size=4, progress=False)
    s32 = similarity_matrix(pair, pimgs, pcaps, progress=False)
    s64 = similarity_matrix(pair, pimgs, pcaps, progress=False, score_dtype="float64", out=tmp_path / "p.npy")
    assert s64.dtype == np.float64 and np.array_equal(s64, s32.astype(np.float64))
    result = evaluate_model(model, root, "test", pipeline, out_dir=tmp_path / "ev", progress=False,
                            score_dtype="float64")
    assert np.load(tmp_path / "ev" / "sims.npy").dtype == np.float64
    assert result.metric("rsum") == pytest.approx(recall_metrics(want)["rsum"])
    with pytest.raises(ValueError, match=r"score_dtype: expected one of \['float32', 'float64'\], found 'float16'"):
        similarity_matrix(model, imgs, caps, progress=False, score_dtype="float16")


def test_nan_or_collapsed_models_are_errors_naming_model_and_split(data, tmp_path):
    from itmkit.evaluate.collapse import CollapsedScoresError
    from itmkit.evaluate.metrics import NonFiniteScoresError

    root, split, pipeline = data
    model = MeanModel(vocab_size=pipeline.vocab_size)
    with torch.no_grad():
        model.image.weight[0, 0] = float("nan")  # NaN weights used to evaluate to rsum 600
    with pytest.raises(NonFiniteScoresError, match=r"scores of MeanModel on .*/test: expected finite scores"):
        evaluate_model(model, root, "test", pipeline, progress=False)
    flat = MeanModel(vocab_size=pipeline.vocab_size)
    with torch.no_grad():  # every image and caption embeds to the same vector: all scores equal
        flat.image.weight.zero_()
        flat.image.bias.fill_(1.0)
        flat.embed.weight.fill_(1.0)
    with pytest.raises(CollapsedScoresError, match=r"scores of MeanModel on .*/test: expected scores that differ"):
        evaluate_model(flat, root, "test", pipeline, out_dir=tmp_path / "flat", progress=False)
    assert not list((tmp_path / "flat").glob("*.npy")) and not list((tmp_path / "flat").glob(".*"))


def test_stale_temporary_files_are_removed(data, tmp_path):
    root, split, pipeline = data
    out = tmp_path / "ev"
    out.mkdir()
    stale = out / ".sims.npy.k3j_x9a2.tmp.npy"  # what a killed evaluation leaves
    stale.write_bytes(b"x" * 100)
    keep = out / "notes.tmp"
    keep.write_text("mine")
    evaluate_model(MeanModel(vocab_size=pipeline.vocab_size), root, "test", pipeline, out_dir=out, progress=False)
    assert not stale.exists() and keep.exists()
