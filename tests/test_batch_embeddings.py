"""embedding_space.batch_embeddings (notebook 10): a training batch's test-time embeddings.

Checked against each item encoded on its own in eval mode (an independent path: no batching, and
HREM's test-time embedding must not depend on the other items of the batch, hrem.md §3.4), that the
caller's train/eval mode comes back, and that a pairwise method is refused by name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def tiny():
    from itmkit.data.embedded import embedded_dataset
    from itmkit.data.loaders import training_batch
    from itmkit.data.precomp import PrecompSplit
    from itmkit.data.text import WordIdPipeline
    from itmkit.data.vocab import Vocabulary

    split = PrecompSplit.open(embedded_dataset("tiny"), "train")
    pipeline = WordIdPipeline(Vocabulary.build(split.captions, threshold=1))
    batch = training_batch(split, pipeline, batch_size=6, seed=1, epoch=0, index=1)
    return pipeline, batch


def _build(method: str, vocab_size: int):
    from itmkit.methods.registry import get_method

    torch.manual_seed(0)
    return get_method(method).build(get_method(method).preset("smoke"), vocab_size)


def test_batch_embeddings_are_each_items_eval_embedding(tiny):
    from itmkit.evaluate.embedding_space import batch_embeddings

    pipeline, batch = tiny
    model = _build("hrem", pipeline.vocab_size)
    model.train()
    images, captions = batch_embeddings(model, batch)
    assert model.training  # the caller's mode comes back
    assert images.shape == captions.shape == (len(batch.image_index), images.shape[1])

    model.eval()
    with torch.no_grad():  # one item at a time: nothing from the rest of the batch can leak in
        own_images = [model.encode_images(batch.images[i : i + 1], batch.img_lengths[i : i + 1]).feats[0]
                      for i in range(len(images))]  # fmt: skip
        own_captions = []
        for i in range(len(captions)):
            n = int(batch.cap_lengths[i])
            own_captions.append(model.encode_captions(batch.tokens[i : i + 1, :n], batch.cap_lengths[i : i + 1]).feats[0])
    np.testing.assert_allclose(images, torch.stack(own_images).numpy(), atol=1e-5)
    np.testing.assert_allclose(captions, torch.stack(own_captions).numpy(), atol=1e-5)

    model.eval()
    batch_embeddings(model, batch)
    assert not model.training  # an eval-mode model stays in eval mode


def test_batch_embeddings_refuse_a_pairwise_method(tiny):
    from itmkit.evaluate.embedding_space import batch_embeddings

    pipeline, batch = tiny
    model = _build("scan", pipeline.vocab_size)
    model.train()
    with pytest.raises(ValueError, match=r"batch_embeddings: expected one vector per item \[B, d\]"):
        batch_embeddings(model, batch)
    assert model.training
